#!/usr/bin/env bash
# Multi-node K-FAC with torchrun: run this script on every node (same command, its own NODE_RANK).
#
#   MASTER_ADDR=10.0.0.1 NODE_RANK=0 NNODES=2 NPROC=8 bash examples/multinode/torchrun.sh   # node 0
#   MASTER_ADDR=10.0.0.1 NODE_RANK=1 NNODES=2 NPROC=8 bash examples/multinode/torchrun.sh   # node 1
#
# Try it on one machine (2 "nodes" of 1 CPU process each, over 127.0.0.1):
#
#   NODE_RANK=0 NNODES=2 NPROC=1 bash examples/multinode/torchrun.sh --trainer.max_steps 5 &
#   NODE_RANK=1 NNODES=2 NPROC=1 bash examples/multinode/torchrun.sh --trainer.max_steps 5
#
# Lightning reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and does not launch processes
# itself. The global batch is data.batch_size x NPROC x NNODES; LRSchedule scales the LR to it and the
# ddp_kfac strategy all-reduces K-FAC's factors across all ranks. Extra arguments go to the CLI.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${MASTER_ADDR:=127.0.0.1}" "${MASTER_PORT:=29500}" "${NODE_RANK:=0}" "${NNODES:=1}" "${NPROC:=1}"
: "${CONFIG:=examples/configs/kfac.yaml}" "${ACCELERATOR:=cpu}"
# One intra-op thread per process on CPU (processes, not threads, use the cores); faster CPU allocator.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000
PER_DEVICE_BATCH=$(( 4096 / (NPROC * NNODES) ))

exec python -m torch.distributed.run \
    --nnodes="$NNODES" --nproc-per-node="$NPROC" --node-rank="$NODE_RANK" \
    --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
    examples/train_cli.py fit --config "$CONFIG" \
    --trainer.accelerator "$ACCELERATOR" --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC" \
    --trainer.strategy ddp_kfac --data.batch_size "$PER_DEVICE_BATCH" "$@"
