#!/usr/bin/env bash
# Builds the shipped solvers of the default catalog (SPEC §14) from Debian's static busybox
# and a shell script each, so no registry is needed; run it on every Docker host:
#   examples/solvers/build.sh [extra docker build arguments, e.g. --label k=v]
# builds ctf-example/juice-shop-solver:1 and ctf-example/todo-app-solver:1
# (SOLVER_TAG=2 examples/solvers/build.sh: another tag).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
busybox="${BUSYBOX:-/bin/busybox}"
tag="${SOLVER_TAG:-1}"
[ -x "$busybox" ] || { echo "need a static busybox at $busybox (apt-get install busybox-static)" >&2; exit 1; }
for solver in juice-shop todo-app; do
    context="$(mktemp -d)"
    cp -a "$here/$solver/." "$context/"
    cp "$busybox" "$context/busybox"
    docker build -q -t "ctf-example/$solver-solver:$tag" "$@" "$context" >/dev/null
    rm -rf "$context"
    echo "built ctf-example/$solver-solver:$tag"
done
