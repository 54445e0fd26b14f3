# One entry point for humans and CI. `make test` is what .ci/run runs.
CARGO ?= cargo

.PHONY: test fmt-check clippy unit bench agent crds

test: fmt-check clippy unit

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

agent:
	$(CARGO) build --release -p devplug-agent
