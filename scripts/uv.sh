#!/usr/bin/env bash
# Run the pinned uv, bootstrapping it from the package index into .tools/ the first time (needs only Python 3.11+).
# Examples: `bash scripts/uv.sh lock --upgrade` moves every pin in uv.lock to the newest version pyproject.toml
# allows; `bash scripts/uv.sh lock` re-resolves after a change to pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
PYTHON=${PYTHON:-python3}
if ! .tools/bin/uv --version 2>/dev/null | grep -q "^uv $UV_VERSION "; then
  "$PYTHON" -m venv .tools
  .tools/bin/python -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
fi
# Use this machine's Python, never a downloaded one; the environment is the project's .venv.
export UV_PYTHON_DOWNLOADS=never UV_PYTHON="${UV_PYTHON:-$PYTHON}"
exec .tools/bin/uv "$@"
