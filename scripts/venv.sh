#!/usr/bin/env bash
# Create .venv if needed and install corral into it (editable).
# `scripts/venv.sh dev` also installs the development tools (pytest, mypy, ruff, ...).
# Reinstalls only when pyproject.toml changed. PYTHON and VENV may be set to override.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
extra="${1:-}"

if [ ! -x "$VENV/bin/python" ]; then
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "error: corral needs Python 3.11 or newer, found: $("$PYTHON" --version 2>&1)." \
            "Set PYTHON=python3.11 (or newer) and run again." >&2
        exit 1
    fi
    echo "== creating $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.corral-installed${extra:+-$extra}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "== installing corral${extra:+ with [$extra]} into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        -e ".${extra:+[$extra]}"
    touch "$stamp"
fi
