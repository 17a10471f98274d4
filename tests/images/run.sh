#!/usr/bin/env bash
# Image test: builds server/Dockerfile and operator/Dockerfile with podman, then runs three
# chorus-server containers and a Redis container on a private podman network and checks that
# a client on one container receives a publish made on another, and that `podman stop` ends a
# container promptly with exit code 0.
#
# By default the images package the host's release binaries (target/release, built here if
# scripts/test.sh has not just built them: then the cargo call below has nothing to do), through
# the Dockerfiles' `binary` build context, so that nothing is compiled twice. The host is Debian
# 12 (bookworm) like the builder image, whose glibc the runtime image takes, so they match.
# IMAGE_BUILD=source compiles inside the builder instead, as a plain `docker build` does.
#
# Nothing can be pulled on this machine kind, so the builder image the Dockerfiles take as
# BUILDER_IMAGE (normally rust:<ver>-bookworm) is a local stand-in: Debian bookworm made with
# debootstrap (plus gcc, libc6-dev, make, ca-certificates and redis-server, which also serves
# as the Redis image); IMAGE_BUILD=source mounts the host's Rust toolchain and crate cache in it
# at build time. The stand-in and the build layers stay in podman's storage, so later runs are
# quick.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD

. scripts/suite.sh
image_build=${IMAGE_BUILD:-host}
case $image_build in host | source) ;; *) echo "IMAGE_BUILD is host or source, not $image_build" >&2; exit 2 ;; esac
for tool in podman node cargo; do
  command -v "$tool" >/dev/null || { cannot_run "container images" "$tool is not installed (.ci/run installs it)"; exit 0; }
done

work=$(mktemp -d)
net=chorus-img-$$
names=()
cleanup() {
  for n in "${names[@]}"; do podman rm -f -t 0 "$n" >/dev/null 2>&1 || true; done
  podman network rm -f "$net" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# runc (crun refuses this machine's cgroup layout) and the hard nofile limit.
cat > "$work/containers.conf" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
CONF
export CONTAINERS_CONF=$work/containers.conf

toolbox=localhost/chorus-toolbox:bookworm
if ! podman image exists "$toolbox"; then
  command -v debootstrap >/dev/null || { cannot_run "container images" "debootstrap is not installed (.ci/run installs it)"; exit 0; }
  mirror=$({ grep -shoE '^(URIs:|deb) +(\[[^]]*\] +)?https?://[^ ]+/debian/?( |$)' \
    /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list || true; } |
    grep -oE 'https?://[^ ]+' | grep -v -- '-security' | head -n 1)
  [ -n "$mirror" ] || { echo "no Debian mirror in the apt sources" >&2; exit 1; }
  echo "images: making $toolbox with debootstrap (once)"
  rootfs=$work/rootfs
  debootstrap --variant=minbase --include=gcc,libc6-dev,make,ca-certificates,redis-server \
    bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log"; exit 1; }
  rm -rf "$rootfs"/usr/share/doc "$rootfs"/usr/share/man "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | podman import \
    --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV RUSTUP_HOME=/usr/local/rustup' --change 'ENV CARGO_HOME=/usr/local/cargo' \
    - "$toolbox" >/dev/null
fi

if [ "$image_build" = host ]; then
  # Nothing to do after scripts/test.sh's release build: these two packages' dependencies have
  # the same features with or without chorus-bench.
  cargo build --release --locked -p chorus-server -p chorus-operator
  # The binaries alone are the build context (target/ is gigabytes; podman gets two files).
  bin=$work/binary
  mkdir "$bin"
  cp target/release/chorus-server target/release/chorus-operator "$bin/"
  # CARGO_NET_OFFLINE is for the compiling stages, skipped here; buildah warns when it is unset.
  build() { # dockerfile tag
    podman build --quiet -f "$1" -t "$2" --build-arg BUILDER_IMAGE="$toolbox" \
      --build-arg CARGO_NET_OFFLINE=true --build-context binary="$bin" "$bin" >/dev/null
  }
else
  rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
  cargo_home=${CARGO_HOME:-$HOME/.cargo}
  # Everything the build needs is in the crate cache once the host has built the workspace.
  cargo fetch --locked >/dev/null
  build() { # dockerfile tag
    podman build --quiet -f "$1" -t "$2" \
      --build-arg BUILDER_IMAGE="$toolbox" --build-arg CARGO_NET_OFFLINE=true \
      -v "$rustup_home:/usr/local/rustup:ro" -v "$cargo_home:/usr/local/cargo" . >/dev/null
  }
fi
echo "images: building server/Dockerfile and operator/Dockerfile ($image_build binaries)"
build server/Dockerfile localhost/chorus-server:test
build operator/Dockerfile localhost/chorus-operator:test

passed=0
failed=0
check() { # description command...
  local what=$1
  shift
  if "$@"; then echo "ok: $what"; passed=$((passed + 1)); else echo "FAILED: $what"; failed=$((failed + 1)); fi
}
check "server image runs as non-root" bash -c '[ "$(podman image inspect --format "{{.Config.User}}" localhost/chorus-server:test)" = "65532:65532" ]'
podman run --rm localhost/chorus-operator:test crd > "$work/crd.yaml"
check "operator image prints its CRD" grep -q "name: realtimeapps.chorus.rs" "$work/crd.yaml"

podman network create "$net" >/dev/null
names+=("redis-$$")
podman run -d --name "redis-$$" --network "$net" --user redis "$toolbox" \
  redis-server --save '' --appendonly no --protected-mode no >/dev/null
urls=()
for i in 1 2 3; do
  port=$(node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')
  names+=("chorus-$i-$$")
  podman run -d --name "chorus-$i-$$" --network "$net" -p "127.0.0.1:$port:3000" \
    -e REDIS_URL="redis://redis-$$:6379" -e POD_NAME="chorus-$i" -e DRAIN_SECONDS=1 \
    localhost/chorus-server:test >/dev/null
  urls+=("http://127.0.0.1:$port")
done
check "three replicas on one Redis deliver across containers" \
  node tests/images/check.js "${urls[@]}"
podman stop -t 20 "chorus-1-$$" >/dev/null
code=$(podman inspect --format '{{.State.ExitCode}}' "chorus-1-$$")
check "podman stop ends a container with exit code 0 (not killed)" test "$code" = 0

echo "images: $passed passed, $failed failed"
[ "$failed" = 0 ]
