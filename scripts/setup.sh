#!/usr/bin/env bash
# Install posguard into .venv with exactly the versions pinned in uv.lock; `--dev` adds the development tools.
# Fails, changing nothing, when pyproject.toml and uv.lock disagree: run `bash scripts/uv.sh lock` and commit both.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--dev" ]]; then
  bash scripts/uv.sh sync --locked --quiet
else
  bash scripts/uv.sh sync --locked --quiet --no-dev
fi
