# Sourced by the .ci scripts: repository root, the venv, and a writable MNIST root.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash .ci/setup
# MNIST: use $BCLIB_DATA when set; else data/ at the root, seeded from ../shared when it is there
# (read-only, so the four files are copied), else torchvision downloads on first use.
if [ -z "${BCLIB_DATA:-}" ]; then
    export BCLIB_DATA="$ROOT/data"
    shared_raw="$ROOT/../shared/data/MNIST/raw"
    if [ -d "$shared_raw" ] && [ ! -f "$BCLIB_DATA/MNIST/raw/t10k-labels-idx1-ubyte.gz" ]; then
        mkdir -p "$BCLIB_DATA/MNIST/raw"
        cp "$shared_raw"/*.gz "$BCLIB_DATA/MNIST/raw/"
    fi
fi
