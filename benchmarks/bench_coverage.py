"""Coverage of the model zoo: how many real architectures each quantization mode keeps within the FP8 paper's
criterion, and how far every mode lands on every model.

    python benchmarks/bench_coverage.py [--zoo zoo/] [--only a,b] [--smoke] [--modes e4m3,plain-e4m3,...]
                                        [--out-json coverage.json] [--out-md coverage.md]

For every zoo model (built into ``--zoo`` first when missing or out of date, see benchmarks/zoo.py) and every
mode, the model is quantized through the public Python API (``onnxfp8.quantize``) on its ``calib/`` data and
compared with its FP32 graph on its ``val/`` data (``onnxfp8.check``, onnxruntime at the exact level). Modes:

* ``e4m3``, ``e5m2``, ``e3m4``, ``int8``: the defaults (``QuantConfig(format=F)``: standard scheme);
* ``auto`` and ``auto-extended``: ``-f auto`` with the standard and the extended scheme;
* ``plain-F`` for each format: the plain scheme of issue 11: Conv, ConvTranspose, Gemm, MatMul (with a constant
  weight, as the standard scheme's structural rule says), per-channel weights, per-tensor activations, max
  calibration, no embedding Gather.

A model meets the criterion (arXiv 2309.14592) when the cosine similarity of every output with FP32 is
>= 0.995, or, where the model has labels (``val_labels.npy``), when the relative accuracy loss is < 1 %.
Coverage = the percentage of models meeting it, per mode; a cell that fails (onnxfp8 refuses with a one-line
reason, "exit 2", or crashes with an internal error) counts as not meeting it and shows its reason instead of
a number. ``default - plain`` is the default's output SQNR minus the plain scheme's, per format (issue 11
item 5: it must never be below -0.5 dB).

Every cell runs in-process, its failure caught and recorded (a crash is a result, not an abort). Prints one
line per cell as it finishes (with its time), then the tables; ``--out-json`` / ``--out-md`` write them.
``--smoke``: only the models tagged ``smoke``, 32 calibration and 32 validation samples; exits 1 only when
something crashed (an internal error, or a zoo model that does not build), not on a missed criterion. That
is CI's entry point. Without ``--smoke`` the exit code is the same rule.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:
    sys.path.insert(1, str(HERE.parent))  # a fresh clone without an install: the repository's onnxfp8

import numpy as np  # noqa: E402

import onnxfp8  # noqa: E402
from onnxfp8 import QuantConfig, Thresholds  # noqa: E402
from onnxfp8.errors import OnnxFp8Error  # noqa: E402

import zoo  # noqa: E402

FORMATS = ("e4m3", "e5m2", "e3m4", "int8")
PLAIN_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
COSINE = 0.995
ACC_LOSS = 0.01
NO_THRESHOLDS = Thresholds(min_sqnr=None, min_cosine=None, max_rel_error=None, min_top1_agreement=None,
                           max_accuracy_loss=None)


def mode_config(mode: str) -> QuantConfig:
    """The QuantConfig of a mode name (see the module docstring)."""
    if mode in FORMATS:
        return QuantConfig(format=mode)
    if mode == "auto":
        return QuantConfig(format="auto")
    if mode == "auto-extended":
        return QuantConfig(format="auto", scheme="extended")
    if mode.startswith("plain-") and mode[6:] in FORMATS:
        return QuantConfig(format=mode[6:], scheme="standard", op_types=PLAIN_OPS, per_channel=True,
                           calibration="max")
    raise ValueError(f"unknown mode '{mode}' (known: {', '.join(ALL_MODES)})")


ALL_MODES = FORMATS + ("auto", "auto-extended") + tuple(f"plain-{f}" for f in FORMATS)


@dataclass
class Cell:
    model: str
    mode: str
    status: str = "ok"               # ok | exit2 (onnxfp8 refused, one-line reason) | crash (internal error)
    reason: str = ""
    sqnr_db: Optional[float] = None  # the worst output's
    cosine: Optional[float] = None   # the worst output's
    accuracy_fp32: Optional[float] = None
    accuracy_quant: Optional[float] = None
    accuracy_loss: Optional[float] = None
    meets: bool = False
    criterion: str = ""
    quantize_s: float = 0.0
    check_s: float = 0.0
    quantized_nodes: Optional[int] = None


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return first[:300]


def run_cell(model_name: str, folder: Path, mode: str, calib_samples: Optional[int],
             val_samples: Optional[int]) -> Cell:
    cell = Cell(model_name, mode)
    cfg = mode_config(mode)
    if calib_samples:
        cfg = cfg.replace(calib_samples=calib_samples)
    labels = folder / "val_labels.npy"
    start = time.perf_counter()
    stage = "quantize"
    try:
        result = onnxfp8.quantize(str(folder / "model.onnx"), str(folder / "calib"), config=cfg)
        cell.quantize_s = time.perf_counter() - start
        cell.quantized_nodes = len(result.plan.quantized_nodes())
        stage = "check"
        t1 = time.perf_counter()
        rep = onnxfp8.check(str(folder / "model.onnx"), result.model, str(folder / "val"), NO_THRESHOLDS,
                            labels=str(labels) if labels.exists() else None, samples=val_samples)
        cell.check_s = time.perf_counter() - t1
        del result
        outs = [o for o in rep.outputs.values() if o.error.count]
        if not outs:
            raise RuntimeError("check compared no floating-point output")
        cell.sqnr_db = min(o.sqnr_db for o in outs)
        cell.cosine = min(o.cosine for o in outs)
        labelled = [o for o in outs if o.classifier is not None and o.classifier.labelled]
        if labelled:
            o = labelled[0]
            cell.accuracy_fp32, cell.accuracy_quant, cell.accuracy_loss = o.accuracy_fp32, o.accuracy_quant, o.accuracy_loss
            cell.meets = bool(o.accuracy_loss < ACC_LOSS)
            cell.criterion = f"accuracy loss {100 * o.accuracy_loss:.2f}% {'<' if cell.meets else '>='} 1%"
        else:
            cell.meets = bool(cell.cosine >= COSINE)
            cell.criterion = f"cosine {cell.cosine:.5f} {'>=' if cell.meets else '<'} {COSINE}"
        if any(o.error.q_nonfinite for o in outs):
            cell.meets = False
            cell.criterion = "non-finite quantized outputs"
    except Exception as e:  # noqa: BLE001 - a failing cell is a result
        if stage == "quantize":
            cell.quantize_s = time.perf_counter() - start
        code = getattr(e, "exit_code", 3) if isinstance(e, OnnxFp8Error) else 3
        cell.status = "exit2" if code == 2 else "crash"
        prefix = "" if code == 2 else f"internal error: {type(e).__name__}: "
        cell.reason = f"{stage}: {prefix}{_one_line(e)}"
    finally:
        gc.collect()
    return cell


# --------------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------------
def _fmt(v: Optional[float], nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.{nd}f}"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def coverage(cells: Sequence[Cell], models: Sequence[str], modes: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    by = {(c.model, c.mode): c for c in cells}
    out = {}
    for m in modes:
        meet = [n for n in models if by.get((n, m)) and by[(n, m)].meets]
        failed = [n for n in models if by.get((n, m)) and by[(n, m)].status != "ok"]
        out[m] = {"meets": len(meet), "models": len(models), "failed": len(failed),
                  "coverage_pct": round(100.0 * len(meet) / len(models), 1) if models else 0.0,
                  "meeting": meet}
    return out


def default_minus_plain(by: Dict[Tuple[str, str], Cell], model: str, fmt: str) -> Optional[float]:
    d, p = by.get((model, fmt)), by.get((model, f"plain-{fmt}"))
    if not d or not p or d.sqnr_db is None or p.sqnr_db is None:
        return None
    if math.isinf(d.sqnr_db) or math.isinf(p.sqnr_db):
        return None
    return d.sqnr_db - p.sqnr_db


def families(models: Sequence[str]) -> Dict[str, str]:
    """Each model's zoo family (benchmarks/zoo_models); "other" for a name the registry does not know."""
    known = {zm.name: zm.family for zm in zoo.select()}
    return {n: known.get(n, "other") for n in models}


def markdown(cells: Sequence[Cell], models: Sequence[str], modes: Sequence[str], meta: Dict[str, Any]) -> str:
    by = {(c.model, c.mode): c for c in cells}
    cov = coverage(cells, models, modes)
    lines = [f"Command: `{meta['command']}`  ", f"Date: {meta['date']}; {meta['versions']}; "
             f"{meta['machine']}; calibration samples: {meta['calib_samples']}, validation samples: "
             f"{meta['val_samples']}; total {meta['seconds']:.0f} s.", ""]
    lines += ["### Coverage (cosine >= 0.995 vs FP32, or relative accuracy loss < 1 % with labels)", ""]
    lines += _table(["mode", "models meeting", "coverage", "failed (exit 2 / crash)"],
                    [[m, f"{cov[m]['meets']} / {cov[m]['models']}", f"{cov[m]['coverage_pct']:.1f} %",
                      str(cov[m]["failed"])] for m in modes])
    fam = families(models)
    if len(set(fam.values())) > 1:
        order = list(dict.fromkeys(fam[n] for n in models))
        lines += ["", "### Coverage per family (models meeting the criterion / models in the family)", ""]
        rows = []
        for m in modes:
            row = [m]
            for f in order:
                members = [n for n in models if fam[n] == f]
                row.append(f"{sum(1 for n in members if by.get((n, m)) and by[(n, m)].meets)} / {len(members)}")
            rows.append(row)
        lines += _table(["mode"] + order, rows)
    fmts = [f for f in FORMATS if f in modes and f"plain-{f}" in modes]
    if fmts:
        lines += ["", "### Default minus plain scheme, output SQNR (dB; issue 11 item 5 wants >= -0.5)", ""]
        rows = []
        for n in models:
            rows.append([n] + [_fmt(default_minus_plain(by, n, f)) for f in fmts])
        viol = {f: sum(1 for n in models if (default_minus_plain(by, n, f) or 0.0) < -0.5) for f in fmts}
        rows.append(["**models below -0.5 dB**"] + [str(viol[f]) for f in fmts])
        lines += _table(["model"] + [f"{f}: default - plain" for f in fmts], rows)

    def cell_text(c: Optional[Cell], what: str) -> str:
        if c is None:
            return "-"
        if c.status != "ok":
            return "**exit 2**" if c.status == "exit2" else "**crash**"
        v = c.sqnr_db if what == "sqnr" else c.cosine
        txt = _fmt(v, 2 if what == "sqnr" else 4)
        return f"{txt}" + ("" if c.meets else "\u2717")

    for what, title in (("sqnr", "Output SQNR per model (dB; \u2717 = misses the criterion)"),
                        ("cos", "Output cosine per model (\u2717 = misses the criterion)")):
        lines += ["", f"### {title}", ""]
        lines += _table(["model"] + list(modes), [[n] + [cell_text(by.get((n, m)), what) for m in modes]
                                                  for n in models])
    acc = [c for c in cells if c.accuracy_loss is not None]
    if acc:
        lines += ["", "### Accuracy (models with labels)", ""]
        lines += _table(["model", "mode", "FP32", "quantized", "relative loss"],
                        [[c.model, c.mode, f"{100 * c.accuracy_fp32:.2f} %", f"{100 * c.accuracy_quant:.2f} %",
                          f"{100 * c.accuracy_loss:.2f} %"] for c in acc])
    bad = [c for c in cells if c.status != "ok"]
    lines += ["", "### Failures", ""]
    if bad:
        lines += _table(["model", "mode", "kind", "reason"],
                        [[c.model, c.mode, c.status, c.reason.replace("|", "\\|")] for c in bad])
    else:
        lines.append("none")
    lines += ["", "### Time per cell (quantize + check, seconds)", ""]
    lines += _table(["model"] + list(modes),
                    [[n] + [(f"{by[(n, m)].quantize_s:.1f}+{by[(n, m)].check_s:.1f}" if (n, m) in by else "-")
                            for m in modes] for n in models])
    return "\n".join(lines) + "\n"


def _versions() -> str:
    import onnx
    import onnxruntime
    parts = [f"onnxfp8 {onnxfp8.__version__}", f"onnx {onnx.__version__}", f"onnxruntime {onnxruntime.__version__}"]
    for mod in ("torch", "transformers", "sklearn"):
        try:
            parts.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001
            pass
    parts.append(f"numpy {np.__version__}")
    parts.append(f"Python {platform.python_version()}")
    return ", ".join(parts)


def _git_head() -> str:
    try:
        import subprocess
        return subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


def _write(path: str, text: str) -> None:
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, p)


def combine(files: Sequence[str], out_json: Optional[str], out_md: Optional[str]) -> int:
    """The tables of several runs' JSON files as one (models in file order; modes of the first file)."""
    cells: List[Cell] = []
    names: List[str] = []
    metas = []
    modes: List[str] = []
    for f in files:
        try:
            data = json.loads(Path(f).read_text())
            modes = modes or list(data["modes"])
            metas.append(data["meta"])
            for c in data["cells"]:
                if c["model"] not in names:
                    names.append(c["model"])
                cells.append(Cell(**c))
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"bench_coverage.py: {f}: not a bench_coverage JSON file ({e})", file=sys.stderr)
            return 2
    meta = dict(metas[0])
    meta["command"] = "`; `".join(m["command"] for m in metas)
    meta["date"] = ", ".join(dict.fromkeys(m["date"] for m in metas))
    meta["seconds"] = sum(float(m["seconds"]) for m in metas)
    md = markdown(cells, names, modes, meta)
    print(md)
    if out_json:
        by = {(c.model, c.mode): c for c in cells}
        dmp = {n: {f: default_minus_plain(by, n, f) for f in FORMATS} for n in names}
        _write(out_json, json.dumps({"meta": meta, "modes": modes, "models": names,
                                     "coverage": coverage(cells, names, modes), "default_minus_plain_db": dmp,
                                     "cells": [asdict(c) for c in cells]}, indent=1, default=str) + "\n")
    if out_md:
        _write(out_md, md)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_coverage.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", default="zoo", help="the zoo folder (built there when missing; default zoo/)")
    ap.add_argument("--only", help="comma-separated zoo model names")
    ap.add_argument("--smoke", action="store_true", help="CI: the smoke models, 32 calib / 32 val samples")
    ap.add_argument("--modes", help=f"comma-separated modes (default all: {','.join(ALL_MODES)})")
    ap.add_argument("--calib-samples", type=int, help="calibration samples per model (default all: 64)")
    ap.add_argument("--val-samples", type=int, help="validation samples per model (default all: 64)")
    ap.add_argument("--seed", type=int, default=0, help="zoo build seed")
    ap.add_argument("--out-json")
    ap.add_argument("--out-md")
    ap.add_argument("--from-json", help="comma-separated JSON files of earlier runs: print (and write) their "
                    "tables together instead of running (e.g. families run separately)")
    args = ap.parse_args(argv)
    if args.from_json:
        return combine([s for s in args.from_json.split(",") if s], args.out_json, args.out_md)
    start = time.perf_counter()
    modes = [m.strip() for m in args.modes.split(",")] if args.modes else list(ALL_MODES)
    try:
        for m in modes:
            mode_config(m)
        selected = zoo.select(args.only, args.smoke)
    except ValueError as e:
        print(f"bench_coverage.py: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"bench_coverage.py: {e} (install the zoo extra: pip install '.[zoo]')", file=sys.stderr)
        return 2
    calib_n = args.calib_samples or (32 if args.smoke else None)
    val_n = args.val_samples or (32 if args.smoke else None)
    out = Path(args.zoo)
    out.mkdir(parents=True, exist_ok=True)
    cells: List[Cell] = []
    names: List[str] = []
    build_failures: List[str] = []
    for zm in selected:
        t0 = time.perf_counter()
        try:
            what = zoo.build_one(zm, out, args.seed)
        except Exception as e:  # noqa: BLE001
            build_failures.append(f"{zm.name}: {type(e).__name__}: {_one_line(e)}")
            print(f"{zm.name}: BUILD FAILED ({type(e).__name__}: {_one_line(e)})", flush=True)
            continue
        print(f"{zm.name}: {what} ({time.perf_counter() - t0:.1f} s)", flush=True)
        names.append(zm.name)
        for mode in modes:
            c = run_cell(zm.name, out / zm.name, mode, calib_n, val_n)
            cells.append(c)
            if c.status == "ok":
                res = f"SQNR {_fmt(c.sqnr_db):>6} dB  cosine {_fmt(c.cosine, 5)}  {'meets' if c.meets else 'misses'}"
            else:
                res = f"{c.status.upper()}: {c.reason}"
            print(f"  {zm.name:<16} {mode:<14} {res}  ({c.quantize_s:.1f} s + {c.check_s:.1f} s)", flush=True)
    seconds = time.perf_counter() - start
    meta = {"command": "python benchmarks/bench_coverage.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "git": _git_head(), "versions": _versions(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s)",
            "calib_samples": calib_n or "all (64)", "val_samples": val_n or "all (64)", "seconds": seconds,
            "criterion": f"cosine >= {COSINE} (every output) or relative accuracy loss < {100 * ACC_LOSS:g} % with labels"}
    cov = coverage(cells, names, modes)
    md = markdown(cells, names, modes, meta)
    print()
    print(md)
    if build_failures:
        print("zoo models that did not build:\n  " + "\n  ".join(build_failures))
    if args.out_json:
        by = {(c.model, c.mode): c for c in cells}
        dmp = {n: {f: default_minus_plain(by, n, f) for f in FORMATS} for n in names}
        _write(args.out_json, json.dumps({"meta": meta, "modes": modes, "models": names, "coverage": cov,
                                          "default_minus_plain_db": dmp, "build_failures": build_failures,
                                          "cells": [asdict(c) for c in cells]}, indent=1, default=str,
                                         allow_nan=True) + "\n")
    if args.out_md:
        _write(args.out_md, md)
    crashed = [c for c in cells if c.status == "crash"]
    if crashed or build_failures:
        print(f"{len(crashed)} cell(s) crashed, {len(build_failures)} model(s) did not build", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
