#!/usr/bin/env bash
# 2 nodes x 1 process on localhost (CPU, gloo): the multi-node code path on one machine.
set -euo pipefail
out=${1:-tlq_out/multinode_local}
port=${MASTER_PORT:-29517}
common=(calibrate --model.model_name_or_path tiny-llava --trainer.accelerator cpu --trainer.num_nodes 2
        --trainer.devices 1 --trainer.strategy ddp --data.num_samples 16 --output_dir "$out" --overwrite true)
GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo} NODE_RANK=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
    lightning-tlq "${common[@]}" --quiet true &
GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo} NODE_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
    lightning-tlq "${common[@]}"
wait
