#!/usr/bin/env bash
# Installs what building and testing isomesh needs, once: the wasm32-wasip1 Rust target,
# Mosquitto and its clients (Debian packages; the second broker of the tests, and mosquitto_pub),
# and the model files (models/fetch.sh). Safe to run again: it skips what is already there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! rustup target list --installed | grep -qx wasm32-wasip1; then
  echo "setup: adding the wasm32-wasip1 Rust target" >&2
  rustup target add wasm32-wasip1
fi

need_mosquitto=""
command -v mosquitto_pub >/dev/null || need_mosquitto=yes
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need_mosquitto=yes
if [ -n "$need_mosquitto" ]; then
  echo "setup: installing mosquitto and mosquitto-clients (Debian packages)" >&2
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
fi

./models/fetch.sh
