"""Every feature on every zoo model: a matrix of ok / exit-2 reason / CRASH.

For each zoo model (``--only NAME,...``; ``--smoke``: the models tagged ``smoke``) the CLI runs, in process
(click's runner, so exit codes and stderr are what a user sees):

* ``quantize`` in both schemes x every format (e4m3, e5m2, e3m4, int8) x both styles (qdq, emulate);
* ``-f auto``, ``--dynamic`` (tensor and token granularity), ``--bn-recalibrate`` on models tagged ``bn``;
* ``check --layers`` of the default output on the validation data;
* every recipe (``onnxfp8 recipes``), and ``lint --target tensorrt --strict`` on the tensorrt recipe's output;
* with ``--defaults``: the default vs the plain scheme (Conv/ConvTranspose/Gemm/MatMul with a constant
  weight, per-channel weights, per-tensor activations, max calibration) in every format, output SQNR on the
  validation data (issue 11's rule: default >= plain - 0.5 dB).

A cell is ``ok`` (exit 0; ``ok/1`` when a quality gate failed: a verdict, not a defect), ``exit-2: <the one
line>`` (what the tool refuses, with why) or ``CRASH: <message>`` (exit 3, a traceback, or exit 2 without
exactly one line). Exits non-zero when anything crashed. Models are built into ``--zoo DIR`` (kept, reused).

    python benchmarks/bench_features.py --smoke
    python benchmarks/bench_features.py --samples 8 --json matrix.json   # crash-freedom: few samples suffice
    python benchmarks/bench_features.py --only bert-small --defaults
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

FORMATS = ("e4m3", "e5m2", "e3m4", "int8")
PLAIN_OPS = "Conv,ConvTranspose,Gemm,MatMul"


def features(model, smoke: bool = False) -> List[Tuple[str, List[str]]]:
    """(column, quantize arguments) of every applicable feature. ``smoke`` (CI): every format in qdq style
    with the standard scheme, the extended scheme in E4M3 and E3M4, emulate style in E4M3 and E3M4."""
    out = []
    for scheme in ("standard", "extended"):
        for fmt in FORMATS:
            for style in ("qdq", "emulate"):
                if smoke and not ((scheme == "standard" and style == "qdq") or fmt in ("e4m3", "e3m4")
                                  and (scheme == "standard" or style == "qdq")):
                    continue
                out.append((f"{scheme[:3]}/{fmt}/{style}", ["--scheme", scheme, "-f", fmt, "--style", style]))
    out.append(("auto", ["-f", "auto"]))
    out.append(("dyn-tensor", ["--dynamic"]))
    out.append(("dyn-token", ["--dynamic", "--dynamic-granularity", "token"]))
    if "bn" in model.tags:
        out.append(("bn-recal", ["--bn-recalibrate"]))
    return out


def run_cli(args: List[str]) -> Tuple[str, str]:
    """Run ``onnxfp8 args`` in process: (cell, detail)."""
    from click.testing import CliRunner

    from onnxfp8.cli import cli

    res = CliRunner().invoke(cli, args, catch_exceptions=True)
    err = (getattr(res, "stderr", "") or "").strip().splitlines()
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        tb = "".join(traceback.format_exception(res.exception)).strip().splitlines()
        return "CRASH", f"{type(res.exception).__name__}: {str(res.exception).splitlines()[0] if str(res.exception) else ''} ({tb[-3].strip() if len(tb) > 2 else ''})"
    code = res.exit_code
    if code in (130, 143):  # Ctrl-C / SIGTERM reached the in-process CLI, which ends the run: stop the bench too
        raise SystemExit(code)
    if code == 0:
        return "ok", ""
    if code == 1:
        return "ok/1", (err[-1] if err else (res.output.strip().splitlines() or [""])[-1])
    if code == 2:
        lines = [l for l in err if l.strip()]
        if len(lines) == 1 or (lines and lines[-1].startswith("Error:")):
            return "exit-2", lines[-1]
        return "CRASH", f"exit 2 with {len(lines)} stderr lines: " + " | ".join(lines[-3:])
    return "CRASH", f"exit {code}: " + (err[-1] if err else "")


def sqnr_of(check_json: str) -> Optional[float]:
    with open(check_json) as f:
        rep = json.load(f)
    vals = [o.get("error", o).get("sqnr_db") for o in rep.get("outputs", {}).values()] \
        if isinstance(rep.get("outputs"), dict) else [o.get("sqnr_db") for o in rep.get("outputs", [])]
    vals = [v for v in vals if isinstance(v, (int, float))]
    return min(vals) if vals else None


def bench_model(model, folder: Path, work: Path, defaults: bool, smoke: bool = False, samples: Optional[int] = None
                ) -> Tuple[Dict[str, Tuple[str, str]], Dict]:
    src, calib, val = str(folder / "model.onnx"), str(folder / "calib"), str(folder / "val")
    cells: Dict[str, Tuple[str, str]] = {}
    out = str(work / f"{model.name}.onnx")
    few = ["--calib-samples", str(samples)] if samples else []  # quantize: at most N calibration samples
    for col, extra in features(model, smoke):
        if samples and "--bn-recalibrate" in extra:
            extra = extra + ["--bn-samples", str(samples)]
        cells[col] = run_cli(["quantize", src, "-c", calib, "-o", out, "-q"] + few + extra)
    default_out = str(work / f"{model.name}.default.onnx")
    cells["quantize"] = run_cli(["quantize", src, "-c", calib, "-o", default_out, "-q"] + few)
    if cells["quantize"][0].startswith("ok"):
        cells["check-layers"] = run_cli(["check", src, default_out, "--data", val, "--layers", "-q"]
                                        + (["--samples", str(samples)] if samples else []))
    else:
        cells["check-layers"] = ("-", "no default output")
    from onnxfp8.recipes import builtin_recipes

    for name in builtin_recipes():
        rout = str(work / f"{model.name}.{name}.onnx")
        cells[f"recipe:{name}"] = run_cli(["quantize", src, "-c", calib, "-o", rout, "-q", "--recipe", name] + few)
        if name == "tensorrt":
            cells["lint-trt"] = (run_cli(["lint", rout, "--target", "tensorrt", "--strict"])
                                 if cells[f"recipe:{name}"][0].startswith("ok") else ("-", "no tensorrt output"))
    figures = {}
    if defaults:
        for fmt in FORMATS:
            row = {}
            for kind, extra in (("default", []), ("plain", ["--op-types", PLAIN_OPS])):
                qout, cj = str(work / f"{model.name}.{kind}.{fmt}.onnx"), str(work / f"{model.name}.{kind}.{fmt}.json")
                cell = run_cli(["quantize", src, "-c", calib, "-o", qout, "-q", "-f", fmt] + extra)
                if cell[0].startswith("ok"):
                    run_cli(["check", src, qout, "--data", val, "-q", "--json", cj])
                    row[kind] = sqnr_of(cj) if os.path.exists(cj) else None
                else:
                    row[kind] = None
            figures[fmt] = row
    return cells, figures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated zoo model names")
    ap.add_argument("--smoke", action="store_true", help="CI: the models tagged smoke, fewer format/style cells")
    ap.add_argument("--zoo", default=os.path.join(tempfile.gettempdir(), "onnxfp8-zoo"), help="where models are built")
    ap.add_argument("--defaults", action="store_true", help="also measure default vs plain scheme SQNR")
    ap.add_argument("--json", help="write the matrix here (rewritten after every model)")
    ap.add_argument("--samples", type=int, help="at most N calibration / validation / BN samples per run (crash-freedom "
                                               "needs few; the --defaults figures then use few too)")
    args = ap.parse_args(argv)
    from zoo_models import all_models

    models = all_models()
    if args.only:
        want = [n.strip() for n in args.only.split(",") if n.strip()]
        known = {m.name for m in models}
        bad = [n for n in want if n not in known]
        if bad:
            print(f"error: unknown zoo model(s) {', '.join(bad)}; known: {', '.join(sorted(known))}", file=sys.stderr)
            return 2
        by_name = {m.name: m for m in models}
        models = [by_name[n] for n in dict.fromkeys(want)]  # in the order given
    if args.smoke:
        models = [m for m in models if "smoke" in m.tags]
    zoo = Path(args.zoo)
    matrix: Dict[str, Dict[str, Tuple[str, str]]] = {}
    figures: Dict[str, Dict] = {}
    crashed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for m in models:
            folder = zoo / m.name
            t0 = time.perf_counter()
            if not (folder / "model.onnx").exists():
                folder.mkdir(parents=True, exist_ok=True)
                try:
                    m.build(folder, 0)
                except Exception as e:
                    matrix[m.name] = {"build": ("CRASH", f"zoo build failed: {e}")}
                    crashed += 1
                    continue
            cells, figs = bench_model(m, folder, Path(tmp), args.defaults, args.smoke, args.samples)
            matrix[m.name], figures[m.name] = cells, figs
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"matrix": matrix, "defaults": figures, "partial": True}, f, indent=1)
            bad = [(c, d) for c, (v, d) in cells.items() if v == "CRASH"]
            crashed += len(bad)
            print(f"{m.name}: {sum(v.startswith('ok') for v, _ in cells.values())}/{len(cells)} ok, "
                  f"{sum(v == 'exit-2' for v, _ in cells.values())} exit-2, {len(bad)} crash "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            for c, d in bad:
                print(f"  CRASH {c}: {d}", flush=True)
    cols = list(dict.fromkeys(c for cells in matrix.values() for c in cells))
    print()
    print("| model | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, cells in matrix.items():
        print(f"| {name} | " + " | ".join(cells.get(c, ("n/a", ""))[0] for c in cols) + " |")
    notes = {(v, d) for cells in matrix.values() for v, d in cells.values() if v in ("exit-2", "CRASH") and d}
    if notes:
        print("\nreasons:")
        for v, d in sorted(notes):
            print(f"  {v}: {d}")
    if any(figures.values()):
        print("\ndefault vs plain scheme, min output SQNR (dB) on the validation data:")
        print("| model | format | default | plain | default - plain |")
        print("|---|---|---|---|---|")
        for name, figs in figures.items():
            for fmt, row in figs.items():
                d, p = row.get("default"), row.get("plain")
                delta = f"{d - p:+.2f}" if d is not None and p is not None else "-"
                f = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
                print(f"| {name} | {fmt} | {f(d)} | {f(p)} | {delta} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"matrix": matrix, "defaults": figures}, f, indent=1)
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
