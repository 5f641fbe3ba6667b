#!/usr/bin/env bash
# Runs the instancer: Celery worker + periodic janitor (beat) + HTTP API and dashboard.
#   ./run-celery-worker.sh              worker, janitor and API on $CTF_API_BIND (127.0.0.1:8000)
#   ./run-celery-worker.sh --no-api     worker and janitor only
#   ./run-celery-worker.sh --host NAME  serve host NAME of $CTF_HOSTS_FILE (its queue)
#   CTF_INGRESS=traefik ./run-celery-worker.sh   also this host's Traefik (SPEC §11)
# Sets itself up on first run; Ctrl-C (SIGINT/SIGTERM) stops everything it started.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
source "$HERE/scripts/lib.sh"

api=1
host="${CTF_HOST:-local}"
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --no-api) api="" ;;
        --host) host="${2:?--host needs a name}"; shift ;;
        --host=*) host="${1#--host=}" ;;
        -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
        *) extra+=("$1") ;;
    esac
    shift
done

"$HERE/setup-celery.sh"
export CTF_DATA_DIR="$DATA_DIR" CTF_HOST="$host"
export CELERY_BROKER_URL="${CELERY_BROKER_URL:-redis://localhost:6379/0}"
export CELERY_RESULT_BACKEND="${CELERY_RESULT_BACKEND:-redis://localhost:6379/1}"
# A Redis we start beyond loopback (CTF_REDIS_BIND, for workers on other hosts) requires a
# password, generated into the data folder; it is added to the URLs of this machine's Redis.
add_redis_password

# Only what this run started is stopped (STARTED, scripts/lib.sh): a pid file an earlier run
# left in the data folder names nothing of ours, whatever process has that pid now.
cleanup() {
    trap - INT TERM EXIT
    say "stopping"
    stop_all_started
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ensure_redis "$CELERY_BROKER_URL"
if [ -z "${CTF_HOSTS_FILE:-}" ]; then ensure_docker; fi

# Fail fast on a bad catalog or settings, before anything else starts.
"$VENV/bin/python" -m celery_app.cli check >&2 || exit 1

# The ingress (CTF_INGRESS=traefik): this host's Traefik, routes from .data/ingress/dynamic.
if [ "${CTF_INGRESS:-ports}" = traefik ]; then
    traefik_log="$CTF_RUN_DIR/traefik-$host.log"
    config="$("$VENV/bin/python" -m celery_app.ingress prepare --log "$traefik_log")" || exit 1
    say "Traefik on ${CTF_INGRESS_HTTP_BIND:-127.0.0.1:8080} (http) and ${CTF_INGRESS_HTTPS_BIND:-127.0.0.1:8443} (https, tls); log: $traefik_log"
    # In the ingress folder: Traefik loads the team gate plugin from ./plugins-local there.
    (cd "$(dirname "$config")" && exec "$VENV/bin/traefik" --configfile="$config") \
        >>"$traefik_log" 2>&1 &
    record_started traefik $!
    "$VENV/bin/python" -m celery_app.ingress wait || exit 1
fi

queues="$("$VENV/bin/python" -m celery_app.cli queues --host "$host")"
say "worker for host '$host' (queues: $queues); logs below"
"$VENV/bin/celery" -A celery_app.celery_app:app worker -B \
    --pool threads --concurrency "${CTF_WORKER_CONCURRENCY:-16}" \
    --loglevel "${CTF_LOG_LEVEL:-INFO}" -n "ctf-$host@%h" -Q "$queues" \
    -s "$CTF_RUN_DIR/celerybeat-schedule-$host" "${extra[@]}" &
record_started worker $!

if [ -n "$api" ]; then
    "$VENV/bin/python" -m celery_app.cli api &
    record_started api $!
fi

# Stop everything when any part stops.
wait -n
