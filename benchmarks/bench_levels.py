"""How much onnxruntime's optimization level moves a quantized deep model, against the quantization error.

On small graphs the emulate style computes the same numbers at every onnxruntime level. On deep models
ENABLE_ALL's own float rewrites (it folds the remaining float ops, fuses Add/Relu into Conv, reorders sums)
change float rounding slightly, a few values cross an FP8 rounding boundary, and the levels differ by a little
noise. This script measures that noise on a ResNet-shaped CNN and a multi-layer transformer and prints it
beside the quantization error, so the claim "well below the quantization error" is a measured one.

    python benchmarks/bench_levels.py                 # ResNet-50-shaped CNN at 64x64 + 4-layer transformer
    python benchmarks/bench_levels.py --size 224 --samples 16
    python benchmarks/bench_levels.py --examples      # the small examples vs onnx.reference at every level

``--examples`` is what tests/test_runtime_levels.py used to pin: max |onnxruntime - onnx.reference| of the
example models (cnn, mlp, transformer) in every format and style at DISABLE_ALL, onnxfp8's BASIC, plain
ENABLE_BASIC and ENABLE_ALL, and whether ENABLE_ALL drops a Relu that feeds an FP8 QuantizeLinear. The tests
only assert what onnxfp8 promises (its own session exact; the emulate style exact at every level); what
onnxruntime's other levels do to the qdq style varies with its version and the machine's kernels.

Figures: SQNR (dB) of the quantized model vs FP32 (the quantization error), and SQNR of the quantized model at
ENABLE_ALL vs the same model at onnxfp8's exact setting (ENABLE_BASIC without WeightBiasQuantization). The
larger the second figure is than the first, the less the level matters. For qdq style, ENABLE_ALL is not a
rounding-noise question but a different function on Conv models (see tests/test_runtime_levels.py): printed too.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from onnxfp8.examples.build import build_resnet_like, build_transformer, make_inputs  # noqa: E402
from onnxfp8 import QuantConfig, quantize  # noqa: E402
from onnxfp8.modelio import make_session  # noqa: E402
from onnxfp8.verify.compare import ErrorStats  # noqa: E402


def plain_all(model):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def sqnr(ref, got):
    stats = ErrorStats()
    stats.update(ref, got)
    return stats.sqnr_db


def run(name, model, calib, val, formats, styles):
    fp32 = make_session(model, level="disable").run(None, val)[0]
    for fmt in formats:
        for style in styles:
            if fmt == "e3m4" and style == "qdq":
                continue  # E3M4 is emulated whatever the style
            t0 = time.perf_counter()
            q = quantize(model, [calib], QuantConfig(format=fmt, style=style, summary_samples=0)).model
            tq = time.perf_counter() - t0
            exact = make_session(q, level="basic").run(None, val)[0]
            try:
                at_all = plain_all(q).run(None, val)[0]
                level_db = sqnr(exact, at_all)
                level = f"{level_db:8.2f}" if np.isfinite(level_db) else "   exact"
                maxdiff = f"{float(np.abs(exact - at_all).max()):.3g}"
            except Exception as e:  # a fusion without a kernel fails to load
                level, maxdiff = "  failed", str(e).splitlines()[0][:40]
            print(f"{name:12s} {fmt:5s} {style:8s} {sqnr(fp32, exact):10.2f} {level:>14s} {maxdiff:>12s} "
                  f"{tq:8.1f}s", flush=True)


def examples_table(samples: int = 16) -> None:
    import warnings

    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    from onnxfp8.examples.build import build_cnn, build_mlp

    def reference(model, feed):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ReferenceEvaluator(model).run(None, feed)[0]

    def plain(model, level):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.log_severity_level = 3
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

    levels = [("disable", lambda q: make_session(q, level="disable")), ("onnxfp8", lambda q: make_session(q)),
              ("plain basic", lambda q: plain(q, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)),
              ("all", lambda q: plain(q, ort.GraphOptimizationLevel.ORT_ENABLE_ALL))]
    print(f"onnxruntime {ort.__version__}: max |onnxruntime - onnx.reference| of the quantized examples "
          f"(relative to max(1, max|ref|))")
    print(f"{'model':12s} {'fmt':5s} {'style':8s} " + " ".join(f"{n:>12s}" for n, _ in levels))
    for name, build in (("cnn", build_cnn), ("mlp", build_mlp), ("transformer", build_transformer)):
        model = build()
        calib, val = make_inputs(model, samples, seed=1), make_inputs(model, 4, seed=2)
        for fmt in ("e4m3", "e5m2", "e3m4", "int8"):
            for style in ("qdq", "emulate"):
                q = quantize(model, [calib], QuantConfig(format=fmt, style=style, summary_samples=0)).model
                ref = reference(q, val)
                scale = max(1.0, float(np.abs(ref).max()))
                cells = []
                for _, make in levels:
                    try:
                        cells.append(f"{float(np.abs(make(q).run(None, val)[0] - ref).max()) / scale:12.3g}")
                    except Exception:  # a fusion without a kernel: the session does not load
                        cells.append(f"{'no load':>12s}")
                print(f"{name:12s} {fmt:5s} {style:8s} " + " ".join(cells), flush=True)
    # Gemm -> Relu -> FP8 Q -> DQ -> Gemm: does ENABLE_ALL keep the Relu? (why onnxfp8 quantizes the Relu input)
    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(0, 1, (16, 16)).astype(np.float32), rng.normal(0, 1, (16, 16)).astype(np.float32)
    inits = [helper.make_tensor("w1", TensorProto.FLOAT, w1.shape, w1.ravel()),
             helper.make_tensor("w2", TensorProto.FLOAT, w2.shape, w2.ravel()),
             helper.make_tensor("s", TensorProto.FLOAT, [], [0.05]),
             helper.make_tensor("z", TensorProto.FLOAT8E4M3FN, [], [0])]
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]), helper.make_node("Gemm", ["dq", "w2"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 16])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    x = {"x": rng.normal(0, 1, (8, 16)).astype(np.float32)}
    err = float(np.abs(plain(m, ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(None, x)[0] - reference(m, x)).max())
    print(f"Gemm -> Relu -> FP8 Q/DQ -> Gemm at ENABLE_ALL: max |diff| {err:.3g} "
          f"({'the Relu is dropped' if err > 1e-3 else 'exact'})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=64, help="image size of the ResNet-shaped CNN (default 64)")
    ap.add_argument("--samples", type=int, default=32, help="calibration and validation samples (default 32)")
    ap.add_argument("--layers", type=int, default=4, help="transformer layers (default 4)")
    ap.add_argument("--formats", default="e4m3,e3m4,int8")
    ap.add_argument("--styles", default="emulate,qdq")
    ap.add_argument("--examples", action="store_true", help="only the small examples against onnx.reference")
    args = ap.parse_args(argv)
    if args.examples:
        examples_table()
        return
    formats, styles = args.formats.split(","), args.styles.split(",")
    print(f"onnxruntime {ort.__version__}; SQNR in dB; 'level' = quantized at ENABLE_ALL vs quantized exact")
    print(f"{'model':12s} {'fmt':5s} {'style':8s} {'quant SQNR':>10s} {'level SQNR':>14s} {'max |diff|':>12s} "
          f"{'quantize':>9s}")
    cnn = build_resnet_like(size=args.size, num_classes=100)
    run("resnet50", cnn, make_inputs(cnn, args.samples, seed=1), make_inputs(cnn, args.samples, seed=2),
        formats, styles)
    tr = build_transformer(num_layers=args.layers)
    run(f"transf-{args.layers}L", tr, make_inputs(tr, args.samples, seed=1), make_inputs(tr, args.samples, seed=2),
        formats, styles)


if __name__ == "__main__":
    main()
