#!/usr/bin/env bash
# Builds the container images of the compose mesh with no registry: static musl binaries and the
# classifier module copied into images FROM scratch (docker/Dockerfile).
#   isomesh:latest          the three binaries, module 0.1.0 and its machine code, the rollout public key
#   isomesh-rollout:latest  the same plus module 0.2.0, for the one-shot rollout service
#   isomesh:arm64           linux/arm64: the aarch64 node, the same signed module 0.1.0 and its
#                           machine code for aarch64, the rollout public key (docker/Dockerfile.arm64)
# The rollout key pair is made once into target/compose/keys (never committed); the compose file
# mounts the secret half into the rollout service only.
#
# Run through `make images`, which builds the module and the binaries first (the
# x86_64-unknown-linux-musl target and musl-gcc, which scripts/setup.sh installs), and the
# aarch64 node (`make arm64-node`: cargo-zigbuild).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The static binaries `make build` made; the images get them stripped of their line tables.
bins=${1:-target/x86_64-unknown-linux-musl/release}
arm_bins=${2:-target/aarch64-unknown-linux-musl/release}
module=target/wasm32-wasip1/release/isomesh_guest.wasm
module_v2=target/modules/mobilenet_v2-0.2.0.wasm
ctx=target/images/context
arm_ctx=target/images/context-arm64
keys=target/compose/keys

command -v docker >/dev/null || { echo "images: docker is not installed" >&2; exit 1; }
for f in "$module" "$module_v2"; do
  [ -f "$f" ] || { echo "images: $f is missing; run 'make module'" >&2; exit 1; }
done

for b in isomesh-node isomesh isomesh-broker; do
  [ -x "$bins/$b" ] || { echo "images: $bins/$b is missing; run 'make build'" >&2; exit 1; }
done
[ -x "$arm_bins/isomesh-node" ] ||
  { echo "images: $arm_bins/isomesh-node is missing; run 'make arm64-node'" >&2; exit 1; }

if [ ! -f "$keys/rollout.key" ]; then
  mkdir -p "$keys"
  "$bins/isomesh" keygen --out "$keys/rollout.key"
fi
# Nothing to do when the three images exist and were made from these very files: `make test`
# and then `make bench-quick` (CI) each ask for the images, and a rebuild compiles the module
# twice (~50 s on 2 cores) to end where it started.
inputs=target/images/inputs.sha256
made_from() {
  sha256sum "$bins"/isomesh-node "$bins"/isomesh "$bins"/isomesh-broker "$arm_bins"/isomesh-node \
    "$module" "$module_v2" "$keys/rollout.key.pub" scripts/images.sh docker/Dockerfile \
    docker/Dockerfile.arm64
}
if [ -f "$inputs" ] && made_from | cmp -s - "$inputs" &&
  docker image inspect isomesh:latest isomesh-rollout:latest isomesh:arm64 >/dev/null 2>&1; then
  echo "images: up to date (isomesh:latest, isomesh-rollout:latest, isomesh:arm64 from these files)"
  exit 0
fi
rm -f "$inputs"

rm -rf "$ctx"
mkdir -p "$ctx/bin" "$ctx/lib/modules" "$ctx/lib/cache" "$ctx/etc" "$ctx/rollout" "$ctx/tmp"
# scratch has no /tmp; libraries may expect one.
chmod 1777 "$ctx/tmp"
for b in isomesh-node isomesh isomesh-broker; do
  strip -o "$ctx/bin/$b" "$bins/$b"
done
cp "$keys/rollout.key.pub" "$ctx/etc/"
cp "$module" "$ctx/lib/modules/mobilenet_v2.wasm"
# Nodes run only signed modules: the baked-in one carries its signed manifest.
"$bins/isomesh" sign --key "$keys/rollout.key" --name mobilenet_v2 --version 0.1.0 \
  "$ctx/lib/modules/mobilenet_v2.wasm"
cp "$module_v2" "$ctx/rollout/mobilenet_v2-0.2.0.wasm"
# The machine code of module 0.1.0, compiled by the very binary the nodes run (the cache key
# includes the engine's settings and this CPU's features; a node on another CPU compiles).
# `compile` MACs it with a key made beside the cache, lib/cache.cache-key, which lands at the
# nodes' default --cache-key (/var/lib/isomesh/cache.cache-key): the baked code is trusted as
# far as the image is; a node whose cache was changed refuses the entry and compiles.
"$bins/isomesh" compile "$ctx/lib/modules/mobilenet_v2.wasm" --cache-dir "$ctx/lib/cache"

# The arm64 image's context: the aarch64 node, and the very module file and signed manifest of
# the x86 image (one signature, every ISA), with machine code compiled for aarch64 by the x86
# `isomesh compile --target` (it self-tests the module with this host's engine first). Its own
# cache key, lib/cache.cache-key, lands at the node's default --cache-key as above.
rm -rf "$arm_ctx"
mkdir -p "$arm_ctx/bin" "$arm_ctx/lib/cache" "$arm_ctx/etc" "$arm_ctx/tmp"
chmod 1777 "$arm_ctx/tmp"
# Binutils' strip knows only x86 here; aarch64-linux-gnu-strip (scripts/setup.sh installs it) or
# an llvm-strip know aarch64.
arm_strip=""
for s in aarch64-linux-gnu-strip llvm-strip; do
  command -v "$s" >/dev/null && { arm_strip=$s; break; }
done
if [ -n "$arm_strip" ]; then
  "$arm_strip" -o "$arm_ctx/bin/isomesh-node" "$arm_bins/isomesh-node"
else
  echo "images: warning: no strip for aarch64 (llvm-strip, aarch64-linux-gnu-strip): isomesh:arm64 ships the node unstripped" >&2
  cp "$arm_bins/isomesh-node" "$arm_ctx/bin/"
fi
cp "$keys/rollout.key.pub" "$arm_ctx/etc/"
cp -r "$ctx/lib/modules" "$arm_ctx/lib/"
# Its self-test loads the x86 code compiled just above instead of compiling again.
"$bins/isomesh" compile "$arm_ctx/lib/modules/mobilenet_v2.wasm" \
  --target aarch64-unknown-linux-musl --cache-dir "$arm_ctx/lib/cache" \
  --compile-cache "$ctx/lib/cache"
rm -rf "$ctx/lib/cache/incremental" "$ctx"/lib/cache/*.lock
rm -rf "$arm_ctx/lib/cache/incremental" "$arm_ctx"/lib/cache/*.lock

docker build -q --target isomesh -t isomesh:latest -f docker/Dockerfile "$ctx" >/dev/null
docker build -q --target rollout -t isomesh-rollout:latest -f docker/Dockerfile "$ctx" >/dev/null
# No registry and FROM scratch: nothing to pull, so the classic builder makes a linux/arm64
# image on this x86 host (it runs no step, so needs no qemu); checked below, not assumed.
docker build -q --platform linux/arm64 -t isomesh:arm64 -f docker/Dockerfile.arm64 "$arm_ctx" >/dev/null
arch=$(docker image inspect -f '{{.Os}}/{{.Architecture}}' isomesh:arm64)
[ "$arch" = linux/arm64 ] || { echo "images: isomesh:arm64 was built for $arch, not linux/arm64" >&2; exit 1; }
made_from >"$inputs"
echo "images: built (sizes below; isomesh-rollout shares all but its last layer with isomesh)"
du -sh "$ctx"/bin/* "$ctx/lib/modules" "$ctx/lib/cache" | sed 's/^/  /'
du -sh "$arm_ctx/bin/isomesh-node" "$arm_ctx/lib/cache" | sed 's/^/  arm64: /'
docker image ls --format '  {{.Repository}}:{{.Tag}}  {{.Size}}' | grep -E 'isomesh(-rollout)?:(latest|arm64)' || true
