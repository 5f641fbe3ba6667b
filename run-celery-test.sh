#!/usr/bin/env bash
# ./run-celery-test.sh [challenge] [team-id]: start an instance through the running worker,
# print its status (URL, port, expiry), stop it. Exit status 0 when every step worked.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
source "$HERE/scripts/lib.sh"
[ -x "$VENV/bin/python" ] || "$HERE/setup-celery.sh"
exec "$VENV/bin/python" "$HERE/test_celery_tasks.py" "$@"
