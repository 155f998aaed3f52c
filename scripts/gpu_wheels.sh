#!/usr/bin/env bash
# Download into .whl/ every wheel scripts/gpu_check.sh needs that the GPU image lacks.
#
# The check machine (one H200, Python 3.12) reaches no package registry: it gets the tree plus at
# most 64 MiB of carried files. Its image has torch, triton, pyarrow, pandas, xxhash, psutil, ninja,
# mpi4py and older transformers/accelerate/peft; it lacks deepspeed, datasets (and its small
# dependencies), trl and liger-kernel. Run this on a CPU machine with the project's venv: versions are
# pinned to that venv's (what the tests ran against), so transformers, accelerate and peft travel too.
# DeepSpeed is an sdist on PyPI: its wheel is built here with no ops prebuilt (the GPU JIT-builds them).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
OUT=.whl
LIMIT_MIB=50
LIGER_VERSION=0.8.5  # not in the venv (it needs a GPU): the newest release

# NAME: the distribution; its version comes from the venv.
FROM_VENV=(
  deepspeed hjson pydantic pydantic-core annotated-types typing-inspection  # deepspeed + its missing deps
  datasets dill multiprocess                                                # datasets + its missing deps
  trl transformers accelerate peft
)

version() {
  "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null \
    || { echo "gpu_wheels: $1 is not installed in $PY; run scripts/setup.sh with DPO_DS_FOR_TESTS=1" >&2; exit 1; }
}

rm -rf "$OUT" && mkdir -p "$OUT"
binary=()
for name in "${FROM_VENV[@]}"; do
  [ "$name" = deepspeed ] || binary+=("$name==$(version "$name")")
done
binary+=("liger-kernel==$LIGER_VERSION")

echo "gpu_wheels: downloading ${binary[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$OUT" \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any "${binary[@]}"

ds_version=$(version deepspeed)
echo "gpu_wheels: building deepspeed==$ds_version (DS_BUILD_OPS=0)"
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$build" "deepspeed==$ds_version" \
  >"$build/log" 2>&1 || { tail -30 "$build/log" >&2; echo "gpu_wheels: building deepspeed failed" >&2; exit 1; }
mv "$build"/deepspeed-*.whl "$OUT"/

ls -1 "$OUT"
total=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
mib=$(awk -v b="$total" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "gpu_wheels: $(ls "$OUT"/*.whl | wc -l) wheels, $mib MiB in $OUT/"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "gpu_wheels: $mib MiB is over the $LIMIT_MIB MiB limit (the GPU machine takes 64 MiB with the tree)" >&2
  exit 1
fi
