#!/usr/bin/env bash
# Builds the instancer's one image (worker, API + dashboard, ctfctl, Traefik, Redis) from
# deploy/Dockerfile. Works with no image registry: when the Dockerfile's base image
# (debian:bookworm-slim) is neither here nor pullable, an equivalent base is built from
# Debian's own packages with debootstrap and `docker import`, once, and kept by tag.
#   deploy/build-image.sh                 builds ctf-instancer:latest
#   CTF_IMAGE=ctf-instancer:1.0 deploy/build-image.sh
# Settings (environment):
#   CTF_IMAGE         the tag to build (default ctf-instancer:latest)
#   CTF_BASE_IMAGE    the base to use (default debian:bookworm-slim)
#   CTF_IMAGE_LABELS  extra labels, "key=value key2=value2" (tests label what they build)
#   CTF_BUILD_LABEL   a value for the label org.ctf-instancer.build on the image and on its
#                     intermediate stages (`docker images --filter label=...` finds them all)
#   DEBIAN_MIRROR     the mirror debootstrap uses (default http://deb.debian.org/debian)
#   CTF_BUILD_ARGS    more `docker build` options, e.g. "--cpu-shares 128" (a busy host)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
say()  { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }
die()  { printf '\033[31merror:\033[0m %s\n' "$*" >&2; exit 1; }

IMAGE="${CTF_IMAGE:-ctf-instancer:latest}"
BASE="${CTF_BASE_IMAGE:-debian:bookworm-slim}"
# The debootstrapped stand-in for the base: made once, reused by every later build.
LOCAL_BASE="ctf-instancer-base:bookworm-debootstrap"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
labels=()
for kv in ${CTF_IMAGE_LABELS:-}; do labels+=(--label "$kv"); done

command -v docker >/dev/null 2>&1 || die "no docker client: apt-get install docker.io"
timeout 10 docker info >/dev/null 2>&1 || die "the Docker engine does not answer"

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

# debootstrap_base: a minimal Debian bookworm root (debootstrap --variant=minbase, what
# debian:bookworm-slim is made from), imported as $LOCAL_BASE.
debootstrap_base() {
    command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] \
        || die "no base image and no debootstrap to build one: apt-get install debootstrap"
    [ "$(id -u)" = 0 ] || die "building the base with debootstrap needs root (sudo $0)"
    local dir
    dir="$(mktemp -d /tmp/ctf-base.XXXXXX)"
    trap 'rm -rf "$dir"' RETURN
    say "building it from Debian's packages: debootstrap --variant=minbase bookworm ($MIRROR; a few minutes, once)"
    PATH="$PATH:/usr/sbin:/sbin" debootstrap --variant=minbase bookworm "$dir" "$MIRROR" \
        >"$dir.log" 2>&1 || { tail -20 "$dir.log" >&2; die "debootstrap failed; see $dir.log"; }
    rm -f "$dir.log"
    # As the slim image: no package lists, caches, logs or documentation.
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/var/cache/apt/archives/*.deb \
        "$dir"/var/log/* "$dir"/usr/share/doc/* "$dir"/usr/share/man/* "$dir"/usr/share/info/* \
        "$dir"/tmp/* "$dir"/root/.bash_history
    tar -C "$dir" --numeric-owner -c . | docker import \
        --change 'CMD ["bash"]' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'LABEL org.ctf-instancer.base=debootstrap' \
        --message "debootstrap --variant=minbase bookworm $MIRROR" - "$LOCAL_BASE" >/dev/null
    say "imported $LOCAL_BASE"
}

base="$BASE"
if have_image "$BASE"; then
    say "base image $BASE: present"
elif timeout 60 docker pull -q "$BASE" >/dev/null 2>&1; then
    say "base image $BASE: pulled"
else
    say "base image $BASE cannot be pulled (no image registry reachable): using a Debian base built here instead"
    if have_image "$LOCAL_BASE"; then
        say "$LOCAL_BASE: already built here (docker rmi it to rebuild)"
    else
        debootstrap_base
    fi
    base="$LOCAL_BASE"
fi

# The wheels of the product and its dependencies, fetched here with this machine's pip (its
# index, proxy and CA settings apply): the build itself reaches no package index.
wheels="$ROOT/deploy/.wheels"
python3 -m pip --version >/dev/null 2>&1 || die "no pip for python3 here: apt-get install python3-pip"
say "gathering wheels into deploy/.wheels (pip wheel)"
rm -rf "$wheels" && mkdir -p "$wheels"
# setuptools' scratch folder: a module deleted from the tree would live on in build/lib and
# go into the wheel.
rm -rf "$ROOT/build"
# async-timeout: redis-py wants it on Python < 3.11.3, as Debian's 3.11.2 in the image is,
# while this machine's Python may be newer (pip resolves markers for the Python it runs on).
python3 -m pip wheel -q --wheel-dir "$wheels" "$ROOT" "async-timeout>=4.0.3" >&2 \
    || die "pip wheel failed: is the Python package index reachable?"

say "building $IMAGE on $base"
start=$(date +%s)
docker build -f "$ROOT/deploy/Dockerfile" --build-arg "BASE=$base" \
    --build-arg "CTF_BUILD_LABEL=${CTF_BUILD_LABEL:-}" -t "$IMAGE" --force-rm \
    --label "org.ctf-instancer.image=1" "${labels[@]}" ${CTF_BUILD_ARGS:-} "$ROOT" >&2
size="$(docker image inspect -f '{{.Size}}' "$IMAGE")"
say "built $IMAGE in $(( $(date +%s) - start )) s ($(( size / 1048576 )) MiB)"
