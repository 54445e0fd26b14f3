#!/usr/bin/env bash
# devplug end-to-end suite, on a real cluster.
#
# Where it runs, first match wins:
# - KUBECONFIG set: that cluster. devplug's images must be pullable there
#   (REGISTRY, TAG; default ghcr.io/devplug and the chart's appVersion).
#   Kubelet restarts need E2E_RESTART_KUBELET, a command that restarts the
#   kubelet of the node (the check is skipped, and says so, without it).
#   The suite touches only what it creates: devplug's CRDs, the release
#   `devplug` in devplug-system with its cluster-wide objects, policies
#   named simulated-foo and e2e-*, pods and claims labelled app=devplug-e2e,
#   and a marker namespace devplug-e2e-run while it runs; it removes all of
#   them when it ends, pass or fail. It refuses a cluster where devplug is
#   already installed (those objects are cluster-wide and would be shared),
#   unless the marker says an earlier run of the suite left them.
# - ../shared/cluster/up.sh exists (the single-node kit): brings the kit up
#   unless it already runs, builds the images without Docker
#   (hack/images.sh), loads them, runs, and takes the kit down again if it
#   brought it up (KEEP=1 leaves it up). A kit that does not come up is a
#   failed e2e, never a skip.
# - Docker and kind: a kind cluster with the images built by Docker
#   (hack/kind-quickstart.sh), deleted afterwards (KEEP=1 keeps it).
# - none of these: says so and skips. It never reports a pass it did not run.
#
# Installs exactly as the README tells a user (CRDs server-side, then the
# chart), then runs each check with its own deadline and prints its time.
# On failure it prints what it saw, and the operator's, the agents' and the
# kubelet's last log lines.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
export PATH="$ROOT/.tools/bin:$PATH"
NS=devplug-system
RES=hardware-vendor.example/foo
RES_JSON='hardware-vendor\.example/foo'
POLICY=simulated-foo
CLUSTER=${CLUSTER:-devplug-e2e}
KIT=${KIT:-$ROOT/../shared/cluster}
TAG=${TAG:-}
REGISTRY=${REGISTRY:-ghcr.io/devplug}
SUITE_START=$SECONDS

say() { printf 'e2e: %s\n' "$*"; }
passed=0
skipped=0
current=""
check_start=$SECONDS

mode=""
if [ -n "${KUBECONFIG:-}" ]; then
  mode=existing
elif [ -x "$KIT/up.sh" ]; then
  mode=kit
elif command -v docker >/dev/null && docker info >/dev/null 2>&1 && command -v kind >/dev/null; then
  mode=kind
else
  why=()
  command -v docker >/dev/null || why+=("no docker client")
  command -v docker >/dev/null && ! docker info >/dev/null 2>&1 && why+=("no Docker engine")
  command -v kind >/dev/null || why+=("no kind")
  reasons=$(IFS=,; echo "${why[*]}")
  say "SKIPPED: ${reasons//,/, }, no cluster kit at $KIT, and KUBECONFIG is not set; no end-to-end check was run."
  exit 0
fi
./hack/tools.sh >/dev/null

diagnostics() {
  set +e
  # CI keeps only the tail of the output: the least telling part first, the
  # operator's own words (including a crashed container's) last.
  echo "----- kubelet log (last 20 lines) -----" >&2
  case $mode in
    kit) tail -n 20 "${DEVPLUG_CLUSTER_DIR:-/var/lib/devplug-cluster}/logs/kubelet.log" | cut -c1-300 >&2 ;;
    kind) docker exec "$CLUSTER-control-plane" journalctl -u kubelet -n 20 --no-pager 2>&1 | cut -c1-300 >&2 ;;
    *) echo "(not reachable from here)" >&2 ;;
  esac
  echo "----- what the cluster looked like -----" >&2
  kubectl get nds -o yaml 2>/dev/null | tail -n 60 >&2
  kubectl get dpp -o yaml 2>/dev/null | grep -A40 '^  status:' | head -n 80 >&2
  kubectl get events -A --sort-by=.lastTimestamp 2>/dev/null | tail -n 25 | cut -c1-300 >&2
  echo "----- agent logs (last 20 lines each) -----" >&2
  for p in $(kubectl -n $NS get pods -l app.kubernetes.io/name=devplug-agent -o name 2>/dev/null); do
    echo "--- $p" >&2
    kubectl -n $NS logs "$p" --tail=20 2>&1 | cut -c1-300 >&2
  done
  kubectl get dpp,nds -o wide >&2
  kubectl get pods -A -o wide >&2
  for p in $(kubectl -n $NS get pods -l app.kubernetes.io/name=devplug-operator -o name 2>/dev/null); do
    if kubectl -n $NS logs "$p" --previous --tail=1 >/dev/null 2>&1; then
      echo "----- $p: the previous (crashed) container, warnings and errors, then its last lines -----" >&2
      kubectl -n $NS logs "$p" --previous 2>&1 | grep -E ' (WARN|ERROR) |^error' | tail -n 12 | cut -c1-300 >&2
      kubectl -n $NS logs "$p" --previous --tail=6 2>&1 | cut -c1-300 >&2
    fi
    echo "----- $p: warnings and errors, then its last lines -----" >&2
    kubectl -n $NS logs "$p" 2>&1 | grep -E ' (WARN|ERROR) |^error' | tail -n 12 | cut -c1-300 >&2
    kubectl -n $NS logs "$p" --tail=6 2>&1 | cut -c1-300 >&2
  done
  set -e
}

fail() {
  printf 'e2e: FAIL: %s: %s\n' "${current:-setup}" "$*" >&2
  diagnostics
  say "$passed passed, 1 failed ($current), $skipped skipped, in $((SECONDS - SUITE_START)) s"
  exit 1
}

begin() { current=$1; check_start=$SECONDS; }
ok() { passed=$((passed + 1)); say "ok - $current ($((SECONDS - check_start)) s)${1:+: $1}"; current=""; }
skip() { skipped=$((skipped + 1)); say "skip - $current: $1"; current=""; }

# Polls a command until it prints the wanted value.
wait_for() { # description, timeout seconds, wanted, command...
  local what=$1 timeout=$2 want=$3; shift 3
  local deadline=$((SECONDS + timeout)) got=""
  while :; do
    got=$("$@" 2>/dev/null || true)
    [ "$got" = "$want" ] && return 0
    [ $SECONDS -lt $deadline ] || fail "$what: wanted '$want' within ${timeout} s, last saw '$got'"
    sleep 1
  done
}

# Whether the API server has feature gate $1 on (1) or off (0).
# (awk reads to the end: an early exit would kill kubectl with SIGPIPE,
# which pipefail turns into the suite's exit.)
gate() { kubectl get --raw /metrics | awk -v g="name=\"$1\"" 'index($0, "kubernetes_feature_enabled{") && index($0, g) {v=$NF} END {print v}'; }

kit_started=""
owns_devplug=""
MARKER=devplug-e2e-run
cleanup() {
  local rc=$?
  set +e
  kubectl delete pod -l app=devplug-e2e --ignore-not-found --wait=false >/dev/null 2>&1
  [ -n "${prom_pid:-}" ] && kill "$prom_pid" >/dev/null 2>&1
  if [ "$mode" = kit ] && [ -n "$kit_started" ] && [ -z "${KEEP:-}" ]; then
    say "taking the cluster kit down"
    "$KIT/down.sh" >/dev/null 2>&1
  fi
  if [ "$mode" = kind ] && [ -z "${KEEP:-}" ]; then
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1
  fi
  if [ "$mode" = existing ] && [ -n "$owns_devplug" ] && [ -z "${KEEP:-}" ]; then
    say "removing what the suite installed on this cluster"
    leftovers
    kubectl delete -f crds/ --ignore-not-found --wait=true --timeout=120s >/dev/null 2>&1
    kubectl delete namespace $NS $MARKER --ignore-not-found --wait=false >/dev/null 2>&1
  fi
  exit $rc
}
trap cleanup EXIT

# Removes what an earlier, failed run left on a reused cluster.
leftovers() {
  kubectl delete pod -l app=devplug-e2e --ignore-not-found --wait=true --timeout=60s >/dev/null 2>&1 || true
  # On the kit or kind the cluster is the suite's: a demo-pod or claim-pod
  # left by the quickstart or a run from before the suite labelled them
  # (the kit's down.sh keeps pods) would keep the suite's own from starting.
  if [ "$mode" != existing ]; then
    kubectl delete pod demo-pod claim-pod --ignore-not-found --wait=true --timeout=60s >/dev/null 2>&1 || true
  fi
  kubectl delete resourceclaim -l app=devplug-e2e --ignore-not-found --wait=true --timeout=60s >/dev/null 2>&1 || true
  kubectl delete resourceclaimtemplate -l app=devplug-e2e --ignore-not-found --wait=true --timeout=60s >/dev/null 2>&1 || true
  kubectl delete dpp --all --wait=true --timeout=60s >/dev/null 2>&1 || true
  # A policy whose operator is gone keeps its finalizer.
  for p in $(kubectl get dpp -o name 2>/dev/null); do
    kubectl patch "$p" --type=merge -p '{"metadata":{"finalizers":[]}}' >/dev/null 2>&1 || true
  done
  helm uninstall devplug -n $NS --wait >/dev/null 2>&1 || true
}

restart_kubelet() {
  case $mode in
    kit) "$KIT/restart-kubelet.sh" >/dev/null 2>&1 ;;
    kind) docker exec "$CLUSTER-control-plane" systemctl restart kubelet ;;
    existing) sh -c "$E2E_RESTART_KUBELET" ;;
  esac
}
can_restart_kubelet() { [ "$mode" != existing ] || [ -n "${E2E_RESTART_KUBELET:-}" ]; }

# ----------------------------------------------------------------- cluster
begin "cluster up ($mode)"
case $mode in
  kit)
    if [ -z "${KUBECONFIG:-}" ] && ! kubectl --kubeconfig "${DEVPLUG_CLUSTER_DIR:-/var/lib/devplug-cluster}/admin.kubeconfig" get --raw /readyz >/dev/null 2>&1; then
      kit_started=1
    fi
    exports=$("$KIT/up.sh" 2>/tmp/devplug-e2e-up.log) || { tail -n 30 /tmp/devplug-e2e-up.log >&2; fail "the cluster kit did not come up"; }
    eval "$exports"
    [ -n "${KUBECONFIG:-}" ] || fail "up.sh printed no KUBECONFIG export"
    TAG=${TAG:-e2e}
    REGISTRY=ghcr.io/devplug TAG=$TAG ./hack/images.sh >/tmp/devplug-e2e-images.log 2>&1 ||
      { tail -n 30 /tmp/devplug-e2e-images.log >&2; fail "building the images failed"; }
    "$KIT/load-image.sh" target/images/devplug-operator.tar target/images/devplug-agent.tar >/tmp/devplug-e2e-load.log 2>&1 ||
      fail "loading the images into the kit failed"
    ;;
  kind)
    TAG=${TAG:-e2e}
    REGISTRY=devplug
    CLUSTER=$CLUSTER TAG=$TAG SAMPLE=false INSTALL=false ./hack/kind-quickstart.sh
    kubectl config use-context "kind-$CLUSTER" >/dev/null
    ;;
  existing)
    say "using the cluster of KUBECONFIG ($(kubectl config current-context)); the suite installs devplug there and removes exactly what it installed when it ends"
    found=()
    kubectl get crd devicepluginpolicies.devplug.io >/dev/null 2>&1 && found+=("CRD devicepluginpolicies.devplug.io")
    kubectl get crd nodedevicestatuses.devplug.io >/dev/null 2>&1 && found+=("CRD nodedevicestatuses.devplug.io")
    kubectl get namespace $NS >/dev/null 2>&1 && found+=("namespace $NS")
    releases=$(helm list -A -o json 2>/dev/null | python3 -c 'import json,sys; print(" ".join(r["namespace"]+"/"+r["name"] for r in json.load(sys.stdin) if r["chart"].startswith("devplug-")))' || true)
    [ -n "$releases" ] && found+=("helm release $releases")
    if kubectl get pod demo-pod >/dev/null 2>&1 && [ "$(kubectl get pod demo-pod -o jsonpath='{.metadata.labels.app}')" != devplug-e2e ]; then
      found+=("pod default/demo-pod, which the suite creates")
    fi
    if [ ${#found[@]} -gt 0 ] && ! kubectl get namespace $MARKER >/dev/null 2>&1; then
      say "FAIL: refusing to run: devplug is already installed on this cluster (${found[*]}). The suite installs devplug's CRDs, the release devplug in $NS and cluster-wide roles and admission policies, deletes them again, and would take an installation it did not make with them. Run it on a cluster without devplug, or uninstall devplug first (README: Uninstall)."
      exit 1
    fi
    [ ${#found[@]} -gt 0 ] && say "an earlier run of the suite left ${found[*]} (marker namespace $MARKER): removing them first"
    kubectl create namespace $MARKER >/dev/null 2>&1 || kubectl get namespace $MARKER >/dev/null || fail "cannot create the marker namespace $MARKER"
    owns_devplug=1
    ;;
esac
NODE=$(kubectl get nodes -o jsonpath='{.items[0].metadata.name}')
[ -n "$NODE" ] || fail "the cluster has no node"
leftovers
ok "node $NODE"

# ----------------------------------------------------------------- CRDs and admission
begin "CRDs apply with no warnings"
out=$(kubectl apply --server-side --force-conflicts -f crds/ 2>&1) || fail "$out"
if printf '%s' "$out" | grep -qi warning; then fail "warnings: $out"; fi
kubectl wait --for=condition=Established crd/devicepluginpolicies.devplug.io crd/nodedevicestatuses.devplug.io --timeout=60s >/dev/null
ok

begin "every example is accepted by the API server"
n=0
for f in examples/*.yaml; do
  out=$(kubectl apply --dry-run=server -f "$f" 2>&1) || fail "$f refused: $out"
  if printf '%s' "$out" | grep -qi warning; then fail "$f: $out"; fi
  n=$((n + 1))
done
ok "$n files"

begin "bad policies are refused by the API server, naming the field"
bad() { # field the message must name, spec (YAML flow)
  local field=$1 spec=$2 out
  if out=$(printf 'apiVersion: devplug.io/v1alpha1\nkind: DevicePluginPolicy\nmetadata: {name: e2e-bad}\nspec: %s\n' "$spec" |
    kubectl apply --dry-run=server -f - 2>&1); then
    fail "admitted: $spec"
  fi
  printf '%s' "$out" | grep -q -- "$field" || fail "refusal of $spec does not name $field: $out"
}
bad spec.resourceName '{resourceName: kubernetes.io/foo, source: {simulated: {count: 1}}}'
bad spec.resourceName '{resourceName: acme-kubernetes.io/foo, source: {simulated: {count: 1}}}'
bad spec.resourceName '{resourceName: requests.example.com/foo, source: {simulated: {count: 1}}}'
bad spec.resourceName '{resourceName: foo, source: {simulated: {count: 1}}}'
bad spec.source '{resourceName: example.com/foo, source: {}}'
bad spec.source '{resourceName: example.com/foo, source: {simulated: {count: 1}, nvidia: {}}}'
bad spec.source.simulated '{resourceName: example.com/foo, source: {simulated: {}}}'
bad spec.source.paths.globs '{resourceName: example.com/foo, source: {paths: {globs: [/etc/shadow]}}}'
bad spec.source.usb.devices '{resourceName: example.com/foo, source: {usb: {devices: [{vendor: xyz}]}}}'
bad spec.sharing '{resourceName: example.com/foo, source: {simulated: {count: 1}}, sharing: {strategy: TimeSlicing}}'
bad spec.sharing.replicas '{resourceName: example.com/foo, source: {simulated: {count: 1}}, sharing: {strategy: TimeSlicing, replicas: 0}}'
bad spec.preStart.command '{resourceName: example.com/foo, source: {simulated: {count: 1}}, preStart: {command: [reset]}}'
bad spec.agent.image '{resourceName: example.com/foo, source: {simulated: {count: 1}}, preStart: {command: [/usr/bin/reset]}}'
bad spec.allocate.env '{resourceName: example.com/foo, source: {simulated: {count: 1}}, allocate: {env: {1BAD: x}}}'
bad spec '{resourceName: example.com/foo, source: {simulated: {count: 4096}}, sharing: {strategy: TimeSlicing, replicas: 8}}'
bad spec.unknownField '{resourceName: example.com/foo, source: {simulated: {count: 1}}, unknownField: 1}'
bad spec.kubeletApi '{resourceName: example.com/foo, source: {simulated: {count: 1}}, kubeletApi: Dra}'
bad spec.preStart '{resourceName: example.com/foo, source: {simulated: {count: 1}}, kubeletApi: DRA, agent: {image: x/y:1}, preStart: {command: [/usr/bin/reset]}}'
bad spec.source.nvidia.migPartitions '{resourceName: nvidia.com/gpu, source: {nvidia: {migPartitions: true}}}'
ok "19 refused"

# ----------------------------------------------------------------- install
begin "helm install (as the README says)"
HELM_SET=(--set image.registry="$REGISTRY")
[ -n "$TAG" ] && HELM_SET+=(--set image.tag="$TAG")
out=$(helm install devplug charts/devplug --namespace $NS --create-namespace "${HELM_SET[@]}" --wait --timeout 5m 2>&1) ||
  fail "$out"
ok

begin "helm upgrade changes a value and carries the CRDs (its pre-upgrade hook)"
# An older CRD, as after installing a previous version: a printer column
# fewer. Helm itself never upgrades the CRDs it installed.
columns() { kubectl get crd devicepluginpolicies.devplug.io -o jsonpath='{.spec.versions[0].additionalPrinterColumns[*].name}'; }
want_columns=$(columns)
kubectl patch crd devicepluginpolicies.devplug.io --type=json \
  -p '[{"op":"remove","path":"/spec/versions/0/additionalPrinterColumns/0"}]' >/dev/null || fail "cannot age the CRD"
[ "$(columns)" != "$want_columns" ] || fail "the CRD did not change"
out=$(helm upgrade devplug charts/devplug --namespace $NS "${HELM_SET[@]}" --set operator.logLevel=debug --wait --timeout 5m 2>&1) ||
  fail "helm upgrade failed: $out"
[ "$(columns)" = "$want_columns" ] || fail "helm upgrade left the old CRD: columns '$(columns)', want '$want_columns'"
wait_for "operator rolled out with the new value" 120 "debug" sh -c \
  "kubectl -n $NS get deploy devplug-operator -o jsonpath='{.spec.template.spec.containers[0]}' | grep -o 'debug' | head -n1"
kubectl -n $NS rollout status deploy/devplug-operator --timeout=120s >/dev/null || fail "operator did not roll out"
ok

begin "helm rollback returns to the previous release and keeps the newer CRDs"
out=$(helm rollback devplug 1 -n $NS --wait --timeout 5m 2>&1) || fail "helm rollback failed: $out"
wait_for "operator rolled back (no debug)" 120 "" sh -c \
  "kubectl -n $NS get deploy devplug-operator -o jsonpath='{.spec.template.spec.containers[0]}' | grep -o 'debug' | head -n1"
kubectl -n $NS rollout status deploy/devplug-operator --timeout=120s >/dev/null || fail "operator did not roll out after the rollback"
[ "$(columns)" = "$want_columns" ] || fail "the rollback changed the CRD: columns '$(columns)'"
ok "revision $(helm history devplug -n $NS -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["revision"])')"

# ----------------------------------------------------------------- a policy, from nothing
alloc() { kubectl get node "$NODE" -o jsonpath="{.status.allocatable.$RES_JSON}"; }
entry() { # jsonpath below the policy's NodeDeviceStatus entry
  kubectl get nds "$NODE" -o jsonpath="{.status.resources[?(@.resourceName==\"$RES\")]$1}"
}
agent_pod() {
  kubectl -n $NS get pods -l devplug.io/policy=$POLICY --field-selector spec.nodeName="$NODE" \
    -o jsonpath='{.items[0].metadata.name}'
}
agent_ready() {
  kubectl -n $NS get pods -l devplug.io/policy=$POLICY --field-selector spec.nodeName="$NODE" \
    -o jsonpath='{.items[0].status.conditions[?(@.type=="Ready")].status}'
}

begin "the operator creates the agent from nothing under the chart's RBAC"
kubectl apply -f examples/simulated-foo.yaml >/dev/null
for o in "serviceaccount/devplug-agent-$POLICY -n $NS" "daemonset/devplug-agent-$POLICY -n $NS" \
  "clusterrole/devplug-agent-$POLICY" "clusterrolebinding/devplug-agent-$POLICY"; do
  # shellcheck disable=SC2086
  wait_for "$o exists" 60 yes sh -c "kubectl get $o -o name >/dev/null && echo yes"
done
wait_for "agent pod Ready" 120 True agent_ready
ok

begin "status right from the start: every device Healthy within 15 s of the agent becoming ready"
wait_for "allocatable $RES" 30 2 alloc
wait_for "NodeDeviceStatus health" 15 "Healthy Healthy" entry '.devices[*].health'
wait_for "policy devices healthy" 15 "2/2" kubectl get dpp $POLICY -o jsonpath='{.status.devicesHealthy}'
wait_for "policy Ready" 30 True kubectl get dpp $POLICY -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}'
wait_for "policy nodes" 30 "1/1" kubectl get dpp $POLICY -o jsonpath='{.status.nodesReady}'
ok "2/2 healthy, Ready"

# Watches for Unknown while the agent serves, until stopped.
watch_unknown() {
  : >/tmp/devplug-e2e-unknown
  (
    while [ -e /tmp/devplug-e2e-unknown ]; do
      h=$(entry '.devices[*].health' 2>/dev/null || true)
      s=$(entry '.state' 2>/dev/null || true)
      case "$h $s" in *Unknown*) echo "$(date +%T) health='$h' state='$s'" >>/tmp/devplug-e2e-unknown.seen ;; esac
      sleep 1
    done
  ) &
  watcher=$!
}
stop_watch_unknown() {
  rm -f /tmp/devplug-e2e-unknown
  wait "$watcher" 2>/dev/null || true
  if [ -s /tmp/devplug-e2e-unknown.seen ]; then
    fail "devices shown Unknown while the agent served: $(head -n 3 /tmp/devplug-e2e-unknown.seen)"
  fi
}
rm -f /tmp/devplug-e2e-unknown.seen
watch_unknown

begin "the demo pod gets its devices"
t0=$(date +%s%3N)
sed 's/^metadata:/metadata:\n  labels: {app: devplug-e2e}/' examples/demo-pod.yaml | kubectl apply -f - >/dev/null
kubectl wait --for=condition=Ready pod/demo-pod --timeout=180s >/dev/null || fail "demo-pod not Ready"
dp_ready=$(( $(date +%s%3N) - t0 ))
ids=$(kubectl exec demo-pod -- printenv DEVPLUG_HARDWARE_VENDOR_EXAMPLE_FOO)
case "$ids" in
  foo-0,foo-1 | foo-1,foo-0) ok "$ids; apply to Ready ${dp_ready} ms" ;;
  *) fail "demo pod environment shows '$ids'" ;;
esac

begin "a flip shows in both statuses, naming the pod, and in the pod's allocatedResourcesStatus"
AGENT=$(agent_pod)
kubectl -n $NS exec "$AGENT" -- devplug-agent sim --control-dir /run/devplug/sim $POLICY foo-1 Unhealthy "e2e flip" >/dev/null
wait_for "allocatable after the flip" 60 1 alloc
wait_for "NodeDeviceStatus health of foo-1" 30 Unhealthy entry '.devices[?(@.id=="foo-1")].health'
[ "$(entry '.devices[?(@.id=="foo-1")].allocations[*].pod')" = demo-pod ] || fail "NodeDeviceStatus does not name demo-pod"
wait_for "policy status names the device" 30 "foo-1" kubectl get dpp $POLICY -o jsonpath='{.status.unhealthyDevices[0].device}'
[ "$(kubectl get dpp $POLICY -o jsonpath='{.status.unhealthyDevices[0].pods[0]}')" = default/demo-pod ] ||
  fail "policy status does not name default/demo-pod"
kubelet_view() {
  kubectl get pod demo-pod -o jsonpath="{.status.containerStatuses[0].allocatedResourcesStatus[?(@.name==\"$RES\")].resources[?(@.resourceID==\"foo-1\")].health}"
}
note=""
if kubectl get pod demo-pod -o jsonpath='{.status.containerStatuses[0].allocatedResourcesStatus}' | grep -q resourceID; then
  wait_for "the kubelet's allocatedResourcesStatus of foo-1" 60 Unhealthy kubelet_view
else
  note="(the kubelet of this cluster does not fill allocatedResourcesStatus: ResourceHealthStatus is off)"
fi
kubectl -n $NS exec "$AGENT" -- devplug-agent sim --control-dir /run/devplug/sim $POLICY foo-1 Healthy >/dev/null
wait_for "NodeDeviceStatus health after recovery" 60 Healthy entry '.devices[?(@.id=="foo-1")].health'
wait_for "allocatable after recovery" 60 2 alloc
ok "$note"

begin "the agent repairs its entry when someone else deletes it"
kubectl delete nds "$NODE" --wait=true >/dev/null
wait_for "entry written again by the agent" 30 "Healthy Healthy" entry '.devices[*].health'
ok

begin "a real Prometheus scrapes the operator and an agent with the chart's rules: an alert fires on a flip and resolves on recovery"
if ! command -v prometheus >/dev/null; then
  skip "no prometheus binary (Debian's prometheus package; make testenv-deps installs it)"
elif [ "$mode" != kit ]; then
  skip "needs pod IPs reachable from this machine (the cluster kit)"
else
  pdir=$(mktemp -d)
  # The chart's own rules, with a short hold so the check takes seconds.
  helm template devplug charts/devplug --set metrics.prometheusRule.enabled=true \
    --set metrics.prometheusRule.unhealthyFor=5s --show-only templates/prometheusrule.yaml |
    sed -n '/^spec:/,$p' | sed '1d; s/^  //' >"$pdir/rules.yaml"
  op_ip=$(kubectl -n $NS get pods -l app.kubernetes.io/name=devplug-operator -o jsonpath='{.items[0].status.podIP}')
  agent_ip=$(kubectl -n $NS get pod "$AGENT" -o jsonpath='{.status.podIP}')
  cat >"$pdir/prometheus.yml" <<PROM
global: {scrape_interval: 1s, evaluation_interval: 1s}
rule_files: [rules.yaml]
scrape_configs:
  - job_name: devplug-operator
    honor_labels: true
    static_configs: [{targets: ["$op_ip:8080"]}]
  - job_name: devplug-agents
    honor_labels: true
    static_configs: [{targets: ["$agent_ip:8080"], labels: {policy: $POLICY}}]
PROM
  promtool check config "$pdir/prometheus.yml" >/dev/null 2>&1 || fail "promtool check config: $(promtool check config "$pdir/prometheus.yml" 2>&1)"
  prometheus --config.file="$pdir/prometheus.yml" --storage.tsdb.path="$pdir/data" \
    --web.listen-address=127.0.0.1:19090 >"$pdir/log" 2>&1 &
  prom_pid=$!
  alert_state() { # the state of DevplugDeviceUnhealthy for foo-1, or none
    curl -sf http://127.0.0.1:19090/api/v1/alerts | python3 -c '
import json, sys
alerts = json.load(sys.stdin)["data"]["alerts"]
print(next((a["state"] for a in alerts if a["labels"].get("alertname") == "DevplugDeviceUnhealthy" and a["labels"].get("device") == "foo-1"), "none"))' 2>/dev/null || echo down
  }
  up_targets() { curl -sf 'http://127.0.0.1:19090/api/v1/query?query=sum(up)' | python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(int(float(r[0]["value"][1])) if r else 0)' 2>/dev/null || echo 0; }
  wait_for "Prometheus scraping the operator and the agent" 60 2 up_targets
  wait_for "no alert while every device is healthy" 10 none alert_state
  t_flip=$SECONDS
  kubectl -n $NS exec "$AGENT" -- devplug-agent sim --control-dir /run/devplug/sim $POLICY foo-1 Unhealthy "e2e alert" >/dev/null
  wait_for "DevplugDeviceUnhealthy firing for foo-1" 60 firing alert_state
  fired=$((SECONDS - t_flip))
  kubectl -n $NS exec "$AGENT" -- devplug-agent sim --control-dir /run/devplug/sim $POLICY foo-1 Healthy >/dev/null
  t_back=$SECONDS
  wait_for "DevplugDeviceUnhealthy resolved after recovery" 60 none alert_state
  resolved=$((SECONDS - t_back))
  # The checks after this one start from both devices allocatable again.
  wait_for "NodeDeviceStatus health after recovery" 60 Healthy entry '.devices[?(@.id=="foo-1")].health'
  wait_for "allocatable after recovery" 60 2 alloc
  kill "$prom_pid" 2>/dev/null; wait "$prom_pid" 2>/dev/null || true
  prom_pid=""
  rm -rf "$pdir"
  ok "fired ${fired} s after the flip (5 s hold), resolved ${resolved} s after recovery"
fi

begin "two policies for one resource: the newer gets Conflict and no agents, the older serves on"
sed -e 's/name: simulated-foo/name: e2e-conflict/' examples/simulated-foo.yaml | kubectl apply -f - >/dev/null
wait_for "Conflict on the newer policy" 60 True kubectl get dpp e2e-conflict -o jsonpath='{.status.conditions[?(@.type=="Conflict")].status}'
[ -z "$(kubectl -n $NS get ds -l devplug.io/policy=e2e-conflict -o name)" ] || fail "the losing policy has agents"
[ "$(kubectl get dpp $POLICY -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ] || fail "the older policy is not Ready"
[ "$(alloc)" = 2 ] || fail "allocatable changed to $(alloc)"
kubectl delete dpp e2e-conflict --wait=true --timeout=60s >/dev/null
ok
stop_watch_unknown

begin "a CDI policy's pod runs and sees its device node and env (the agent writes the CDI spec)"
if [ -c /dev/fuse ] || [ "$mode" != kit ]; then
  cat <<EOF | kubectl apply -f - >/dev/null
apiVersion: devplug.io/v1alpha1
kind: DevicePluginPolicy
metadata: {name: e2e-cdi}
spec:
  resourceName: cdi.example.com/fuse
  source: {paths: {globs: [/dev/fuse]}}
  allocate:
    env: {FUSE_E2E: "yes"}
    cdi: {enabled: true}
EOF
  wait_for "cdi.example.com/fuse allocatable" 120 1 kubectl get node "$NODE" -o jsonpath='{.status.allocatable.cdi\.example\.com/fuse}'
  cat <<EOF | kubectl apply -f - >/dev/null
apiVersion: v1
kind: Pod
metadata: {name: e2e-cdi-pod, labels: {app: devplug-e2e}}
spec:
  restartPolicy: Never
  containers:
    - name: c
      image: registry.k8s.io/e2e-test-images/busybox:1.36.1-1
      command: ["sh", "-c", "test -c /dev/fuse && echo \"node=/dev/fuse device=\$DEVPLUG_DEVICE_FUSE env=\$FUSE_E2E\""]
      resources: {limits: {cdi.example.com/fuse: 1}}
EOF
  deadline=$((SECONDS + 120))
  while :; do
    phase=$(kubectl get pod e2e-cdi-pod -o jsonpath='{.status.phase}' 2>/dev/null || true)
    [ "$phase" = Succeeded ] && break
    if [ "$phase" = Failed ] || [ $SECONDS -ge $deadline ]; then
      fail "CDI pod phase '$phase': $(kubectl get pod e2e-cdi-pod -o jsonpath='{.status.containerStatuses[0].state}') $(kubectl logs e2e-cdi-pod 2>&1 | tail -n 3)"
    fi
    waiting=$(kubectl get pod e2e-cdi-pod -o jsonpath='{.status.containerStatuses[0].state.waiting.reason}' 2>/dev/null || true)
    case "$waiting" in CreateContainerError | RunContainerError)
      fail "CDI pod: $(kubectl get pod e2e-cdi-pod -o jsonpath='{.status.containerStatuses[0].state.waiting.message}')" ;;
    esac
    sleep 1
  done
  out=$(kubectl logs e2e-cdi-pod)
  [ "$out" = "node=/dev/fuse device=fuse env=yes" ] || fail "CDI pod printed '$out'"
  kubectl delete pod e2e-cdi-pod --wait=true --timeout=60s >/dev/null
  kubectl delete dpp e2e-cdi --wait=true --timeout=60s >/dev/null
  ok "$out"
else
  skip "this node has no /dev/fuse"
fi

metric_regs() { # registrations the agent has made since it started
  kubectl get --raw "/api/v1/namespaces/$NS/pods/$(agent_pod):8080/proxy/metrics" 2>/dev/null |
    awk '/^devplug_registrations_total/ {s += $2} END {print s + 0}'
}

begin "a live sharing.replicas change is served in place: same agent pod, no new registration, held IDs reported"
uid=$(kubectl -n $NS get pod "$AGENT" -o jsonpath='{.metadata.uid}')
regs=$(metric_regs)
kubectl patch dpp $POLICY --type=merge -p '{"spec":{"sharing":{"strategy":"TimeSlicing","replicas":3}}}' >/dev/null
wait_for "allocatable with 3 replicas" 90 6 alloc
[ "$(kubectl -n $NS get pod "$AGENT" -o jsonpath='{.metadata.uid}' 2>/dev/null)" = "$uid" ] || fail "the agent pod was replaced"
# demo-pod holds foo-0 and foo-1, which 3 replicas no longer advertise.
wait_for "demo-pod's IDs listed as orphaned" 30 "foo-0 foo-1" entry '.orphaned[*].id'
wait_for "a DevicesOrphaned event on the policy" 30 1 sh -c \
  "kubectl get events -n default --field-selector involvedObject.name=$POLICY,reason=DevicesOrphaned -o name | head -1 | wc -l"
kubectl patch dpp $POLICY --type=json -p '[{"op":"remove","path":"/spec/sharing"}]' >/dev/null
wait_for "allocatable back to 2" 90 2 alloc
wait_for "no orphans once the IDs are advertised again" 30 "" entry '.orphaned[*].id'
[ "$(metric_regs)" = "$regs" ] || fail "the agent registered again ($regs before, $(metric_regs) after): the kubelet saw the resource disconnected"
ok "registrations stayed $regs"

begin "a live edit the operator refuses never reaches a pod: the last approved spec serves on, no DaemonSet is deleted"
kubectl delete pod demo-pod --ignore-not-found --wait=true --timeout=60s >/dev/null
approved_mode() { kubectl get dpp $POLICY -o jsonpath='{.status.approvedSpec.allocate.env.FOO_MODE}'; }
ready_reason() { kubectl get dpp $POLICY -o jsonpath='{.status.conditions[?(@.type=="Ready")].status} {.status.conditions[?(@.type=="Ready")].reason}'; }
kubectl patch dpp $POLICY --type=merge -p '{"spec":{"allocate":{"env":{"FOO_MODE":"approved"},"mounts":[{"hostPath":"/dev/null","containerPath":"/x","readOnly":true}]}}}' >/dev/null
wait_for "the edit approved" 60 approved approved_mode
ds_uid=$(kubectl -n $NS get ds -l devplug.io/policy=$POLICY -o jsonpath='{.items[0].metadata.uid}')
# The finding: this edit (the host's /etc read-write) was served within a
# second by the agent's own watch, then the DaemonSet was deleted.
kubectl patch dpp $POLICY --type=merge -p '{"spec":{"allocate":{"env":{"FOO_MODE":"evil"},"mounts":[{"hostPath":"/etc","containerPath":"/host-etc"}]}}}' >/dev/null
wait_for "Ready=False InvalidSpec" 60 "False InvalidSpec" ready_reason
msg=$(kubectl get dpp $POLICY -o jsonpath='{.status.conditions[?(@.type=="Ready")].message}')
case $msg in *spec.allocate.mounts*) ;; *) fail "the InvalidSpec message does not name the field: $msg" ;; esac
[ "$(approved_mode)" = approved ] || fail "status.approvedSpec changed to '$(approved_mode)'"
kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: refused-edit, labels: {app: devplug-e2e}}
spec:
  restartPolicy: Never
  containers:
    - name: c
      image: registry.k8s.io/e2e-test-images/busybox:1.36.1-1
      command: ["sh", "-c", "echo mode=\$FOO_MODE; if [ -e /host-etc ]; then echo HOST-ETC; fi"]
      resources: {limits: {$RES: 1}}
YAML
wait_for "refused-edit ran" 120 Succeeded kubectl get pod refused-edit -o jsonpath='{.status.phase}'
out=$(kubectl logs refused-edit)
case $out in *mode=approved*) ;; *) fail "the pod did not get the approved spec: $out" ;; esac
case $out in *HOST-ETC*) fail "the refused mount reached the pod: $out" ;; esac
[ "$(kubectl -n $NS get ds -l devplug.io/policy=$POLICY -o jsonpath='{.items[0].metadata.uid}')" = "$ds_uid" ] ||
  fail "the agent DaemonSet was deleted or replaced"
kubectl delete pod refused-edit --wait=true --timeout=60s >/dev/null
kubectl patch dpp $POLICY --type=json -p '[{"op":"remove","path":"/spec/allocate/mounts"},{"op":"replace","path":"/spec/allocate/env","value":{"FOO_MODE":"demo"}}]' >/dev/null
wait_for "Ready again once fixed" 90 "True AgentsReady" ready_reason
wait_for "the fix approved" 60 demo approved_mode
ok "${msg:0:160}"

begin "kubelet restarted 5 times in a row, a new pod runs after each"
if can_restart_kubelet; then
  kubectl delete pod demo-pod --ignore-not-found --wait=true --timeout=60s >/dev/null
  # The kubelet keeps a deleted pod's devices in its checkpoint until its next
  # Allocate, and right after a restart it does not clean the checkpoint until
  # every pod source has synced: a pod admitted in that first second sees
  # devices of pods deleted before the restart as still in use (kubelet
  # behaviour, whatever the plugin). One pod before the restarts lets the
  # kubelet drop demo-pod's two devices, as any later Allocate would.
  run_pod() { # name
    cat <<EOF | kubectl apply -f - >/dev/null
apiVersion: v1
kind: Pod
metadata: {name: $1, labels: {app: devplug-e2e}}
spec:
  restartPolicy: Never
  containers:
    - name: c
      image: registry.k8s.io/e2e-test-images/busybox:1.36.1-1
      command: ["sh", "-c", "printenv DEVPLUG_HARDWARE_VENDOR_EXAMPLE_FOO"]
      resources: {limits: {$RES: 1}}
EOF
    local deadline=$((SECONDS + 120)) phase=""
    while :; do
      phase=$(kubectl get pod "$1" -o jsonpath='{.status.phase}' 2>/dev/null || true)
      [ "$phase" = Succeeded ] && break
      [ "$phase" = Failed ] && fail "pod $1 failed: $(kubectl get pod "$1" -o jsonpath='{.status.reason}: {.status.message}')"
      [ $SECONDS -lt $deadline ] || fail "pod $1 did not succeed within 120 s (phase '$phase')"
      sleep 1
    done
    kubectl delete pod "$1" --wait=false >/dev/null
  }
  kubelet_pods() { # the pods the kubelet itself holds (its /pods endpoint)
    local pki="${DEVPLUG_CLUSTER_DIR:-/var/lib/devplug-cluster}/pki"
    curl -sf --max-time 5 --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
      https://127.0.0.1:10250/pods 2>/dev/null |
      python3 -c 'import json,sys; [print(p["metadata"]["name"]) for p in json.load(sys.stdin)["items"]]' 2>/dev/null || true
  }
  uae_events() { kubectl get events -A --field-selector reason=UnexpectedAdmissionError -o name 2>/dev/null | wc -l; }
  uae_before=$(uae_events)
  run_pod e2e-before-restarts
  heartbeat() { # seconds since the epoch of the kubelet's last node-lease renewal
    date -d "$(kubectl -n kube-node-lease get lease "$NODE" -o jsonpath='{.spec.renewTime}')" +%s 2>/dev/null || echo 0
  }
  for i in 1 2 3 4 5; do
    before=$(metric_regs)
    restarted=$(date +%s)
    restart_kubelet || fail "restart $i of the kubelet failed"
    # The new kubelet is through its start (it has renewed its node lease)
    # and has our plugin again (the agent counted one more registration).
    deadline=$((SECONDS + 60))
    until [ "$(heartbeat)" -gt "$restarted" ]; do
      [ $SECONDS -lt $deadline ] || fail "no node heartbeat within 60 s of restart $i"
      sleep 1
    done
    deadline=$((SECONDS + 60))
    until [ "$(metric_regs)" -gt "$before" ] 2>/dev/null; do
      [ $SECONDS -lt $deadline ] || fail "no re-registration within 60 s of restart $i (registrations stayed $before)"
      sleep 1
    done
    # The kubelet admits pods of its first API listing before it counts
    # its pod sources as synced, and then does not free devices of pods
    # deleted before the restart. Where the kubelet's own pod list can be
    # read (the kit), wait until it holds the agent pod: the listing is in.
    if [ "$mode" = kit ]; then
      deadline=$((SECONDS + 60))
      until kubelet_pods | grep -qx "$(agent_pod)"; do
        [ $SECONDS -lt $deadline ] || fail "the kubelet did not list its pods within 60 s of restart $i"
        sleep 1
      done
    fi
    wait_for "allocatable after restart $i" 60 2 alloc
    run_pod "e2e-after-restart-$i"
  done
  uae=$(($(uae_events) - uae_before))
  [ "$uae" -le 0 ] || fail "$uae new UnexpectedAdmissionError events"
  ok "5 restarts, 5 pods ran, no UnexpectedAdmissionError"
else
  skip "set E2E_RESTART_KUBELET to a command that restarts the node's kubelet"
fi

begin "two operator replicas: the standby takes over and reconciles"
helm upgrade devplug charts/devplug --namespace $NS "${HELM_SET[@]}" --set operator.replicas=2 --wait --timeout 5m >/dev/null ||
  fail "helm upgrade to 2 replicas failed"
kubectl -n $NS rollout status deploy/devplug-operator --timeout=120s >/dev/null
leader() { kubectl -n $NS get lease devplug-operator -o jsonpath='{.spec.holderIdentity}'; }
device_events() {
  kubectl get events -n default --field-selector involvedObject.name=$POLICY -o jsonpath='{range .items[*]}{.reason}{"\n"}{end}' 2>/dev/null |
    grep -c '^Device' || true
}
events_before=$(device_events)
# The rollout replaced both pods; the old leader released the lease on
# SIGTERM, and one of the new ones takes it at its next try.
deadline=$((SECONDS + 30))
until old=$(leader) && [ -n "$old" ] && kubectl -n $NS get pod "$old" >/dev/null 2>&1; do
  [ $SECONDS -lt $deadline ] || fail "no leader among the running operator pods within 30 s (lease holder '$old')"
  sleep 1
done
oldlog=$(mktemp)
kubectl -n $NS logs -f "$old" >"$oldlog" 2>&1 &
oldlog_pid=$!
takeover_start=$SECONDS
kubectl -n $NS delete pod "$old" --wait=false >/dev/null
# The leader releases the lease on SIGTERM and the standby takes it at its
# next try (every 2 s): well within the lease duration (15 s).
deadline=$((SECONDS + 15))
timeline=""
while :; do
  now=$(leader)
  timeline+="$((SECONDS - takeover_start))s holder='$now' renewed=$(kubectl -n $NS get lease devplug-operator -o jsonpath='{.spec.renewTime}')"$'\n'
  if [ -n "$now" ] && [ "$now" != "$old" ] && kubectl -n $NS get pod "$now" >/dev/null 2>&1; then break; fi
  if [ $SECONDS -ge $deadline ]; then
    kill $oldlog_pid 2>/dev/null || true
    say "lease over time:"; printf '%s' "$timeline"
    say "the old leader's log:"; tail -30 "$oldlog"
    fail "no new leader within the lease duration, 15 s (lease holder '$now')"
  fi
  sleep 1
done
took=$((SECONDS - takeover_start))
kill $oldlog_pid 2>/dev/null || true
rm -f "$oldlog"
kubectl label dpp $POLICY e2e/touched=yes --overwrite >/dev/null
kubectl patch dpp $POLICY --type=merge -p '{"spec":{"allocate":{"env":{"FOO_MODE":"after-failover"}}}}' >/dev/null
gen=$(kubectl get dpp $POLICY -o jsonpath='{.metadata.generation}')
wait_for "the new leader reconciles the change" 60 "$gen" kubectl get dpp $POLICY -o jsonpath='{.status.observedGeneration}'
[ "$(kubectl get dpp $POLICY -o jsonpath='{.status.devicesHealthy}')" = 2/2 ] || fail "status after failover: $(kubectl get dpp $POLICY -o jsonpath='{.status.devicesHealthy}')"
[ -z "$(entry '.devices[?(@.health=="Unknown")].id')" ] || fail "devices Unknown after failover"
[ "$(device_events)" = "$events_before" ] || fail "device events after failover: $events_before before, $(device_events) after"
ok "$now leads after $took s; status 2/2, no device events"

begin "agents the namespace's Pod Security forbids: the policy's Degraded says why and how to fix it"
psa=$(kubectl get ns $NS -o jsonpath='{.metadata.labels.pod-security\.kubernetes\.io/enforce}')
[ "$psa" = privileged ] || fail "the operator did not label namespace $NS for Pod Security (enforce='$psa')"
kubectl label ns $NS pod-security.kubernetes.io/enforce=baseline --overwrite >/dev/null
cat <<EOF | kubectl apply -f - >/dev/null
apiVersion: devplug.io/v1alpha1
kind: DevicePluginPolicy
metadata: {name: e2e-psa}
spec:
  resourceName: hardware-vendor.example/psa
  source: {simulated: {count: 1}}
EOF
degraded() { kubectl get dpp e2e-psa -o jsonpath='{.status.conditions[?(@.type=="Degraded")].status} {.status.conditions[?(@.type=="Degraded")].reason}'; }
wait_for "Degraded AgentsNotCreated" 90 "True AgentsNotCreated" degraded
msg=$(kubectl get dpp e2e-psa -o jsonpath='{.status.conditions[?(@.type=="Degraded")].message}')
case $msg in *PodSecurity*enforce=privileged*) ;; *) fail "Degraded message without the cause or the fix: $msg" ;; esac
kubectl label ns $NS pod-security.kubernetes.io/enforce=privileged --overwrite >/dev/null
kubectl delete dpp e2e-psa --wait=true --timeout=90s >/dev/null || fail "e2e-psa was not deleted"
ok "${msg:0:160}"

begin "policy deletion removes agents, the resource, the NodeDeviceStatus entry and the node labels"
kubectl delete pod -l app=devplug-e2e --wait=true --timeout=60s >/dev/null 2>&1 || true
kubectl delete dpp $POLICY --wait=true --timeout=120s >/dev/null || fail "deleting the policy did not finish"
wait_for "agents removed" 120 "" kubectl -n $NS get ds -l devplug.io/policy=$POLICY -o name
wait_for "agent pods gone" 120 "" kubectl -n $NS get pods -l devplug.io/policy=$POLICY -o name
wait_for "resource gone from allocatable" 180 "" sh -c "v=\$(kubectl get node $NODE -o jsonpath='{.status.allocatable.$RES_JSON}'); [ \"\$v\" = 0 ] && v=''; echo \"\$v\""
wait_for "NodeDeviceStatus entry removed" 60 "" entry '.policy'
wait_for "node labels removed" 60 "" sh -c "kubectl get node $NODE -o jsonpath='{.metadata.labels}' | grep -o 'devplug.io/$POLICY[^\"]*' || true"
ok

# ----------------------------------------------------------------- DRA
DRA_POLICY=simulated-foo-dra
DRIVER=$DRA_POLICY.devplug.io
dra_agent() {
  kubectl -n $NS get pods -l devplug.io/policy=$DRA_POLICY --field-selector spec.nodeName="$NODE" \
    -o jsonpath="{.items[0]$1}"
}
dra_entry() {
  kubectl get nds "$NODE" -o jsonpath="{.status.resources[?(@.policy==\"$DRA_POLICY\")]$1}"
}
slice_devices() {
  kubectl get resourceslices --field-selector spec.driver=$DRIVER,spec.nodeName="$NODE" \
    -o jsonpath='{.items[*].spec.devices[*].name}'
}
pod_ready_or_fail() { # pod, seconds
  kubectl wait --for=condition=Ready "pod/$1" --timeout="$2s" >/dev/null 2>&1 && return 0
  kubectl describe pod "$1" | tail -n 25 >&2
  fail "pod $1 not Ready within $2 s"
}

begin "DRA: the policy's DeviceClass, the node's ResourceSlice, registered with the real kubelet"
kubectl apply -f examples/$DRA_POLICY.yaml >/dev/null
wait_for "DeviceClass $DRIVER with the extended resource" 60 "$RES" \
  kubectl get deviceclass $DRIVER -o jsonpath='{.spec.extendedResourceName}'
# Ready means the kubelet's plugin watcher called GetInfo and then told the
# agent it is registered (NotifyRegistrationStatus).
wait_for "DRA agent Ready (registered with the kubelet)" 120 True dra_agent '.status.conditions[?(@.type=="Ready")].status'
wait_for "ResourceSlice devices" 60 "foo-0 foo-1" slice_devices
wait_for "policy devices healthy" 60 "2/2" kubectl get dpp $DRA_POLICY -o jsonpath='{.status.devicesHealthy}'
ok "driver $DRIVER, devices $(slice_devices)"

begin "DRA: a ResourceClaim pod gets its device through CDI"
t0=$(date +%s%3N)
sed 's/^metadata:/metadata:\n  labels: {app: devplug-e2e}/' examples/claim-pod.yaml | kubectl apply -f - >/dev/null
pod_ready_or_fail claim-pod 180
claim_ready=$(( $(date +%s%3N) - t0 ))
got=$(kubectl exec claim-pod -- printenv DEVPLUG_HARDWARE_VENDOR_EXAMPLE_FOO)
case "$got" in foo-0 | foo-1) ;; *) fail "claim pod environment shows '$got'" ;; esac
[ "$(kubectl exec claim-pod -- printenv FOO_MODE)" = demo ] || fail "the policy's env did not reach the claim pod"
wait_for "NodeDeviceStatus names the claim pod" 30 claim-pod dra_entry ".devices[?(@.id==\"$got\")].allocations[*].pod"
kubectl delete pod claim-pod --grace-period=1 --wait=true --timeout=60s >/dev/null
ok "$got; apply to Ready ${claim_ready} ms"

begin "DRA: the unchanged demo pod is served through the extended-resource bridge"
sed 's/^metadata:/metadata:\n  labels: {app: devplug-e2e}/' examples/demo-pod.yaml | kubectl apply -f - >/dev/null
pod_ready_or_fail demo-pod 180
ids=$(kubectl exec demo-pod -- printenv DEVPLUG_HARDWARE_VENDOR_EXAMPLE_FOO)
case "$ids" in foo-0,foo-1 | foo-1,foo-0) ;; *) fail "demo pod environment shows '$ids' through DRA" ;; esac
[ -n "$(kubectl get pod demo-pod -o jsonpath='{.status.extendedResourceClaimStatus.resourceClaimName}')" ] ||
  fail "demo-pod was not served through DRA (no extendedResourceClaimStatus)"
kubectl delete pod demo-pod --grace-period=1 --wait=true --timeout=90s >/dev/null
ok "$ids"

begin "DRA: a flip shows in the claim pod's allocatedResourcesStatus and both statuses; recovery clears the taint"
# The kubelet reports DRA device health for containers that name their
# claims (resources.claims), so the claim pod is the one to watch.
sed 's/^metadata:/metadata:\n  labels: {app: devplug-e2e}/' examples/claim-pod.yaml | kubectl apply -f - >/dev/null
pod_ready_or_fail claim-pod 180
dev=$(kubectl exec claim-pod -- printenv DEVPLUG_HARDWARE_VENDOR_EXAMPLE_FOO)
DRA_AGENT=$(dra_agent '.metadata.name')
claim_name=$(kubectl get pod claim-pod -o jsonpath='{.status.resourceClaimStatuses[0].resourceClaimName}')
claim_health() { # the Healthy condition of $dev in the claim's status.devices, as the agent writes it
  kubectl get resourceclaim "$claim_name" -o jsonpath="{range .status.devices[?(@.device==\"$dev\")]}{.conditions[?(@.type==\"Ready\")].status} {.conditions[?(@.type==\"Healthy\")].status} {.conditions[?(@.type==\"Healthy\")].reason} {.conditions[?(@.type==\"Healthy\")].message}{end}"
}
gates="DRAResourceClaimDeviceStatus=$(gate DRAResourceClaimDeviceStatus) DRAResourceClaimGranularStatusAuthorization=$(gate DRAResourceClaimGranularStatusAuthorization)"
wait_for "the claim's status.devices: Ready, Healthy ($gates)" 60 "True True Healthy " claim_health
kubectl -n $NS exec "$DRA_AGENT" -- devplug-agent sim --control-dir /run/devplug/sim $DRA_POLICY "$dev" Unhealthy "e2e DRA flip" >/dev/null
pod_health() { # health and message of device $1 in claim-pod's status, as the kubelet reports it
  kubectl get pod claim-pod -o json | python3 -c '
import json,sys
dev=sys.argv[1]
p=json.load(sys.stdin)
for c in p["status"].get("containerStatuses",[]):
  for a in c.get("allocatedResourcesStatus") or []:
    for r in a.get("resources") or []:
      rid=r.get("resourceID","")
      # A CDI name (<kind>=<device>-<request>-<claim uid>) or <driver>/<pool>/<device>.
      if ("="+dev+"-") in rid or rid.endswith("/"+dev): print(r.get("health"), r.get("message", ""))' "$1"
}
pod_health_only() { pod_health "$1" | cut -d' ' -f1; }
wait_for "claim-pod's allocatedResourcesStatus" 90 "Unhealthy" pod_health_only "$dev"
wait_for "NodeDeviceStatus health of $dev" 30 Unhealthy dra_entry ".devices[?(@.id==\"$dev\")].health"
wait_for "NodeDeviceStatus names the claim pod" 30 claim-pod dra_entry ".devices[?(@.id==\"$dev\")].allocations[*].pod"
wait_for "policy status names $dev" 30 "$dev" kubectl get dpp $DRA_POLICY -o jsonpath='{.status.unhealthyDevices[*].device}'
[ "$(kubectl get dpp $DRA_POLICY -o jsonpath='{.status.unhealthyDevices[0].pods[0]}')" = default/claim-pod ] ||
  fail "the policy status does not name default/claim-pod: $(kubectl get dpp $DRA_POLICY -o jsonpath='{.status.unhealthyDevices}')"
wait_for "slice taints $dev" 30 "devplug.io/unhealthy" kubectl get resourceslices --field-selector spec.driver=$DRIVER \
  -o jsonpath="{.items[*].spec.devices[?(@.name==\"$dev\")].taints[*].key}"
wait_for "the claim's status.devices: Unhealthy with the flip's reason" 30 "True False Unhealthy e2e DRA flip" claim_health
health_line=$(pod_health "$dev")
kubectl -n $NS exec "$DRA_AGENT" -- devplug-agent sim --control-dir /run/devplug/sim $DRA_POLICY "$dev" Healthy >/dev/null
wait_for "taint removed on recovery" 60 "" kubectl get resourceslices --field-selector spec.driver=$DRIVER \
  -o jsonpath="{.items[*].spec.devices[?(@.name==\"$dev\")].taints[*].key}"
wait_for "claim-pod's device Healthy again" 90 "Healthy" pod_health_only "$dev"
wait_for "policy healthy again" 60 "2/2" kubectl get dpp $DRA_POLICY -o jsonpath='{.status.devicesHealthy}'
wait_for "the claim's status.devices: Healthy again" 30 "True True Healthy " claim_health
ok "$dev: $health_line; claim $claim_name status.devices followed; gates $gates"

begin "DRA: the agent and the kubelet restarted mid-way lose no prepared claim"
specs() { ls /var/run/cdi/devplug-claim-*.json 2>/dev/null | wc -l; }
if [ "$mode" = kit ]; then
  [ "$(specs)" -ge 1 ] || fail "no claim CDI spec on the node while claim-pod runs"
fi
kubectl -n $NS delete pod "$DRA_AGENT" --wait=true --timeout=60s >/dev/null
wait_for "DRA agent Ready again" 120 True dra_agent '.status.conditions[?(@.type=="Ready")].status'
if can_restart_kubelet; then restart_kubelet || fail "restarting the kubelet failed"; fi
wait_for "DRA agent Ready after the kubelet restart" 120 True dra_agent '.status.conditions[?(@.type=="Ready")].status'
[ "$(kubectl get pod claim-pod -o jsonpath='{.status.phase}')" = Running ] || fail "claim-pod is not Running after the restarts"
kubectl delete pod claim-pod --grace-period=1 --wait=true --timeout=90s >/dev/null
if [ "$mode" = kit ]; then
  wait_for "claim CDI specs removed by unprepare" 60 0 specs
fi
sed 's/^metadata:/metadata:\n  labels: {app: devplug-e2e}/' examples/claim-pod.yaml | kubectl apply -f - >/dev/null
pod_ready_or_fail claim-pod 180
kubectl delete pod claim-pod --grace-period=1 --wait=true --timeout=60s >/dev/null
ok "the claim prepared before the restarts was unprepared after them; a new one ran"

begin "DRA: a pod with two requests of one claim, and a pod with two claims, each see both devices"
sorted_ids() { kubectl exec "$1" -- printenv DEVPLUG_HARDWARE_VENDOR_EXAMPLE_FOO | tr , '\n' | sort | paste -sd, -; }
kubectl apply -f - >/dev/null <<YAML
apiVersion: resource.k8s.io/v1
kind: ResourceClaim
metadata: {name: two-requests, labels: {app: devplug-e2e}}
spec:
  devices:
    requests:
      - {name: first, exactly: {deviceClassName: $DRIVER}}
      - {name: second, exactly: {deviceClassName: $DRIVER}}
---
apiVersion: v1
kind: Pod
metadata: {name: two-requests, labels: {app: devplug-e2e}}
spec:
  containers:
    - name: c
      image: registry.k8s.io/e2e-test-images/busybox:1.36.1-1
      command: ["sleep", "3600"]
      resources: {claims: [{name: both}]}
  resourceClaims: [{name: both, resourceClaimName: two-requests}]
YAML
pod_ready_or_fail two-requests 180
got_a=$(sorted_ids two-requests)
[ "$got_a" = foo-0,foo-1 ] || fail "a container given a claim with two requests sees '$got_a'"
for d in FOO_0 FOO_1; do
  [ -n "$(kubectl exec two-requests -- printenv DEVPLUG_DEVICE_$d)" ] || fail "two-requests lacks DEVPLUG_DEVICE_$d"
done
kubectl delete pod two-requests --grace-period=1 --wait=true --timeout=60s >/dev/null
kubectl delete resourceclaim two-requests --wait=true --timeout=60s >/dev/null
kubectl apply -f - >/dev/null <<YAML
apiVersion: resource.k8s.io/v1
kind: ResourceClaimTemplate
metadata: {name: one-foo, labels: {app: devplug-e2e}}
spec:
  spec:
    devices:
      requests: [{name: foo, exactly: {deviceClassName: $DRIVER}}]
---
apiVersion: v1
kind: Pod
metadata: {name: two-claims, labels: {app: devplug-e2e}}
spec:
  containers:
    - name: c
      image: registry.k8s.io/e2e-test-images/busybox:1.36.1-1
      command: ["sleep", "3600"]
      resources: {claims: [{name: a}, {name: b}]}
  resourceClaims:
    - {name: a, resourceClaimTemplateName: one-foo}
    - {name: b, resourceClaimTemplateName: one-foo}
YAML
pod_ready_or_fail two-claims 180
got_b=$(sorted_ids two-claims)
[ "$got_b" = foo-0,foo-1 ] || fail "a container naming two claims sees '$got_b'"
kubectl delete pod two-claims --grace-period=1 --wait=true --timeout=60s >/dev/null
kubectl delete resourceclaimtemplate one-foo --wait=true --timeout=60s >/dev/null
ok "two requests: $got_a; two claims: $got_b"

begin "DRA at real size: 300 devices, one Unhealthy: the taint is published and a new claim is allocated from the other 299"
BIG=e2e-dra-300
BIG_DRIVER=$BIG.devplug.io
kubectl apply -f - >/dev/null <<YAML
apiVersion: devplug.io/v1alpha1
kind: DevicePluginPolicy
metadata: {name: $BIG, labels: {app: devplug-e2e}}
spec:
  resourceName: hardware-vendor.example/big
  kubeletApi: DRA
  source: {simulated: {count: 300, idPrefix: big}}
YAML
big_slices() { # devices, slices at the newest generation, slices in all, tainted devices, generation
  kubectl get resourceslices --field-selector spec.driver=$BIG_DRIVER,spec.nodeName="$NODE" -o json | python3 -c '
import json,sys
items=json.load(sys.stdin)["items"]
if not items: print("none"); sys.exit()
g=max(i["spec"]["pool"]["generation"] for i in items)
cur=[i for i in items if i["spec"]["pool"]["generation"]==g]
devs=[d for i in cur for d in i["spec"]["devices"]]
want=cur[0]["spec"]["pool"]["resourceSliceCount"]
print(len(devs), "devices", len(cur), "of", want, "slices", len(items), "in all", sum(1 for d in devs if d.get("taints")), "tainted")'
}
big_agent() {
  kubectl -n $NS get pods -l devplug.io/policy=$BIG --field-selector spec.nodeName="$NODE" -o jsonpath='{.items[0].metadata.name}'
}
wait_for "the 300-device pool published whole" 120 "300 devices 5 of 5 slices 5 in all 0 tainted" big_slices
kubectl -n $NS exec "$(big_agent)" -- devplug-agent sim --control-dir /run/devplug/sim $BIG big-7 Unhealthy "e2e: one bad device" >/dev/null
wait_for "the taint published, the pool whole" 60 "300 devices 5 of 5 slices 5 in all 1 tainted" big_slices
kubectl apply -f - >/dev/null <<YAML
apiVersion: resource.k8s.io/v1
kind: ResourceClaim
metadata: {name: big-claim, labels: {app: devplug-e2e}}
spec:
  devices:
    requests:
      - name: big
        exactly: {deviceClassName: $BIG_DRIVER, count: 1}
---
apiVersion: v1
kind: Pod
metadata: {name: big-pod, labels: {app: devplug-e2e}}
spec:
  restartPolicy: Never
  containers:
    - name: c
      image: registry.k8s.io/e2e-test-images/busybox:1.36.1-1
      command: ["sleep", "3600"]
      resources: {claims: [{name: big}]}
  resourceClaims: [{name: big, resourceClaimName: big-claim}]
YAML
pod_ready_or_fail big-pod 180
got=$(kubectl get resourceclaim big-claim -o jsonpath='{.status.allocation.devices.results[0].device}')
[ -n "$got" ] && [ "$got" != big-7 ] || fail "big-claim got '$got' (the tainted device is big-7)"
kubectl -n $NS exec "$(big_agent)" -- devplug-agent sim --control-dir /run/devplug/sim $BIG big-7 Healthy >/dev/null
wait_for "the taint removed on recovery" 60 "300 devices 5 of 5 slices 5 in all 0 tainted" big_slices
kubectl delete pod big-pod --grace-period=1 --wait=true --timeout=60s >/dev/null
kubectl delete resourceclaim big-claim --wait=true --timeout=60s >/dev/null
kubectl delete dpp $BIG --wait=true --timeout=120s >/dev/null || fail "deleting $BIG did not finish"
[ -z "$(kubectl get resourceslices --field-selector spec.driver=$BIG_DRIVER -o name)" ] || fail "$BIG's ResourceSlices left"
ok "big-claim got $got while big-7 was tainted"

begin "DRA topology: the standard pcieRoot attribute, and a claim for two devices on one PCIe root"
TOPO=e2e-dra-topo
TOPO_DRIVER=$TOPO.devplug.io
kubectl apply -f - >/dev/null <<YAML
apiVersion: devplug.io/v1alpha1
kind: DevicePluginPolicy
metadata: {name: $TOPO, labels: {app: devplug-e2e}}
spec:
  resourceName: hardware-vendor.example/topo
  kubeletApi: DRA
  source:
    simulated:
      devices:
        - {id: t-a, pcieRoot: "pci0000:00", pciBusID: "0000:01:00.0"}
        - {id: t-b, pcieRoot: "pci0000:40", pciBusID: "0000:41:00.0"}
        - {id: t-c, pcieRoot: "pci0000:40", pciBusID: "0000:42:00.0"}
YAML
topo_attrs() {
  kubectl get resourceslices --field-selector spec.driver=$TOPO_DRIVER,spec.nodeName="$NODE" -o json | python3 -c '
import json,sys
items=json.load(sys.stdin)["items"]
a=lambda d,k: d.get("attributes",{}).get(k,{}).get("string","-")
print(" ".join(d["name"]+"="+a(d,"resource.kubernetes.io/pcieRoot")+"/"+a(d,"resource.kubernetes.io/pciBusID") for i in items for d in i["spec"]["devices"]))'
}
wait_for "the standard attributes published" 120 "t-a=pci0000:00/0000:01:00.0 t-b=pci0000:40/0000:41:00.0 t-c=pci0000:40/0000:42:00.0" topo_attrs
kubectl apply -f - >/dev/null <<YAML
apiVersion: resource.k8s.io/v1
kind: ResourceClaim
metadata: {name: topo-claim, labels: {app: devplug-e2e}}
spec:
  devices:
    requests:
      - name: two
        exactly: {deviceClassName: $TOPO_DRIVER, count: 2}
    constraints:
      - requests: [two]
        matchAttribute: resource.kubernetes.io/pcieRoot
---
apiVersion: v1
kind: Pod
metadata: {name: topo-pod, labels: {app: devplug-e2e}}
spec:
  restartPolicy: Never
  containers:
    - name: c
      image: registry.k8s.io/e2e-test-images/busybox:1.36.1-1
      command: ["sleep", "3600"]
      resources: {claims: [{name: two}]}
  resourceClaims: [{name: two, resourceClaimName: topo-claim}]
YAML
pod_ready_or_fail topo-pod 180
got=$(kubectl get resourceclaim topo-claim -o jsonpath='{.status.allocation.devices.results[*].device}' | tr ' ' '\n' | sort | paste -sd, -)
[ "$got" = "t-b,t-c" ] || fail "topo-claim got '$got'; only t-b and t-c share a PCIe root (pci0000:40)"
seen=$(kubectl exec topo-pod -- printenv DEVPLUG_HARDWARE_VENDOR_EXAMPLE_TOPO | tr , '\n' | sort | paste -sd, -)
[ "$seen" = "t-b,t-c" ] || fail "topo-pod sees '$seen', not t-b,t-c"
kubectl delete pod topo-pod --grace-period=1 --wait=true --timeout=60s >/dev/null
kubectl delete resourceclaim topo-claim --wait=true --timeout=60s >/dev/null
kubectl delete dpp $TOPO --wait=true --timeout=120s >/dev/null || fail "deleting $TOPO did not finish"
ok "topo-claim got $got (pci0000:40); the pod sees $seen"

begin "DRA sharing: one device in 4 shares; 4 claims run on it, a fifth stays Pending; the bridge's foo: 1 is one share"
SHARE=e2e-dra-share
SHARE_DRIVER=$SHARE.devplug.io
kubectl apply -f - >/dev/null <<YAML
apiVersion: devplug.io/v1alpha1
kind: DevicePluginPolicy
metadata: {name: $SHARE, labels: {app: devplug-e2e}}
spec:
  resourceName: hardware-vendor.example/share
  kubeletApi: DRA
  sharing: {strategy: TimeSlicing, replicas: 4}
  source: {simulated: {devices: [{id: s-0}]}}
YAML
share_slice() {
  kubectl get resourceslices --field-selector spec.driver=$SHARE_DRIVER,spec.nodeName="$NODE" \
    -o jsonpath='{.items[*].spec.devices[*].name} {.items[*].spec.devices[*].allowMultipleAllocations} {.items[*].spec.devices[*].capacity.shares.value}'
}
wait_for "one device, several allocations, 4 shares ($(gate DRAConsumableCapacity | sed 's/^/DRAConsumableCapacity=/'))" 120 "s-0 true 4" share_slice
kubectl apply -f - >/dev/null <<YAML
apiVersion: resource.k8s.io/v1
kind: ResourceClaimTemplate
metadata: {name: share-claim, labels: {app: devplug-e2e}}
spec:
  spec:
    devices:
      requests:
        - name: s
          exactly: {deviceClassName: $SHARE_DRIVER}
YAML
for i in 1 2 3 4 5; do
  kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: share-$i, labels: {app: devplug-e2e}}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
    - name: c
      image: registry.k8s.io/e2e-test-images/busybox:1.36.1-1
      command: ["sleep", "3600"]
      resources: {claims: [{name: s}]}
  resourceClaims: [{name: s, resourceClaimTemplateName: share-claim}]
YAML
done
running_shares() { kubectl get pods -l app=devplug-e2e -o jsonpath='{range .items[*]}{.metadata.name} {.status.phase}{"\n"}{end}' | grep -c '^share-[0-9] Running$'; }
wait_for "4 of the 5 share pods Running" 180 4 running_shares
unscheduled() { # the Pending pod's scheduler message
  for i in 1 2 3 4 5; do
    [ "$(kubectl get pod share-$i -o jsonpath='{.status.phase}')" = Pending ] &&
      kubectl get pod share-$i -o jsonpath='{.status.conditions[?(@.type=="PodScheduled")].reason} {.status.conditions[?(@.type=="PodScheduled")].message}'
  done
}
unscheduled_reason() { unscheduled | cut -d' ' -f1; }
wait_for "the fifth Pending as Unschedulable" 60 Unschedulable unscheduled_reason
pending_msg=$(unscheduled | cut -d' ' -f2-)
now_running=$(running_shares)
[ "$now_running" = 4 ] || fail "$now_running share pods Running, wanted 4 (the device has 4 shares)"
first=$(kubectl get pods -l app=devplug-e2e -o jsonpath='{range .items[?(@.status.phase=="Running")]}{.metadata.name}{"\n"}{end}' | awk '/^share-/ && !n++')
pct=$(kubectl exec "$first" -- printenv DEVPLUG_DEVICE_S_0_SHARE)
[ "$pct" = 25 ] || fail "$first sees DEVPLUG_DEVICE_S_0_SHARE='$pct', wanted 25"
for i in 1 2 3 4 5; do kubectl delete pod share-$i --wait=false >/dev/null 2>&1; done
for i in 1 2 3 4 5; do kubectl wait --for=delete pod/share-$i --timeout=90s >/dev/null 2>&1 || true; done
# The extended-resource bridge: an unchanged pod asking for the resource.
kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: share-bridge, labels: {app: devplug-e2e}}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
    - name: c
      image: registry.k8s.io/e2e-test-images/busybox:1.36.1-1
      command: ["sleep", "3600"]
      resources: {limits: {hardware-vendor.example/share: 1}}
YAML
pod_ready_or_fail share-bridge 180
bridge_pct=$(kubectl exec share-bridge -- printenv DEVPLUG_DEVICE_S_0_SHARE)
[ "$bridge_pct" = 25 ] || fail "the bridge pod (share: 1) sees DEVPLUG_DEVICE_S_0_SHARE='$bridge_pct', wanted 25 (one share)"
kubectl delete pod share-bridge --wait=true --timeout=90s >/dev/null
kubectl delete resourceclaimtemplate share-claim --ignore-not-found >/dev/null
kubectl delete dpp $SHARE --wait=true --timeout=120s >/dev/null || fail "deleting $SHARE did not finish"
ok "4 running at 25 %, the fifth: $pending_msg; the bridge's share: 1 got $bridge_pct %"

begin "DRA partitions: a device in 4 slots; two 2-slot claims run, a third stays Pending until one ends"
PART=e2e-dra-part
PART_DRIVER=$PART.devplug.io
kubectl apply -f - >/dev/null <<YAML
apiVersion: devplug.io/v1alpha1
kind: DevicePluginPolicy
metadata: {name: $PART, labels: {app: devplug-e2e}}
spec:
  resourceName: hardware-vendor.example/part
  kubeletApi: DRA
  source: {simulated: {devices: [{id: p-0}], partitionSlots: 4}}
YAML
part_pool() { # the counter sets, then how many devices consume counters
  local j='{range .items[*]}{.spec.sharedCounters[*].name}{" "}{range .spec.devices[*]}{.consumesCounters[0].counterSet}{" "}{end}{end}'
  kubectl get resourceslices --field-selector spec.driver=$PART_DRIVER,spec.nodeName="$NODE" -o jsonpath="$j" |
    tr ' ' '\n' | grep -v '^$' | sort | uniq -c | awk '{printf "%s:%s ", $2, $1}'
}
# p-0 names the counter set once and is consumed by 7 partitions
# (4 of 1 slot, 2 of 2, 1 of 4).
part_gate="DRAPartitionableDevices=$(gate DRAPartitionableDevices)"
wait_for "a counter set and 7 partitions ($part_gate)" 120 "p-0:8 " part_pool
kubectl apply -f - >/dev/null <<YAML
apiVersion: resource.k8s.io/v1
kind: ResourceClaimTemplate
metadata: {name: part-claim, labels: {app: devplug-e2e}}
spec:
  spec:
    devices:
      requests:
        - name: p
          exactly:
            deviceClassName: $PART_DRIVER
            selectors: [{cel: {expression: 'device.attributes["$PART_DRIVER"].profile == "2s"'}}]
YAML
part_pod() {
  kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: part-$1, labels: {app: devplug-e2e}}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
    - name: c
      image: registry.k8s.io/e2e-test-images/busybox:1.36.1-1
      command: ["sleep", "3600"]
      resources: {claims: [{name: p}]}
  resourceClaims: [{name: p, resourceClaimTemplateName: part-claim}]
YAML
}
part_pod 1
part_pod 2
pod_ready_or_fail part-1 180
pod_ready_or_fail part-2 180
got1=$(kubectl exec part-1 -- printenv DEVPLUG_HARDWARE_VENDOR_EXAMPLE_PART)
got2=$(kubectl exec part-2 -- printenv DEVPLUG_HARDWARE_VENDOR_EXAMPLE_PART)
[ "$(printf '%s\n%s\n' "$got1" "$got2" | sort | tr '\n' ' ')" = "p-0-part-2s-0 p-0-part-2s-2 " ] ||
  fail "the two pods got '$got1' and '$got2', wanted the two 2-slot partitions"
part_pod 3
part3_reason() { kubectl get pod part-3 -o jsonpath='{.status.conditions[?(@.type=="PodScheduled")].reason}'; }
wait_for "the third Pending as Unschedulable (no 2 slots left)" 60 Unschedulable part3_reason
part3_msg=$(kubectl get pod part-3 -o jsonpath='{.status.conditions[?(@.type=="PodScheduled")].message}')
kubectl delete pod part-1 --wait=true --timeout=90s >/dev/null || fail "part-1 did not go"
pod_ready_or_fail part-3 180
got3=$(kubectl exec part-3 -- printenv DEVPLUG_HARDWARE_VENDOR_EXAMPLE_PART)
[ "$got3" = "$got1" ] || fail "part-3 got '$got3', wanted the partition part-1 left ('$got1')"
for i in 2 3; do kubectl delete pod part-$i --wait=false >/dev/null 2>&1; done
for i in 2 3; do kubectl wait --for=delete pod/part-$i --timeout=90s >/dev/null 2>&1 || true; done
kubectl delete resourceclaimtemplate part-claim --ignore-not-found >/dev/null
kubectl delete dpp $PART --wait=true --timeout=120s >/dev/null || fail "deleting $PART did not finish"
ok "$part_gate; $got1 and $got2 running; the third: $part3_msg; then it got $got3"

begin "DRA health: detection to slice taint, 10 flips; NoExecute evicts the device's pod"
EVICT=e2e-dra-evict
EVICT_DRIVER=$EVICT.devplug.io
kubectl apply -f - >/dev/null <<YAML
apiVersion: devplug.io/v1alpha1
kind: DevicePluginPolicy
metadata: {name: $EVICT, labels: {app: devplug-e2e}}
spec:
  resourceName: hardware-vendor.example/evict
  kubeletApi: DRA
  health: {settleSeconds: 0, taintEffect: NoExecute}
  source: {simulated: {devices: [{id: e-0}, {id: e-1}]}}
YAML
evict_taint() { # the taint effect on device $1, if any
  kubectl get resourceslices --field-selector spec.driver=$EVICT_DRIVER,spec.nodeName="$NODE" \
    -o jsonpath="{.items[*].spec.devices[?(@.name==\"$1\")].taints[*].effect}"
}
evict_agent() { kubectl -n $NS get pods -l devplug.io/policy=$EVICT --field-selector spec.nodeName="$NODE" -o jsonpath='{.items[0].metadata.name}'; }
wait_for "the pool published" 120 "e-0 e-1" kubectl get resourceslices --field-selector spec.driver=$EVICT_DRIVER,spec.nodeName="$NODE" -o jsonpath='{.items[*].spec.devices[*].name}'
wait_for "the agent Ready" 120 True kubectl -n $NS get pods -l devplug.io/policy=$EVICT -o jsonpath='{.items[0].status.conditions[?(@.type=="Ready")].status}'
EA=$(evict_agent)
# From the flip command's start (so including kubectl exec's own time: an
# upper bound of detection) to the taint seen in the API server, polled
# every 0.1 s; recovery waits for the taint to go.
lat=""
for i in 1 2 3 4 5 6 7 8 9 10; do
  t0=$(date +%s%3N)
  kubectl -n $NS exec "$EA" -- devplug-agent sim --control-dir /run/devplug/sim $EVICT e-1 Unhealthy "e2e flip $i" >/dev/null
  while [ "$(evict_taint e-1)" != NoExecute ]; do
    [ $(( $(date +%s%3N) - t0 )) -lt 30000 ] || fail "flip $i: no taint on e-1 within 30 s"
    sleep 0.1
  done
  lat="$lat $(( $(date +%s%3N) - t0 ))"
  kubectl -n $NS exec "$EA" -- devplug-agent sim --control-dir /run/devplug/sim $EVICT e-1 Healthy >/dev/null
  wait_for "flip $i recovered" 30 "" evict_taint e-1
done
lat_summary=$(echo $lat | tr ' ' '\n' | sort -n | awk '{v[NR]=$1} END {printf "p50 %d ms, max %d ms over %d flips", v[int((NR+1)/2)], v[NR], NR}')
say "flip command to taint in the API server: $lat_summary (ms:$lat)"
# NoExecute: a pod holding the device is evicted once it turns unhealthy.
kubectl apply -f - >/dev/null <<YAML
apiVersion: resource.k8s.io/v1
kind: ResourceClaim
metadata: {name: evict-claim, labels: {app: devplug-e2e}}
spec:
  devices:
    requests:
      - name: e
        exactly:
          deviceClassName: $EVICT_DRIVER
          selectors: [{cel: {expression: 'device.attributes["$EVICT_DRIVER"].id == "e-0"'}}]
---
apiVersion: v1
kind: Pod
metadata: {name: evict-pod, labels: {app: devplug-e2e}}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
    - name: c
      image: registry.k8s.io/e2e-test-images/busybox:1.36.1-1
      command: ["sleep", "3600"]
      resources: {claims: [{name: e}]}
  resourceClaims: [{name: e, resourceClaimName: evict-claim}]
YAML
pod_ready_or_fail evict-pod 180
evict_uid=$(kubectl get pod evict-pod -o jsonpath='{.metadata.uid}')
kubectl -n $NS exec "$EA" -- devplug-agent sim --control-dir /run/devplug/sim $EVICT e-0 Unhealthy "e2e: evict" >/dev/null
evicted() { # gone, or marked for deletion with the taint manager's reason
  local got
  got=$(kubectl get pod evict-pod -o jsonpath='{.metadata.uid} {.status.conditions[?(@.type=="DisruptionTarget")].reason}' 2>/dev/null)
  case "$got" in "" | "$evict_uid "?*) echo evicted ;; *) echo "$got" ;; esac
}
wait_for "evict-pod evicted by the NoExecute taint ($(gate DRADeviceTaints | sed 's/^/DRADeviceTaints=/'))" 120 evicted evicted
reason=$(kubectl get pod evict-pod -o jsonpath='{.status.conditions[?(@.type=="DisruptionTarget")].reason}' 2>/dev/null)
kubectl delete pod evict-pod --ignore-not-found --wait=true --timeout=60s >/dev/null
kubectl delete resourceclaim evict-claim --ignore-not-found --wait=true --timeout=60s >/dev/null
kubectl delete dpp $EVICT --wait=true --timeout=120s >/dev/null || fail "deleting $EVICT did not finish"
ok "detection to taint $lat_summary; evict-pod evicted (${reason:-gone})"

begin "DRA: deleting the policy removes its agents, slices and DeviceClass"
kubectl delete resourceclaimtemplate foo-claim --ignore-not-found >/dev/null
kubectl delete dpp $DRA_POLICY --wait=true --timeout=120s >/dev/null || fail "deleting the DRA policy did not finish"
[ -z "$(kubectl get resourceslices --field-selector spec.driver=$DRIVER -o name)" ] || fail "ResourceSlices left"
[ -z "$(kubectl get deviceclass $DRIVER -o name --ignore-not-found)" ] || fail "DeviceClass left"
ok

# ----------------------------------------------------------------- every uninstall order
# What no order may leave: agents, ResourceSlices, DeviceClasses, node
# labels, the chart's cluster-scoped objects, or a policy that hangs.
leftover() {
  kubectl -n $NS get ds,pods,sa -o name 2>/dev/null | grep -v 'serviceaccount/default' || true
  kubectl get clusterroles,clusterrolebindings -o name 2>/dev/null | grep devplug || true
  kubectl get validatingadmissionpolicies,validatingadmissionpolicybindings,flowschemas -o name 2>/dev/null | grep devplug || true
  kubectl get resourceslices -o jsonpath='{range .items[*]}{.spec.driver}{"\n"}{end}' 2>/dev/null | grep 'devplug\.io$' || true
  kubectl get deviceclasses -o name 2>/dev/null | grep 'devplug\.io' || true
  kubectl get node "$NODE" -o jsonpath='{.metadata.labels}' | grep -o '"devplug.io/[^"]*"' || true
  kubectl get dpp -o name 2>/dev/null | while read -r p; do
    [ -n "$(kubectl get "$p" -o jsonpath='{.metadata.finalizers}' 2>/dev/null)" ] && echo "$p with finalizers"
  done
}
nothing_left() { # what was done, seconds
  local deadline=$((SECONDS + $2))
  until [ -z "$(leftover)" ]; do
    [ $SECONDS -lt $deadline ] || fail "left behind $2 s after $1: $(echo $(leftover))"
    sleep 1
  done
}
serve_both() { # a device plugin and a DRA policy (another resource), both serving
  kubectl apply -f examples/simulated-foo.yaml >/dev/null
  kubectl apply -f - >/dev/null <<YAML
apiVersion: devplug.io/v1alpha1
kind: DevicePluginPolicy
metadata: {name: e2e-bye, labels: {app: devplug-e2e}}
spec:
  resourceName: hardware-vendor.example/bye
  kubeletApi: DRA
  source: {simulated: {count: 2, idPrefix: bye}}
YAML
  wait_for "agent pod Ready" 120 True agent_ready
  wait_for "the DRA policy's ResourceSlice" 120 "bye-0 bye-1" kubectl get resourceslices \
    --field-selector spec.driver=e2e-bye.devplug.io,spec.nodeName="$NODE" -o jsonpath='{.items[*].spec.devices[*].name}'
}
reinstall() {
  kubectl apply --server-side --force-conflicts -f crds/ >/dev/null || fail "applying the CRDs failed"
  out=$(helm install devplug charts/devplug --namespace $NS --create-namespace "${HELM_SET[@]}" --wait --timeout 5m 2>&1) ||
    fail "helm install again: $out"
}

begin "uninstall in the README's order (policies, chart, CRDs) leaves nothing behind"
serve_both
kubectl delete dpp --all --wait=true --timeout=120s >/dev/null || fail "kubectl delete dpp --all --wait did not return"
helm uninstall devplug -n $NS --wait --timeout 2m >/dev/null || fail "helm uninstall failed"
nothing_left "the README's order" 60
kubectl delete -f crds/ --wait=true --timeout=120s >/dev/null || fail "deleting the CRDs failed"
ok

begin "helm uninstall with policies still serving: the pre-delete hook cleans them up, nothing is left or hangs"
reinstall
serve_both
t0=$SECONDS
out=$(helm uninstall devplug -n $NS --wait --timeout 4m 2>&1) || fail "helm uninstall failed: $out"
took=$((SECONDS - t0))
nothing_left "helm uninstall" 60
[ -z "$(kubectl get dpp -o name)" ] || fail "policies left: $(kubectl get dpp -o name)"
ok "helm uninstall took ${took} s"

begin "the release namespace deleted first: nothing is left and nothing hangs"
reinstall
serve_both
kubectl delete namespace $NS --wait=true --timeout=180s >/dev/null || fail "deleting namespace $NS did not finish"
nothing_left "deleting the namespace" 60
kubectl delete dpp --all --wait=true --timeout=30s >/dev/null || fail "deleting the policies hung after the namespace went"
ok

begin "CRDs deleted first: the operator cleans up each policy, then helm uninstall leaves nothing"
reinstall
serve_both
kubectl delete -f crds/ --wait=true --timeout=180s >/dev/null || fail "deleting the CRDs did not finish"
out=$(helm uninstall devplug -n $NS --wait --timeout 4m 2>&1) || fail "helm uninstall after the CRDs: $out"
nothing_left "deleting the CRDs, then helm uninstall" 60
ok

say "$passed passed, 0 failed, $skipped skipped, in $((SECONDS - SUITE_START)) s"
