#!/usr/bin/env bash
# The offline quickstart: curate → shards → frozen features → projectors → evaluation, on the shared Flickr8k
# photos and ImageNet sample. Run from anywhere after `bash .ci/install`; outputs go to runs/quickstart/.
# Each step resumes when interrupted: rerun the script. Step-by-step explanation: docs/quickstart.md.
source "$(dirname "$0")/_env.sh"  # strict mode, repo root, .venv, TETHER_SHARED checked
OUT=runs/quickstart
mkdir -p "$OUT"
# each step's wall time, summed up at the end (extraction is most of a fresh run; a rerun skips finished work)
T_ALL=$SECONDS
TIMES=()
step() {
  local name=$1 t0=$SECONDS
  shift
  "$@"
  TIMES+=("$name $((SECONDS - t0))")
}

# 1. curate: TRAIN-split captions (include_images; the test images stay unseen until evaluation) → ImageNet/
#    WordNet concepts → lexical matching → t-balancing → image dedup → shards
step curate curate build recipes/quickstart_curate.yaml --out "$OUT/curate" \
  --set sources.0.path="$F/captions.txt" --set sources.0.include_images="$F/train_images.txt" \
  --set balance.t=30 --set 'media={shards: {samples_per_shard: 1000}}'

# 2. frozen EfficientNet-Lite0 + all-MiniLM-L6-v2 features of the shards and of the Flickr8k test split
step extract align extract --config recipes/quickstart_align.yaml
# 3. train the two projectors from the cached features
step train align train --config recipes/quickstart_align.yaml
# 4. retrieval: 1,000 Flickr8k test images × 5,000 captions, from the cached test features
step eval align eval "$OUT/align/model" --task retrieval --features "$OUT/cache/val" --out "$OUT/eval"
# 5. zero-shot: 1,000-class ImageNet sample
step eval align eval "$OUT/align/model" --task zeroshot --data "$S/data/imagenet-sample" --prompts photo --out "$OUT/eval"

cat "$OUT/eval/retrieval.md" "$OUT/eval/zeroshot.md"
total=$((SECONDS - T_ALL))
summary=$(for t in "${TIMES[@]}"; do echo "$t"; done | awk -v all="$total" '
  { s[$1] += $2; if (!($1 in seen)) { seen[$1] = 1; order[++n] = $1 } }
  END { for (i = 1; i <= n; i++) { k = order[i]; printf "%s%s %d s (%d %%)", (i > 1 ? ", " : ""), k, s[k], (all ? 100 * s[k] / all : 0) } }')
printf '\nquickstart: %d min %02d s in all: %s\n' $((total / 60)) $((total % 60)) "$summary"
