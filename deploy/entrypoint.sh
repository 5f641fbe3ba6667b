#!/usr/bin/env bash
# The image's entry point: one image, one role per container.
#   worker    the Celery worker + janitor of host $CTF_HOST (needs the engine's socket)
#   api       the HTTP API and dashboard on $CTF_API_BIND
#   traefik   the ingress: writes Traefik's files into $CTF_DATA_DIR/ingress and runs it
#   redis     redis-server with AOF in $CTF_REDIS_DIR (/var/lib/ctf/redis), password
#             $CTF_REDIS_PASSWORD, on $CTF_REDIS_BIND (0.0.0.0) port $CTF_REDIS_PORT (6379)
#   ctfctl …  the command line (ctfctl check, status, hosts, firewall status, …)
#   anything else is run as given.
# Redis URLs: CELERY_BROKER_URL / CELERY_RESULT_BACKEND / CTF_REDIS_URL when set; otherwise
# built from CTF_REDIS_ADDR (host:port, default redis:6379) and CTF_REDIS_PASSWORD, so the
# password is written once.
# Secrets: CTF_ADMIN_TOKEN, CTF_FLAG_SECRET and CTF_REDIS_PASSWORD are read from the files
# /run/secrets/ctf_admin_token, ctf_flag_secret and ctf_redis_password when present (deploy/
# compose.yaml mounts them) and exported to this process and its children only: the
# container's configuration (`docker inspect`) holds none. A variable already set wins.
# `docker-compose exec api ctf-entrypoint ctfctl status` runs ctfctl with them.
set -euo pipefail

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

redis_urls() {
    local addr="${CTF_REDIS_ADDR:-redis:6379}" auth=""
    if [ -n "${CTF_REDIS_PASSWORD:-}" ]; then
        auth=":$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$CTF_REDIS_PASSWORD")@"
    fi
    export CELERY_BROKER_URL="${CELERY_BROKER_URL:-redis://$auth$addr/0}"
    export CELERY_RESULT_BACKEND="${CELERY_RESULT_BACKEND:-redis://$auth$addr/1}"
    export CTF_REDIS_URL="${CTF_REDIS_URL:-redis://$auth$addr/2}"
}

# wait_redis: Redis may still be loading its AOF (compose starts everything at once).
wait_redis() {
    python3 - <<'PY' || die "Redis does not answer at ${CTF_REDIS_ADDR:-redis:6379} (120 s)"
import os, sys, time
import redis
url = os.environ["CELERY_BROKER_URL"]
deadline = time.monotonic() + 120
while True:
    try:
        redis.Redis.from_url(url, socket_timeout=2).ping()
        sys.exit(0)
    except redis.exceptions.AuthenticationError as exc:
        print(f"error: Redis refuses the password: {exc}", file=sys.stderr)
        sys.exit(2)
    except redis.exceptions.RedisError:
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.5)
PY
}

# load_secrets: each secret file of $CTF_SECRETS_PATH (default /run/secrets) into its variable.
load_secrets() {
    local dir="${CTF_SECRETS_PATH:-/run/secrets}" name var file value
    for name in admin_token flag_secret redis_password; do
        var="CTF_${name^^}"
        file="$dir/ctf_$name"
        [ -z "${!var:-}" ] || continue
        [ -e "$file" ] || continue
        # Docker makes a missing bind-mount source into an empty folder.
        [ -f "$file" ] || die "$file is not a file: the secret file on the host is missing (run deploy/make-secrets.sh; CTF_SECRETS_DIR names its folder)"
        [ -r "$file" ] || die "cannot read $file as uid $(id -u): deploy/make-secrets.sh gives each secret file owner 10001, group 0, mode 0440"
        value="$(cat "$file")"
        [ -n "$value" ] || die "$file is empty: write the secret into it, or delete it and run deploy/make-secrets.sh"
        export "$var=$value"
    done
}
load_secrets

# Compose passes every optional setting; an empty one means "not set" (the product's default).
[ -n "${CTF_EXTRA_LABELS:-}" ] || unset CTF_EXTRA_LABELS

role="${1:-api}"
[ $# -gt 0 ] && shift
case "$role" in
    worker)
        redis_urls
        wait_redis
        host="${CTF_HOST:-local}"
        # Fail fast on a bad catalog or settings (the log says what to fix).
        python3 -m celery_app.cli check >&2
        queues="$(python3 -m celery_app.cli queues --host "$host")"
        say "worker for host '$host' (queues: $queues)"
        exec celery -A celery_app.celery_app:app worker -B \
            --pool threads --concurrency "${CTF_WORKER_CONCURRENCY:-16}" \
            --loglevel "${CTF_LOG_LEVEL:-INFO}" -n "ctf-$host@%h" -Q "$queues" \
            -s "$CTF_DATA_DIR/celerybeat-schedule-$host" "$@"
        ;;
    api)
        redis_urls
        wait_redis
        exec python3 -m celery_app.cli api "$@"
        ;;
    traefik)
        # The same files run-celery-worker.sh prepares; Traefik runs in their folder (it
        # loads the team gate plugin from ./plugins-local there). Logs go to stdout.
        config="$(python3 -m celery_app.ingress prepare)"
        cd "$(dirname "$config")"
        exec traefik --configfile="$config" "$@"
        ;;
    redis)
        [ -n "${CTF_REDIS_PASSWORD:-}" ] || die "no Redis password: run deploy/make-secrets.sh (compose) or set CTF_REDIS_PASSWORD"
        dir="${CTF_REDIS_DIR:-/var/lib/ctf/redis}"
        mkdir -p "$dir"
        # requirepass from a file of mode 0600, not the command line (ps would show it).
        conf="$(mktemp /tmp/redis-auth.XXXXXX)"
        printf 'requirepass "%s"\n' "$CTF_REDIS_PASSWORD" >"$conf"
        # Not in redis-server's environment either (its INFO/CONFIG never shows it, but a
        # child process would inherit it).
        unset CTF_REDIS_PASSWORD
        # noeviction: a full Redis refuses writes and never drops the index or a lock (docs/
        # DEPLOYMENT.md, "What to firewall"); AOF every second: a restart loses nothing.
        # CTF_REDIS_BIND: 0.0.0.0 in its container (compose publishes the port); on a bare
        # host (deploy/systemd/ctf-redis.service) loopback and the private address.
        # shellcheck disable=SC2086  # a list of addresses
        exec redis-server "$conf" --bind ${CTF_REDIS_BIND:-0.0.0.0} --port "${CTF_REDIS_PORT:-6379}" --dir "$dir" \
            --appendonly yes --appendfsync everysec \
            --maxmemory "${CTF_REDIS_MAXMEMORY:-1gb}" --maxmemory-policy noeviction "$@"
        ;;
    ctfctl)
        redis_urls
        exec ctfctl "$@"
        ;;
    *)
        exec "$role" "$@"
        ;;
esac
