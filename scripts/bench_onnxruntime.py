#!/usr/bin/env python3
"""The baseline a user would pick instead of isomesh: MobileNetV2 in onnxruntime.

Runs the same ONNX model the guest embeds on the same photos, with the preprocessing its
SOURCES.md specifies (shorter side to 256, bilinear; centre crop 224; ImageNet mean/std; NCHW),
single-threaded like one isomesh worker, and prints one JSON object: inference and decode +
preprocess times (median, p95, all samples, ms) and each photo's top-1 index, so a caller can
check the baseline classifies as the reference does.

`isomesh bench infer --onnxruntime` runs it in the same run as the Wasm and native figures.
Needs the PyPI packages onnxruntime, numpy and pillow (the caller installs them if missing).
Not a dependency of the product.

usage: bench_onnxruntime.py MODEL.onnx ITERATIONS IMAGE...
"""

import json
import statistics
import sys
import time

import numpy as np
import onnxruntime
from PIL import Image

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def preprocess(path):
    image = Image.open(path).convert("RGB")
    width, height = image.size
    scale = 256 / min(width, height)
    image = image.resize(
        (max(224, round(width * scale)), max(224, round(height * scale))),
        Image.BILINEAR,
    )
    width, height = image.size
    left, top = (width - 224) // 2, (height - 224) // 2
    image = image.crop((left, top, left + 224, top + 224))
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    pixels = (pixels - MEAN) / STD
    return pixels.transpose(2, 0, 1)[np.newaxis, ...].astype(np.float32)


def percentile(samples, fraction):
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def summary(samples):
    return {
        "median": statistics.median(samples),
        "p95": percentile(samples, 0.95),
        "n": len(samples),
    }


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__.strip().splitlines()[-1])
    model, iterations, images = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    options = onnxruntime.SessionOptions()
    # One thread, as one isomesh worker runs one job on one thread.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        model, options, providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    infer_ms, prepare_ms, top1 = [], [], {}
    for path in images:
        started = time.perf_counter()
        tensor = preprocess(path)
        prepare_ms.append((time.perf_counter() - started) * 1000)
        (logits,) = session.run(None, {name: tensor})  # warm-up
        top1[path] = int(np.argmax(logits[0]))
        for _ in range(iterations):
            started = time.perf_counter()
            session.run(None, {name: tensor})
            infer_ms.append((time.perf_counter() - started) * 1000)
    json.dump(
        {
            "onnxruntime": onnxruntime.__version__,
            "threads": 1,
            "infer_ms": summary(infer_ms),
            "decode_preprocess_ms": summary(prepare_ms),
            "top1": top1,
        },
        sys.stdout,
    )
    print()


if __name__ == "__main__":
    main()
