#!/usr/bin/env bash
# One node's part of the train stage's launch: train.sbatch's srun runs it once per node, with the
# stage's launch arguments after it (-m pipeline.train ...). Slurm sets SLURM_NODEID, SLURM_NNODES and,
# on GPU nodes, SLURM_GPUS_ON_NODE; train.sbatch sets MAIN_IP and MAIN_PORT.
# PROCS_PER_NODE overrides the processes per node (default: one per GPU, or one on a CPU node).
set -euo pipefail
per_node=${PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
exec python -m pipeline.launch --multi_gpu --same_network --rdzv_backend static \
  --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" --num_processes "$((SLURM_NNODES * per_node))" \
  --main_process_ip "$MAIN_IP" --main_process_port "$MAIN_PORT" "$@"
