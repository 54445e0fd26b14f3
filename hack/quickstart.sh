#!/usr/bin/env bash
# The quickstart, one command: a real cluster, devplug built and installed as
# the README says, the sample policy and the demo pod, and the devices the
# pod was given.
#
#   make quickstart                 # or ./hack/quickstart.sh
#
# The cluster: kind (cluster "devplug") where Docker runs, else the
# single-node kit beside this checkout (../shared/cluster: kube-apiserver,
# kubelet and containerd as host processes; needs root). Images are built
# from this checkout (Docker with kind; umoci + skopeo and a Rust toolchain
# with the kit). helm and kubectl go to .tools/bin.
#
#   CLUSTER=name   kind cluster name (default devplug)
#   TAG=tag        image tag (default dev)
#   MODE=kind|kit  force one of the two
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${TAG:-dev}
CLUSTER=${CLUSTER:-devplug}
KIT=${KIT:-../shared/cluster}
NS=devplug-system
say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'quickstart: %s\n' "$*" >&2; exit 1; }

if [ -z "${MODE:-}" ]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1 && command -v kind >/dev/null; then
    MODE=kind
  elif [ -x "$KIT/up.sh" ]; then
    MODE=kit
  else
    die "no cluster to use: install Docker and kind, or put the cluster kit at $KIT"
  fi
fi

say "helm and kubectl (into .tools/bin)"
./hack/tools.sh >/dev/null
export PATH="$PWD/.tools/bin:$PATH"

case "$MODE" in
  kind)
    say "kind cluster '$CLUSTER', images built with Docker and loaded"
    INSTALL=false CLUSTER="$CLUSTER" TAG="$TAG" ./hack/kind-quickstart.sh >&2
    kubectl config use-context "kind-$CLUSTER" >/dev/null
    REGISTRY=devplug
    reach="kubectl config use-context kind-$CLUSTER"
    ;;
  kit)
    [ "$(id -u)" = 0 ] || die "the cluster kit runs its components as root: run as root (sudo -E make quickstart)"
    command -v cargo >/dev/null || die "building the images needs a Rust toolchain (https://rustup.rs)"
    say "the cluster kit ($KIT): up"
    eval "$("$KIT/up.sh")"
    export KUBECONFIG
    say "images built without Docker (umoci + skopeo) and loaded"
    REGISTRY=devplug TAG="$TAG" ./hack/images.sh >&2
    "$KIT/load-image.sh" target/images/devplug-operator.tar target/images/devplug-agent.tar >&2
    REGISTRY=devplug
    reach="export KUBECONFIG=$KUBECONFIG"
    ;;
  *) die "MODE must be kind or kit, not '$MODE'" ;;
esac

say "devplug installed (as the README says)"
kubectl apply --server-side -f crds/ >/dev/null
helm upgrade --install devplug charts/devplug -n "$NS" --create-namespace \
  --set image.registry="$REGISTRY" --set image.tag="$TAG" --set image.pullPolicy=IfNotPresent \
  --wait --timeout 5m >/dev/null

say "the sample policy: two simulated hardware-vendor.example/foo devices per node"
kubectl apply -f examples/simulated-foo.yaml >/dev/null
if ! kubectl wait dpp/simulated-foo --for=condition=Ready --timeout=180s >/dev/null; then
  kubectl describe dpp simulated-foo >&2
  die "the policy did not become Ready in 3 minutes (above: its conditions and events)"
fi

say "the demo pod asks for both devices"
kubectl delete pod demo-pod --ignore-not-found --wait=true >/dev/null
kubectl apply -f examples/demo-pod.yaml >/dev/null
if ! kubectl wait pod/demo-pod --for=condition=Ready --timeout=180s >/dev/null; then
  kubectl describe pod demo-pod >&2
  die "the demo pod did not start in 3 minutes (above: its events)"
fi
devices=$(kubectl exec demo-pod -- printenv DEVPLUG_HARDWARE_VENDOR_EXAMPLE_FOO)
echo "demo-pod was given: $devices"
echo
kubectl get dpp,nds
cat <<EOF

devplug is running ($MODE). To reach this cluster from your shell:
  export PATH=$PWD/.tools/bin:\$PATH
  $reach
Then: kubectl get dpp,nds -o wide; kubectl describe nds; the README's
"Operations" for upgrades, uninstall and troubleshooting.
EOF
