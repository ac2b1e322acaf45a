#!/usr/bin/env bash
# Install what bench/compare.py measures corral against: the Python packages of
# bench/requirements.txt into .venv (which scripts/venv.sh made) and the npm packages of bench/node
# (`npm ci`, the versions of its package-lock.json). `make bench` and scripts/test.sh run this;
# each step runs again only when its list changed. Without npm (or a package index), the systems
# it would install are reported as not installed; with CI=true that fails instead.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
in_ci() { case "${CI:-}" in 1 | true | TRUE | yes) return 0 ;; *) return 1 ;; esac; }

stamp="$VENV/.bench-requirements-installed"
if [ ! -f "$stamp" ] || [ bench/requirements.txt -nt "$stamp" ]; then
    echo "== installing bench/requirements.txt into $VENV"
    if "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        -r bench/requirements.txt; then
        touch "$stamp"
    elif in_ci; then
        exit 1
    else
        echo "warning: bench/requirements.txt could not be installed; the systems it lists" \
            "will be reported as not installed" >&2
    fi
fi

installed=bench/node/node_modules/.package-lock.json
if [ ! -f "$installed" ] || [ bench/node/package-lock.json -nt "$installed" ]; then
    if command -v npm >/dev/null; then
        echo "== installing the Node.js packages of bench/node"
        (cd bench/node && npm ci --no-audit --no-fund --loglevel=error)
    elif in_ci; then
        echo "error: npm is needed for bench/node and is not installed" >&2
        exit 1
    else
        echo "warning: npm is not installed; bullmq-node will be reported as not installed" >&2
    fi
fi
