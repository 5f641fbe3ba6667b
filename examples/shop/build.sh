#!/usr/bin/env bash
# Builds the example's three images from Debian's static busybox (no registry needed):
#   examples/shop/build.sh [extra docker build arguments, e.g. --label k=v]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
busybox="${BUSYBOX:-/bin/busybox}"
[ -x "$busybox" ] || { echo "need a static busybox at $busybox (apt-get install busybox-static)" >&2; exit 1; }
for service in web db bot; do
    context="$(mktemp -d)"
    cp -a "$here/$service/." "$context/"
    cp "$busybox" "$context/busybox"
    docker build -q -t "ctf-example/shop-$service:1" "$@" "$context" >/dev/null
    rm -rf "$context"
    echo "built ctf-example/shop-$service:1"
done
