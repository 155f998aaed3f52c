# Network and runtime settings for multi-node runs. Sourced by launch/slurm/train.sbatch
# and launch/mpi/train.sh; source it yourself before `deepspeed --hostfile ...`. The
# deepspeed launcher passes variables to remote nodes only through `.deepspeed_env`
# (one NAME=value per line, in the working directory or $HOME): copy what you set here.
# Every value can be overridden from the environment.

# The interface ranks talk over, e.g. ib0 or eth0 (`ip -4 addr` lists them). Unset, NCCL and
# gloo guess, and may pick docker0 or a management network the other nodes cannot reach.
# dpo_ds also takes the rendezvous (master) address from it for mpirun launches.
if [ -n "${DPO_DS_IFNAME:-}" ]; then
  export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$DPO_DS_IFNAME}
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$DPO_DS_IFNAME}
fi

# WARN: only problems. Set INFO once on a new cluster to see which transport (IB, sockets)
# and interfaces NCCL picked.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# Without InfiniBand/RoCE, uncomment to keep NCCL from probing for it:
# export NCCL_IB_DISABLE=1

# A rank that fails turns into an error on the others instead of a silent hang until the timeout.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

# CPU threads per rank: the cores Slurm gave the task (torch would otherwise use every core
# of the node in every rank, and the ranks fight over them).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

# The tokenizers library's thread pool does not survive fork(): avoid its warnings and deadlocks.
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

# Log lines reach the log file as they are printed, not when a buffer fills.
export PYTHONUNBUFFERED=1
