#!/usr/bin/env bash
# Installs what building and testing isomesh needs, once: the wasm32-wasip1 Rust target,
# Mosquitto and its clients (Debian packages; the second broker of the tests, and mosquitto_pub),
# the x86_64-unknown-linux-musl target and musl-gcc (Debian musl-tools: ring, under the broker,
# compiles C) for the static binaries of the container images, Python's `cryptography` for the
# TLS tests' certificates, and the model files (models/fetch.sh). Safe to run again: it skips what is already there. Docker Engine and
# docker-compose are not installed here: the container tests need them and say so if missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! rustup target list --installed | grep -qx wasm32-wasip1; then
  echo "setup: adding the wasm32-wasip1 Rust target" >&2
  rustup target add wasm32-wasip1
fi

if ! rustup target list --installed | grep -qx x86_64-unknown-linux-musl; then
  echo "setup: adding the x86_64-unknown-linux-musl Rust target (static binaries for the images)" >&2
  rustup target add x86_64-unknown-linux-musl
fi

packages=()
command -v mosquitto_pub >/dev/null || packages+=(mosquitto-clients)
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || packages+=(mosquitto)
command -v musl-gcc >/dev/null || packages+=(musl-tools)
if [ ${#packages[@]} -gt 0 ]; then
  echo "setup: installing ${packages[*]} (Debian packages)" >&2
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${packages[@]}" >/dev/null
fi

# The TLS tests make their certificates with Python's `cryptography` (from PyPI).
if ! python3 -c 'import cryptography' 2>/dev/null; then
  echo "setup: installing the Python package cryptography (test certificates)" >&2
  python3 -m pip install --quiet cryptography
fi

./models/fetch.sh
