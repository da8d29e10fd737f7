#!/usr/bin/env bash
# Prepare, here, what tools/gpu_check.sh needs on a GPU machine that cannot download anything:
# the wheels its Python lacks (submitit, omegaconf; ../shared/docs/GPU_NOTES.md and the device
# tool's KINDS.md list what is there: torch, numpy, pandas, scipy, seaborn, jinja2, tqdm, pillow,
# pyyaml, cloudpickle, typing_extensions, pytest) and the MNIST IDX files, into an ignored folder
# (.gpu_carry/, ~12 MB) that the device tool's `run` takes along with `carry: [".gpu_carry"]`.
#
#   bash tools/gpu_carry.sh            # then: run(command="bash tools/gpu_check.sh", carry=[".gpu_carry"])
#
# Environment: GPU_CHECK_CARRY (the folder, default .gpu_carry), AIR_MNIST_SRC (where MNIST is
# copied from; default $AIR_DATA_DIR, else ../shared/data/mnist beside the checkout), PYTHON.
# The wheels are the versions installed here (what the tests ran with), for CPython 3.12 (the
# GPU machine's); both are pure Python. Needs the package registry (pip download).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
CARRY=${GPU_CHECK_CARRY:-.gpu_carry}
SRC=${AIR_MNIST_SRC:-${AIR_DATA_DIR:-$ROOT/../shared/data/mnist}}
FILES="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz
t10k-labels-idx1-ubyte.gz"

if ! git check-ignore -q "$CARRY/x" 2>/dev/null; then
    echo "tools/gpu_carry.sh: $CARRY is not ignored by git; add '/$CARRY/' to .gitignore" \
         "(or .git/info/exclude) first, else it travels as untracked files" >&2
    exit 2
fi
for f in $FILES; do
    if [ ! -f "$SRC/$f" ]; then
        echo "tools/gpu_carry.sh: MNIST file $SRC/$f not found (set AIR_MNIST_SRC to the folder" \
             "of the four IDX .gz files)" >&2
        exit 1
    fi
done

pins=()
for pkg in submitit omegaconf; do
    version=$("$PY" -c "import importlib.metadata as m; print(m.version('$pkg'))") || {
        echo "tools/gpu_carry.sh: $pkg is not installed here (pip install -e .)" >&2
        exit 1
    }
    pins+=("$pkg==$version")
done
rm -rf "$CARRY/wheels"
mkdir -p "$CARRY/wheels" "$CARRY/mnist"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d "$CARRY/wheels" "${pins[@]}"
for f in $FILES; do
    cp -f "$SRC/$f" "$CARRY/mnist/$f"
done
chmod -R u+w "$CARRY"

echo "carry folder $CARRY ($(du -sh "$CARRY" | cut -f1)):"
ls -la "$CARRY/wheels" "$CARRY/mnist"
echo "what the wheels need (each must be on the GPU machine already):"
for w in "$CARRY"/wheels/*.whl; do
    echo "  $(basename "$w"): $("$PY" -c "
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in z.namelist() if n.endswith('.dist-info/METADATA'))
needs = [l.split(':', 1)[1].strip() for l in z.read(meta).decode().splitlines()
         if l.startswith('Requires-Dist:') and 'extra ==' not in l]
print(', '.join(needs) or 'nothing')" "$w")"
done
echo "next: run(command=\"bash tools/gpu_check.sh\", carry=[\"$CARRY\"], timeout_s=360)"
