#!/usr/bin/env bash
# Install posguard into .venv with exactly the versions pinned in uv.lock; `--dev` adds the development tools.
# Fails, changing nothing, when pyproject.toml and uv.lock disagree: run `bash scripts/uv.sh lock` and commit both.
set -euo pipefail
cd "$(dirname "$0")/.."
# Every module is compiled to bytecode here, once: where Python may not write its bytecode caches
# (PYTHONDONTWRITEBYTECODE set, as container images often set it, or a read-only file system), each process
# would otherwise compile every module it imports, which made each command of posguard-server and each server
# start-up about 2.5 s slower on a 2-core machine. Files whose bytecode is up to date are skipped, so a second
# run costs next to nothing.
if [[ "${1:-}" == "--dev" ]]; then
  bash scripts/uv.sh sync --locked --quiet --compile-bytecode
else
  bash scripts/uv.sh sync --locked --quiet --no-dev --compile-bytecode
fi
# posguard's own packages are installed in place (editable), so uv leaves them to this.
.venv/bin/python -m compileall -q -j 0 clients/posguard server/posguard_server models/posguard_models
