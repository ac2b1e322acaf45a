#!/usr/bin/env bash
# Lint, type-check and test corral. `make test` runs this and so does `.ci/run`.
#
# Installs the dev tools into .venv, the Node.js interop fixture's packages (tests/node), what
# bench/compare.py compares corral with (scripts/bench-setup.sh), makes sure Redis answers on
# 127.0.0.1:6379 (starting redis-server if it does not), then runs ruff check, ruff format
# --check, mypy --strict (src/corral, bench, examples) and pytest. Extra arguments go to pytest.
# With CI=true a missing service fails the run instead of skipping its tests.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
BIN="$VENV/bin"
REDIS_PORT=6379
in_ci() { case "${CI:-}" in 1 | true | TRUE | yes) return 0 ;; *) return 1 ;; esac; }

scripts/venv.sh dev

if [ -f tests/node/package-lock.json ]; then
    installed=tests/node/node_modules/.package-lock.json
    if [ ! -f "$installed" ] || [ tests/node/package-lock.json -nt "$installed" ]; then
        if command -v npm >/dev/null; then
            echo "== installing the Node.js packages of tests/node"
            (cd tests/node && npm ci --no-audit --no-fund --loglevel=error)
        elif in_ci; then
            echo "error: npm is needed for tests/node and is not installed" >&2
            exit 1
        else
            echo "warning: npm is not installed; the Node.js interop tests will be skipped" >&2
        fi
    fi
fi
scripts/bench-setup.sh

redis_answers() {
    "$BIN/python" - "$REDIS_PORT" <<'PY'
import socket, sys
try:
    with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=0.5) as sock:
        sock.sendall(b"PING\r\n")
        sys.exit(0 if sock.recv(16).startswith(b"+PONG") else 1)
except OSError:
    sys.exit(1)
PY
}

if ! redis_answers; then
    if command -v redis-server >/dev/null; then
        echo "== starting redis-server on 127.0.0.1:$REDIS_PORT"
        redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" \
            --save '' --appendonly no >/dev/null
        for _ in $(seq 100); do redis_answers && break; sleep 0.1; done
        redis_answers || { echo "error: redis-server started but does not answer" >&2; exit 1; }
    elif in_ci; then
        echo "error: Redis does not answer on 127.0.0.1:$REDIS_PORT and redis-server is" \
            "not installed" >&2
        exit 1
    else
        echo "warning: no Redis on 127.0.0.1:$REDIS_PORT; the BullMQ tests will be skipped" >&2
    fi
fi

echo "== ruff check"
"$BIN/ruff" check .
echo "== ruff format --check"
"$BIN/ruff" format --check .
echo "== mypy --strict"
"$BIN/mypy"
"$BIN/mypy" --strict examples

echo "== pytest"
status=0
"$BIN/pytest" "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$status"
