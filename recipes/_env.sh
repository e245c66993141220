# Sourced by the recipes/*.sh scripts: strict mode, the repository root as working directory, the project
# environment that .ci/install made, offline hub settings and the shared data (TETHER_SHARED) checked.
set -euo pipefail
cd "$(dirname "$0")/.."
# the project environment that .ci/install made (skip when one is already active)
VENV="${TETHER_VENV:-.venv}"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "$VENV/bin/activate" ]; then
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
fi
if ! command -v curate >/dev/null 2>&1; then
  echo "error: curate not found: run \`bash .ci/install\` first (it installs tether into $VENV)" >&2
  exit 2
fi
export NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
S="${TETHER_SHARED:-$(cd .. && pwd)/shared}"
F="$S/data/flickr8k"
for need in "$F/captions.txt" "$F/train_images.txt" "$F/images" "$S/data/imagenet-sample"; do
  if [ ! -e "$need" ]; then
    echo "error: $need not found: set TETHER_SHARED to the folder holding data/flickr8k and data/imagenet-sample" >&2
    exit 2
  fi
done
export TETHER_SHARED="$S"
