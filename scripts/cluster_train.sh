#!/usr/bin/env bash
# Train a recipe on several machines: run this on every node, each with its own NODE_RANK.
#
#   scripts/cluster_train.sh CONFIG NUM_NODES NODE_RANK MASTER_ADDR PORT [--section.key=value ...]
#
# It execs `torchrun ... -m stoker train CONFIG [overrides]` on the one training loop, with
# flags that agree with the trainer by construction: the trainer reads rank and world size
# from torchrun's environment, nothing else. Processes per node: $NPROC_PER_NODE, else every
# CUDA device this node has, else 1 (a CPU node: gloo). PYTHON picks the interpreter (default:
# .venv/bin/python beside this script's repo, else python3). Nothing here kills processes:
# SIGTERM to torchrun reaches every rank, which saves a checkpoint through the loop's stop flag
# and exits (docs/cluster.md).
set -euo pipefail

die() { echo "cluster_train.sh: error: $*" >&2; exit 2; }

[ $# -ge 5 ] || die "usage: $0 CONFIG NUM_NODES NODE_RANK MASTER_ADDR PORT [--section.key=value ...]"
config=$1 nodes=$2 rank=$3 addr=$4 port=$5
shift 5

[ -f "$config" ] || die "recipe file not found: $config"
[[ $nodes =~ ^[1-9][0-9]*$ ]] || die "NUM_NODES must be a positive integer, got '$nodes'"
[[ $rank =~ ^[0-9]+$ ]] && [ "$rank" -lt "$nodes" ] || die "NODE_RANK must be 0..$((nodes - 1)), got '$rank'"
[ -n "$addr" ] || die "MASTER_ADDR is empty (the host name or address of node 0)"
[[ $port =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || die "PORT must be 1..65535, got '$port'"

root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-}
if [ -z "$python" ]; then
    if [ -x "$root/.venv/bin/python" ]; then python=$root/.venv/bin/python; else python=python3; fi
fi
nproc=${NPROC_PER_NODE:-}
if [ -z "$nproc" ]; then
    nproc=$("$python" -c "import torch; print(torch.cuda.device_count() or 1)") \
        || die "cannot run $python to count this node's GPUs (set PYTHON or NPROC_PER_NODE)"
fi
[[ $nproc =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE must be a positive integer, got '$nproc'"

echo "cluster_train.sh: node $rank of $nodes, $nproc process(es), rendezvous $addr:$port" >&2
exec "$python" -m torch.distributed.run \
    --nnodes="$nodes" --nproc_per_node="$nproc" --node_rank="$rank" \
    --master_addr="$addr" --master_port="$port" \
    -m stoker train "$config" "$@"
