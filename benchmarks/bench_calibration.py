"""Calibration cost and quality: onnxfp8 quantize vs one FP32 inference pass and vs onnxruntime's quantize_static.

Models (built in code, random but settled weights, see onnxfp8/examples/build.py): ``resnet50`` (ResNet-50-shaped
bottleneck CNN, 25.6M parameters, 224x224), ``bert`` (BERT-base-sized encoder: 12 layers, hidden 768, 12
heads, sequence 128, ~110M parameters), and the bundled examples ``cnn``, ``mlp``, ``transformer``. For each
model and each calibration sample count, every measurement runs in a fresh process (its peak RSS is its own
VmHWM; wall time is the whole process, interpreter start included):

* ``floor``: one plain FP32 onnxruntime pass over the calibration set (default session options, the same
  files read and batched by 16, as a user's inference script would);
* ``onnxfp8 max`` / ``onnxfp8 mse``: ``onnxfp8 quantize MODEL --calib DIR --calib-samples N -f e4m3 --quiet``
  (the CLI run in the measured process) (max calibration, the default; mse calibration), everything included: loading, passes,
  calibration, the post-quantization summary on 64 samples, the ONNX check and saving;
* ``ort fp8`` / ``ort int8``: ``onnxruntime.quantization.quantize_static`` on the same model, data (a
  CalibrationDataReader yielding the same batches of 16) and nodes (the ones onnxfp8 quantized): FP8
  ``QuantType.QFLOAT8E4M3FN`` for activations and weights (onnxruntime requires its Distribution calibrator for
  FP8), and INT8 symmetric MinMax with per-channel weights;
* ``sqnr``: the output SQNR vs FP32 of every result on held-out data (``--val`` samples, another seed), each
  quantized model run through onnxfp8.modelio.make_session (ENABLE_BASIC, exact Q/DQ numerics).

Printed: a table per model, the ratios onnxfp8 / floor and onnxfp8 / onnxruntime (time), the peak RSS growth
from the smallest to the largest sample count, and whether the issue's targets hold. Usage::

    python benchmarks/bench_calibration.py                                   # every model, 128 and 1024 samples
    python benchmarks/bench_calibration.py --models cnn,transformer --samples 128,1024
    python benchmarks/bench_calibration.py --models resnet50,bert --samples 128 --val 16
    python benchmarks/bench_calibration.py --models resnet50 --size 112      # a smaller input for a short run

Built models and data are kept in ``--workdir`` (default /tmp/onnxfp8-bench-calibration) between runs.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
BIG = ("resnet50", "bert")
ALL_MODELS = ("resnet50", "bert", "cnn", "mlp", "transformer")


def _vm_hwm_mb() -> float:
    """This process's peak RSS since its exec (VmHWM). getrusage / wait4 ru_maxrss is no good here: Linux
    carries the forking parent's peak over exec, so every child would report at least the parent's RSS."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status")


# -- children: each runs in its own process ------------------------------------------------------------
def _batches(data: str, n: int, batch_size: int):
    import numpy as np

    files = sorted(glob.glob(os.path.join(data, "*.npz")))[:n]
    for i in range(0, len(files), batch_size):
        parts = [dict(np.load(f)) for f in files[i:i + batch_size]]
        yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def child_floor(model: str, data: str, n: int, batch_size: int) -> dict:
    import onnxruntime as ort

    start = time.perf_counter()
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    seen = 0
    for feed in _batches(data, n, batch_size):
        sess.run(names, feed)
        seen += next(iter(feed.values())).shape[0]
    return {"samples": seen, "inner_seconds": time.perf_counter() - start}


def child_ort(model: str, data: str, n: int, batch_size: int, kind: str, out: str, nodes_json: str) -> dict:
    import logging

    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    logging.disable(logging.WARNING)  # its "consider pre-processing" advice

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = _batches(data, n, batch_size)

        def get_next(self):
            return next(self.it, None)

    nodes = json.load(open(nodes_json)) if nodes_json != "-" else None
    start = time.perf_counter()
    common = dict(quant_format=QuantFormat.QDQ, nodes_to_quantize=nodes,
                  op_types_to_quantize=["Conv", "ConvTranspose", "Gemm", "MatMul", "Gather"])
    if kind == "fp8":
        quantize_static(model, out, Reader(), activation_type=QuantType.QFLOAT8E4M3FN,
                        weight_type=QuantType.QFLOAT8E4M3FN, per_channel=False,
                        calibrate_method=CalibrationMethod.Distribution, **common)
    else:
        quantize_static(model, out, Reader(), activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        per_channel=True, calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True}, **common)
    return {"inner_seconds": time.perf_counter() - start}


def child_sqnr(fp32: str, val: str, n: int, batch_size: int, models_json: str) -> dict:
    sys.path.insert(0, str(ROOT))
    from onnxfp8.modelio import make_session
    from onnxfp8.verify.compare import ErrorStats

    results = json.load(open(models_json))
    ref_sess = make_session(fp32, level="basic")
    names = [o.name for o in ref_sess.get_outputs()]
    refs = [ref_sess.run(names, feed) for feed in _batches(val, n, batch_size)]
    out = {}
    for label, path in results.items():
        try:
            sess = make_session(path, level="basic")
        except Exception as e:  # a peer's model onnxruntime cannot run
            out[label] = {"error": str(e).splitlines()[0][:160]}
            continue
        stats = ErrorStats()  # over every output together
        for feed, ref in zip(_batches(val, n, batch_size), refs):
            for r, g in zip(ref, sess.run(names, feed)):
                stats.update(r, g)
        out[label] = {"sqnr_db": stats.sqnr_db}
    return out


# -- the parent ----------------------------------------------------------------------------------------
def spawn(cmd: List[str]) -> dict:
    """Run ``cmd`` (a ``--child`` of this script) in a fresh process: its wall time, its peak RSS (VmHWM, which
    it reports) and its JSON result (the last ``{...}`` line of its stdout); ``{"error": last stderr line}``
    when it fails."""
    start = time.perf_counter()
    out_path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"onnxfp8-bench-{os.getpid()}-{time.time_ns()}.out")
    with open(out_path, "w+") as out, open(out_path + ".err", "w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=str(ROOT))
        _, status = os.waitpid(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        text, errtext = out.read(), err.read()
    os.unlink(out_path)
    os.unlink(out_path + ".err")
    if proc.returncode != 0:
        last = (errtext.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return {"error": last[:200], "wall_seconds": wall}
    res = {"wall_seconds": wall}
    lines = [l for l in text.strip().splitlines() if l.startswith("{")]
    if lines:
        res.update(json.loads(lines[-1]))
    res["peak_rss_mb"] = res.pop("own_peak_rss_mb")
    return res


def build(name: str, args, work: Path, max_samples: int) -> Dict[str, str]:
    """The model file, its calibration data (max_samples files, seed 1) and held-out data (seed 2)."""
    sys.path.insert(0, str(ROOT))
    import onnx

    from onnxfp8.examples.build import build_bert_like, build_cnn, build_mlp, build_resnet_like, build_transformer, write_data

    tag = {"resnet50": f"resnet50-{args.size}", "bert": f"bert-{args.bert_layers}x768-s{args.seq}"}.get(name, name)
    folder = work / tag
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    if not path.exists():
        maker = {"resnet50": lambda: build_resnet_like(size=args.size),
                 "bert": lambda: build_bert_like(num_layers=args.bert_layers, seq=args.seq),
                 "cnn": build_cnn, "mlp": build_mlp, "transformer": build_transformer}[name]
        onnx.save(maker(), str(path))
    model = onnx.load(str(path), load_external_data=False)
    calib, val = folder / "calib", folder / "val"
    if len(glob.glob(str(calib / "*.npz"))) < max_samples:
        write_data(model, calib, max_samples, seed=1)
    if len(glob.glob(str(val / "*.npz"))) != args.val:
        write_data(model, val, args.val, seed=2)
    return {"model": str(path), "calib": str(calib), "val": str(val), "dir": str(folder),
            "mb": f"{path.stat().st_size / 2**20:.0f}"}


def quantized_nodes(plan_path: str) -> List[str]:
    sys.path.insert(0, str(ROOT))
    from onnxfp8.plan import QuantPlan

    with open(plan_path) as f:
        return sorted(d.node for d in QuantPlan.from_json(f.read()).quantized_nodes())


def _add_report(res: dict, path: Path) -> None:
    """Where an onnxfp8 run spent its time, from its --report: the calibrate pass, the rest of quantize()
    (loading and preparing the model, the other passes, the ONNX check, the output summary on the summary
    samples, saving) and the rest of the process (interpreter start, imports)."""
    if "error" in res or not path.exists():
        return
    rep = json.load(open(path))
    passes = {p["name"]: p["seconds"] for p in rep.get("passes", [])}
    res["calibrate_seconds"] = passes.get("calibrate", 0.0)
    res["rest_seconds"] = rep.get("seconds", 0.0) - res["calibrate_seconds"]
    res["process_seconds"] = res["wall_seconds"] - rep.get("seconds", 0.0)


def fmt(v, spec, unit=""):
    return "-" if v is None else f"{v:{spec}}{unit}"


def outlier_demo() -> List[str]:
    """mse vs max calibration where a quantized activation has outliers: the input of a MatMul -> Tanh -> MatMul
    network is N(0, 1) with 0.1% of its values replaced by spikes of magnitude K/2..K (calibration and held-out
    data alike, 1024 samples each). Output SQNR vs FP32 on the held-out data, E4M3 and INT8."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    sys.path.insert(0, str(ROOT))
    import onnxfp8
    from onnxfp8.modelio import make_session
    from onnxfp8.verify.compare import sqnr_db

    m = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 19]>
    g (float[N,64] x) => (float[N,16] y) { h = MatMul (x, w1)  a = Tanh (h)  y = MatMul (a, w2) }""")
    rng = np.random.default_rng(0)
    m.graph.initializer.extend([numpy_helper.from_array((rng.normal(0, 1, (64, 128)) / 8).astype(np.float32), "w1"),
                                numpy_helper.from_array((rng.normal(0, 1, (128, 16)) / 11).astype(np.float32), "w2")])

    def data(seed: int, k: float) -> "np.ndarray":
        r = np.random.default_rng(seed)
        x = r.normal(0, 1, (1024, 64)).astype(np.float32)
        mask = r.random(x.shape) < 1e-3
        x[mask] = k * np.sign(x[mask]) * r.uniform(0.5, 1, int(mask.sum()))
        return x

    lines = []
    for k in (0.0, 30.0, 100.0):
        cal, val = (data(1, k), data(2, k)) if k else (np.random.default_rng(1).normal(0, 1, (1024, 64)).astype(np.float32),
                                                      np.random.default_rng(2).normal(0, 1, (1024, 64)).astype(np.float32))
        ref = make_session(m, level="basic").run(None, {"x": val})[0]
        cells = []
        for f in ("e4m3", "int8"):
            got = {}
            for method in ("max", "mse"):
                q = onnxfp8.quantize(m, [{"x": cal[i:i + 16]} for i in range(0, 1024, 16)],
                                     config=onnxfp8.QuantConfig(format=f, calibration=method))
                got[method] = sqnr_db(ref, make_session(q.model, level="basic").run(None, {"x": val})[0])
            cells.append(f"{f}: max {got['max']:.2f} dB, mse {got['mse']:.2f} dB ({got['mse'] - got['max']:+.2f})")
        what = f"spikes up to {k:g} in 0.1% of the values" if k else "no spikes (plain N(0,1))"
        lines.append(f"{what:38} " + "; ".join(cells))
    return lines


def run_child(kind: str, rest: List[str]) -> int:
    """``--child KIND ARGS...``: one measurement in this (fresh) process; prints a JSON line with its peak RSS."""
    if kind == "cli":  # `python -m onnxfp8 ARGS` in this process, then its peak RSS
        sys.path.insert(0, str(ROOT))
        from onnxfp8.cli import cli

        code = 0
        try:
            cli.main(rest, prog_name="onnxfp8", standalone_mode=True)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        print(json.dumps({"own_peak_rss_mb": _vm_hwm_mb()}))
        return code
    if kind == "floor":
        res = child_floor(rest[0], rest[1], int(rest[2]), int(rest[3]))
    elif kind == "ort":
        res = child_ort(rest[0], rest[1], int(rest[2]), int(rest[3]), rest[4], rest[5], rest[6])
    else:
        res = child_sqnr(rest[0], rest[1], int(rest[2]), int(rest[3]), rest[4])
    res["own_peak_rss_mb"] = _vm_hwm_mb()
    print(json.dumps(res))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        return run_child(argv[1], argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(ALL_MODELS), help=f"comma separated, from {', '.join(ALL_MODELS)}")
    p.add_argument("--samples", default="128,1024", help="calibration sample counts (comma separated)")
    p.add_argument("--big-samples", help="sample counts for resnet50 and bert (default: --samples)")
    p.add_argument("--val", type=int, default=32, help="held-out samples for the SQNR")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--size", type=int, default=224, help="resnet50 input size")
    p.add_argument("--seq", type=int, default=128, help="bert sequence length")
    p.add_argument("--bert-layers", type=int, default=12)
    p.add_argument("--no-ort", action="store_true", help="skip onnxruntime's quantize_static")
    p.add_argument("--no-mse", action="store_true", help="skip the onnxfp8 mse run")
    p.add_argument("--no-summary-row", action="store_true",
                   help="skip the onnxfp8 max run with --summary-samples 0 (no post-quantization SQNR summary)")
    p.add_argument("--no-outlier-demo", action="store_true", help="skip the mse-vs-max outlier case")
    p.add_argument("--workdir", default="/tmp/onnxfp8-bench-calibration")
    p.add_argument("--json", help="write every measurement here")
    args = p.parse_args(argv)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in ALL_MODELS]
    if bad:
        p.error(f"unknown model {bad[0]}; choose from {', '.join(ALL_MODELS)}")
    small_counts = [int(s) for s in args.samples.split(",")]
    big_counts = [int(s) for s in (args.big_samples or args.samples).split(",")]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    me = str(Path(__file__).resolve())
    bs = str(args.batch_size)
    total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    all_rows = {}
    verdicts: List[str] = []
    print(f"onnxruntime quantize_static vs onnxfp8 quantize; batch {args.batch_size}, {os.cpu_count()} CPU(s), "
          f"load average at start {os.getloadavg()[0]:.1f}", flush=True)
    for name in models:
        counts = big_counts if name in BIG else small_counts
        t0 = time.perf_counter()
        ex = build(name, args, work, max(counts))
        print(f"\n== {name}: {ex['model']} ({ex['mb']} MB), calibration {', '.join(map(str, counts))} samples, "
              f"{args.val} held-out (setup {time.perf_counter() - t0:.0f} s)", flush=True)
        rows = {}
        for n in counts:
            d = Path(ex["dir"]) / f"n{n}"
            d.mkdir(exist_ok=True)
            r: Dict[str, dict] = {}
            print(f"-- {n} calibration samples", flush=True)

            def show(k: str) -> None:
                v = r[k]
                if "error" in v or "skipped" in v:
                    print(f"   {k:14} {'failed' if 'error' in v else 'skipped'}: {v.get('error', v.get('skipped'))}",
                          flush=True)
                else:
                    print(f"   {k:14} {v['wall_seconds']:7.1f} s {v['peak_rss_mb']:7.0f} MB", flush=True)

            r["floor"] = spawn([py, me, "--child", "floor", ex["model"], ex["calib"], str(n), bs])
            show("floor")
            base = [py, me, "--child", "cli", "quantize", ex["model"], "--calib", ex["calib"], "--calib-samples", str(n),
                    "--batch-size", bs, "-f", "e4m3", "--quiet"]
            r["onnxfp8 max"] = spawn(base + ["-o", str(d / "ours_max.onnx"), "--plan", str(d / "plan.json"),
                                             "--report", str(d / "report_max.json")])
            _add_report(r["onnxfp8 max"], d / "report_max.json")
            show("onnxfp8 max")
            if not args.no_summary_row:
                r["onnxfp8 max s0"] = spawn(base + ["--summary-samples", "0", "-o", str(d / "ours_max_s0.onnx"),
                                                    "--report", str(d / "report_s0.json")])
                _add_report(r["onnxfp8 max s0"], d / "report_s0.json")
                show("onnxfp8 max s0")
            outs = {"onnxfp8 max": str(d / "ours_max.onnx")}
            if not args.no_mse:
                r["onnxfp8 mse"] = spawn(base + ["--calibration", "mse", "-o", str(d / "ours_mse.onnx"),
                                                 "--report", str(d / "report_mse.json")])
                _add_report(r["onnxfp8 mse"], d / "report_mse.json")
                show("onnxfp8 mse")
                outs["onnxfp8 mse"] = str(d / "ours_mse.onnx")
            if not args.no_ort:
                nodes = str(d / "nodes.json")
                with open(nodes, "w") as f:
                    json.dump(quantized_nodes(str(d / "plan.json")) if "error" not in r["onnxfp8 max"] else None, f)
                for kind in ("fp8", "int8"):
                    out = str(d / f"ort_{kind}.onnx")
                    prev = [(m, rows[m][f"ort {kind}"]["peak_rss_mb"]) for m in rows
                            if "peak_rss_mb" in rows[m].get(f"ort {kind}", {})]
                    if prev and prev[-1][1] * n / prev[-1][0] > 0.6 * total_mb:
                        m0, rss0 = prev[-1]
                        r[f"ort {kind}"] = {"skipped": f"its peak RSS grew with the samples ({rss0 / 1024:.1f} GB at "
                                                       f"{m0}); at {n} that extrapolates to "
                                                       f"{rss0 * n / m0 / 1024:.0f} GB, over 60% of this machine's "
                                                       f"{total_mb / 1024:.0f} GB"}
                    else:
                        r[f"ort {kind}"] = spawn([py, me, "--child", "ort", ex["model"], ex["calib"], str(n), bs,
                                                  kind, out, nodes])
                        outs[f"ort {kind}"] = out
                    show(f"ort {kind}")
            outs = {k: v for k, v in outs.items() if "error" not in r[k] and "skipped" not in r[k]}
            mj = str(d / "models.json")
            with open(mj, "w") as f:
                json.dump(outs, f)
            sq = spawn([py, me, "--child", "sqnr", ex["model"], ex["val"], str(args.val), bs, mj])
            for k in r:
                if k in sq:
                    r[k].update(sq[k])
                elif "error" in sq and k != "floor":
                    r[k]["sqnr_error"] = sq["error"]
            rows[n] = r
            floor = r["floor"].get("wall_seconds")
            print(f"   {'run':14} {'wall s':>8} {'peak RSS':>10} {'/floor':>7} {'SQNR dB':>8}  note")
            for k, v in r.items():
                if "error" in v or "skipped" in v:
                    print(f"   {k:14} {'failed' if 'error' in v else 'skipped':>8}  {v.get('error', v.get('skipped'))}")
                    continue
                ratio = v["wall_seconds"] / floor if floor else None
                note = "" if k != "floor" else f"inference loop {v['inner_seconds']:.1f} s"
                if "calibrate_seconds" in v:
                    loop = r["floor"].get("inner_seconds")
                    note = (f"calibrate pass {v['calibrate_seconds']:.1f} s"
                            + (f" ({v['calibrate_seconds'] / loop:.2f}x the floor's loop)" if loop else "")
                            + f", rest of quantize {v['rest_seconds']:.1f} s, process start {v['process_seconds']:.1f} s")
                if k.startswith("ort"):
                    note = f"quantize_static {v['inner_seconds']:.1f} s"
                if "error" in v.get("sqnr_error", "") or "error" in sq.get(k, {}):
                    note += f" SQNR failed: {sq.get(k, {}).get('error', v.get('sqnr_error'))}"
                print(f"   {k:14} {v['wall_seconds']:8.1f} {v['peak_rss_mb']:7.0f} MB {fmt(ratio, '7.2f')} "
                      f"{fmt(v.get('sqnr_db'), '8.2f')}  {note}", flush=True)
            ours = r["onnxfp8 max"]
            if "error" not in ours:
                parts = [f"onnxfp8 max / floor {ours['wall_seconds'] / floor:.2f}x (target <= 1.5x)"]
                for kind in ("fp8", "int8"):
                    o = r.get(f"ort {kind}", {})
                    if "peak_rss_mb" in o:
                        parts.append(f"/ ort {kind} {ours['wall_seconds'] / o['wall_seconds']:.2f}x time, "
                                     f"{ours['peak_rss_mb'] / o['peak_rss_mb']:.2f}x RSS")
                print("   ratios: " + "; ".join(parts))
                verdicts.append(f"{name} n={n}: onnxfp8 max / floor {ours['wall_seconds'] / floor:.2f}x "
                                f"({'met' if ours['wall_seconds'] <= 1.5 * floor else 'NOT met'})")
                s0 = r.get("onnxfp8 max s0", {})
                if "wall_seconds" in s0 and "error" not in s0:
                    verdicts.append(f"{name} n={n}: onnxfp8 max --summary-samples 0 / floor "
                                    f"{s0['wall_seconds'] / floor:.2f}x "
                                    f"({'met' if s0['wall_seconds'] <= 1.5 * floor else 'NOT met'})")
                if "calibrate_seconds" in ours and r["floor"].get("inner_seconds"):
                    verdicts.append(f"{name} n={n}: calibrate pass / floor's inference loop "
                                    f"{ours['calibrate_seconds'] / r['floor']['inner_seconds']:.2f}x")
                o = r.get("ort fp8", {})
                if "peak_rss_mb" in o:
                    q = ours["wall_seconds"] / o["wall_seconds"]
                    verdicts.append(f"{name} n={n}: onnxfp8 max / ort fp8 time {q:.2f}x "
                                    f"({'met' if q < 0.5 else 'NOT met'})")
                if "sqnr_db" in ours and "sqnr_db" in o:
                    verdicts.append(f"{name} n={n}: E4M3 SQNR onnxfp8 max {ours['sqnr_db']:.2f} dB vs ort fp8 "
                                    f"{o['sqnr_db']:.2f} dB ({'met' if ours['sqnr_db'] >= o['sqnr_db'] else 'NOT met'})")
                m = r.get("onnxfp8 mse", {})
                if "sqnr_db" in ours and "sqnr_db" in m:
                    verdicts.append(f"{name} n={n}: mse vs max SQNR {m['sqnr_db'] - ours['sqnr_db']:+.2f} dB")
        if len(counts) > 1:
            lo, hi = min(counts), max(counts)
            for k in rows[lo]:
                a, b = rows[lo][k].get("peak_rss_mb"), rows[hi][k].get("peak_rss_mb")
                if a and b:
                    growth = b / a - 1
                    tgt = f" (target < 10%: {'met' if growth < 0.10 else 'NOT met'})" if k.startswith("onnxfp8") else ""
                    line = f"{name}: peak RSS {k} {lo} -> {hi} samples: {a:.0f} -> {b:.0f} MB ({growth:+.1%}){tgt}"
                    print("   " + line)
                    if k.startswith("onnxfp8") or k.startswith("ort"):
                        verdicts.append(line)
        all_rows[name] = {str(n): r for n, r in rows.items()}
    if not args.no_outlier_demo:
        print("\nmse vs max calibration with outliers (MatMul -> Tanh -> MatMul, input N(0,1) with spikes; output "
              "SQNR on held-out data):", flush=True)
        for line in outlier_demo():
            print("  " + line, flush=True)
    print("\nsummary (timings on this machine, whatever else it was running; load average now "
          f"{os.getloadavg()[0]:.1f}):")
    for v in verdicts:
        print("  " + v)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
