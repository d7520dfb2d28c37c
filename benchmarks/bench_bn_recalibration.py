"""BatchNorm recalibration on a trained CNN: accuracy and output SQNR without and with recalibration.

The model is onnxfp8/examples/digits.py's CNN (conv-bn-relu x2 + fc), trained in numpy on scikit-learn's real 8x8
digits (a few seconds). For E3M4, E4M3 and INT8 it quantizes the model with the standard pipeline (BN
folded first) and with ``bn_recalibrate`` (BN left unfolded, recalibrated on the quantized graph, then folded
and its weights re-quantized) in ``shift`` mode (the default) and ``replace`` mode (the FP8 paper's, with the
guard on and off), and prints on the 360 held-out test images (never seen by training, calibration or
recalibration):

- top-1 accuracy (and the FP32 model's), top-1 agreement with FP32;
- output SQNR (dB) of the logits against the FP32 model, and against the FP32 model whose BN statistics
  were re-estimated on the same data without quantization ("FP32-recal"): that reference separates the
  part of the change that comes from the data (running averages vs pooled statistics of the
  recalibration set) from the part that corrects quantization;
- per BN layer, the mean shift (mean over channels, in old standard deviations) and the variance ratio
  recalibration measured, whether it was applied (the guard), the SQNR the pipeline itself measured on
  its 64 held-out calibration samples without / with, and how far the quantized statistics are from the
  FP32 ones on the same data.

    python benchmarks/bench_bn_recalibration.py [--samples 1024] [--augment flip,crop,jitter] [--epochs 12]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import onnxfp8  # noqa: E402
from onnxfp8.config import QuantConfig  # noqa: E402
from onnxfp8.modelio import make_session  # noqa: E402
from onnxfp8.verify.compare import sqnr_db  # noqa: E402
from onnxfp8.examples.digits import build_digits  # noqa: E402


def run(model, x):
    sess = make_session(model, level="basic", threads=1)
    return sess.run(None, {"input": x})[0]


def fp32_recalibrated(model, calib, cfg_kw):
    """The FP32 model with BN statistics re-estimated on the same data, nothing quantized."""
    cfg = QuantConfig(op_types=("NoSuchOp",), bn_recalibrate=True, **dict(cfg_kw, bn_mode="replace", bn_guard=False))
    return onnxfp8.quantize(model, calib, config=cfg, check_model=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1024, help="calibration / recalibration samples (<= 1024)")
    ap.add_argument("--augment", default="", help="augmentations for the recalibration data, e.g. flip,crop,jitter")
    ap.add_argument("--bn-samples", type=int, default=None, help="recalibration samples (default: --samples)")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--bn-ranges", action="store_true", help="also re-measure activation ranges after folding")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    model, data = build_digits(epochs=a.epochs)
    x_val, y_val = data["val"]
    calib_x = data["calib"][: a.samples]
    calib = [{"input": calib_x[i:i + 64]} for i in range(0, len(calib_x), 64)]
    print(f"trained digits CNN in {time.perf_counter() - t0:.1f} s; calibration/recalibration on {len(calib_x)} "
          f"training images, evaluation on {len(x_val)} held-out images")
    ref = run(model, x_val)
    acc32 = float((ref.argmax(1) == y_val).mean())
    augment = tuple(s for s in a.augment.split(",") if s)
    kw = dict(augment=augment, bn_samples=a.bn_samples or len(calib_x), bn_ranges=a.bn_ranges)
    ctrl = fp32_recalibrated(model, calib, kw)
    ref_recal = run(ctrl.model, x_val)
    acc_ctrl = float((ref_recal.argmax(1) == y_val).mean())
    fp32_stats = {}
    print(f"FP32: accuracy {acc32:.4f}; FP32 with BN re-estimated on the calibration data (no quantization): "
          f"accuracy {acc_ctrl:.4f}, SQNR vs FP32 {sqnr_db(ref, ref_recal):.2f} dB")
    print()
    hdr = (f"{'format':6} {'recalibration':22} {'applied':7} {'accuracy':>8} {'agree':>6} {'SQNR vs FP32':>12} "
           f"{'vs FP32-recal':>13} {'bn1 shift':>9} {'bn2 shift':>9} {'bn1 var':>7} {'bn2 var':>7} "
           f"{'pipeline without/with (64 held-out)':>36} {'s':>5}")
    print(hdr)
    rows = (("none (BN folded first)", None, {}), ("shift (default)", "shift", {}),
            ("replace, guard on", "replace", {}), ("replace, guard off", "replace", {"bn_guard": False}))
    for fmt in ("e3m4", "e4m3", "int8"):
        for label, recal, extra in rows:
            start = time.perf_counter()
            cfg = QuantConfig(format=fmt, bn_recalibrate=bool(recal),
                              **(dict(kw, bn_mode=recal, **extra) if recal else {}))
            res = onnxfp8.quantize(model, calib, config=cfg)
            secs = time.perf_counter() - start
            out = run(res.model, x_val)
            acc = float((out.argmax(1) == y_val).mean())
            agree = float((out.argmax(1) == ref.argmax(1)).mean())
            bn = res.report.batchnorm.to_dict() if res.report.batchnorm else {}
            layers = bn.get("layers", {}) if recal else {}
            cols = []
            for key in ("mean_shift", "var_ratio"):
                for name in ("bn1", "bn2"):
                    cols.append(f"{layers[name][key]:.4f}" if name in layers else "-")
            pipe = (f"{bn['sqnr_without']['logits']:.2f} / {bn['sqnr_with']['logits']:.2f} dB"
                    if recal and bn.get("sqnr_with") else "-")
            applied = ("yes" if bn.get("applied") else "no") if recal else "-"
            print(f"{fmt:6} {label:22} {applied:7} {acc:8.4f} {agree:6.3f} {sqnr_db(ref, out):12.2f} "
                  f"{sqnr_db(ref_recal, out):13.2f} {cols[0]:>9} {cols[1]:>9} {cols[2]:>7} {cols[3]:>7} "
                  f"{pipe:>36} {secs:5.2f}")
            if recal == "shift":
                # how far the quantized statistics are from the FP32 ones on the same data
                for name in ("bn1", "bn2"):
                    m32, v32 = np.array(layers[name]["mean_data_fp32"]), np.array(layers[name]["var_data_fp32"])
                    mq, vq = np.array(layers[name]["mean_data"]), np.array(layers[name]["var_data"])
                    fp32_stats.setdefault(fmt, []).append(
                        f"{name}: mean |q-fp32| {np.mean(np.abs(mq - m32) / np.sqrt(v32 + 1e-5)):.4f} sigma "
                        f"(max {np.max(np.abs(mq - m32) / np.sqrt(v32 + 1e-5)):.4f}), "
                        f"var q/fp32 {np.min(vq / v32):.4f}-{np.max(vq / v32):.4f}")
    print()
    print("quantization-induced BN statistic shift (quantized vs FP32 working copy, same batches, pooled):")
    for fmt, lines in fp32_stats.items():
        print(f"  {fmt}: " + "; ".join(lines))
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
