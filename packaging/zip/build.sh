#!/usr/bin/env bash
# Build dist/twisted-gateway-<version>-linux-x86_64.zip and -windows-amd64.zip: wheels for that
# platform (Python 3.11), the example configuration, and launchers that create the virtual
# environment offline on first start.
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
OUT="${OUT:-$REPO/dist}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"

stage() {  # stage NAME: the common tree
  local root="$WORK/$1/twisted-gateway-$VERSION"
  mkdir -p "$root/etc" "$root/bin" "$root/docs"
  cp "$REPO"/etc/gateway.yaml "$REPO"/etc/shards.yaml "$root/etc/"
  cp "$REPO"/README.md "$root/"
  cp "$REPO"/docs/*.md "$root/docs/"
  echo "$root"
}

# Linux
root="$(stage linux)"
wheelhouse "$root/wheels" manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_28_x86_64 linux_x86_64
install -m 0755 "$REPO/packaging/zip/gateway.sh" "$root/bin/gateway"
(cd "$WORK/linux" && zip -qr "$OUT/twisted-gateway-$VERSION-linux-x86_64.zip" "twisted-gateway-$VERSION")

# Windows
root="$(stage windows)"
wheelhouse "$root/wheels" win_amd64
cp "$REPO/packaging/zip/gateway.cmd" "$REPO/packaging/zip/gateway.ps1" "$REPO/packaging/zip/install-service.ps1" "$root/bin/"
(cd "$WORK/windows" && zip -qr "$OUT/twisted-gateway-$VERSION-windows-amd64.zip" "twisted-gateway-$VERSION")

echo "$OUT/twisted-gateway-$VERSION-linux-x86_64.zip"
echo "$OUT/twisted-gateway-$VERSION-windows-amd64.zip"
