#!/usr/bin/env bash
# One command on a fresh Debian machine (as root): install the peers and load generators, the
# project, then run the side-by-side benchmark. Arguments go to bench/run.py
# (e.g. --duration 10 --bulk-mib 1024 --only W1 --profile /tmp/profiles).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for tool in haproxy nginx wrk h2load taskset unshare openssl py-spy; do
  command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
if [ "${#need[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends haproxy nginx-light wrk nghttp2-client util-linux openssl
fi
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore . py-spy uvloop
exec python3 bench/run.py "$@"
