#!/usr/bin/env bash
# GPU benchmark: ONE command, run from the repository root on a machine with CUDA and torch.
#
#   bash benchmarks/gpu.sh prepare   # here, with internet: fills benchmarks/.vendor (gitignored):
#                                    # the geotorch 0.4.0 wheel unpacked + optree wheels
#   bash benchmarks/gpu.sh           # on the GPU box (no internet): writes $OUT/RESULTS-cuda.md
#                                    # (+ $OUT/cost_vs_n-cuda.png when matplotlib is there)
#
# Installs nothing from the internet. geotorch is put on PYTHONPATH from benchmarks/.vendor
# (carry that folder); without it the GeoTorch columns are skipped with a note. optree (a
# geofunc dependency) is installed from the local wheels only if the machine lacks it.
# Budget: < 6 minutes (the runner stops each case after ~8 s of timed rounds on CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
VENDOR=benchmarks/.vendor

if [[ "${1:-}" == "prepare" ]]; then
    mkdir -p "$VENDOR/wheels" "$VENDOR/site"
    python -m pip download --no-deps --only-binary=:all: geotorch==0.4.0 -d "$VENDOR/wheels"
    for py in 3.10 3.11 3.12 3.13; do
        python -m pip download --no-deps --only-binary=:all: --python-version "$py" \
            --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 optree -d "$VENDOR/wheels" || true
    done
    python - <<'PY'
import glob, zipfile
for w in glob.glob("benchmarks/.vendor/wheels/geotorch-*.whl"):
    zipfile.ZipFile(w).extractall("benchmarks/.vendor/site")
PY
    du -sh "$VENDOR"
    exit 0
fi

OUT="${OUT:-benchmarks}"
mkdir -p "$OUT"
nvidia-smi -L || true
python -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())"
if ! python -c "import optree" 2>/dev/null; then
    python -m pip install --no-index --no-deps --find-links "$VENDOR/wheels" optree -q
fi
export PYTHONPATH="$PWD:$PWD/$VENDOR/site${PYTHONPATH:+:$PYTHONPATH}"
timeout 340 python -m benchmarks --device cuda --out "$OUT/RESULTS-cuda.md" 2>&1 | tee "$OUT/bench-cuda.log"
