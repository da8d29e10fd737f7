#!/usr/bin/env bash
# Start (or complete) a single-node SLURM cluster with accounting under DIR, as root.
# Installs the Debian packages if missing; idempotent; returns when the node is idle.
#   tools/slurm/start_local_slurm.sh DIR [--port-offset N]
#   export SLURM_CONF=DIR/etc/slurm.conf
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 DIR [--port-offset N]" >&2; exit 2; }
exec python "$(dirname "$0")/local_cluster.py" start "$@"
