"""Tuning to the FP8 paper's criterion on the model zoo: coverage per mode, layers in fallback, tuning time.

    python benchmarks/bench_tuning.py --zoo /tmp/zoo [--only bert,vit] [--sized resnet50,bert-base]
                                      [--json out.json] [--md out.md]

Per model (a zoo folder: ``<zoo>/<name>/model.onnx``, ``calib/``, ``val/``, ``val_labels.npy`` when labelled;
``--sized`` adds the ResNet-50- and BERT-base-shaped example builders with generated data):

* **floor**: one plain FP32 onnxruntime pass (default session options, session creation included) over the
  calibration plus the validation data, measured in the same run;
* **modes**: E4M3, E5M2, E3M4, INT8 and ``-f auto`` with default settings (one calibration, each mode realised from
  its statistics) scored on the validation data against the criterion (cosine >= 0.995 vs FP32, or < 1 %
  relative accuracy loss where labels exist);
* **tuned**: ``onnxfp8.tuning.tune.tune`` to the same criterion with the default budget (10 % of the quantized
  layers in fallback), timed end to end (its own calibration included), as a multiple of the floor.

Prints a table per model and the coverage per mode; ``--json`` / ``--md`` write them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from onnxfp8.calibrators.data import as_data
from onnxfp8.config import QuantConfig
from onnxfp8.modelio import load_model, make_session
from onnxfp8.tuning.evaluate import Evaluator, Workspace
from onnxfp8.tuning.sweep import default_criterion
from onnxfp8.tuning.tune import tune

MODES = ("e4m3", "e5m2", "e3m4", "int8", "auto")


def fp32_floor(model: str, calib: str, val: str, batch_size: int, calib_samples=None, val_samples=None) -> float:
    """Seconds of one plain FP32 onnxruntime pass over calib + val (session creation included)."""
    proto = load_model(model)
    t = time.perf_counter()
    sess = make_session(model, level="all")
    names = [o.name for o in sess.get_outputs()]
    for src, limit in ((calib, calib_samples), (val, val_samples)):
        for batch in as_data(src, proto, batch_size=batch_size, limit=limit).batches():
            sess.run(names, batch)
    return time.perf_counter() - t


def sized_models(out: Path, names, calib: int, val: int):
    from onnxfp8.examples.build import build_bert_like, build_resnet_like, write_data

    builders = {"resnet50": lambda: build_resnet_like(), "bert-base": lambda: build_bert_like()}
    for name in names:
        folder = out / name
        model = folder / "model.onnx"
        if not model.exists():
            folder.mkdir(parents=True, exist_ok=True)
            m = builders[name]()
            import onnx

            onnx.save(m, str(model))
            write_data(m, folder / "calib", calib, seed=1)
            write_data(m, folder / "val", val, seed=2)
        yield name, folder


def bench_one(name: str, folder: Path, batch_size: int, calib_samples=None, val_samples=None,
              formats=None) -> dict:
    """The floor, then tuning timed end to end (its one calibration and FP32 validation pass included), then
    the single modes scored from the tuner's own statistics and FP32 outputs (not timed)."""
    model, calib, val = str(folder / "model.onnx"), str(folder / "calib"), str(folder / "val")
    labels = folder / "val_labels.npy"
    labels = str(labels) if labels.exists() else None
    row = {"model": name, "labelled": labels is not None}
    row["floor_s"] = fp32_floor(model, calib, val, batch_size, calib_samples, val_samples)
    cfg = QuantConfig(batch_size=batch_size, calib_samples=calib_samples)
    t = time.perf_counter()
    ws = None
    try:
        ws = Workspace(model, calib, cfg)
        ev = Evaluator(model, val, labels, batch_size=batch_size, samples=val_samples)
        crit = default_criterion(ev.labelled)
        row["criterion"] = crit.describe()
        res = tune(model, calib, val, crit, cfg, labels=labels, workspace=ws, evaluator=ev, formats=formats)
        row["tune_s"] = time.perf_counter() - t
        rep = res.tuning
        row["tuned"] = {"met": rep.met, "value": rep.reached, "fallback": len(rep.fallback),
                        "fallback_fp16": sum(1 for p in rep.fallback_precision.values() if p == "fp16"),
                        "quantized_layers": rep.quantized_layers, "steps": len(rep.steps),
                        "fallback_pct": 100.0 * len(rep.fallback) / max(rep.quantized_layers, 1),
                        "how": rep.steps[rep.best_step].tried, "timings": rep.timings,
                        "formats": _format_counts(res.plan), "candidates": rep.candidates,
                        "path": [(s.name, s.tried, s.metric, s.samples) for s in rep.steps]}
    except Exception as exc:  # the model does not quantize at all: every mode fails with this reason
        reason = str(exc).splitlines()[0][:160]
        row.setdefault("criterion", "-")
        row["tuned"] = {"met": False, "error": reason}
        row["modes"] = {m: {"met": False, "error": reason} for m in MODES}
        row["tune_s"] = time.perf_counter() - t
        row["tune_x_floor"] = row["tune_s"] / row["floor_s"]
        if ws is not None:
            ws.close()
        return row
    row["tune_x_floor"] = row["tune_s"] / row["floor_s"]
    modes = {}
    with ws:
        for m in MODES:
            try:
                e = ev.evaluate(ws.realize(cfg.replace(format=m)).model)
                v = e.value(crit.metric)
                modes[m] = {"met": crit.met(v), "value": v, "cosine": e.cosine, "sqnr_db": e.sqnr_db}
            except Exception as exc:  # one line per failure; the other modes still run
                modes[m] = {"met": False, "error": str(exc).splitlines()[0][:160]}
    row["modes"] = modes
    return row


def _format_counts(plan) -> dict:
    """The tuned plan's tensors per format (weights and activations), most first."""
    out: dict = {}
    for spec in plan.tensors.values():
        out[spec.format] = out.get(spec.format, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _v(m: dict) -> str:
    if "error" in m:
        return "error"
    v = m.get("value")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4f}" + (" ok" if m["met"] else "")


def markdown(rows) -> str:
    head = ["model", "criterion"] + list(MODES) + ["tuned", "fallback", "tuning time", "x FP32 floor", "how"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        t = r["tuned"]
        lines.append("| " + " | ".join([r["model"], r["criterion"]] + [_v(r["modes"][m]) for m in MODES] + [
            _v(t), f"{t.get('fallback', '-')}/{t.get('quantized_layers', '-')}"
            + (f" ({t['fallback_fp16']} FP16)" if t.get("fallback_fp16") else ""), f"{r['tune_s']:.1f} s",
            f"{r['tune_x_floor']:.1f}x", t.get("how", t.get("error", ""))
            + (" [" + ", ".join(f"{f} {n}" for f, n in t["formats"].items()) + "]" if t.get("formats") else "")])
            + " |")
    n = len(rows)
    cov = {m: sum(r["modes"][m]["met"] for r in rows) for m in MODES}
    cov["tuned"] = sum(r["tuned"]["met"] for r in rows)
    lines += ["", "coverage (models within the criterion): " + ", ".join(
        f"{m} {k}/{n} ({100 * k / max(n, 1):.0f} %)" for m, k in cov.items())]
    worst = max((r["tuned"].get("fallback_pct", 0.0) for r in rows), default=0.0)
    lines.append(f"largest fallback share: {worst:.1f} % of a model's quantized layers")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", help="a folder built by benchmarks/zoo.py build")
    ap.add_argument("--only", help="comma-separated zoo model names")
    ap.add_argument("--sized", default="", help="resnet50,bert-base: the example builders at full size")
    ap.add_argument("--sized-calib", type=int, default=64)
    ap.add_argument("--sized-val", type=int, default=32)
    ap.add_argument("--sized-dir", default=os.path.join(tempfile.gettempdir(), "onnxfp8-sized"))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--calib-samples", type=int, help="at most N calibration samples per model (floor too)")
    ap.add_argument("--val-samples", type=int, help="at most N validation samples per model (floor too)")
    ap.add_argument("--formats", help="the tuner's candidate formats (default: auto's, e4m3,e5m2,int8)")
    ap.add_argument("--skip", help="comma-separated zoo model names to leave out")
    ap.add_argument("--json")
    ap.add_argument("--md")
    args = ap.parse_args(argv)
    todo = []
    if args.zoo:
        only = {s.strip() for s in args.only.split(",")} if args.only else None
        for d in sorted(Path(args.zoo).iterdir()):
            skip = {x.strip() for x in args.skip.split(",")} if args.skip else set()
            if (d / "model.onnx").exists() and (only is None or d.name in only) and d.name not in skip:
                todo.append((d.name, d))
    sized = [s.strip() for s in args.sized.split(",") if s.strip()]
    todo += list(sized_models(Path(args.sized_dir), sized, args.sized_calib, args.sized_val))
    rows = []
    if args.json and Path(args.json).exists():  # resume: models already measured are kept
        rows = json.loads(Path(args.json).read_text())
        done = {r["model"] for r in rows}
        todo = [(n, f) for n, f in todo if n not in done]
    for name, folder in todo:
        t = time.perf_counter()
        fmts = tuple(f.strip() for f in args.formats.split(",")) if args.formats else None
        r = bench_one(name, folder, args.batch_size, args.calib_samples, args.val_samples, fmts)
        rows.append(r)
        print(f"{name}: modes " + ", ".join(f"{m} {_v(r['modes'][m])}" for m in MODES)
              + f"; tuned {_v(r['tuned'])} ({r['tuned'].get('fallback', '-')} fallback, {r['tune_s']:.1f} s = "
              f"{r['tune_x_floor']:.1f}x the FP32 floor {r['floor_s']:.2f} s) [{time.perf_counter() - t:.0f} s]",
              flush=True)
        if args.json:  # after every model: a killed run keeps what it measured
            Path(args.json).write_text(json.dumps(rows, indent=1, default=float))
    md = markdown(rows)
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=float))
    if args.md:
        Path(args.md).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
