#!/usr/bin/env bash
# One node's part of slurm/train.sbatch: `srun --ntasks-per-node=1` runs this once on every node
# of the job, and it becomes that node's `accelerate launch`, which starts the node's processes.
#
#   launch-node.sh [mnist-dist train flags...]
#
# Reads the launch plan that `mnist-dist doctor --write-env` wrote and train.sbatch exported
# (MNIST_DIST_NUM_PROCESSES, MNIST_DIST_MAIN_ADDR, MNIST_DIST_MAIN_PORT) and what SLURM sets
# on each node (SLURM_NNODES, SLURM_NODEID).
set -euo pipefail

: "${SLURM_NNODES:?not set: run inside a SLURM job step (srun)}"
: "${SLURM_NODEID:?not set: run inside a SLURM job step (srun)}"
: "${MNIST_DIST_NUM_PROCESSES:?not set: slurm/train.sbatch exports the launch plan}"
: "${MNIST_DIST_MAIN_ADDR:?not set: slurm/train.sbatch exports the launch plan}"
: "${MNIST_DIST_MAIN_PORT:?not set: slurm/train.sbatch exports the launch plan}"

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The machine rank is this node's own SLURM_NODEID, read here, on the node. Inside a
# `srun bash -c "... --machine_rank $SLURM_NODEID"` string it would be expanded once, on the
# batch host, and every node would claim rank 0 (huggingface/accelerate#2816, #1645).
launch=(
    accelerate launch
    --config_file "$root/accelerate_configs/multi_node.yaml"
    --num_machines "$SLURM_NNODES"
    --num_processes "$MNIST_DIST_NUM_PROCESSES"
    --machine_rank "$SLURM_NODEID"
    --main_process_ip "$MNIST_DIST_MAIN_ADDR"
    --main_process_port "$MNIST_DIST_MAIN_PORT"
    -m mnist_dist train "$@"
)
echo "mnist-dist: node $SLURM_NODEID ($(hostname -s)): $(printf "%q " "${launch[@]}")"
exec "${launch[@]}"
