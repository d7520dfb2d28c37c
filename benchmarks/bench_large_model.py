"""A model over 2 GB, end to end: protobuf cannot serialize one message over 2 GB, so loading, shape inference,
onnxruntime sessions and saving all have to go through external data. This builds a ~2.3 GB FP32 MLP (four
12288x12288 Gemm layers, written with external data as exporters do), quantizes it to E4M3 with
`onnxfp8 quantize` in a subprocess and reports wall time, peak RSS, the output files and the output SQNR.

    python benchmarks/bench_large_model.py [--width 12288] [--layers 4] [--keep DIR]

Needs about 4x the model size in free disk and ~6 GB of memory (measured 2026-11-30: 48 s wall, 5.19 GiB peak
RSS for the default 2.25 GiB model on 2 cores).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def build(path: str, width: int, layers: int) -> None:
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    x = "input"
    for i in range(layers):
        w = rng.standard_normal((width, width), dtype=np.float32)
        w *= np.float32(1.0 / np.sqrt(width))
        inits.append(onnx.numpy_helper.from_array(w, f"fc{i}.weight"))
        del w
        out = f"fc{i}" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [x, f"fc{i}.weight"], [out], name=f"fc{i}", transB=1))
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    g = helper.make_graph(nodes, "large_mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", width])],
                          [helper.make_tensor_value_info(f"fc{layers - 1}", TensorProto.FLOAT, ["n", width])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    onnx.save_model(m, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(path) + ".data")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=12288)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--keep", help="build in this folder and keep the files (default: a temporary folder)")
    args = ap.parse_args(argv)
    work = args.keep or tempfile.mkdtemp(prefix="onnxfp8-large-")
    os.makedirs(work, exist_ok=True)
    try:
        src = os.path.join(work, "large.onnx")
        t0 = time.perf_counter()
        build(src, args.width, args.layers)
        size = os.path.getsize(src) + os.path.getsize(src + ".data")
        print(f"built {src}: {size / 2**30:.2f} GiB with external data in {time.perf_counter() - t0:.0f} s")
        rng = np.random.default_rng(1)
        calib = os.path.join(work, "calib.npz")
        val = {"input": rng.standard_normal((args.samples, args.width), dtype=np.float32)}
        np.savez(calib, input=rng.standard_normal((args.samples, args.width), dtype=np.float32))
        out = os.path.join(work, "large.e4m3.onnx")
        cmd = [sys.executable, "-m", "onnxfp8", "quantize", src, "--calib", calib, "-o", out, "--batch-size", "4"]
        t0 = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd] if os.path.exists("/usr/bin/time") else cmd,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        rss = [line for line in proc.stderr.splitlines() if "Maximum resident" in line]
        print(proc.stdout.strip())
        if proc.returncode != 0:
            print(f"onnxfp8 quantize failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
            return 1
        peak = f", peak RSS {int(rss[0].split()[-1]) / 2**20:.2f} GiB" if rss else ""
        files = {f: os.path.getsize(os.path.join(work, f)) for f in sorted(os.listdir(work)) if f.startswith("large.e4m3")}
        print(f"onnxfp8 quantize: {wall:.0f} s wall{peak}; output files: "
              + ", ".join(f"{f} {b / 2**20:.0f} MiB" for f, b in files.items()))
        from onnxfp8.modelio import make_session
        from onnxfp8.verify.compare import ErrorStats

        ref = make_session(src, level="basic").run(None, val)[0]
        got = make_session(out, level="basic").run(None, val)[0]
        stats = ErrorStats()
        stats.update(ref, got)
        print(f"output SQNR vs FP32 on {args.samples} held-out samples: {stats.sqnr_db:.2f} dB")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
