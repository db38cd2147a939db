#!/usr/bin/env bash
# make image-test: build the image without a Docker daemon and check it from the inside.
#
# Runs as root on Debian bookworm (CI and the project's machines). It installs buildah,
# debootstrap and iproute2 when missing, stands in for python:3.11-slim with a Debian
# minbase (cached between runs), builds the Dockerfile with buildah's chroot isolation,
# then runs the image as uid 10001 with every directory of its root read-only and only
# the socket volume writable: version, daemon start with the baked config, an env secret
# read over the socket, the socket's mode, metrics, a clean stop. It needs the wheelhouse
# (build/wheels, `make wheelhouse`; `make image-test` fills it first).
#
# Environment: IMAGE_TEST_CACHE (default /var/cache/secret-sidecar-ci) keeps the base.
set -euo pipefail

cd "$(dirname "$0")/.."
started=$SECONDS
IMAGE=localhost/secret-sidecar:test
BASE=docker.io/library/python:3.11-slim
CACHE=${IMAGE_TEST_CACHE:-/var/cache/secret-sidecar-ci}
SOCKET=/var/run/secret-sidecar/sidecar.sock

say() { printf 'image-test: %s\n' "$*"; }
fail() {
    printf 'image-test: FAILED: %s\n' "$*" >&2
    exit 1
}

[ "$(id -u)" = 0 ] || fail "needs root (buildah's chroot isolation, debootstrap, network namespaces)"
VERSION=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
ls build/wheels/secret_sidecar-"$VERSION"-*.whl >/dev/null 2>&1 ||
    fail "no build/wheels/secret_sidecar-$VERSION-*.whl: run 'make wheelhouse' first (make image-test does)"

# --- programs -----------------------------------------------------------------------
missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v ip >/dev/null || missing+=(iproute2)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
        fail "apt-get install ${missing[*]}"
fi

work=$(mktemp -d /var/tmp/image-test.XXXXXX)
containers=()
cleanup() {
    for c in "${containers[@]}"; do
        buildah umount "$c" >/dev/null 2>&1 || true
        buildah rm "$c" >/dev/null 2>&1 || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

# --- the base -----------------------------------------------------------------------
# python:3.11-slim cannot be pulled here, so a Debian bookworm minbase with python3
# stands in (python3 in /usr/bin, not /usr/local/bin: the Dockerfile uses PATH). The
# recipe's hash names the cached rootfs tarball and the record of the image made from
# it; an image by that name with no record is a real python:3.11-slim and is used as is.
mirror=$(awk '$1 == "URIs:" { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
PACKAGES=python3,python3-venv,python3-pip,ca-certificates
recipe="debootstrap --variant=minbase --include=$PACKAGES bookworm; apt lists and debs removed"
key=$(printf '%s' "$recipe" | sha256sum | cut -c1-16)
tarball=$CACHE/base-$key.tar
record=$CACHE/base-$key.id
mkdir -p "$CACHE"

image_id() { # the full id of image $1, or nothing
    { buildah images --noheading --no-trunc --format '{{.ID}}' "$1" 2>/dev/null || true; } |
        sed 's/^sha256://'
}
base_id=$(image_id "$BASE")
if [ -n "$base_id" ] && [ -f "$record" ] && [ "$(cat "$record")" = "$base_id" ]; then
    base_state="cached in buildah storage"
elif [ -n "$base_id" ] && ! grep -qxF "$base_id" "$CACHE"/base-*.id 2>/dev/null; then
    base_state="a real $BASE"
else
    if [ ! -f "$tarball" ]; then
        say "making the stand-in base with debootstrap ($mirror)"
        t=$SECONDS
        debootstrap --variant=minbase --include="$PACKAGES" bookworm "$work/rootfs" "$mirror" \
            >"$work/debootstrap.log" 2>&1 || {
            tail -n 30 "$work/debootstrap.log" >&2
            fail "debootstrap"
        }
        rm -rf "$work"/rootfs/var/cache/apt/*.bin "$work"/rootfs/var/cache/apt/archives/*.deb \
            "$work"/rootfs/var/lib/apt/lists/*
        tar -C "$work/rootfs" --numeric-owner -cf "$tarball.partial" . && mv "$tarball.partial" "$tarball"
        rm -rf "$work/rootfs"
        base_state="made by debootstrap in $((SECONDS - t)) s"
    else
        base_state="imported from $tarball"
    fi
    ctr=$(buildah from --quiet scratch)
    containers+=("$ctr")
    rootfs=$(buildah mount "$ctr")
    tar -C "$rootfs" --numeric-owner -xpf "$tarball"
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 --cmd python3 "$ctr"
    buildah commit --quiet --rm "$ctr" "$BASE" >"$record"
    containers=()
    [ -z "$base_id" ] || buildah rmi "$base_id" >/dev/null 2>&1 || true # the stale stand-in
fi
say "base $BASE: $base_state"

# --- build --------------------------------------------------------------------------
# Docker format: the OCI image config has no HEALTHCHECK.
previous=$(image_id "$IMAGE")
t=$SECONDS
buildah bud --isolation chroot --pull=never --format docker --quiet \
    --build-arg VERSION="$VERSION" --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
    -t "$IMAGE" . >"$work/build.log" 2>&1 || {
    tail -n 40 "$work/build.log" >&2
    fail "buildah bud"
}
build_seconds=$((SECONDS - t))
current=$(image_id "$IMAGE")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
    buildah rmi "$previous" >/dev/null 2>&1 || true # the last run's image, now untagged
fi

# --- the image's config -------------------------------------------------------------
buildah inspect --type image "$IMAGE" >"$work/inspect.json"
config() { # config KEY... : that value of the image's config, as compact JSON (strings bare)
    python3 -c 'import json, sys
value = json.load(open(sys.argv[1]))["Docker"]["config"]
for key in sys.argv[2:]:
    value = (value or {}).get(key)
print(value if isinstance(value, str) else json.dumps(value, separators=(",", ":")))' \
        "$work/inspect.json" "$@"
}
expect() { # expect WHAT ACTUAL EXPECTED
    [ "$2" = "$3" ] || fail "$1 is '$2', expected '$3'"
}
expect "USER" "$(config User)" "10001:10001"
expect "ENTRYPOINT" "$(config Entrypoint)" '["secret-sidecar"]'
expect "CMD" "$(config Cmd)" '["run","-c","/etc/secret-sidecar/config.yaml"]'
expect "VOLUME" "$(config Volumes)" '{"/var/run/secret-sidecar":{}}'
expect "EXPOSE" "$(config ExposedPorts)" '{"9464/tcp":{}}'
expect "HEALTHCHECK" "$(config Healthcheck Test)" \
    '["CMD","secret-sidecar","health","--socket","'"$SOCKET"'"]'
expect "label version" "$(config Labels org.opencontainers.image.version)" "$VERSION"

# --- no build tools or build inputs in the final image --------------------------------
ctr=$(buildah from --quiet --pull=never "$IMAGE")
containers+=("$ctr")
root=$(buildah mount "$ctr")
for tool in gcc cc c++ g++ make ld as; do
    for dir in usr/bin usr/local/bin; do
        [ ! -e "$root/$dir/$tool" ] || fail "build tool /$dir/$tool is in the image"
    done
done
for path in tmp/wheels tmp/runtime.txt build root/.cache home/sidecar \
    opt/secret-sidecar/bin/pip opt/secret-sidecar/lib/python3.11/site-packages/pip; do
    [ ! -e "$root/$path" ] || fail "/$path is in the image"
done
# The interpreter's own bundled pip wheels are the base's, not ours.
strays=$(find "$root" -xdev -name '*.whl' -not -path '*/ensurepip/_bundled/*' \
    -not -path '*/usr/share/python-wheels/*' | sed "s|^$root||")
[ -z "$strays" ] || fail "wheels left in the image: $strays"

# --- run it: uid 10001, read-only root, the socket volume the only writable place ------
# buildah's chroot isolation has no read-only root of its own, so every top-level
# directory (and those under /run, where buildah itself writes /run/.containerenv) is
# bind-mounted read-only over itself, and a host directory made like the volume
# (10001:10001, 2750) is the socket directory. /run and / stay writable for root only.
# buildah's bind mounts are read-only unless told rw, and a destination under the
# /var/run -> /run symlink ends up hidden, so the volume is mounted at /run/secret-sidecar.
mounts=()
for dir in "$root"/* "$root"/run/*; do
    name=${dir#"$root"/}
    if [ ! -d "$dir" ] || [ -L "$dir" ]; then continue; fi
    case $name in proc | sys | dev | run | run/secret-sidecar) continue ;; esac
    mounts+=(--mount "type=bind,source=$dir,destination=/$name,ro")
done
install -d -o 10001 -g 10001 -m 2750 "$work/socket-volume"
mounts+=(--mount "type=bind,source=$work/socket-volume,destination=/run/secret-sidecar,rw")

# Its own network namespace: the baked config's metrics port 9464 must not meet the host's.
run() { # run USER SCRIPT [ENV...]
    local user=$1 script=$2
    shift 2
    unshare --net -- sh -c 'ip link set lo up && exec "$@"' sh \
        buildah run --isolation chroot --user "$user" "${@/#/--env=}" "${mounts[@]}" \
        "$ctr" -- sh -c "$script"
}

out=$(run 10001:10001 'secret-sidecar --version') || fail "secret-sidecar --version: $out"
expect "secret-sidecar --version" "$out" "$VERSION"
# Every backend's SDK ([all]) is in the venv and imports on the read-only root.
out=$(run 10001:10001 'python3 -c "import sidecar.backends.aws, sidecar.backends.gcp, sidecar.backends.hcv"' 2>&1) ||
    fail "the backends do not import: $out"

# As root: the mounts really are read-only (EROFS), not just closed to uid 10001.
# shellcheck disable=SC2016 # the scripts below expand inside the container
out=$(run 0:0 'for d in /etc /usr /opt/secret-sidecar /tmp /var; do
    touch "$d/.rw" 2>&1 || true; done') || true
for d in /etc /usr /opt/secret-sidecar /tmp /var; do
    grep -q "$d/.rw.*Read-only file system" <<<"$out" || fail "$d is not read-only: $out"
done
# As uid 10001: nowhere to write but the socket volume (/var/run -> /run).
out=$(run 10001:10001 'find / \( -path /proc -o -path /sys -o -path /dev \) -prune -o -writable -print 2>/dev/null; touch /x 2>&1 || true')
writable=$(grep -v '^touch' <<<"$out" || true)
expect "the places uid 10001 can write" "$writable" "/run/secret-sidecar"
grep -q "touch: cannot touch '/x'" <<<"$out" || fail "uid 10001 can write to /: $out"

secret="not-a-real-secret-$RANDOM$RANDOM"
# shellcheck disable=SC2016
daemon='set -u
sock='"$SOCKET"'
secret-sidecar run -c /etc/secret-sidecar/config.yaml 2>/var/run/secret-sidecar/daemon.log &
pid=$!
i=0
until secret-sidecar health --ready --socket "$sock" --timeout 1 >/dev/null 2>&1; do
    i=$((i + 1))
    kill -0 "$pid" 2>/dev/null || { echo "daemon exited before ready"; exit 1; }
    [ "$i" -lt 150 ] || { echo "not ready after 30 s"; exit 1; }
    sleep 0.2
done
echo "value=$(secret-sidecar get "{vault://env/db-password}" --socket "$sock")"
echo "uid=$(awk "/^Uid:/ { print \$2, \$3 }" /proc/$pid/status)"
echo "socket=$(stat -c "%a %U %G" "$sock")"
secret-sidecar health --socket "$sock" >/dev/null && echo "healthz=ok"
python3 -c "import re, urllib.request as u
text = u.urlopen(\"http://127.0.0.1:9464/metrics\", timeout=5).read().decode()
print(\"metrics=ok\" if re.search(r\"^secret_sidecar_ready 1\", text, re.M) else text)"
kill -TERM "$pid"
wait "$pid" && echo "stopped=ok"
[ -e "$sock" ] || echo "socket-removed=ok"'
out=$(run 10001:10001 "$daemon" "DB_PASSWORD=$secret") || true
report() {
    printf '%s\n--- daemon log ---\n' "$out" >&2
    cat "$work/socket-volume/daemon.log" >&2 2>/dev/null || true
    fail "$1"
}
[ -s "$work/socket-volume/daemon.log" ] || report "the daemon did not write its log into the volume"
grep -qxF "value=$secret" <<<"$out" || report "the env secret was not read over the socket"
grep -qxF "uid=10001 10001" <<<"$out" || report "the daemon does not run as uid 10001"
grep -qxF "socket=660 sidecar sidecar" <<<"$out" || report "the socket is not 0660 sidecar:sidecar"
for check in healthz metrics stopped socket-removed; do
    grep -qxF "$check=ok" <<<"$out" || report "$check"
done

size=$(buildah images --format '{{.Size}}' "$IMAGE")
say "passed in $((SECONDS - started)) s (build $build_seconds s); $IMAGE is $size"
