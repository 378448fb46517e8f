#!/usr/bin/env bash
# Builds the container images of the compose mesh with no registry: static musl binaries and the
# classifier module copied into images FROM scratch (docker/Dockerfile).
#   isomesh:latest          the three binaries, module 0.1.0 and its machine code, the rollout public key
#   isomesh-rollout:latest  the same plus module 0.2.0, for the one-shot rollout service
# The rollout key pair is made once into target/compose/keys (never committed); the compose file
# mounts the secret half into the rollout service only.
#
# Run through `make images`, which builds the module and the binaries first (the
# x86_64-unknown-linux-musl target and musl-gcc, which scripts/setup.sh installs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The static binaries `make build` made; the images get them stripped of their line tables.
bins=${1:-target/x86_64-unknown-linux-musl/release}
module=target/wasm32-wasip1/release/isomesh_guest.wasm
module_v2=target/modules/mobilenet_v2-0.2.0.wasm
ctx=target/images/context
keys=target/compose/keys

command -v docker >/dev/null || { echo "images: docker is not installed" >&2; exit 1; }
for f in "$module" "$module_v2"; do
  [ -f "$f" ] || { echo "images: $f is missing; run 'make module'" >&2; exit 1; }
done

for b in isomesh-node isomesh isomesh-broker; do
  [ -x "$bins/$b" ] || { echo "images: $bins/$b is missing; run 'make build'" >&2; exit 1; }
done

if [ ! -f "$keys/rollout.key" ]; then
  mkdir -p "$keys"
  "$bins/isomesh" keygen --out "$keys/rollout.key"
fi

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
rm -rf "$ctx/lib/cache/incremental" "$ctx"/lib/cache/*.lock

docker build -q --target isomesh -t isomesh:latest -f docker/Dockerfile "$ctx" >/dev/null
docker build -q --target rollout -t isomesh-rollout:latest -f docker/Dockerfile "$ctx" >/dev/null
echo "images: built (sizes below; isomesh-rollout shares all but its last layer with isomesh)"
du -sh "$ctx"/bin/* "$ctx/lib/modules" "$ctx/lib/cache" | sed 's/^/  /'
docker image ls --format '  {{.Repository}}:{{.Tag}}  {{.Size}}' | grep -E 'isomesh(-rollout)?:latest' || true
