#!/usr/bin/env bash
# Installs what building and testing isomesh needs, once: the wasm32-wasip1 Rust target,
# Mosquitto and its clients (Debian packages; the second broker of the tests, and mosquitto_pub),
# the x86_64-unknown-linux-musl target and musl-gcc (Debian musl-tools: ring, under the broker,
# compiles C) for the static binaries of the container images, Python's `cryptography` for the
# TLS tests' certificates, and the model files (models/fetch.sh). For the aarch64 (ARM) device
# tier: the aarch64-unknown-linux-musl Rust target, cargo-zigbuild and ziglang (PyPI: zig is the C
# cross compiler and linker), qemu-user-static (Debian: runs aarch64 binaries on this x86 host),
# binutils-aarch64-linux-gnu (Debian: its strip strips the aarch64 node for the image),
# protobuf-compiler (Debian: protoc, which the broker's cluster protocol, gRPC, is generated
# with at build time), and qemu-aarch64 registered
# with the kernel's binfmt_misc so Docker can run linux/arm64 containers. Safe to run again: it
# skips what is already there. Docker Engine and docker-compose are not installed here: the
# container tests need them and say so if missing.
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

# The aarch64 node (the ARM device tier): static too, cross-compiled with cargo-zigbuild.
if ! rustup target list --installed | grep -qx aarch64-unknown-linux-musl; then
  echo "setup: adding the aarch64-unknown-linux-musl Rust target (the ARM device node)" >&2
  rustup target add aarch64-unknown-linux-musl
fi

packages=()
command -v mosquitto_pub >/dev/null || packages+=(mosquitto-clients)
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || packages+=(mosquitto)
command -v musl-gcc >/dev/null || packages+=(musl-tools)
# The broker's cluster protocol is gRPC: its build generates code from .proto files with protoc.
command -v protoc >/dev/null || packages+=(protobuf-compiler)
# Runs the aarch64 node on this host: the tests call it directly, Docker through binfmt_misc.
[ -x /usr/bin/qemu-aarch64-static ] || packages+=(qemu-user-static)
# Binutils' strip knows x86 only; the cross binutils' strips the aarch64 node for the arm64 image
# (a few MB, where Debian's llvm, whose llvm-strip would do too, is hundreds).
command -v aarch64-linux-gnu-strip >/dev/null || packages+=(binutils-aarch64-linux-gnu)
if [ ${#packages[@]} -gt 0 ]; then
  echo "setup: installing ${packages[*]} (Debian packages)" >&2
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${packages[@]}" >/dev/null
fi

# The aarch64 cross build: cargo-zigbuild runs cargo with zig as the C compiler and linker for
# aarch64 musl (ring, under the broker and rustls, compiles C). Chosen over Debian's
# gcc-aarch64-linux-gnu because that is a glibc toolchain (a musl one would still be missing),
# while this is one pip install bringing both, and it built this project unchanged.
if ! command -v cargo-zigbuild >/dev/null || ! python3 -m ziglang version >/dev/null 2>&1; then
  echo "setup: installing cargo-zigbuild and ziglang (Python packages: the aarch64 cross build)" >&2
  python3 -m pip install --quiet cargo-zigbuild ziglang
fi

# Docker runs linux/arm64 containers (compose's d4) through qemu: the kernel's binfmt_misc must
# hand aarch64 ELF files to qemu-aarch64-static. The F (fix-binary) flag makes the kernel open
# the interpreter once, here, so it also runs inside containers that lack it (FROM scratch).
# The magic and mask are Debian's (qemu-user-static's binfmt.d file), the interpreter the static
# qemu itself. The tests that run the aarch64 node directly call qemu-aarch64-static and need
# none of this; without it only the arm64 containers cannot run.
binfmt=/proc/sys/fs/binfmt_misc
register_qemu_aarch64() {
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  if [ ! -e "$binfmt/register" ]; then
    $sudo mount -t binfmt_misc binfmt_misc "$binfmt" 2>/dev/null || return 1
  fi
  local line="" conf=/usr/lib/binfmt.d/qemu-aarch64.conf
  [ -f "$conf" ] && line=$(grep -m1 '^:qemu-aarch64:' "$conf" || true)
  # The standard line (qemu's qemu-binfmt-conf.sh) if Debian's file is missing.
  [ -n "$line" ] || line=':qemu-aarch64:M::\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff::F'
  # :name:type:offset:magic:mask:interpreter:flags
  local name type offset magic mask interpreter flags
  IFS=: read -r _ name type offset magic mask interpreter flags <<<"$line"
  [[ "$flags" == *F* ]] || flags="${flags}F"
  line=":$name:$type:$offset:$magic:$mask:/usr/bin/qemu-aarch64-static:$flags"
  printf '%s\n' "$line" | $sudo tee "$binfmt/register" >/dev/null 2>&1 || return 1
  [ -e "$binfmt/qemu-aarch64" ]
}
if [ -e "$binfmt/qemu-aarch64" ]; then
  grep -q '^flags:.*F' "$binfmt/qemu-aarch64" ||
    echo "setup: warning: qemu-aarch64 is registered without the F flag: arm64 containers may not find their interpreter (unregister with 'echo -1 > $binfmt/qemu-aarch64' and run this again)" >&2
else
  echo "setup: registering qemu-aarch64 with binfmt_misc (arm64 containers)" >&2
  register_qemu_aarch64 ||
    echo "setup: warning: could not register qemu-aarch64 with binfmt_misc: Docker cannot run the linux/arm64 containers (compose's d4); everything else works" >&2
fi

# The TLS tests make their certificates with Python's `cryptography` (from PyPI).
if ! python3 -c 'import cryptography' 2>/dev/null; then
  echo "setup: installing the Python package cryptography (test certificates)" >&2
  python3 -m pip install --quiet cryptography
fi

./models/fetch.sh
