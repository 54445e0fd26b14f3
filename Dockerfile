# syntax=docker/dockerfile:1
# Two images from one build: the operator (non-root, read-only root
# filesystem in the chart) and the node agent (root only to create its socket
# in the kubelet's directory; the operator drops every capability).
# Protos compile with protox (pure Rust): no protoc in the build image.
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p devplug-operator -p devplug-agent \
 && mkdir -p /out \
 && cp target/release/devplug-operator target/release/devplug-agent /out/

FROM gcr.io/distroless/cc-debian12:nonroot AS operator
COPY --from=build /out/devplug-operator /usr/bin/devplug-operator
USER 65532:65532
ENTRYPOINT ["/usr/bin/devplug-operator"]

FROM gcr.io/distroless/cc-debian12 AS agent
COPY --from=build /out/devplug-agent /usr/bin/devplug-agent
ENTRYPOINT ["/usr/bin/devplug-agent"]
