#!/usr/bin/env bash
# Installs what is missing and runs the whole test suite against a real Redis and a real
# Docker engine (both started here when needed; what this run started, it stops).
#   ./run-tests.sh [pytest arguments]
#   ./run-tests.sh --unit [pytest arguments]   only tests/unit: no Docker, no Redis, seconds
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
source "$HERE/scripts/lib.sh"
export CTF_RUN_DIR="${CTF_RUN_DIR:-$DATA_DIR/test-run}"

if [ "${1:-}" = "--unit" ]; then
    shift
    ensure_venv dev
    cd "$HERE"
    say "unit tests (fake engine, in-memory Redis)"
    # --confcutdir: the Docker and Redis fixtures of tests/conftest.py are not even loaded.
    exec "$VENV/bin/python" -m pytest tests/unit --confcutdir tests/unit "$@"
fi

"$HERE/setup-celery.sh" --dev
mkdir -p "$CTF_RUN_DIR"
ensure_docker
trap stop_all_started EXIT

cd "$HERE"
if [ $# -eq 0 ]; then
    say "lint: ruff and mypy"
    "$VENV/bin/ruff" check celery_app tests bench test_celery_tasks.py
    "$VENV/bin/mypy"
fi
say "tests"
"$VENV/bin/python" -m pytest "$@"
