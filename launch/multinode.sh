#!/usr/bin/env bash
# Start one node of a multi-node job without SLURM (torchrun-style environment).
#
#   launch/multinode.sh --nodes 4 --node-rank $RANK --master $HOST [--port 29500] [--run-name NAME] \
#       -- lmtrain train strategy=fsdp trainer.devices=8
#
# Run the same command on every node, changing only --node-rank. Each node's Lightning launcher
# starts trainer.devices processes; they meet at MASTER_ADDR:MASTER_PORT. All nodes must agree on
# the run directory, so the run name is fixed here (default: derived from master and port) and
# runs_dir must be on a filesystem every node sees.
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

nodes="" node_rank="" master="" port=29500 run_name=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes=$2; shift 2 ;;
    --node-rank) node_rank=$2; shift 2 ;;
    --master) master=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --run-name) run_name=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "multinode.sh: unknown option '$1'" >&2; usage ;;
  esac
done
[[ -n "$nodes" && -n "$node_rank" && -n "$master" && $# -gt 0 ]] || { echo "multinode.sh: --nodes, --node-rank, --master and a command after -- are required" >&2; usage; }
[[ "$node_rank" =~ ^[0-9]+$ && "$node_rank" -lt "$nodes" ]] || { echo "multinode.sh: --node-rank $node_rank must be in 0..$((nodes - 1))" >&2; exit 2; }

export MASTER_ADDR=$master MASTER_PORT=$port NODE_RANK=$node_rank
# Every node must name the same run dir; a derived default would make unrelated jobs resume each other.
if [[ -z "$run_name" ]]; then
  for arg in "$@"; do [[ "$arg" == run_name=* ]] && run_name=given; done
  [[ -n "$run_name" ]] || { echo "multinode.sh: name the run: --run-name NAME (or run_name=NAME in the command), the same on every node" >&2; exit 2; }
  exec "$@" "trainer.num_nodes=$nodes"
fi
exec "$@" "trainer.num_nodes=$nodes" "run_name=$run_name"
