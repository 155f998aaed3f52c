#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py says what it measures): at most 8 minutes on one H200.
#
#   bash scripts/gpu_check.sh [--out DIR] [--quick] [--dry-run]
#
# On the GPU machine, which reaches no registry: the wheels that scripts/gpu_wheels.sh put in .whl/
# are installed into a private --target directory put first on PYTHONPATH (the image's own packages
# stay untouched), then the check runs with the image's python3. --dry-run rehearses the same script
# on a CPU machine with the project's venv: it checks that .whl/ installs on CPython 3.12 manylinux
# (without installing: this machine's Python may differ) and forces the CPU. Results: DIR/results.json
# and DIR/results.md (default gpu_results/). Exit code 0 only when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."

out=gpu_results
flags=()
dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --quick) flags+=(--quick); shift ;;
    --dry-run) dry_run=1; flags+=(--dry-run); shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (expected --out DIR, --quick, --dry-run)" >&2; exit 2 ;;
  esac
done

wheels=(.whl/*.whl)
[ -e "${wheels[0]}" ] || wheels=()
if [ "$dry_run" = 1 ]; then
  PY=${PYTHON:-.venv/bin/python}
  [ -x "$PY" ] || PY=python3
  export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES="" TOKENIZERS_PARALLELISM=false
  if [ ${#wheels[@]} -eq 0 ]; then
    status="no .whl/ to check (run scripts/gpu_wheels.sh)"
  else
    target=$(mktemp -d)
    if "$PY" -m pip install -q --dry-run --no-deps --no-index --target "$target" --python-version 3.12 \
         --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
         --only-binary=:all: "${wheels[@]}" >/dev/null 2>&1; then
      status="${#wheels[@]} wheels install on cp312 manylinux (pip --dry-run; not installed here)"
    else
      status="FAILED: ${#wheels[@]} wheels do not all install on cp312 manylinux"
    fi
    rm -rf "$target"
  fi
else
  PY=${PYTHON:-python3}
  unset DS_ACCELERATOR
  export TOKENIZERS_PARALLELISM=false
  if [ ${#wheels[@]} -eq 0 ]; then
    status="no .whl/: deepspeed, datasets, trl and liger-kernel must already be installed"
  else
    site=$(mktemp -d)/site
    start=$SECONDS
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels[@]}"; then
      export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
      status="${#wheels[@]} wheels installed into $site in $((SECONDS - start)) s"
    else
      status="FAILED: pip could not install .whl/ (the steps run with the image's packages)"
    fi
  fi
fi
echo "gpu_check: $status"
exec "$PY" benchmarks/gpu_check.py --out "$out" --wheels "$status" "${flags[@]}"
