#!/usr/bin/env python3
"""Derive mobilenet_v2_1.0_224_dequant.onnx from Google Coral's mobilenet_v2_1.0_224_quant.tflite.

Usage:
    python models/derive_onnx.py TFLITE OUTPUT_ONNX [--keep-tf2onnx-names]

Run it with the pinned tools of models/requirements-derive.txt (models/fetch.sh makes that
venv itself, under models/.venv-derive):

    python3 -m venv models/.venv-derive
    models/.venv-derive/bin/pip install -r models/requirements-derive.txt
    models/.venv-derive/bin/python models/derive_onnx.py \\
        models/files/mobilenet_v2_1.0_224_quant.tflite /tmp/mobilenet_v2_1.0_224_dequant.onnx

What it does
------------
The input is the upstream file, byte for byte (google-coral/test_data, Apache-2.0, sha256
7aad0c74...4776): a quantization-aware-trained TF-slim MobileNetV2 1.0/224 with int8 weights,
a uint8 NHWC input and a quantized softmax over 1001 classes (0 = background).

1. Conversion, with tf2onnx's own command line, run as a subprocess:
       python -m tf2onnx.convert --tflite TFLITE --dequantize --opset 13 --output RAW
   `--dequantize` turns every int8 weight into float32 (weight = scale * (q - zero_point)), so the
   result has no quantized ops inside. Its graph: uint8 input [1,224,224,3] -> Cast -> Sub(128)
   -> Mul(1/128) -> Transpose(NHWC->NCHW) -> 53 Conv / 35 Clip / 10 Add -> AveragePool -> Conv
   -> Reshape [1,1001] -> Softmax -> QuantizeLinear (uint8 output).

2. Graph surgery with the onnx Python API, so that the model has the contract of the ONNX-zoo
   mobilenetv2-7 (torchvision preprocessing, raw logits, 1000 classes):
   - input: the uint8 NHWC input and Cast/Sub/Mul/Transpose are replaced by a float32 NCHW input
     `input` [1,3,224,224] followed by `Mul(prep_scale)` and `Add(prep_bias)`, per channel:
         t = x * (255/128 * std) + (255/128 * mean - 1)
     With x = (p/255 - mean)/std (torchvision normalisation of pixel p), t = (p - 128)/128, which
     is exactly what the tflite model computes from its own uint8 input. mean = [0.485, 0.456,
     0.406], std = [0.229, 0.224, 0.225]; the constants are computed in float32.
   - output: Softmax and the output QuantizeLinear are removed; the output `logits` [1,1000] is
     `Slice` [1:1001] (axis 1) of the 1001 pre-softmax logits, dropping the background class so
     that index i is the standard ImageNet-1k class i.
   - the initializers the removed nodes used are dropped, the unused `ai.onnx.ml` opset import is
     dropped, and onnx shape inference fills in value_info.
   - onnx.checker must pass.

Why the output can be checked by sha256
---------------------------------------
tf2onnx's conversion is deterministic in everything but the names it invents for 57 tensors
(the constant-folded weights `const_fold_opt__N`, one `new_shape__N` and the two shared
Relu6 bounds `Relu6__N_min/max__M`): N changes from run to run, even with a fixed
PYTHONHASHSEED, and tf2onnx orders initializers by name. Node order, ops, attributes and every
weight value come out the same each run. So that the derived file is the very file listed in
models/MANIFEST.tsv (sha256 cde6cc69...4c31), this script renames those 57 tensors, in order of
first use, to the names they have in that file (PINNED_NAMES below) and sorts the initializers
as tf2onnx does (by name, descending). It also writes the three doc/producer strings of that
file (MODEL_DOC, GRAPH_DOC, PRODUCER_NAME). Nothing else is taken from the published file: every
weight, op and connection comes from the tflite through tf2onnx, so a matching sha256 proves the
published ONNX is exactly what this derivation gives. `--keep-tf2onnx-names` skips the renaming
(the model then computes the same thing, but its bytes differ from run to run).

The pinned tools (tf2onnx 1.17.0, tensorflow-cpu 2.21.0, onnx 1.23.2, protobuf, numpy) matter:
another version may name, fold or serialise differently, and the sha256 check then fails.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile

TFLITE_SHA256 = "7aad0c74c5e3c06e5eb3c827e13304fdd68a83da6087d92ee169c24ff9fd4776"
EXPECTED_ONNX_SHA256 = "cde6cc693aa5bb2d5f3bd04c6475d0a3f9504b27ec975d465d1c1355e9964c31"
PINNED_VERSIONS = {"tf2onnx": "1.17.0", "tensorflow": "2.21.0", "onnx": "1.23.2"}  # see requirements-derive.txt

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

PRODUCER_NAME = "tf2onnx(--dequantize)+rewire"
GRAPH_NAME = "mobilenet_v2_1.0_224"
# The graph doc string tf2onnx wrote when the published file was made (it names the path the
# tflite had on that machine); kept verbatim so that the bytes match.
GRAPH_DOC = "converted from src/coral/mobilenet_v2_1.0_224_quant.tflite"
MODEL_DOC = (
    "MobileNetV2 1.0/224 ImageNet classifier. Weights: dequantized from google-coral/test_data "
    "mobilenet_v2_1.0_224_quant.tflite (Apache-2.0). Input: float32 NCHW RGB, (p/255-mean)/std "
    "with ImageNet mean/std. Output: 1000 raw logits in standard ImageNet-1k class order."
)

# Names that tf2onnx invents anew on each run (see the docstring), matched by this pattern ...
VARYING_NAME = re.compile(r"^(const_fold_opt__\d+|new_shape__\d+|Relu6__\d+_(min|max)__\d+)$")
# ... and the names they have in the published file, in order of first use by the nodes.
PINNED_NAMES = (
    "const_fold_opt__550 Relu6__12_min__229 Relu6__70_max__403 const_fold_opt__620 "
    "const_fold_opt__596 const_fold_opt__623 const_fold_opt__635 const_fold_opt__536 "
    "const_fold_opt__561 const_fold_opt__586 const_fold_opt__574 const_fold_opt__593 "
    "const_fold_opt__599 const_fold_opt__611 const_fold_opt__622 const_fold_opt__610 "
    "const_fold_opt__604 const_fold_opt__519 const_fold_opt__625 const_fold_opt__631 "
    "const_fold_opt__545 const_fold_opt__587 const_fold_opt__524 const_fold_opt__562 "
    "const_fold_opt__629 const_fold_opt__606 const_fold_opt__582 const_fold_opt__630 "
    "const_fold_opt__632 const_fold_opt__616 const_fold_opt__628 const_fold_opt__541 "
    "const_fold_opt__552 const_fold_opt__601 const_fold_opt__573 const_fold_opt__609 "
    "const_fold_opt__569 const_fold_opt__584 const_fold_opt__532 const_fold_opt__619 "
    "const_fold_opt__520 const_fold_opt__563 const_fold_opt__591 const_fold_opt__624 "
    "const_fold_opt__592 const_fold_opt__633 const_fold_opt__580 const_fold_opt__525 "
    "const_fold_opt__595 const_fold_opt__607 const_fold_opt__600 const_fold_opt__608 "
    "const_fold_opt__517 const_fold_opt__581 new_shape__504 const_fold_opt__558 "
    "const_fold_opt__597"
).split()

REQS_HINT = (
    "install the pinned tools in a venv and run this script with its python:\n"
    "    python3 -m venv models/.venv-derive\n"
    "    models/.venv-derive/bin/pip install -r models/requirements-derive.txt\n"
    "    models/.venv-derive/bin/python models/derive_onnx.py TFLITE OUTPUT\n"
    "(models/fetch.sh does all of this by itself)"
)


class DeriveError(Exception):
    pass


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def import_tools():
    try:
        import numpy as np
        import onnx
        from onnx import helper, numpy_helper
    except ImportError as e:
        raise DeriveError(f"missing Python package ({e.name}); " + REQS_HINT) from e
    from importlib import metadata

    versions = {}
    for mod, dists in (("tf2onnx", ["tf2onnx"]), ("tensorflow", ["tensorflow-cpu", "tensorflow"]),
                       ("onnx", ["onnx"])):
        for dist in dists:
            try:
                versions[mod] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
        else:
            raise DeriveError(f"missing Python package ({dists[0]}); " + REQS_HINT)
    for mod, want in PINNED_VERSIONS.items():
        if versions[mod] != want:
            print(
                f"derive_onnx.py: warning: {mod} {versions[mod]} is installed, the pinned version "
                f"is {want}; the result may not be byte-identical to the published file",
                file=sys.stderr,
            )
    return np, onnx, helper, numpy_helper


def run_tf2onnx(tflite: str, raw_out: str) -> None:
    cmd = [
        sys.executable, "-m", "tf2onnx.convert",
        "--tflite", tflite, "--dequantize", "--opset", "13", "--output", raw_out,
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    print("derive_onnx.py: running " + " ".join(cmd[1:]), file=sys.stderr)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not os.path.isfile(raw_out):
        tail = "\n".join(proc.stdout.splitlines()[-30:])
        raise DeriveError(
            f"tf2onnx failed (exit {proc.returncode}); its last output:\n{tail}\n"
            "check that the pinned tools are installed (" + "pip install -r models/requirements-derive.txt)"
        )


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise DeriveError(
            "tf2onnx's output does not have the expected structure (" + what + "); this script "
            "only knows the graph that tf2onnx 1.17.0 makes from mobilenet_v2_1.0_224_quant.tflite. "
            "Use the pinned versions of models/requirements-derive.txt."
        )


def rewire(raw_path: str, out_path: str, pin_names: bool, tools) -> None:
    np, onnx, helper, numpy_helper = tools
    from onnx import TensorProto

    model = onnx.load(raw_path)
    g = model.graph
    nodes = list(g.node)
    inits = {t.name: t for t in g.initializer}

    # --- the input side: uint8 NHWC -> Cast -> Sub(zp) -> Mul(scale) -> Transpose -> Conv
    expect(len(g.input) == 1 and g.input[0].name == "input", "one input named 'input'")
    in_type = g.input[0].type.tensor_type
    expect(in_type.elem_type == TensorProto.UINT8, "uint8 input")
    expect([d.dim_value for d in in_type.shape.dim] == [1, 224, 224, 3], "input shape [1,224,224,3]")
    expect([n.op_type for n in nodes[:4]] == ["Cast", "Sub", "Mul", "Transpose"], "Cast/Sub/Mul/Transpose first")
    cast, sub, mul, transpose = nodes[:4]
    expect(list(cast.input) == ["input"], "Cast reads the input")
    expect(sub.input[0] == cast.output[0] and mul.input[0] == sub.output[0]
           and transpose.input[0] == mul.output[0], "the four input nodes form a chain")
    zp = numpy_helper.to_array(inits[sub.input[1]])
    scale = numpy_helper.to_array(inits[mul.input[1]])
    expect(float(zp) == 128.0 and float(scale) == 1.0 / 128.0, "input dequantisation (p - 128) / 128")
    perm = [a for a in transpose.attribute if a.name == "perm"]
    expect(len(perm) == 1 and list(perm[0].ints) == [0, 3, 1, 2], "Transpose NHWC->NCHW")
    body_input = transpose.output[0]

    # --- the output side: ... -> Reshape [1,1001] -> Softmax -> QuantizeLinear -> output
    expect([n.op_type for n in nodes[-2:]] == ["Softmax", "QuantizeLinear"], "Softmax/QuantizeLinear last")
    softmax, quant = nodes[-2:]
    expect(len(g.output) == 1 and g.output[0].name == quant.output[0], "the QuantizeLinear is the output")
    expect(quant.input[0] == softmax.output[0], "Softmax feeds QuantizeLinear")
    pre_softmax = softmax.input[0]
    dims = [d.dim_value for d in g.output[0].type.tensor_type.shape.dim]
    expect(dims == [1, 1001], "1001 outputs")

    body = nodes[4:-2]
    used = {x for n in body for x in n.input}
    expect(all(x not in used for x in (cast.output[0], sub.output[0], mul.output[0], softmax.output[0])),
           "no other node reads the removed nodes' outputs")

    # --- the new input side
    f32 = np.float32
    k = f32(255.0 / 128.0)
    prep_scale = (k * np.array(STD, dtype=f32)).astype(f32).reshape(1, 3, 1, 1)
    prep_bias = (k * np.array(MEAN, dtype=f32) - f32(1.0)).astype(f32).reshape(1, 3, 1, 1)
    prep = [
        helper.make_node("Mul", ["input", "prep_scale"], ["prep_scaled"], name="prep_mul"),
        helper.make_node("Add", ["prep_scaled", "prep_bias"], [body_input], name="prep_add"),
    ]
    # --- the new output side
    tail = [helper.make_node(
        "Slice", [pre_softmax, "slice_starts", "slice_ends", "slice_axes"], ["logits"], name="drop_background")]
    new_inits = [
        numpy_helper.from_array(prep_scale, "prep_scale"),
        numpy_helper.from_array(prep_bias, "prep_bias"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "slice_starts"),
        numpy_helper.from_array(np.array([1001], dtype=np.int64), "slice_ends"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "slice_axes"),
    ]

    # --- the initializers the body keeps, renamed (see the docstring) and sorted as tf2onnx does
    kept = [t for t in g.initializer if t.name in used]
    rename = {}
    if pin_names:
        order = []
        for n in body:
            for x in n.input:
                if x in inits and VARYING_NAME.match(x) and x not in order:
                    order.append(x)
        expect(len(order) == len(PINNED_NAMES), f"{len(PINNED_NAMES)} tf2onnx-generated tensor names, found {len(order)}")
        rename = dict(zip(order, PINNED_NAMES))
        clash = set(PINNED_NAMES) & (set(inits) - set(order))
        expect(not clash, "no clash between pinned and other names")
        for t in kept:
            t.name = rename.get(t.name, t.name)
        for n in body:
            for i, x in enumerate(n.input):
                n.input[i] = rename.get(x, x)
        kept.sort(key=lambda t: t.name, reverse=True)

    new_graph = helper.make_graph(
        prep + body + tail,
        GRAPH_NAME if pin_names else g.name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1000])],
        initializer=kept + new_inits,
        doc_string=GRAPH_DOC if pin_names else g.doc_string,
    )
    new_model = onnx.ModelProto()
    new_model.ir_version = model.ir_version
    new_model.producer_name = PRODUCER_NAME
    new_model.producer_version = model.producer_version
    new_model.doc_string = MODEL_DOC
    new_model.graph.CopyFrom(new_graph)
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            new_model.opset_import.add().CopyFrom(op)
    expect([(o.domain, o.version) for o in new_model.opset_import] == [("", 13)], "opset 13")

    new_model = onnx.shape_inference.infer_shapes(new_model, strict_mode=True)
    onnx.checker.check_model(new_model, full_check=True)
    counts = {}
    for n in new_model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    expect(counts.get("Conv") == 53 and counts.get("Clip") == 35 and counts.get("Add") == 11
           and counts.get("Slice") == 1 and "QuantizeLinear" not in counts and "DequantizeLinear" not in counts,
           f"op counts {counts}")

    tmp = out_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(new_model.SerializeToString())
    os.replace(tmp, out_path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Derive mobilenet_v2_1.0_224_dequant.onnx from mobilenet_v2_1.0_224_quant.tflite "
        "(tf2onnx --dequantize + graph surgery; see the docstring at the top of this file).")
    ap.add_argument("tflite", help="path to mobilenet_v2_1.0_224_quant.tflite (sha256 %s)" % TFLITE_SHA256)
    ap.add_argument("output", help="where to write the ONNX")
    ap.add_argument("--keep-tf2onnx-names", action="store_true",
                    help="keep the tensor names tf2onnx invents (output then differs run to run)")
    args = ap.parse_args(argv)

    try:
        if not os.path.isfile(args.tflite):
            raise DeriveError(f"{args.tflite} does not exist; get it with models/fetch.sh "
                              "(its URL is in models/MANIFEST.tsv)")
        got = sha256_of(args.tflite)
        if got != TFLITE_SHA256:
            raise DeriveError(f"{args.tflite} has sha256 {got}, expected {TFLITE_SHA256}: this script derives "
                              "the ONNX from that exact upstream file only (see models/README.md)")
        out_dir = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(out_dir):
            raise DeriveError(f"the output folder {out_dir} does not exist")
        tools = import_tools()
        with tempfile.TemporaryDirectory(prefix="derive_onnx.") as tmp:
            raw = os.path.join(tmp, "raw.onnx")
            run_tf2onnx(args.tflite, raw)
            rewire(raw, args.output, not args.keep_tf2onnx_names, tools)
    except DeriveError as e:
        print(f"derive_onnx.py: error: {e}", file=sys.stderr)
        return 1
    got = sha256_of(args.output)
    note = "matches" if got == EXPECTED_ONNX_SHA256 else "DIFFERS from"
    print(f"derive_onnx.py: wrote {args.output}, sha256 {got} ({note} the published file's "
          f"{EXPECTED_ONNX_SHA256})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
