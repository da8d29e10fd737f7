#!/usr/bin/env bash
# Stop the cluster under DIR: cancel its jobs, kill job processes and every daemon it started.
#   tools/slurm/stop_local_slurm.sh DIR [--purge]     (--purge also deletes DIR)
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 DIR [--purge]" >&2; exit 2; }
exec python "$(dirname "$0")/local_cluster.py" stop "$@"
