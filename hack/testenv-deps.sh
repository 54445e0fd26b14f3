#!/usr/bin/env bash
# What the integration tests' real control plane (devplug-testenv) needs on
# this machine: etcd (Debian's etcd-server, as the cluster kit uses),
# openssl (its certificates) and xz (to unpack the kit's kube-apiserver from
# ../shared/cluster/bin); and Debian's prometheus, whose promtool checks and
# tests the chart's alert rules. Installs what is missing when run as root;
# says what to install otherwise. Nothing is downloaded at test time.
set -euo pipefail
missing=()
command -v etcd >/dev/null 2>&1 || [ -x /usr/bin/etcd ] || missing+=(etcd-server)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v xz >/dev/null 2>&1 || missing+=(xz-utils)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "the integration tests need: ${missing[*]} (Debian: sudo apt-get install ${missing[*]})" >&2
  exit 1
fi
echo "installing ${missing[*]} for the integration tests" >&2
# Keep Debian's maintainer scripts from starting an etcd service on 2379
# (the cluster kit's port), or a Prometheus on 9090.
added_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod 755 /usr/sbin/policy-rc.d
  added_policy=1
fi
rc=0
{ DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >/dev/null || rc=$?
[ $added_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
[ $rc = 0 ] || { echo "apt-get install ${missing[*]} failed" >&2; exit $rc; }
if [ -d /run/systemd/system ] && [[ " ${missing[*]} " == *" etcd-server "* ]]; then
  systemctl disable --now etcd.service >/dev/null 2>&1 || true
fi
