#!/usr/bin/env bash
# Restarts the cluster kit's kube-controller-manager with a longer node
# grace period (--node-monitor-grace-period and --node-startup-grace-period
# set to SECONDS), or with the kit's own flags again ("default").
#
# For bench-scale's largest fleets: this machine's API server cannot renew
# 5,000 node Leases every 20 s on top of the fleet's writes, and the node
# lifecycle controller would then mark simulated nodes (and their agent
# pods) not Ready over and over. With SCALE_NODE_GRACE=SECONDS the bench
# renews each Lease every SECONDS/4 instead, and the controller still marks
# a node whose Lease stops.
#
# Usage: hack/kit-node-grace.sh SECONDS|default   (as root, the kit up)
set -euo pipefail
grace=${1:?usage: kit-node-grace.sh SECONDS|default}
KIT=${KIT:-$(cd "$(dirname "$0")/../../shared/cluster" && pwd)}
# shellcheck source=/dev/null
source "$KIT/lib.sh"
# The kit's own start_controllers, unchanged, with its start_daemon wrapped
# to add the flags for the controller manager.
eval "$(sed -n '/^start_controllers() {/,/^}/p' "$KIT/up.sh")"
eval "kit_$(declare -f start_daemon)"
start_daemon() {
  if [[ $1 == kube-controller-manager && $grace != default ]]; then
    kit_start_daemon "$@" "--node-monitor-grace-period=${grace}s" "--node-startup-grace-period=${grace}s"
  else
    kit_start_daemon "$@"
  fi
}
[[ $grace == default || $grace =~ ^[0-9]+$ ]] || die "SECONDS must be a whole number of seconds or 'default', not '$grace'"
stop_daemon kube-controller-manager
start_controllers
