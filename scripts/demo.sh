#!/usr/bin/env bash
# The isomesh demo: the embedded broker, one node per tier (device d1, edge e1, cloud c1) all
# serving the same .wasm module, then every shared photo classified on each tier, once with the
# `isomesh` CLI (protobuf jobs) and once with plain `mosquitto_pub -f` (raw bytes, JSON answer).
# A burst at the device with a tight budget shows offload: jobs the device would finish late go
# up to the edge and the cloud.
# Then a signed rollout of version 0.2.0 of the module to every node, hot-swapped while they run,
# and one more classification to show every tier answering with the new version.
#
# Run through `make demo`, which builds everything first. Logs: target/demo/*.log.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The binaries `make build` made (static, x86_64-unknown-linux-musl).
bin=${1:-target/x86_64-unknown-linux-musl/release}
module=target/wasm32-wasip1/release/isomesh_guest.wasm
module_v2=target/modules/mobilenet_v2-0.2.0.wasm
images="${ISOMESH_IMAGES:-photos}"
port="${ISOMESH_DEMO_PORT:-18830}"
broker="mqtt://127.0.0.1:$port"
work=target/demo
pids=()

cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

[ -f "$module" ] || { echo "demo: $module is missing; run 'make demo'" >&2; exit 1; }
ls "$images"/*.jp*g >/dev/null 2>&1 || { echo "demo: no photos in $images; set ISOMESH_IMAGES" >&2; exit 1; }
rm -rf "$work"
mkdir -p "$work/cache"
echo "== isomesh keygen: the key that signs rollouts; every node trusts its public half"
"$bin/isomesh" keygen --out "$work/rollout.key"

echo "== starting isomesh-broker on 127.0.0.1:$port, anonymous access on (a demo on loopback; see"
echo "   docs/security.md for logins and roles)"
"$bin/isomesh-broker" --listen "127.0.0.1:$port" --allow-anonymous >"$work/broker.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do "$bin/isomesh-broker" health --broker "$broker" >/dev/null 2>&1 && break; sleep 0.2; done

for spec in d1:device e1:edge c1:cloud; do
  id="${spec%%:*}"; tier="${spec##*:}"
  mkdir -p "$work/$id/modules"
  cp "$module" "$work/$id/modules/mobilenet_v2.wasm"
  # Nodes run only signed modules; a copied file needs its signed manifest beside it (name and
  # version come from the module's own isomesh-module section).
  "$bin/isomesh" sign --key "$work/rollout.key" "$work/$id/modules/mobilenet_v2.wasm"
  echo "== starting $tier node $id"
  "$bin/isomesh-node" --id "$id" --tier "$tier" --broker "$broker" \
    --modules "$work/$id/modules" --cache-dir "$work/cache" \
    --trusted-key "$work/rollout.key.pub" >"$work/$id.log" 2>&1 &
  pids+=($!)
done

echo "== waiting for the nodes (the first start compiles the module once, ~15-30 s; later starts load it from the cache)"
started=$(date +%s)
ready() {
  "$bin/isomesh" status --broker "$broker" --json 2>/dev/null | grep '"online":true' | grep -c '"version":"[^"]'
}
until [ "$(ready)" -ge 3 ]; do
  if [ $(( $(date +%s) - started )) -gt 300 ]; then
    echo "demo: nodes not ready after 300 s; see $work/*.log" >&2
    exit 1
  fi
  sleep 1
done
echo "   ready after $(( $(date +%s) - started )) s"
"$bin/isomesh" status --broker "$broker"

for node in d1 e1 c1; do
  echo
  echo "== isomesh classify --node $node (MS = round trip seen by the client)"
  "$bin/isomesh" classify --broker "$broker" --node "$node" "$images"/*.jp*g
done

if command -v mosquitto_pub >/dev/null && command -v mosquitto_sub >/dev/null; then
  echo
  echo "== plain MQTT: mosquitto_pub -f $images/cat_720p.jpg -t isomesh/images/e1"
  mosquitto_sub -h 127.0.0.1 -p "$port" -t isomesh/results/e1 -C 1 -W 60 &
  sub=$!
  sleep 0.5
  mosquitto_pub -h 127.0.0.1 -p "$port" -q 1 -t isomesh/images/e1 -f "$images/cat_720p.jpg"
  wait "$sub"
fi

echo
echo "== offload: a burst of 24 photos at the device, 300 ms budget each. One worker at ~40 ms a"
echo "   photo cannot finish them all in time, so it sends jobs up; NODE and PATH say where each ran"
burst=()
for _ in 1 2 3 4; do burst+=("$images"/*.jp*g); done
"$bin/isomesh" classify --broker "$broker" --node d1 --budget-ms 300 "${burst[@]:0:24}"
echo "   forwarded by d1: $(grep -c 'forwarding the job up' "$work/d1.log" || true) jobs, by e1: $(grep -c 'forwarding the job up' "$work/e1.log" || true)"

echo
echo "== isomesh rollout $module_v2 --wait (0.2.0 by its own section; signed, retained, hot-swapped: no node restarts)"
"$bin/isomesh" rollout "$module_v2" \
  --key "$work/rollout.key" --broker "$broker" --wait --timeout-s 300

echo
echo "== isomesh classify on every tier after the rollout (MODULE: the version that answered)"
for node in d1 e1 c1; do
  "$bin/isomesh" classify --broker "$broker" --node "$node" "$images/cat_720p.jpg"
done

echo
echo "== status after the run"
"$bin/isomesh" status --broker "$broker"
