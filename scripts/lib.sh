# Shared shell functions of setup-celery.sh, run-celery-worker.sh and run-tests.sh.
# Source it; it never kills what it did not start (record_started keeps pid files in
# $CTF_RUN_DIR with each process's start time; stop_started checks both).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
DATA_DIR="${CTF_DATA_DIR:-$ROOT/.data}"
CTF_RUN_DIR="${CTF_RUN_DIR:-$DATA_DIR/run}"

say()  { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }
warn() { printf '\033[33mwarning:\033[0m %s\n' "$*" >&2; }
die()  { printf '\033[31merror:\033[0m %s\n' "$*" >&2; exit 1; }

is_root() { [ "$(id -u)" = 0 ]; }

# ensure_packages PKG... : install missing Debian packages (root on Debian/Ubuntu only).
ensure_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null 2>&1 \
        || die "missing ${missing[*]} and no apt-get here: install them with your package manager"
    is_root || die "missing ${missing[*]}: run as root, or install them first (sudo apt-get install ${missing[*]})"
    say "installing ${missing[*]} (apt-get)"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >"$DATA_DIR/apt.log" 2>&1; then
        apt-get update -q >>"$DATA_DIR/apt.log" 2>&1 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >>"$DATA_DIR/apt.log" 2>&1 \
            || die "apt-get install ${missing[*]} failed; see $DATA_DIR/apt.log"
    fi
}

# ensure_venv [extra]: create .venv and install the package (with [extra]) when pyproject changed.
ensure_venv() {
    local extra="${1:-}" spec="$ROOT" stamp
    [ -n "$extra" ] && spec="$ROOT[$extra]"
    command -v python3 >/dev/null 2>&1 || die "python3 (3.11 or newer) is required"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "python3 is $(python3 --version 2>&1); 3.11 or newer is required"
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating $VENV"
        python3 -m venv "$VENV" || die "python3 -m venv failed (apt-get install python3-venv?)"
    fi
    stamp="$VENV/.installed-$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)-${extra:-base}"
    if [ ! -f "$stamp" ]; then
        say "installing Python dependencies into .venv${extra:+ (with $extra)}"
        "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
        "$VENV/bin/python" -m pip install -q -e "$spec" 2>&1 | grep -v -i -E "^(WARNING|  )" >&2 || true
        "$VENV/bin/python" -c "import celery_app.core.service" 2>/dev/null \
            || die "pip install of $spec failed; run: $VENV/bin/pip install -e '$spec'"
        rm -f "$VENV"/.installed-*
        touch "$stamp"
    fi
}

docker_up() { timeout 10 docker info >/dev/null 2>&1; }

# ensure_docker: start dockerd when it is installed but not running; remember we started it.
ensure_docker() {
    docker_up && return 0
    [ -n "${DOCKER_HOST:-}" ] && case "$DOCKER_HOST" in unix://*) ;; *)
        die "DOCKER_HOST=$DOCKER_HOST does not answer; start that engine first" ;; esac
    command -v dockerd >/dev/null 2>&1 || die "no Docker engine: run ./setup-celery.sh as root"
    is_root || die "the Docker engine is not running and only root can start it (sudo dockerd)"
    mkdir -p "$CTF_RUN_DIR"
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        say "starting Docker (systemctl start docker)"
        systemctl start docker || true
    fi
    if ! docker_up; then
        say "starting dockerd (log: $CTF_RUN_DIR/dockerd.log)"
        nohup dockerd --pidfile /var/run/docker.pid >"$CTF_RUN_DIR/dockerd.log" 2>&1 &
        record_started dockerd $!
    fi
    local i
    for i in $(seq 1 120); do docker_up && return 0; sleep 0.5; done
    die "dockerd did not come up within 60 s; see $CTF_RUN_DIR/dockerd.log"
}

# Processes this shell started, by name (record_started); stop_all_started stops them.
STARTED=()

# proc_start_time PID: when process PID started (clock ticks after boot, field 22 of
# /proc/PID/stat); prints nothing when there is no such process. A pid alone is not enough to
# name a process: once ours exits, the kernel may give its pid to any other.
proc_start_time() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
    # After the command name, which may hold spaces and parentheses: fields 3 onwards.
    stat="${stat##*) }"
    # shellcheck disable=SC2086  # split into fields on purpose
    set -- $stat
    printf '%s\n' "${20:-}"
}

# record_started NAME PID: remember that this shell started PID as NAME: a pid file in
# $CTF_RUN_DIR holding the pid and its start time, and NAME in STARTED.
record_started() {
    mkdir -p "$CTF_RUN_DIR"
    printf '%s %s\n' "$2" "$(proc_start_time "$2")" >"$CTF_RUN_DIR/$1.pid"
    STARTED+=("$1")
}

# stop_started NAME: stop the process recorded as NAME, and wait for it. It is signalled only
# while it is still the very process that was recorded (same pid and start time): a pid file
# left by an earlier run, whose pid now names another process, is removed and nothing killed.
stop_started() {
    local pidfile="$CTF_RUN_DIR/$1.pid" pid start i
    [ -f "$pidfile" ] || return 0
    read -r pid start <"$pidfile" || true
    if [ -n "$pid" ] && [ -n "${start:-}" ] && [ "$(proc_start_time "$pid")" = "$start" ]; then
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 100); do
            [ "$(proc_start_time "$pid")" = "$start" ] || break
            sleep 0.2
        done
        [ "$(proc_start_time "$pid")" = "$start" ] && kill -KILL "$pid" 2>/dev/null || true
    elif [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        warn "not stopping pid $pid named by $pidfile: it is not the process recorded there"
    fi
    rm -f "$pidfile"
}

# stop_all_started: stop what this shell started (record_started), the last started first.
stop_all_started() {
    local i
    for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do stop_started "${STARTED[$i]}"; done
    STARTED=()
}

# url_host_port URL: print "host port" of a redis:// URL.
url_host_port() {
    python3 - "$1" <<'PY'
import sys
from urllib.parse import urlsplit
u = urlsplit(sys.argv[1])
print(u.hostname or "localhost", u.port or 6379)
PY
}

# url_password URL: print the URL's password (percent-decoded; empty when it has none).
url_password() {
    python3 - "$1" <<'PY'
import sys
from urllib.parse import unquote, urlsplit
print(unquote(urlsplit(sys.argv[1]).password or ""))
PY
}

# redis_bind_is_loopback: whether the Redis we start listens on loopback only. CTF_REDIS_BIND
# (default 127.0.0.1) is redis-server's bind list, e.g. "127.0.0.1 10.0.0.5" for other hosts.
redis_bind_is_loopback() {
    local addr
    for addr in ${CTF_REDIS_BIND:-127.0.0.1}; do
        case "${addr#-}" in 127.*|::1|localhost) ;; *) return 1 ;; esac
    done
}

# redis_password: the password of the Redis we start beyond loopback; generated on first use
# into the data folder (mode 0600), like the admin token and the flag secret.
redis_password() {
    local file="$DATA_DIR/redis_password"
    if [ ! -s "$file" ]; then
        mkdir -p "$DATA_DIR"
        (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(32))' >"$file")
    fi
    cat "$file"
}

# with_redis_password URL PASSWORD: URL with PASSWORD added, when it points at this machine
# (the Redis we start) and has none yet; any other URL is printed unchanged.
with_redis_password() {
    python3 - "$1" "$2" <<'PY'
import sys
from urllib.parse import quote, urlsplit, urlunsplit
url, password = sys.argv[1], sys.argv[2]
u = urlsplit(url)
local = (u.hostname or "localhost") in ("localhost", "::1") or (u.hostname or "").startswith("127.")
if u.password or not local:
    print(url)
else:
    host = u.netloc.rpartition("@")[2]
    print(urlunsplit((u.scheme, f"{quote(u.username or '')}:{quote(password, safe='')}@{host}",
                      u.path, u.query, u.fragment)))
PY
}

# add_redis_password: when the Redis we start listens beyond loopback, put its password into
# CELERY_BROKER_URL, CELERY_RESULT_BACKEND and CTF_REDIS_URL (those that point at this machine).
add_redis_password() {
    redis_bind_is_loopback && return 0
    local pw
    pw="$(redis_password)"
    CELERY_BROKER_URL="$(with_redis_password "${CELERY_BROKER_URL:-redis://localhost:6379/0}" "$pw")"
    CELERY_RESULT_BACKEND="$(with_redis_password "${CELERY_RESULT_BACKEND:-redis://localhost:6379/1}" "$pw")"
    export CELERY_BROKER_URL CELERY_RESULT_BACKEND
    if [ -n "${CTF_REDIS_URL:-}" ]; then
        CTF_REDIS_URL="$(with_redis_password "$CTF_REDIS_URL" "$pw")"
        export CTF_REDIS_URL
    fi
    say "Redis listens on ${CTF_REDIS_BIND} and requires the password in $DATA_DIR/redis_password"
}

# url_auth URL: print the URL's scheme, user name and password (percent-decoded), one a line.
url_auth() {
    python3 - "$1" <<'PY'
import sys
from urllib.parse import unquote, urlsplit
u = urlsplit(sys.argv[1])
print(u.scheme)
print(unquote(u.username or ""))
print(unquote(u.password or ""))
PY
}

# redis_ping URL: print Redis's answer to PING at URL, authenticating as the URL says. The
# password goes through REDISCLI_AUTH, never on a command line (ps would show it).
redis_ping() {
    local host port scheme user pass
    read -r host port < <(url_host_port "$1")
    { IFS= read -r scheme; IFS= read -r user; IFS= read -r pass; } < <(url_auth "$1")
    (
        [ -n "$pass" ] && export REDISCLI_AUTH="$pass"
        opts=(-h "$host" -p "$port")
        [ -n "$user" ] && [ -n "$pass" ] && opts+=(--user "$user")
        [ "$scheme" = rediss ] && opts+=(--tls)
        timeout 3 redis-cli "${opts[@]}" ping 2>&1
    )
}

# redis_up URL: whether Redis answers at URL; dies when it answers but refuses our password.
redis_up() {
    local answer
    answer="$(redis_ping "$1" || true)"
    case "$answer" in
        *PONG*) return 0 ;;
        *NOAUTH*|*WRONGPASS*|*"invalid password"*|*"invalid username-password"*)
            die "Redis at $(url_host_port "$1" | tr ' ' :) refuses the URL's password (or needs one): fix the password in the URL" ;;
    esac
    return 1
}

# ensure_redis URL: start a local redis-server when none answers at URL.
ensure_redis() {
    local host port auth=() pass
    read -r host port < <(url_host_port "$1")
    redis_up "$1" && return 0
    case "$host" in localhost|127.0.0.1|::1) ;; *) die "Redis at $host:$port does not answer; start it first" ;; esac
    command -v redis-server >/dev/null 2>&1 || die "no redis-server: run ./setup-celery.sh as root"
    mkdir -p "$CTF_RUN_DIR" "$DATA_DIR/redis"
    pass="$(url_password "$1")"
    if [ -n "$pass" ]; then
        # requirepass from a file of mode 0600: on the command line, ps would show it.
        (umask 077 && printf 'requirepass "%s"\n' "$pass" >"$DATA_DIR/redis/auth.conf")
        auth=("$DATA_DIR/redis/auth.conf")
    elif ! redis_bind_is_loopback; then
        die "Redis would listen on ${CTF_REDIS_BIND} without a password: put one in the URL"
    fi
    say "starting redis-server on ${CTF_REDIS_BIND:-127.0.0.1} port $port${auth:+ (password required)} (data in $DATA_DIR/redis)"
    # noeviction: when full, Redis refuses writes (the API answers 503) but never drops the
    # instance index or a lock; any volatile-* policy could evict locks, which carry TTLs.
    redis-server "${auth[@]}" --bind ${CTF_REDIS_BIND:-127.0.0.1} --port "$port" --dir "$DATA_DIR/redis" --appendonly yes \
        --maxmemory "${CTF_REDIS_MAXMEMORY:-1gb}" --maxmemory-policy noeviction \
        --daemonize no --logfile "$CTF_RUN_DIR/redis.log" &
    record_started redis $!
    local i
    for i in $(seq 1 50); do redis_up "$1" && return 0; sleep 0.1; done
    die "redis-server did not come up; see $CTF_RUN_DIR/redis.log"
}
