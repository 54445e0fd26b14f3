#!/usr/bin/env bash
# devplug end-to-end suite.
#
# - KUBECONFIG set: runs against that cluster (devplug's images must be
#   pullable there: set REGISTRY and TAG, default ghcr.io/devplug and the
#   chart's appVersion; no kind step).
# - else Docker and kind present: creates a kind cluster, builds and loads
#   the images (hack/kind-quickstart.sh), runs, deletes the cluster (KEEP=1
#   keeps it).
# - else: says so and skips. It never reports a pass it did not run.
#
# Checks: the chart installs; the example policy makes the node show
# hardware-vendor.example/foo: 2 allocatable; the demo Pod's environment lists
# its two device IDs; a simulated device flipped unhealthy drops allocatable
# to 1 and both CRD statuses name the device and the Pod; a kubelet restart
# leads to re-registration; deleting the policy removes the agents and the
# resource.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/.tools/bin:$PATH"
NS=devplug-system
RES=hardware-vendor.example/foo
POLICY=simulated-foo
CLUSTER=${CLUSTER:-devplug-e2e}

say() { printf 'e2e: %s\n' "$*"; }
fail() { printf 'e2e: FAIL: %s\n' "$*" >&2; exit 1; }
passed=0
ok() { passed=$((passed + 1)); say "ok - $*"; }

mode=""
if [ -n "${KUBECONFIG:-}" ]; then
  mode=existing
elif command -v docker >/dev/null && docker info >/dev/null 2>&1 && command -v kind >/dev/null; then
  mode=kind
else
  why=()
  command -v docker >/dev/null || why+=("no docker client")
  command -v docker >/dev/null && ! docker info >/dev/null 2>&1 && why+=("no Docker engine")
  command -v kind >/dev/null || why+=("no kind")
  reasons=$(IFS=,; echo "${why[*]}")
  say "SKIPPED: ${reasons//,/, }, and KUBECONFIG is not set; no end-to-end check was run."
  exit 0
fi
./hack/tools.sh

# Polls a command until it prints the wanted value.
wait_for() { # description, timeout seconds, wanted, command...
  local what=$1 timeout=$2 want=$3; shift 3
  local deadline=$((SECONDS + timeout)) got=""
  while [ $SECONDS -lt $deadline ]; do
    got=$("$@" 2>/dev/null || true)
    [ "$got" = "$want" ] && return 0
    sleep 2
  done
  fail "$what: wanted '$want', last saw '$got'"
}

cleanup() {
  kubectl delete pod demo-pod --ignore-not-found --wait=false >/dev/null 2>&1 || true
  if [ "$mode" = kind ] && [ -z "${KEEP:-}" ]; then
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

if [ "$mode" = kind ]; then
  say "creating kind cluster $CLUSTER"
  CLUSTER=$CLUSTER TAG=e2e SAMPLE=false ./hack/kind-quickstart.sh
  kubectl config use-context "kind-$CLUSTER" >/dev/null
else
  say "using the cluster of KUBECONFIG ($(kubectl config current-context))"
  kubectl apply --server-side -f crds/
  helm upgrade --install devplug charts/devplug --namespace $NS --create-namespace \
    --set image.registry="${REGISTRY:-ghcr.io/devplug}" ${TAG:+--set image.tag=$TAG} --wait --timeout 5m
fi
ok "chart installed"

NODE=$(kubectl get nodes -o jsonpath='{.items[0].metadata.name}')
kubectl apply -f examples/simulated-foo.yaml
alloc() { kubectl get node "$NODE" -o jsonpath="{.status.allocatable.hardware-vendor\.example/foo}"; }
wait_for "allocatable $RES on $NODE" 240 2 alloc
ok "node $NODE shows $RES: 2"
wait_for "policy Ready" 120 True kubectl get dpp $POLICY -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}'
ok "policy Ready"

kubectl apply -f examples/demo-pod.yaml
kubectl wait --for=condition=Ready pod/demo-pod --timeout=180s >/dev/null
ids=$(kubectl exec demo-pod -- printenv DEVPLUG_HARDWARE_VENDOR_EXAMPLE_FOO)
case "$ids" in
  foo-0,foo-1|foo-1,foo-0) ok "demo pod got $ids" ;;
  *) fail "demo pod environment shows '$ids'" ;;
esac

AGENT=$(kubectl -n $NS get pods -l devplug.io/policy=$POLICY --field-selector spec.nodeName="$NODE" -o jsonpath='{.items[0].metadata.name}')
kubectl -n $NS exec "$AGENT" -- devplug-agent sim --control-dir /run/devplug/sim $POLICY foo-1 Unhealthy "e2e flip"
wait_for "allocatable after the flip" 60 1 alloc
ok "allocatable dropped to 1"
wait_for "NodeDeviceStatus health" 60 Unhealthy \
  kubectl get nds "$NODE" -o jsonpath="{.status.resources[?(@.resourceName==\"$RES\")].devices[?(@.id==\"foo-1\")].health}"
pods=$(kubectl get nds "$NODE" -o jsonpath="{.status.resources[?(@.resourceName==\"$RES\")].devices[?(@.id==\"foo-1\")].allocations[*].pod}")
[ "$pods" = demo-pod ] || fail "NodeDeviceStatus names pods '$pods' for foo-1"
ok "NodeDeviceStatus: foo-1 Unhealthy, held by demo-pod"
wait_for "policy status names the device" 60 "foo-1" kubectl get dpp $POLICY -o jsonpath='{.status.unhealthyDevices[0].device}'
pods=$(kubectl get dpp $POLICY -o jsonpath='{.status.unhealthyDevices[0].pods[0]}')
[ "$pods" = default/demo-pod ] || fail "policy status names pods '$pods'"
ok "policy status: foo-1 unhealthy, affects default/demo-pod"

metric() {
  kubectl get --raw "/api/v1/namespaces/$NS/pods/$AGENT:8080/proxy/metrics" \
    | awk '/^devplug_registrations_total/ {print $2}'
}
before=$(metric)
if [ "$mode" = kind ]; then
  docker exec "$NODE" systemctl restart kubelet
else
  kubectl debug "node/$NODE" --profile=sysadmin --image=registry.k8s.io/e2e-test-images/busybox:1.36.1-1 \
    -- chroot /host systemctl restart kubelet >/dev/null
fi
deadline=$((SECONDS + 120))
until [ "$(metric)" -gt "$before" ] 2>/dev/null; do
  [ $SECONDS -lt $deadline ] || fail "no re-registration after the kubelet restart (registrations stayed $before)"
  sleep 2
done
ok "re-registered after the kubelet restart ($before -> $(metric))"
wait_for "allocatable after the restart" 120 1 alloc
ok "allocatable still 1 (foo-1 still unhealthy) after the restart"

kubectl delete pod demo-pod --wait=true >/dev/null
kubectl delete -f examples/simulated-foo.yaml
wait_for "agents removed" 120 "" kubectl -n $NS get ds -l devplug.io/policy=$POLICY -o name
ok "agent DaemonSet removed"
wait_for "resource gone from allocatable" 180 "" sh -c "v=\$(kubectl get node $NODE -o jsonpath='{.status.allocatable.hardware-vendor\.example/foo}'); [ \"\$v\" = 0 ] && v=''; echo \"\$v\""
ok "$RES no longer allocatable"

echo "e2e: $passed passed, 0 failed"
