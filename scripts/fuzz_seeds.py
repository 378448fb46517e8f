#!/usr/bin/env python3
"""Seed corpora for the fuzz targets (fuzz/), made from real messages.

usage: fuzz_seeds.py CORPUS_DIR ISOMESH_BIN MODULE PHOTO...

job/       protobuf Jobs carrying the real photos, as `isomesh classify` sends them
image/     the real photos, and a small real PNG
manifest/  a real signed manifest of MODULE, written by `isomesh sign`
chunks/    the plain (mode byte 0) rollout of fuzz/fuzz_targets/chunks.rs, whole and shuffled
guest_outcome/, relayed_result/: protobuf messages shaped like the real ones
version_order/  versions one a line, release candidates and builds among them
broker_files/   the deploy ACL file (part byte 0), a password line (1), filter checks (2)
rollout_agent/, offload/: a few arbitrary byte strings (their input is a script of events)
"""
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib


def varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number, value):
    """One protobuf field: ints as varints, str/bytes length-delimited."""
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    if isinstance(value, str):
        value = value.encode()
    return varint(number << 3 | 2) + varint(len(value)) + value


def write(directory, name, data):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)


def png(width, height):
    raw = b"".join(b"\0" + b"".join(bytes((x * 40 % 256, y * 40 % 256, 128)) for x in range(width))
                   for y in range(height))

    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def main():
    corpus, isomesh, module, photos = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    for n, path in enumerate(photos):
        data = open(path, "rb").read()
        write(f"{corpus}/image", os.path.basename(path), data)
        job = (field(1, f"seed-{n}") + field(2, data) + field(3, "isomesh/results/seed")
               + field(4, 300) + field(7, 5) + field(9, b"corr"))
        write(f"{corpus}/job", f"job-{n}", job)
    write(f"{corpus}/image", "small.png", png(8, 6))
    write(f"{corpus}/job", "pinned", field(1, "p") + field(2, png(8, 6))
          + field(6, "d1") + field(6, "e1") + field(5, 2) + field(8, "mobilenet_v2@0.1.0"))

    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "module.wasm")
        shutil.copy(module, copy)
        subprocess.run([isomesh, "keygen", "--out", os.path.join(tmp, "k")], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run([isomesh, "sign", copy, "--name", "mobilenet_v2", "--version", "0.1.0",
                        "--key", os.path.join(tmp, "k")], check=True, stdout=subprocess.DEVNULL)
        write(f"{corpus}/manifest", "signed", open(os.path.join(tmp, "module.manifest"), "rb").read())

    blob = bytes(i * 7 % 251 for i in range(3000))
    digest = hashlib.sha256(blob).hexdigest()
    pieces = [blob[i:i + 1024] for i in range(0, len(blob), 1024)]
    chunks = [field(1, digest) + field(2, i) + field(3, len(pieces)) + field(4, piece)
              if i else field(1, digest) + field(3, len(pieces)) + field(4, piece)
              for i, piece in enumerate(pieces)]
    framed = [struct.pack("<H", len(c)) + c for c in chunks]
    write(f"{corpus}/chunks", "whole", b"\0" + b"".join(framed))
    write(f"{corpus}/chunks", "reversed-with-duplicate",
          b"\0" + b"".join(reversed(framed)) + framed[0])

    guest_score = field(1, 144) + bytes([2 << 3 | 5]) + struct.pack("<f", 0.93)
    write(f"{corpus}/guest_outcome", "classification",
          field(1, field(1, guest_score) + field(2, 12000) + field(3, 39000)))
    write(f"{corpus}/guest_outcome", "error", field(2, field(1, 2) + field(2, "not an image")))
    score = field(1, 144) + field(2, "pelican") + bytes([3 << 3 | 5]) + struct.pack("<f", 0.93)
    result = (field(1, "job-1") + field(2, "e1") + field(3, 2) + field(5, score)
              + field(7, "d1") + field(7, "e1") + field(10, b"corr"))
    write(f"{corpus}/relayed_result", "result", result)

    write(f"{corpus}/version_order", "release-after-rc", b"1.0.0-rc1\n1.0.0\n1.0.1")
    write(f"{corpus}/version_order", "builds", b"1.0.0+b2\n1.0.0+b1\n0.10.0-alpha.1")
    acl_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "deploy", "acl.conf")
    if os.path.exists(acl_path):
        write(f"{corpus}/broker_files", "acl", b"\0" + open(acl_path, "rb").read())
    write(f"{corpus}/broker_files", "passwd",
          b"\1d1:$7$101$c2FsdHNhbHRzYWx0$" + b"A" * 86 + b"==\n")
    write(f"{corpus}/broker_files", "covers", b"\2isomesh/#\nisomesh/status/+\nisomesh/status/d1")
    for n, seed in enumerate([bytes(range(256)), bytes(range(255, -1, -1)) * 2]):
        write(f"{corpus}/rollout_agent", f"script-{n}", seed)
        write(f"{corpus}/offload", f"script-{n}", seed)


if __name__ == "__main__":
    main()
