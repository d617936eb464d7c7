#!/usr/bin/env bash
# Start the whole system on its embedded defaults (demo model, SQLite feedback log and
# checkpoints under ./data, gateway on http://127.0.0.1:8000). Extra arguments go to
# `palm-rlhf up`.
# Only the core dependencies are installed: a PostgreSQL feedback store (a postgresql:// URL)
# also needs `bash scripts/bootstrap.sh postgres` (pip install 'palm-rlhf[postgres]').
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash "$ROOT/scripts/bootstrap.sh" core
exec "$ROOT/.venv/bin/palm-rlhf" up "$@"
