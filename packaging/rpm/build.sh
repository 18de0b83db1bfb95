#!/usr/bin/env bash
# Build twisted-gateway-<version>.x86_64.rpm into dist/: the project and all its dependencies
# as wheels inside the package; %post creates /opt/twisted-gateway/venv from them offline.
# Needs rpmbuild (Debian's "rpm" package) and network access to the package index at build time.
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
OUT="${OUT:-$REPO/dist}"
TOP="$(mktemp -d)"
trap 'rm -rf "$TOP"' EXIT
mkdir -p "$TOP"/{SOURCES,SPECS,BUILD,RPMS,SRPMS} "$OUT"
STAGE="$TOP/SOURCES/twisted-gateway-$VERSION"
mkdir -p "$STAGE"
wheelhouse "$STAGE/wheels" manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_28_x86_64 linux_x86_64
cp "$REPO"/etc/gateway.yaml "$REPO"/etc/shards.yaml "$STAGE/"
cp "$REPO"/etc/twisted-gateway.service "$REPO"/etc/twisted-gateway.socket "$REPO"/etc/twisted-gateway-admin.socket "$STAGE/"
cp "$REPO"/packaging/rpm/create-venv "$STAGE/"
cp "$REPO"/README.md "$REPO"/docs/*.md "$STAGE/"
rpmbuild --quiet -bb --define "_topdir $TOP" --define "gw_version $VERSION" \
  --define "gw_source $STAGE" "$REPO/packaging/rpm/twisted-gateway.spec"
cp "$TOP"/RPMS/x86_64/twisted-gateway-"$VERSION"-1.x86_64.rpm "$OUT/"
echo "$OUT/twisted-gateway-$VERSION-1.x86_64.rpm"
