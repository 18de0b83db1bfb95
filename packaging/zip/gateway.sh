#!/bin/sh
# twisted-gateway launcher (Linux ZIP). On first start it creates ./venv from ./wheels without
# network access, then runs the gateway with etc/gateway.yaml; extra arguments are passed on
# (e.g. --tls-port 8443). PYTHON selects the interpreter (Python 3.11 is the target).
set -eu
HERE="$(cd "$(dirname "$0")/.." && pwd)"
if [ ! -x "$HERE/venv/bin/twistd" ]; then
  PY="${PYTHON:-}"
  if [ -z "$PY" ]; then
    for candidate in python3.11 python3.12 python3.13 python3; do
      if command -v "$candidate" >/dev/null 2>&1; then PY="$candidate"; break; fi
    done
  fi
  [ -n "$PY" ] || { echo "gateway: Python 3.11 is needed to create the environment" >&2; exit 1; }
  echo "gateway: creating $HERE/venv from the bundled wheels (offline)" >&2
  "$PY" -m venv "$HERE/venv"
  "$HERE/venv/bin/pip" install --quiet --disable-pip-version-check --no-index \
    --find-links "$HERE/wheels" twisted-gateway
fi
cd "$HERE"
exec "$HERE/venv/bin/twistd" -n --pidfile= gateway --config "$HERE/etc/gateway.yaml" "$@"
