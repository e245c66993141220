#!/usr/bin/env bash
# The curate -> align -> re-curate loop (issue 26) on the quickstart: the quickstart's model (round 1) scores
# its own build's images (media.agreement: image-text agreement + image-verified senses, recipes/loop_agreement.yaml),
# the re-balanced survivors become round 2's shards, and three arms are trained and evaluated with the
# quickstart's align recipe, 3 seeds each (bench/curated_vs_random.py): `curated` = round 2 (agreement-filtered),
# `random` = as many captions drawn from round 1's set (unfiltered, equal size), `first` = round 1's set in full.
# Run from anywhere after `bash .ci/install`; runs the quickstart first when its model is missing. Outputs go to
# runs/loop/; every step resumes when interrupted. SEEDS="0" for a quicker single-seed run. Numbers: docs/media.md.
source "$(dirname "$0")/_env.sh"  # strict mode, repo root, .venv, TETHER_SHARED checked
[ -f runs/quickstart/align/model/config.json ] || bash recipes/quickstart.sh
OUT=runs/loop
mkdir -p "$OUT"
T0=$SECONDS
# 1. a copy of the round-1 build (its catalog keeps the caption stages and the stored images), re-judged by its images
if [ ! -f "$OUT/curate/catalog.duckdb" ]; then
  rm -rf "$OUT/curate.tmp"
  cp -a runs/quickstart/curate "$OUT/curate.tmp"
  mv "$OUT/curate.tmp" "$OUT/curate"
fi
curate shard "$OUT/curate" --recipe recipes/loop_agreement.yaml
T1=$SECONDS
# 2. round 2 vs an equal-size random draw of round 1 vs round 1 in full: same recipe, same seeds
read -r -a seeds <<< "${SEEDS:-0 1 2}"
python3 bench/curated_vs_random.py --selection "$OUT/curate/shards/index.parquet" \
  --random-from runs/quickstart/curate/shards/index.parquet --also first=runs/quickstart/curate/shards/index.parquet \
  --config recipes/quickstart_align.yaml --seeds "${seeds[@]}" --out "$OUT/compare"
printf '\nloop: re-curation %d s, three arms trained and evaluated %d s\n' $((T1 - T0)) $((SECONDS - T1))
