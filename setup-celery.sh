#!/usr/bin/env bash
# Installs everything the instancer needs and prepares the data folder. Idempotent.
#   ./setup-celery.sh          the service (Python env, Redis, Docker engine)
#   ./setup-celery.sh --dev    also what the tests need (test tools, busybox, a local registry)
set -euo pipefail
source "$(dirname "$0")/scripts/lib.sh"

dev=""
[ "${1:-}" = "--dev" ] && dev=1
mkdir -p "$DATA_DIR" "$CTF_RUN_DIR"
chmod 700 "$DATA_DIR"

pkgs=()
command -v redis-server >/dev/null 2>&1 || pkgs+=(redis-server)
command -v dockerd >/dev/null 2>&1 || docker_up || pkgs+=(docker.io)
python3 -c 'import venv, ensurepip' 2>/dev/null || pkgs+=(python3-venv)
# The egress firewall (celery_app/engine/firewall.py) is an nftables table the worker installs.
command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || pkgs+=(nftables)
[ ${#pkgs[@]} -gt 0 ] && ensure_packages "${pkgs[@]}"
# The tests build stand-in images from a static busybox, pull from a local registry and drive
# the dashboard in Debian's headless Chromium (Playwright never downloads a browser here).
# The deployment's tests (deploy/) bring the stack up with Debian's docker-compose, build the
# image's base with debootstrap when no registry answers, and check the alert rules with
# promtool (prometheus) and the units with systemd-analyze (systemd).
[ -n "$dev" ] && ensure_packages busybox-static docker-registry chromium \
    docker-compose debootstrap prometheus systemd

ensure_venv "${dev:+dev}"
# The CTFd plugin's tests run the real CTFd in a venv of its own: build it once, cached in
# .data/ctfd (instant when already there; the tests skip when CTFd's source is absent).
if [ -n "$dev" ]; then
    "$VENV/bin/python" "$ROOT/tests/ctfd_support.py" >&2 \
        || warn "CTFd for the plugin tests is not ready; tests/test_ctfd_plugin.py will retry"
fi
say "ready: data folder $DATA_DIR, Python env $VENV"
