"""Peak memory of `onnxfp8.check` vs a plain FP32 inference run over the same data.

The model is the 12-layer transformer-block example (onnxfp8.examples.build.build_transformer(num_layers=12, ...)),
quantized to FP8 E4M3 (Q/DQ) by onnxfp8.quantize; the data is 256 validation samples, one .npz per sample.
Each measurement runs in a fresh subprocess and reports that process's peak RSS (VmHWM):

* ``plain``: what a user's inference script does: numpy + onnxruntime (default session options), the same
  files read and batched, the FP32 model run batch by batch;
* ``check``: ``onnxfp8.check(fp32, quant, data)`` (both models, per-output statistics);
* ``check --layers``: the same with per-layer attribution (at most ``--max-memory`` MB of tensors exposed per
  onnxruntime run: micro-batches, then chunks of layers; see onnxfp8/verify/layers.py).

The target is check peak RSS < 2x plain. Usage::

    python benchmarks/bench_check_memory.py                 # 12 layers, 256 samples, batch 16
    python benchmarks/bench_check_memory.py --hidden 256 --ffn 1024 --max-memory 128

Measured (onnxruntime 1.32, 2 shared cores): plain 98.9 MB, check 149.4 MB (1.51x), check --layers 175.5 MB
(1.77x, 74 layers in 1 pass at batch 1); 2.2 s, 11.6 s and 61.7 s.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _peak_mb() -> float:
    """This process's peak RSS in MB: VmHWM from /proc/self/status. Not getrusage's ru_maxrss: Python starts
    the child with vfork + exec, and Linux carries the parent's high-water mark (here the setup's quantize)
    over the exec into the child's ru_maxrss, so every child would report at least the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KB on Linux (see above)


def child_plain(model: str, data: str, batch_size: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    start = time.perf_counter()
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    files = sorted(glob.glob(os.path.join(data, "*.npz")))
    n = 0
    for i in range(0, len(files), batch_size):
        parts = [dict(np.load(f)) for f in files[i:i + batch_size]]
        feed = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        sess.run(names, feed)
        n += next(iter(feed.values())).shape[0]
    return {"samples": n, "seconds": time.perf_counter() - start}


def child_check(model: str, quant: str, data: str, batch_size: int, layers: bool, max_memory: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import onnxfp8

    start = time.perf_counter()
    report = onnxfp8.check(model, quant, data, layers=layers, batch_size=batch_size, max_memory_mb=max_memory)
    out = {"samples": report.samples, "seconds": time.perf_counter() - start, "passed": report.passed,
           "sqnr_db": report.outputs["logits"].sqnr_db}
    if layers:
        out.update({"layers": len(report.layers), "layer_passes": report.layer_passes,
                    "layer_mb_per_batch": report.layer_bytes_per_batch / 2**20})
    return out


def measure(args: list) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child"] + args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child {args[0]} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--num-layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-memory", type=int, default=32, help="MB of exposed tensors per batch for --layers")
    p.add_argument("--no-layers", action="store_true", help="skip the --layers measurement")
    args = p.parse_args(argv)

    if args.child:
        kind, rest = args.child[0], args.child[1:]
        if kind == "plain":
            res = child_plain(rest[0], rest[1], int(rest[2]))
        else:
            res = child_check(rest[0], rest[1], rest[2], int(rest[3]), kind == "check-layers", int(rest[4]))
        res["peak_rss_mb"] = _peak_mb()
        print(json.dumps(res))
        return 0

    sys.path.insert(0, str(ROOT))
    import onnx

    import onnxfp8
    from onnxfp8.examples.build import build_transformer, write_data

    with tempfile.TemporaryDirectory(prefix="onnxfp8-bench-") as tmp:
        t0 = time.perf_counter()
        model = build_transformer(num_layers=args.num_layers, hidden=args.hidden, heads=args.heads, ffn=args.ffn,
                                  seq=args.seq)
        fp32 = os.path.join(tmp, "transformer.onnx")
        quant = os.path.join(tmp, "transformer.e4m3.onnx")
        onnx.save(model, fp32)
        calib, val = os.path.join(tmp, "calib"), os.path.join(tmp, "val")
        write_data(model, calib, 32, seed=1)
        write_data(model, val, args.samples, seed=2)
        onnxfp8.quantize(fp32, calib, output=quant)
        print(f"model: transformer, {args.num_layers} layers, hidden {args.hidden}, {args.heads} heads, ffn {args.ffn}, "
              f"seq {args.seq}; {os.path.getsize(fp32) / 2**20:.1f} MB FP32, {os.path.getsize(quant) / 2**20:.1f} MB "
              f"E4M3; {args.samples} samples, batch {args.batch_size} (setup {time.perf_counter() - t0:.1f} s)")
        bs = str(args.batch_size)
        plain = measure(["plain", fp32, val, bs])
        rows = [("plain FP32 inference (onnxruntime)", plain)]
        rows.append(("onnxfp8.check (outputs)", measure(["check", fp32, quant, val, bs, str(args.max_memory)])))
        if not args.no_layers:
            rows.append((f"onnxfp8.check --layers (--max-memory {args.max_memory})",
                         measure(["check-layers", fp32, quant, val, bs, str(args.max_memory)])))
        base = plain["peak_rss_mb"]
        print(f"{'run':48} {'peak RSS':>10} {'vs plain':>9} {'time':>8}")
        for name, r in rows:
            print(f"{name:48} {r['peak_rss_mb']:8.1f} MB {r['peak_rss_mb'] / base:8.2f}x {r['seconds']:7.1f}s")
        for name, r in rows[1:]:
            extra = f", {r['layers']} layers in {r['layer_passes']} pass(es), {r['layer_mb_per_batch']:.1f} MB exposed/batch" \
                if "layers" in r else ""
            print(f"  {name}: {r['samples']} samples, logits SQNR {r['sqnr_db']:.2f} dB, "
                  f"{'PASS' if r['passed'] else 'FAIL'}{extra}")
        worst = max(r["peak_rss_mb"] for _, r in rows[1:]) / base
        print(f"largest ratio check / plain: {worst:.2f}x (target < 2x): {'met' if worst < 2 else 'NOT met'}")
        return 0 if worst < 2 else 1


if __name__ == "__main__":
    sys.exit(main())
