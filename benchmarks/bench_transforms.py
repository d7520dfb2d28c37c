"""What the function-preserving transforms do to each zoo model, format by format.

    python benchmarks/bench_transforms.py --zoo ZOO [--only a,b] [--formats e4m3,e5m2,e3m4,int8]
                                          [--transforms none,equalize,bias,smoothquant,guarded]
                                          [--calib-samples N] [--val-samples N] [--out-json FILE]
                                          [--check-function]

``ZOO`` is a folder built by ``python benchmarks/zoo.py build --out ZOO`` (``<name>/model.onnx``, ``calib/``,
``val/``, optionally ``val_labels.npy``); without ``--only`` every model in it is measured. Per model, format
and transform the model is quantized through the public API (``onnxfp8.quantize``, standard scheme, every
selected layer quantized: no fallback) on ``calib/`` and checked against FP32 on ``val/`` (``onnxfp8.check``).
Transforms:

* ``none``: the defaults;
* ``equalize``: ``--equalize --no-transform-guard`` (cross-layer equalization + bias absorption + bias
  correction, unmeasured);
* ``bias``: ``--bias-correction --no-transform-guard`` alone;
* ``smoothquant``: ``--smoothquant --no-transform-guard`` (alpha per layer from the data);
* ``both``: ``--equalize --smoothquant --no-transform-guard`` (equalization with its bias correction, and
  smoothquant auto);
* ``guarded``: ``--equalize --smoothquant --bias-correction`` with the transform guard (quantize's default):
  each kept only when it raises the output SQNR on held-out calibration samples (two folds); its decisions are kept
  in the cell.

``--check-function`` instead measures, per model, the FP32 function of the transformed but unquantized graph
against the original (max abs / rel difference on val and calib samples).

Printed per cell: the worst output's SQNR (dB) and cosine, and whether the model meets the coverage criterion
(cosine >= 0.995 vs FP32 for every output, or < 1 % relative accuracy loss with labels). A transform that
changes nothing (no layer pair, nothing to smooth, or no alpha helps in that format) is marked ``n/a``; when
the model has nothing to transform it is not run again for the other formats. Then the
gain table (transform minus none, dB) and the coverage per format with and without the transforms (with: the
best transform per model).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import onnxfp8  # noqa: E402
from onnxfp8 import QuantConfig, Thresholds  # noqa: E402

FORMATS = ("e4m3", "e5m2", "e3m4", "int8")
RAW = {"transform_guard": False}
TRANSFORMS = {"none": {}, "equalize": {"equalize": True, **RAW}, "bias": {"bias_correction": True, **RAW},
              "smoothquant": {"smoothquant": "auto", **RAW},
              "both": {"equalize": True, "smoothquant": "auto", **RAW},
              "guarded": {"equalize": True, "smoothquant": "auto", "bias_correction": True}}
PASS_OF = {"equalize": "equalize", "bias": "bias_correction", "smoothquant": "smoothquant",
           "both": ("equalize", "smoothquant"), "guarded": "transform_guard"}
COSINE, ACC_LOSS = 0.995, 0.01
NO_THRESHOLDS = Thresholds(min_sqnr=None, min_cosine=None, max_rel_error=None, min_top1_agreement=None,
                           max_accuracy_loss=None)


def run_cell(folder: Path, fmt: str, transform: str, calib_samples: Optional[int],
             val_samples: Optional[int]) -> Dict[str, Any]:
    cfg = QuantConfig(format=fmt, calib_samples=calib_samples, **TRANSFORMS[transform])
    start = time.perf_counter()
    cell: Dict[str, Any] = {"format": fmt, "transform": transform}
    try:
        result = onnxfp8.quantize(str(folder / "model.onnx"), str(folder / "calib"), config=cfg)
        notes = {p.name: p for p in result.report.passes}
        names = PASS_OF.get(transform, "")
        ps = [notes.get(n) for n in ((names,) if isinstance(names, str) else names)]
        cell["applied"] = transform == "none" or any(p and p.modified for p in ps)
        cell["notes"] = [n for p in ps if p for n in p.notes[:1]]
        if transform == "guarded":
            decisions = [r for r in result.plan.transforms if r.get("pass") == "transform_guard"]
            cell["guard"] = [{k: r.get(k) for k in ("transform", "kept", "without_db", "with_db", "reason")}
                             for r in decisions]
            cell["kept"] = [r["transform"] for r in decisions if r.get("kept")]
            cell["applied"] = any(r.get("with_db") is not None for r in decisions)
        if not cell["applied"]:
            cell["seconds"] = round(time.perf_counter() - start, 1)
            return cell
        labels = folder / "val_labels.npy"
        rep = onnxfp8.check(str(folder / "model.onnx"), result.model, str(folder / "val"), NO_THRESHOLDS,
                            labels=str(labels) if labels.exists() else None, samples=val_samples)
        outs = [o for o in rep.outputs.values() if o.error.count]
        cell["sqnr_db"] = min(o.sqnr_db for o in outs)
        cell["cosine"] = min(o.cosine for o in outs)
        labelled = [o for o in outs if o.classifier is not None and o.classifier.labelled]
        if labelled:
            cell["accuracy_loss"] = labelled[0].accuracy_loss
            cell["meets"] = bool(labelled[0].accuracy_loss < ACC_LOSS)
        else:
            cell["meets"] = bool(cell["cosine"] >= COSINE)
    except Exception as e:  # noqa: BLE001 - a failing cell is a result
        cell["applied"] = True
        cell["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        cell["meets"] = False
    cell["seconds"] = round(time.perf_counter() - start, 1)
    return cell


# --check-function: the transformed FP32 graph (no quantization) against the original
FUNCTION_TRANSFORMS = {"equalize": {"equalize": True, "bias_correction": False}, "smoothquant": {"smoothquant": 0.5}}


def _max_diff(original, model, folder: Path, where: str, limit: Optional[int], level: str = "disable"
              ) -> Dict[str, Any]:
    """Max |a - b| and max |a - b| / max |a| (the worst output) of two FP32 models on a data folder (``b`` run at
    onnxruntime level ``level``)."""
    import numpy as np

    from onnxfp8.calibrators.data import as_data
    from onnxfp8.modelio import make_session

    ref_s = make_session(original, level="disable")
    got_s = make_session(model, level=level)
    names = [o.name for o in ref_s.get_outputs()]
    data = as_data(str(folder / where), original, batch_size=16, limit=limit)
    diff = {n: 0.0 for n in names}
    top = {n: 0.0 for n in names}
    count = 0
    for feed in data.batches():
        feed = dict(feed)
        for n, x, y in zip(names, ref_s.run(names, feed), got_s.run(names, feed)):
            x, y = np.asarray(x), np.asarray(y)
            if x.dtype.kind != "f":
                continue
            fin = np.isfinite(x) & np.isfinite(y)
            if fin.any():
                diff[n] = max(diff[n], float(np.max(np.abs(x[fin].astype(np.float64) - y[fin]))))
                top[n] = max(top[n], float(np.max(np.abs(x[fin].astype(np.float64)))))
            if (np.isfinite(x) != np.isfinite(y)).any():
                diff[n] = math.inf
        count += len(next(iter(feed.values())))
    rel = {n: diff[n] / top[n] if top[n] > 0 else (0.0 if diff[n] == 0 else math.inf) for n in names
           if top[n] or diff[n]}
    worst = max(rel, key=rel.get) if rel else None
    return {"samples": count, "max_abs": max(diff.values()) if diff else 0.0,
            "max_rel": rel[worst] if worst else 0.0, "output": worst}


def check_function(folder: Path, transform: str, calib_samples: Optional[int], val_samples: Optional[int]
                   ) -> Dict[str, Any]:
    """Max |difference| and max |difference| / max |output| (per output, the worst) between the original
    model and the model after ``transform`` alone (equalize: CLE + bias absorption; smoothquant: alpha 0.5, so
    every candidate is smoothed) without quantization, on the validation samples and on the calibration
    samples, onnxruntime without optimizations; and the floor: the same pipeline without the transform
    (BatchNorm folding, canonicalization) against the original, on the validation samples."""
    from onnxfp8.modelio import load_model
    from onnxfp8.quantize import transformed

    start = time.perf_counter()
    cfg = QuantConfig(calib_samples=calib_samples, **FUNCTION_TRANSFORMS[transform])
    cell: Dict[str, Any] = {"transform": transform}
    try:
        original = load_model(str(folder / "model.onnx"))
        model, plan = transformed(original, str(folder / "calib"), cfg)
        recs = [r for r in plan.transforms if r.get("pass") == transform and r.get("kind") != "left_alone"]
        cell["records"] = len(recs)
        if not recs:
            cell["applied"] = False
            return cell
        cell["applied"] = True
        base, _ = transformed(original, None, QuantConfig(calib_samples=calib_samples))
        cell["val"] = _max_diff(original, model, folder, "val", val_samples)
        cell["calib"] = _max_diff(original, model, folder, "calib", calib_samples)
        cell["floor"] = _max_diff(original, base, folder, "val", val_samples)
        cell["vs_floor"] = _max_diff(base, model, folder, "val", val_samples)
        # the model's own sensitivity to float rounding: onnxruntime's ENABLE_ALL rewrites vs none, original model
        cell["ort_all"] = _max_diff(original, original, folder, "val", val_samples, level="all")
    except Exception as e:  # noqa: BLE001 - a failing cell is a result
        cell["applied"] = True
        cell["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    finally:
        cell["seconds"] = round(time.perf_counter() - start, 1)
    return cell


def function_table(cells: List[Dict[str, Any]]) -> str:
    lines = ["### FP32 function after the transform, unquantized, vs the original (onnxruntime, no optimizations)",
             "", "max |diff| / max |output| of the worst output (max |diff| in brackets); floor: the pipeline "
             "without the transform (BatchNorm folding) vs the original; transform alone: transformed vs that "
             "pipeline; ORT levels: the original at onnxruntime ENABLE_ALL vs no optimization (the model's own "
             "sensitivity to float rounding); n/a: nothing to transform", "",
             "| model | transform | records | val | calib | floor (val) | transform alone (val) | ORT levels (val) |",
             "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        if "error" in c:
            lines.append(f"| {c['model']} | {c['transform']} | error: {c['error']} | | | | | |")
        elif not c.get("applied"):
            lines.append(f"| {c['model']} | {c['transform']} | n/a | | | | | |")
        else:
            cols = [f"{c[k]['max_rel']:.2g} ({c[k]['max_abs']:.2g})" for k in ("val", "calib", "floor", "vs_floor",
                                                                                "ort_all")]
            lines.append(f"| {c['model']} | {c['transform']} | {c['records']} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def _f(v, nd=2) -> str:
    if v is None:
        return "-"
    return "inf" if isinstance(v, float) and math.isinf(v) else f"{v:.{nd}f}"


def tables(cells: List[Dict[str, Any]], models: List[str], formats, transforms) -> str:
    by = {(c["model"], c["format"], c["transform"]): c for c in cells}
    lines = ["### Output SQNR (dB, worst output) per format and transform; n/a: the transform changes nothing", ""]
    head = ["model", "format"] + list(transforms)
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        for f in formats:
            row = [m, f]
            for t in transforms:
                c = by.get((m, f, t))
                if c is None:
                    row.append("-")
                elif "error" in c:
                    row.append("error")
                elif not c["applied"]:
                    row.append("n/a")
                else:
                    row.append(_f(c.get("sqnr_db")) + (" *" if c.get("meets") else ""))
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "`*`: meets the criterion (cosine >= 0.995, or < 1 % accuracy loss with labels).", ""]
    lines += ["### Gain over none (dB) where the transform applies", ""]
    head = ["transform", "format", "models", "mean", "min", "max"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in transforms:
        if t == "none":
            continue
        for f in formats:
            g = []
            for m in models:
                a, b = by.get((m, f, t)), by.get((m, f, "none"))
                if a and b and a.get("applied") and a.get("sqnr_db") is not None and b.get("sqnr_db") is not None \
                        and math.isfinite(a["sqnr_db"]) and math.isfinite(b["sqnr_db"]):
                    g.append(a["sqnr_db"] - b["sqnr_db"])
            if g:
                lines.append(f"| {t} | {f} | {len(g)} | {sum(g) / len(g):+.2f} | {min(g):+.2f} | {max(g):+.2f} |")
    if "guarded" in transforms:
        lines += ["", "### Guarded (quantize's default with the transforms asked for): never worse?", ""]
        head = ["format", "models", "kept something", "worse by > 0.2 dB", "worst gain", "best gain", "mean gain"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for f in formats:
            g, kept, worse = [], 0, []
            for m in models:
                a, b = by.get((m, f, "guarded")), by.get((m, f, "none"))
                if not (a and b and a.get("sqnr_db") is not None and b.get("sqnr_db") is not None):
                    continue
                if not (math.isfinite(a["sqnr_db"]) and math.isfinite(b["sqnr_db"])):
                    continue
                d = a["sqnr_db"] - b["sqnr_db"]
                g.append(d)
                kept += bool(a.get("kept"))
                if d < -0.2:
                    worse.append(f"{m} {d:+.2f}")
            if g:
                lines.append(f"| {f} | {len(g)} | {kept} | {len(worse)}{' (' + ', '.join(worse) + ')' if worse else ''} "
                             f"| {min(g):+.2f} | {max(g):+.2f} | {sum(g) / len(g):+.2f} |")
        lines += ["", "Kept per model (the guard's decisions, SQNR on the held-out calibration samples without -> with):", ""]
        for m in models:
            for f in formats:
                c = by.get((m, f, "guarded"))
                if c and c.get("guard"):
                    parts = [f"{d['transform']} {'kept' if d['kept'] else 'reverted'} ({_f(d['without_db'])} -> "
                             f"{_f(d['with_db'])})" for d in c["guard"] if d.get("with_db") is not None]
                    if parts:
                        lines.append(f"- {m} {f}: " + "; ".join(parts))
    lines += ["", "### Coverage without fallback (models meeting the criterion)", ""]
    head = ["format", "defaults", "guarded transforms", "best of any cell (raw or guarded)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in formats:
        n = len(models)
        base = sum(1 for m in models if by.get((m, f, "none"), {}).get("meets"))
        guard = sum(1 for m in models if (by.get((m, f, "guarded"), {}).get("meets") if by.get((m, f, "guarded"), {})
                                          .get("applied") else by.get((m, f, "none"), {}).get("meets")))
        best = sum(1 for m in models if any(by.get((m, f, t), {}).get("meets") for t in transforms))
        pct = lambda k: f"{k}/{n} ({100 * k / max(n, 1):.0f} %)"  # noqa: E731
        lines.append(f"| {f} | {pct(base)} | {pct(guard)} | {pct(best)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", required=True, type=Path)
    ap.add_argument("--only", default="")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--transforms", default=",".join(TRANSFORMS))
    ap.add_argument("--calib-samples", type=int, default=None)
    ap.add_argument("--val-samples", type=int, default=None)
    ap.add_argument("--out-json", type=Path)
    ap.add_argument("--check-function", action="store_true",
                    help="only check that each transform keeps the FP32 function (no quantization): max abs/rel "
                         "error per model vs the original")
    ap.add_argument("--from-json", default="",
                    help="comma-separated --out-json files of earlier runs (e.g. the raw columns and the guarded "
                         "one run apart): print their merged tables, run nothing")
    a = ap.parse_args(argv)
    if a.from_json:
        cells, models = [], []
        for f in a.from_json.split(","):
            d = json.loads(Path(f).read_text())
            cells += d["cells"]
            models += [m for m in d["models"] if m not in models and any(c["model"] == m for c in d["cells"])]
        formats = [f for f in FORMATS if any(c["format"] == f for c in cells)]
        transforms = [t for t in TRANSFORMS if any(c["transform"] == t for c in cells)]
        print(tables(cells, models, formats, transforms))
        return 0
    formats = [f for f in a.formats.split(",") if f]
    transforms = [t for t in a.transforms.split(",") if t]
    bad = [t for t in transforms if t not in TRANSFORMS]
    if bad:
        print(f"error: unknown transform '{bad[0]}' (known: {', '.join(TRANSFORMS)})", file=sys.stderr)
        return 2
    if "none" not in transforms:
        transforms.insert(0, "none")
    if a.only:
        models = [m.strip() for m in a.only.split(",") if m.strip()]
    else:
        models = sorted(p.name for p in a.zoo.iterdir() if (p / "model.onnx").exists()) if a.zoo.is_dir() else []
    missing = [m for m in models if not (a.zoo / m / "model.onnx").exists()]
    if missing or not models:
        print(f"error: {a.zoo}: no built zoo model {missing[0] if missing else ''} (build it with "
              f"benchmarks/zoo.py build --out {a.zoo})", file=sys.stderr)
        return 2
    cells = []
    start = time.perf_counter()
    if a.check_function:
        for m in models:
            for t in [t for t in transforms if t in FUNCTION_TRANSFORMS] or list(FUNCTION_TRANSFORMS):
                c = check_function(a.zoo / m, t, a.calib_samples, a.val_samples)
                c["model"] = m
                cells.append(c)
                got = "n/a" if not c.get("applied") else c.get("error") or \
                    f"val max rel {c['val']['max_rel']:.3g}, calib {c['calib']['max_rel']:.3g}, floor " \
                    f"{c['floor']['max_rel']:.3g}, transform alone {c['vs_floor']['max_rel']:.3g}, ORT levels " \
                    f"{c['ort_all']['max_rel']:.3g} " \
                    f"({c['records']} record(s))"
                print(f"{m:24} {t:12} {got}  ({c['seconds']} s)", flush=True)
        print()
        print(f"Command: `python benchmarks/bench_transforms.py {' '.join(argv if argv is not None else sys.argv[1:])}`;"
              f" {time.perf_counter() - start:.0f} s")
        print(function_table(cells))
        if a.out_json:
            a.out_json.write_text(json.dumps({"function": cells, "models": models}, indent=1, default=str))
        return 0
    for m in models:
        skip = set()
        for f in formats:
            for t in transforms:
                if t in skip:
                    cells.append({"model": m, "format": f, "transform": t, "applied": False})
                    continue
                c = run_cell(a.zoo / m, f, t, a.calib_samples, a.val_samples)
                c["model"] = m
                cells.append(c)
                if not c["applied"] and any(n.startswith("no ") for n in c.get("notes", [])):
                    skip.add(t)  # nothing to transform in this model, whatever the format
                print(f"{m:24} {f:5} {t:12} " + ("n/a" if not c["applied"] else c.get("error") or
                      f"SQNR {_f(c.get('sqnr_db'))} dB cosine {_f(c.get('cosine'), 5)}"
                      f"{' meets' if c.get('meets') else ''}") + f"  ({c['seconds']} s)"
                      + (f"  kept {c.get('kept') or 'none'}" if t == "guarded" and c.get("applied") else ""),
                      flush=True)
        if a.out_json:  # after every model: a run cut short keeps what it measured
            a.out_json.write_text(json.dumps({"cells": cells, "models": models, "partial": True}, indent=1,
                                             default=str))
    text = tables(cells, models, formats, transforms)
    print()
    print(f"Command: `python benchmarks/bench_transforms.py {' '.join(argv if argv is not None else sys.argv[1:])}`;"
          f" {time.perf_counter() - start:.0f} s")
    print(text)
    if a.out_json:
        a.out_json.write_text(json.dumps({"cells": cells, "models": models}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
