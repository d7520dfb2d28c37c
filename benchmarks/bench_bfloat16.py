"""Is a written bfloat16 model what onnxfp8 measured? onnx.reference runs the written bfloat16 file itself (every
intermediate rounded to bfloat16); onnxfp8 measured its float32 twin in onnxruntime (onnxfp8/bfloat16.py).

    python benchmarks/bench_bfloat16.py [--zoo zoo/] [--model distilbert-bf16] [--samples 4] [--formats e4m3,int8]

Prints, per format: the twin's output SQNR vs the unquantized bfloat16 model in onnx.reference, the written
file's (onnx.reference) vs the same, and file vs twin; first the unquantized twin vs onnx.reference (what
bfloat16 arithmetic alone moves). The zoo model must be built (benchmarks/zoo.py build --only MODEL).
"""
import argparse
import glob
import os
import time

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator

import onnxfp8
from onnxfp8.modelio import make_session


def sqnr(r, q):
    r, q = np.asarray(r, np.float64), np.asarray(q, np.float64)
    return 10 * np.log10((r ** 2).sum() / max(((r - q) ** 2).sum(), 1e-300))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default=os.path.join(os.path.dirname(__file__), "..", "zoo"))
    ap.add_argument("--model", default="distilbert-bf16")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--formats", default="e4m3,int8")
    a = ap.parse_args()
    folder = os.path.join(a.zoo, a.model)
    path = os.path.join(folder, "model.onnx")
    calib = [dict(np.load(f)) for f in sorted(glob.glob(os.path.join(folder, "calib", "*.npz")))]
    val = dict(np.load(sorted(glob.glob(os.path.join(folder, "val", "*.npz")))[0]))
    feed = {k: v[:a.samples] for k, v in val.items()}
    orig = onnx.load(path)
    ref = np.asarray(ReferenceEvaluator(orig).run(None, feed)[0], np.float32)
    print(f"{a.model}, {a.samples} validation sample(s), onnx {onnx.__version__}")
    print(f"unquantized: twin (onnxruntime) vs the bfloat16 model (onnx.reference) {sqnr(ref, make_session(orig).run(None, feed)[0]):.2f} dB")
    for fmt in a.formats.split(","):
        q = onnxfp8.quantize(path, calib, onnxfp8.QuantConfig(format=fmt)).model
        onnx.checker.check_model(q, full_check=True)
        scales = sorted({onnx.TensorProto.DataType.Name(i.data_type) for i in q.graph.initializer if i.name.endswith(".scale")})
        meas = make_session(q).run(None, feed)[0]
        t = time.perf_counter()
        wr = np.asarray(ReferenceEvaluator(q).run(None, feed)[0], np.float32)
        print(f"{fmt}: scales {','.join(scales)}; vs the bfloat16 model: twin {sqnr(ref, meas):.2f} dB, written file "
              f"{sqnr(ref, wr):.2f} dB; file vs twin {sqnr(meas, wr):.2f} dB, max |diff| {np.abs(meas - wr).max():.4g} "
              f"(onnx.reference {time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
