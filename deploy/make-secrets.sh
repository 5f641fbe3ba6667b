#!/usr/bin/env bash
# Makes the deployment's secrets as files, once: deploy/compose.yaml mounts them at
# /run/secrets/ctf_* (never in a container's environment, so `docker inspect` shows none).
#   sudo deploy/make-secrets.sh                  # deploy/secrets/{admin_token,flag_secret,redis_password}
#   sudo CTF_SECRETS_DIR=/etc/ctf/secrets deploy/make-secrets.sh   (then the same CTF_SECRETS_DIR
#                                                 for docker-compose, e.g. in deploy/.env)
# A file that exists is kept (a new admin token would invalidate every team's token); its
# owner and mode are set again. To choose a value yourself, write it into the file first.
# Each file: owner uid 10001 (the image's user `ctf`, which runs the API and Redis), group 0
# (the worker and Traefik run as root in their containers with no CAP_DAC_OVERRIDE, so they
# read by group), mode 0440; the folder 0700. Hence root: only root can give a file to uid 10001.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

dir="${CTF_SECRETS_DIR:-$ROOT/deploy/secrets}"
owner="${CTF_SECRETS_OWNER:-10001:0}"
[ "$(id -u)" = 0 ] || die "run it as root (sudo $0): the files go to uid 10001, the image's user"
umask 077
mkdir -p "$dir"
chmod 700 "$dir"
for name in admin_token flag_secret redis_password; do
    file="$dir/$name"
    if [ -s "$file" ]; then
        printf 'kept %s\n' "$file" >&2
    else
        # 43 URL-safe characters (32 random bytes): no quoting needed in a URL or redis.conf.
        python3 -c 'import secrets; print(secrets.token_urlsafe(32))' >"$file.new"
        mv "$file.new" "$file"
        printf 'made %s\n' "$file" >&2
    fi
    chown "$owner" "$file"
    chmod 440 "$file"
done
