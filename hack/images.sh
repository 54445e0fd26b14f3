#!/usr/bin/env bash
# Builds the operator and agent images without Docker: the same content and
# entrypoints as the Dockerfile's `operator` and `agent` targets (release
# binaries plus exactly the shared libraries they link, the operator as user
# 65532), assembled with umoci and written by skopeo as docker-archive tars
# that both `../shared/cluster/load-image.sh` and `kind load image-archive`
# take.
#
#   ./hack/images.sh                      # -> target/images/devplug-{operator,agent}.tar
#   REGISTRY=devplug TAG=dev ./hack/images.sh
#
# Image names: $REGISTRY/devplug-operator:$TAG and $REGISTRY/devplug-agent:$TAG
# (defaults ghcr.io/devplug and the chart's appVersion, what the chart uses).
# Needs cargo, umoci and skopeo (installed from Debian when missing and root).
set -euo pipefail
cd "$(dirname "$0")/.."
REGISTRY=${REGISTRY:-ghcr.io/devplug}
TAG=${TAG:-$(awk '/^appVersion:/ {gsub(/"/, "", $2); print $2}' charts/devplug/Chart.yaml)}
OUT=${OUT:-target/images}
CARGO=${CARGO:-cargo}

need=()
command -v umoci >/dev/null || need+=(umoci)
command -v skopeo >/dev/null || need+=(skopeo)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "images: installing ${need[*]} from Debian" >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "images: ${need[*]} required (apt-get install ${need[*]})" >&2
    exit 1
  fi
fi

start=$SECONDS
$CARGO build --release --locked -p devplug-operator -p devplug-agent
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# One image: binary $1 as /usr/bin/$1, user $2, into $OUT/$1.tar.
build() {
  local bin=$1 user=$2 ref="$REGISTRY/$1:$TAG"
  local layout="$work/$bin-layout" bundle="$work/$bin-bundle"
  umoci init --layout "$layout"
  umoci new --image "$layout:app"
  umoci unpack --rootless --image "$layout:app" "$bundle" >/dev/null
  local root="$bundle/rootfs"
  install -D -m 0755 "target/release/$bin" "$root/usr/bin/$bin"
  # The runtime libraries the binary links (what distroless/cc provides).
  ldd "target/release/$bin" | awk '/=> \// {print $3} $1 ~ /^\// {print $1}' | sort -u |
    while read -r lib; do
      install -D -m 0755 "$lib" "$root$lib"
      # Keep the loader's canonical path too (it may be a symlink target).
      real=$(readlink -f "$lib")
      [ "$real" = "$lib" ] || install -D -m 0755 "$real" "$root$real"
    done
  chmod 0755 "$root"/lib64/ld-linux-x86-64.so.2 2>/dev/null || true
  mkdir -p "$root/etc" "$root/tmp"
  chmod 1777 "$root/tmp"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
  umoci repack --image "$layout:app" "$bundle" >/dev/null
  umoci config --image "$layout:app" --config.entrypoint "/usr/bin/$bin" \
    --config.user "$user" --os linux --architecture amd64
  rm -f "$OUT/$bin.tar"
  skopeo copy --quiet "oci:$layout:app" "docker-archive:$OUT/$bin.tar:$ref"
  echo "images: $ref -> $OUT/$bin.tar ($(du -h "$OUT/$bin.tar" | cut -f1))"
}
build devplug-operator 65532:65532
build devplug-agent 0:0
echo "images: built in $((SECONDS - start)) s"
