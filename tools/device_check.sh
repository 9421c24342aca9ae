#!/usr/bin/env bash
# The GPU path end to end on one device: tools/device_check.sh [--device cuda|cpu] [--wheels DIR] [--report docs/gpu.md] [...]
# It checks that the Python packages hinge needs are importable, installs the missing ones from --wheels DIR
# (wheels made here with `make device-wheels`, for a machine without the internet), then runs tools/device_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
wheels=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) wheels="$2"; shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
# import name:pip name of each package hinge needs at run time
needed="torch:torch typer:typer rich:rich anndata:anndata h5py:h5py numpy:numpy scipy:scipy pandas:pandas yaml:pyyaml PIL:pillow
        openslide:openslide-python openslide_bin:openslide-bin tifffile:tifffile imagecodecs:imagecodecs safetensors:safetensors
        matplotlib:matplotlib"
missing=()
for pair in $needed; do
    "$PYTHON" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ -z "$wheels" ]; then
        echo "device check: $PYTHON lacks ${missing[*]}; make wheels with \`make device-wheels\` and pass --wheels build/device-wheels" >&2
        exit 2
    fi
    echo "device check: installing ${missing[*]} from $wheels"
    "$PYTHON" -m pip install -q --no-index --find-links "$wheels" "${missing[@]}"
fi
if ! "$PYTHON" -c "import hinge_cli.configs" 2>/dev/null; then  # the configs package exists only once hinge is installed
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index -e .
fi
exec "$PYTHON" tools/device_check.py "${args[@]}"
