#!/usr/bin/env bash
# The kind quickstart: a kind cluster, devplug's images built and loaded into
# it, the chart installed with the sample policy (two simulated
# hardware-vendor.example/foo devices on every node).
#
#   ./hack/kind-quickstart.sh            # cluster "devplug"
#   CLUSTER=other ./hack/kind-quickstart.sh
#
# Needs Docker and kind; installs helm and kubectl into .tools/bin itself.
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER=${CLUSTER:-devplug}
TAG=${TAG:-dev}
SAMPLE=${SAMPLE:-true}
for tool in docker kind; do
  command -v "$tool" >/dev/null || { echo "kind-quickstart: $tool is required" >&2; exit 1; }
done
./hack/tools.sh
export PATH="$PWD/.tools/bin:$PATH"

if ! kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --wait 120s
fi
docker build --target operator -t "devplug/devplug-operator:$TAG" .
docker build --target agent -t "devplug/devplug-agent:$TAG" .
kind load docker-image --name "$CLUSTER" "devplug/devplug-operator:$TAG" "devplug/devplug-agent:$TAG"

# The e2e suite installs by itself, as the README says.
[ "${INSTALL:-true}" = true ] || exit 0

kubectl --context "kind-$CLUSTER" apply --server-side -f crds/
helm upgrade --install devplug charts/devplug --kube-context "kind-$CLUSTER" \
  --namespace devplug-system --create-namespace \
  --set image.registry=devplug --set image.tag="$TAG" --set image.pullPolicy=Never \
  --set samplePolicy.enabled="$SAMPLE" --wait --timeout 5m
echo
echo "devplug is running in kind cluster '$CLUSTER'. Try:"
echo "  kubectl get dpp,nds"
echo "  kubectl apply -f examples/demo-pod.yaml && kubectl exec demo-pod -- printenv DEVPLUG_HARDWARE_VENDOR_EXAMPLE_FOO"
