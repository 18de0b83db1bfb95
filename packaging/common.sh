# Shared by the package builders: the version (from the package metadata, setup.cfg) and a
# wheelhouse of the project and every dependency for one target platform, for Python 3.11.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="$(sed -n 's/^version *= *//p' "$REPO/setup.cfg" | head -n1)"
PYTHON="${PYTHON:-python3}"
TARGET_PYTHON="${TARGET_PYTHON:-3.11}"

# wheelhouse DIR PLATFORM...: the project's wheel plus binary wheels of all its dependencies.
wheelhouse() {
  local dir="$1"; shift
  mkdir -p "$dir"
  # The project's wheel is built from a copy of the tree without build/ and dist/: setuptools
  # builds in the source tree's build/, whose leftovers (a module since removed) would ship,
  # and two builds at once (the packaging tests under pytest-xdist) would race in it.
  local src
  src="$(mktemp -d)"
  tar -C "$REPO" --exclude=./build --exclude=./dist --exclude=./.git --exclude='*.egg-info' \
    --exclude=__pycache__ -cf - . | tar -C "$src" -xf -
  "$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$dir" "$src"
  rm -rf "$src"
  local platforms=()
  for p in "$@"; do platforms+=(--platform "$p"); done
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
    "${platforms[@]}" --python-version "$TARGET_PYTHON" --implementation cp \
    --dest "$dir" "$dir"/twisted_gateway-"$VERSION"-py3-none-any.whl
}
