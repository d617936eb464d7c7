#!/usr/bin/env bash
# Run the whole test suite. Sets up .venv (torch pinned first) and, as root, the Debian
# packages the browser tests need. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing chromium for the browser tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "[setup] chromium could not be installed; browser tests will be skipped"
fi
bash "$ROOT/scripts/bootstrap.sh" test
exec "$ROOT/.venv/bin/python" -m pytest -q -ra "$@"
