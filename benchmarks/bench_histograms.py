"""The histogram calibrators' own cost: observe() per million values and result() per tensor.

    python benchmarks/bench_histograms.py             # 5 repeats of each, median printed
    python benchmarks/bench_histograms.py --repeats 9

These figures used to be asserted as wall-clock limits in tests/calibrators (observe < 50 ms per million
values, mse result() of 40 tensors < 2 s); timed tests fail on a loaded machine without a change in the code,
so the figures are measured here instead, beside a floor measured in the same run: one numpy pass over the same
values (np.abs(x).max()), which no calibrator can beat. docs/calibration.md carries the results.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

from onnxfp8.calibrators.base import make_calibrator


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--values", type=int, default=1_000_000, help="values per observe() call")
    ap.add_argument("--tensors", type=int, default=40, help="tensors for the result() timing")
    args = ap.parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"histogram calibrators, {os.cpu_count()} CPU(s), load average {load:.1f}, numpy {np.__version__}")
    x = np.random.default_rng(0).standard_normal(args.values).astype(np.float32)
    floor = _median_seconds(lambda: float(np.abs(x).max()), args.repeats)
    print(f"floor: np.abs(x).max() over {args.values:,} values: {floor * 1e3:.2f} ms")
    print(f"{'method':10s} {'observe ms':>11s} {'/ floor':>8s} {'result s':>9s} {'ms/tensor':>10s}")
    for method in ("percentile", "mse", "entropy"):
        cal = make_calibrator(method, format="e4m3")
        cal.set_ranges({"t": float(np.abs(x).max())})
        cal.observe("t", x)  # the first call sizes the bins
        obs = _median_seconds(lambda: cal.observe("t", x), args.repeats)
        rng = np.random.default_rng(1)
        many = make_calibrator(method, format="e4m3")
        for i in range(args.tensors):
            d = rng.standard_normal(20_000).astype(np.float32) * (1 + i)
            many.set_ranges({f"t{i}": float(np.abs(d).max())})
            many.observe(f"t{i}", d)
        res = _median_seconds(many.result, max(1, args.repeats // 2))
        print(f"{method:10s} {obs * 1e3:11.2f} {obs / floor:7.1f}x {res:9.3f} {res / args.tensors * 1e3:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
