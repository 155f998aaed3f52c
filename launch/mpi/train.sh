#!/usr/bin/env bash
# dpo_ds under OpenMPI's mpirun: one rank per slot of the hostfile, or NP ranks on this host.
#
#   launch/mpi/train.sh CONFIG.yaml [--key value ...]                    # NP=<GPUs here> ranks here
#   HOSTFILE=launch/hostfile launch/mpi/train.sh CONFIG.yaml [...]         # every slot of the hostfile
#   NP=16 HOSTFILE=launch/hostfile MPIRUN_ARGS="--mca btl_tcp_if_include ib0" launch/mpi/train.sh ...
#
# Each rank finds its rank, world size and local rank from OpenMPI; rank 0 picks the rendezvous
# address (DPO_DS_IFNAME / NCCL_SOCKET_IFNAME, else its address on the route to the other
# nodes) and a free port, and mpi4py broadcasts them (pip install mpi4py). The same happens under
#   deepspeed --launcher openmpi --hostfile launch/hostfile launch/train.py --config CONFIG.yaml
# mpirun starts remote ranks over passwordless ssh and exports only the variables named with -x:
# here every variable of launch/env.sh plus PATH, PYTHONPATH, LD_LIBRARY_PATH, and anything
# starting with NCCL_, GLOO_, DS_, DPO_DS_, TORCH_, HF_, OMP_, CUDA_, MASTER_.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: [NP=N] [HOSTFILE=H] [MPIRUN_ARGS=...] launch/mpi/train.sh CONFIG.yaml [--key value ...]" >&2
  exit 2
fi
CONFIG=$1
shift
REPO=$(cd "$(dirname "$0")/../.." && pwd)
source "$REPO/launch/env.sh"
if [ -z "${DPO_DS_PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then DPO_DS_PYTHON=$REPO/.venv/bin/python; else DPO_DS_PYTHON=python; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

where=()
if [ -n "${HOSTFILE:-}" ]; then
  where=(--hostfile "$HOSTFILE")
  NP=${NP:-$("$DPO_DS_PYTHON" -c 'import sys; from dpo_ds.hostfile import parse_hostfile
print(parse_hostfile(open(sys.argv[1]).read(), sys.argv[1]).total_slots)' "$HOSTFILE")}
fi
NP=${NP:-$(nvidia-smi -L 2>/dev/null | wc -l)}
if [ "${NP:-0}" -lt 1 ]; then
  echo "launch/mpi/train.sh: no GPU found: set NP (number of ranks)" >&2
  exit 2
fi

exports=()
for name in $(compgen -e); do
  case $name in
    PATH | PYTHONPATH | PYTHONUNBUFFERED | LD_LIBRARY_PATH | TOKENIZERS_PARALLELISM | \
      NCCL_* | GLOO_* | DS_* | DPO_DS_* | TORCH_* | HF_* | OMP_* | CUDA_* | MASTER_*)
      exports+=(-x "$name") ;;
  esac
done
# --bind-to none: each rank uses the cores OMP_NUM_THREADS gives it; OpenMPI's default binds
# every rank to one core.
# shellcheck disable=SC2086
exec mpirun -np "$NP" "${where[@]}" --bind-to none --map-by slot "${exports[@]}" ${MPIRUN_ARGS:-} \
  "$DPO_DS_PYTHON" -u "$REPO/launch/train.py" --config "$CONFIG" "$@"
