#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv.
# torch is installed first and pinned, so that no dependency pulls a CUDA build.
#
#   bash scripts/bootstrap.sh [EXTRAS]
#
# EXTRAS: the pyproject extras to install, comma-separated (default "test": everything the test
# suite needs); "core" installs the package with its core dependencies only.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PALM_RLHF_VENV:-$ROOT/.venv}"
TORCH_VERSION="${PALM_RLHF_TORCH:-2.13.0}"
EXTRAS="${1:-test}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment in $VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
fi
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
    echo "[setup] installing torch==$TORCH_VERSION"
    "$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
fi
# Re-install the project only when its declared dependencies changed.
STAMP="$VENV/.palm-rlhf-$EXTRAS.stamp"
WANT="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)-$TORCH_VERSION"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    if [ "$EXTRAS" = core ]; then SPEC="$ROOT"; else SPEC="$ROOT[$EXTRAS]"; fi
    echo "[setup] installing palm-rlhf${SPEC#"$ROOT"} (editable)"
    "$VENV/bin/pip" install -q -e "$SPEC" "torch==$TORCH_VERSION"
    echo "$WANT" > "$STAMP"
fi
