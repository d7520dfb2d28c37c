"""sweep(): the FP8 paper's table for one model: formats x schemes x calibration methods, plus the tuned result.

Per scheme the model is calibrated once (evaluate.Workspace: min/max and histograms of every tensor), and every
(format, calibration method) pair is realised from those statistics and scored on the validation data with one
onnxruntime pass (evaluate.Evaluator, FP32 outputs computed once): output SQNR and cosine vs FP32, top-1
agreement, accuracy with labels, file size. The tuned row is tune() on the same statistics and data. A
configuration that cannot be built (an option the model does not allow) is a row with its one-line reason.

Results: ``SweepReport.to_markdown()``, ``to_json()``, and report/html.py's self-contained HTML page (per-layer
SQNR bars, activation histograms on each format's grid, the sensitivity ranking).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from onnxfp8.config import ALL_FORMATS, CALIBRATION_METHODS, SCHEMES, QuantConfig
from onnxfp8.errors import ConfigError, OnnxFp8Error
from onnxfp8.modelio import load_model, model_bytes
from onnxfp8.plan import json_plain
from onnxfp8.tuning.evaluate import CRITERION_ACCURACY_LOSS, CRITERION_COSINE, Evaluator, Target, Workspace


@dataclass
class SweepRow:
    scheme: str
    format: str
    calibration: str
    metrics: Dict[str, Any] = field(default_factory=dict)  # cosine, sqnr_db, accuracy, accuracy_loss, top1...
    size_bytes: int = 0
    quantized_layers: int = 0
    fallback: int = 0
    met: bool = False
    seconds: float = 0.0
    error: str = ""
    tuned: bool = False
    transform: str = ""  # a transform row: equalize, smoothquant or bias_correction on (unguarded)

    @property
    def label(self) -> str:
        if self.tuned:
            return f"tuned ({self.scheme})"
        return f"{self.format} {self.scheme} {self.calibration}" + (f" + {self.transform}" if self.transform else "")

    def to_dict(self) -> Dict[str, Any]:
        return json_plain({"label": self.label, "scheme": self.scheme, "format": self.format,
                           "calibration": self.calibration, **self.metrics, "size_bytes": self.size_bytes,
                           "quantized_layers": self.quantized_layers, "fallback": self.fallback, "met": self.met,
                           "seconds": round(self.seconds, 3), "error": self.error, "tuned": self.tuned,
                           "transform": self.transform})


@dataclass
class SweepReport:
    source: str
    criterion: Target
    rows: List[SweepRow]
    fp32_size: int = 0
    samples: int = 0
    tuning: Any = None  # tune.TuneReport
    sensitivity: Any = None  # verify.sensitivity.SensitivityReport
    histograms: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # tensor -> {"hist", "amax", "layer"}
    seconds: float = 0.0
    timings: Dict[str, float] = field(default_factory=dict)

    def best(self) -> Optional[SweepRow]:
        ok = [r for r in self.rows if not r.error and not r.tuned]
        key = "accuracy_loss" if self.criterion.metric == "accuracy_loss" else (
            "sqnr_db" if self.criterion.metric == "sqnr" else "cosine")
        sign = -1 if key == "accuracy_loss" else 1
        ok = [r for r in ok if r.metrics.get(key) is not None and not math.isnan(r.metrics[key])]
        return max(ok, key=lambda r: (sign * r.metrics[key], r.metrics.get("cosine", 0.0))) if ok else None

    def to_dict(self) -> Dict[str, Any]:
        best = self.best()
        return json_plain({"source": self.source, "criterion": self.criterion.to_dict(), "samples": self.samples,
                           "fp32_size": self.fp32_size, "seconds": round(self.seconds, 3),
                           "timings": {k: round(v, 3) for k, v in self.timings.items()},
                           "best_plain": best.label if best else None,
                           "rows": [r.to_dict() for r in self.rows],
                           "tuning": self.tuning.to_dict() if self.tuning else None,
                           "sensitivity": self.sensitivity.to_dict() if self.sensitivity else None,
                           "histograms": {k: {"amax": v["amax"], "layer": v["layer"]} for k, v in self.histograms.items()}})

    def to_json(self, indent: int = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def table_rows(self) -> List[List[str]]:
        out = []
        for r in self.rows:
            m = r.metrics
            if r.error:
                out.append([r.label, "-", "-", "-", "-", "-", "-", "-", r.error])
                continue
            out.append([r.label, _f(m.get("sqnr_db"), "{:.2f}"), _f(m.get("cosine"), "{:.5f}"),
                        _pct(m.get("top1_agreement")), _pct(m.get("accuracy")), _pct(m.get("accuracy_loss")),
                        f"{r.size_bytes / 1e6:.2f} MB ({r.size_bytes / max(self.fp32_size, 1):.2f}x)",
                        f"{r.fallback}/{r.quantized_layers}", "yes" if r.met else "no"])
        return out

    def to_markdown(self) -> str:
        head = ["configuration", "SQNR dB", "cosine", "top-1 agree", "accuracy", "acc. loss", "size", "fallback",
                f"meets {self.criterion.describe()}"]
        lines = [f"# sweep: {self.source}", "",
                 f"{self.samples} validation sample(s); FP32 size {self.fp32_size / 1e6:.2f} MB; criterion "
                 f"{self.criterion.describe()}; {self.seconds:.1f} s", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in self.table_rows()]
        lines += self.transform_table()
        if self.tuning is not None:
            lines += ["", "## tuning", "", "```", self.tuning.summary(), "```"]
        if self.sensitivity is not None:
            lines += ["", "## sensitivity", "", "```", self.sensitivity.summary(), "```"]
        return "\n".join(lines) + "\n"


    def transform_table(self) -> List[str]:
        """Format x transform: the output SQNR (dB) / cosine without and with each transform (the transform rows'
        scheme and calibration method); ``n/a``: the transform changes nothing in this model."""
        rows = [r for r in self.rows if r.transform]
        if not rows:
            return []
        names = list(dict.fromkeys(r.transform for r in rows))
        scheme, method = rows[0].scheme, rows[0].calibration
        plain = {r.format: r for r in self.rows if not r.transform and not r.tuned and r.scheme == scheme
                 and r.calibration == method}
        by = {(r.format, r.transform): r for r in rows}

        def cell(r: Optional[SweepRow]) -> str:
            if r is None:
                return "-"
            if r.error:
                return r.error if r.error == "n/a" else "error"
            return (f"{_f(r.metrics.get('sqnr_db'), '{:.2f}')} / {_f(r.metrics.get('cosine'), '{:.5f}')}"
                    + (" *" if r.met else ""))

        head = ["format", "none"] + names
        out = ["", f"## transforms ({scheme}, calibration {method}; SQNR dB / cosine, `*` meets "
                   f"{self.criterion.describe()})", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for f in dict.fromkeys(r.format for r in rows):
            out.append("| " + " | ".join([f, cell(plain.get(f))] + [cell(by.get((f, t))) for t in names]) + " |")
        return out


def _f(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return spec.format(v)


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f} %"


def default_criterion(labelled: bool) -> Target:
    """The FP8 paper's pass criterion: < 1 % relative accuracy loss with labels, else cosine >= 0.995."""
    return Target("accuracy_loss", CRITERION_ACCURACY_LOSS) if labelled else Target("cosine", CRITERION_COSINE)


def sweep(model, calib: Any, val: Any, config: Optional[QuantConfig] = None, *,
          formats: Sequence[str] = ALL_FORMATS + ("auto",), schemes: Sequence[str] = SCHEMES,
          calibrations: Sequence[str] = CALIBRATION_METHODS, labels: Any = None, target: Optional[Target] = None,
          tune: bool = True, max_fallback=None, samples: Optional[int] = None, histograms: int = 4,
          progress=None, transforms: Sequence[str] = ()) -> SweepReport:
    """Every (scheme, format, calibration) of ``model`` on ``val``, plus the tuned plan (``tune``); see the
    module docstring. ``target``: the pass criterion of the table and the tuner's target (default: the
    paper's criterion). ``histograms``: activation histograms kept for the report (the most sensitive layers'
    inputs). ``transforms``: equalize, smoothquant, bias_correction: per format a row with each on (unguarded;
    config's scheme and calibration method; each its own calibration, since a transform rewrites the graph
    and depends on the format), and the tuner tries them as steps."""
    from onnxfp8.tuning.tune import tune as run_tune
    from onnxfp8.verify.sensitivity import analyse

    start = time.perf_counter()
    config = config or QuantConfig()
    for s in schemes:
        if s not in SCHEMES:
            raise ConfigError(f"--schemes: unknown scheme '{s}'; choose from {', '.join(SCHEMES)}")
    for c in calibrations:
        if c not in CALIBRATION_METHODS:
            raise ConfigError(f"--calibrations: unknown method '{c}'; choose from {', '.join(CALIBRATION_METHODS)}")
    for f in formats:
        QuantConfig(format=f)  # unknown format: a one-line ConfigError
    for t in transforms:
        if t not in TRANSFORM_ON:
            raise ConfigError(f"--transforms: unknown transform '{t}'; choose from {', '.join(TRANSFORM_ON)}")
    source = str(model) if not hasattr(model, "graph") else "model"
    fp32 = load_model(model)
    ev = Evaluator(model, val, labels, batch_size=config.batch_size, samples=samples, providers=config.providers,
                   threads=config.threads)
    criterion = target or default_criterion(ev.labelled)
    if criterion.metric == "accuracy_loss" and not ev.labelled:
        raise ConfigError(f"{criterion.flag} needs labels: pass --labels FILE (or a 'label' key in the validation files)")
    report = SweepReport(source, criterion, [], fp32_size=model_bytes(fp32), samples=ev.samples)
    report.timings["fp32_validation"] = ev.fp32_seconds
    del fp32
    base_ws: Optional[Workspace] = None
    workspaces: List[Workspace] = []
    try:
        for scheme in schemes:
            t = time.perf_counter()
            try:
                ws = Workspace(model, calib, config.replace(scheme=scheme), progress=progress)
            except OnnxFp8Error as e:
                for f in formats:
                    for c in calibrations:
                        report.rows.append(SweepRow(scheme, f, c, error=_one_line(e)))
                continue
            workspaces.append(ws)
            if scheme == config.scheme:
                base_ws = ws
            report.timings[f"calibration_{scheme}"] = time.perf_counter() - t
            for f in formats:
                for c in calibrations:
                    t = time.perf_counter()
                    row = SweepRow(scheme, f, c)
                    try:
                        res = ws.realize(config.replace(scheme=scheme, format=f, calibration=c, weights_format=None,
                                                        activations_format=None))
                        _score(row, res, ev, criterion, progress)
                    except OnnxFp8Error as e:
                        row.error = _one_line(e)
                    row.seconds = time.perf_counter() - t
                    report.rows.append(row)
        if transforms and base_ws is not None:
            t = time.perf_counter()
            for f in formats:
                for name in transforms:
                    report.rows.append(_transform_row(base_ws, calib, ev, criterion, config, f, name, progress))
            report.timings["transforms"] = time.perf_counter() - t
        if base_ws is not None:
            t = time.perf_counter()
            if tune:
                res = run_tune(model, calib if transforms else None, None, criterion, config,
                               max_fallback=max_fallback, workspace=base_ws, evaluator=ev, progress=progress,
                               transforms=tuple(transforms))
                row = SweepRow(config.scheme, "tuned", res.config.calibration, tuned=True)
                row.metrics = res.tuning.steps[res.tuning.best_step].evaluation
                row.size_bytes = model_bytes(res.model)
                row.quantized_layers = res.tuning.quantized_layers
                row.fallback = len(res.tuning.fallback)
                row.met = res.met
                row.seconds = time.perf_counter() - t
                report.rows.append(row)
                report.tuning = res.tuning
                report.sensitivity = res.tuning.sensitivity
            report.timings["tuning"] = time.perf_counter() - t
            if report.sensitivity is None:
                t = time.perf_counter()
                fmts = [f for f in formats if f != "auto"] or list(ALL_FORMATS)
                report.sensitivity = analyse(base_ws, ev.subset(16), fmts, config, bar=progress)
                report.timings["sensitivity"] = time.perf_counter() - t
            report.histograms = _histograms(base_ws, report.sensitivity, histograms)
    finally:
        for ws in workspaces:
            ws.close()
    report.seconds = time.perf_counter() - start
    return report


def _score(row: SweepRow, res: Any, ev: Evaluator, criterion: Target, progress) -> None:
    """Fill ``row`` with the quantized result's metrics on the validation data, size, layers and verdict."""
    e = ev.evaluate(res.model, progress, f"sweep: {row.label}")
    row.metrics = e.metrics()
    row.size_bytes = model_bytes(res.model)
    row.quantized_layers = len(res.plan.quantized_nodes())
    row.met = criterion.met(e.value(criterion.metric))


TRANSFORM_ON = {"equalize": {"equalize": True, "bias_correction": False}, "smoothquant": {"smoothquant": "auto"},
                "bias_correction": {"bias_correction": True}}


def _transform_row(ws: Workspace, calib: Any, ev: Evaluator, criterion: Target, config: QuantConfig, fmt: str,
                   name: str, progress) -> SweepRow:
    """One format with one transform on: quantized with data (the transform measures it), scored like the others."""
    from onnxfp8.quantize import quantize

    t = time.perf_counter()
    row = SweepRow(config.scheme, fmt, config.calibration, transform=name)
    try:
        cfg = config.replace(format=fmt, weights_format=None, activations_format=None, transform_guard=False,
                             summary_samples=0, load_stats=None, save_stats=None, **TRANSFORM_ON[name])
        res = quantize(ws.prepared, calib, cfg)
        if not any(r.get("pass") == name and r.get("kind") != "left_alone" for r in res.plan.transforms):
            row.error = "n/a"
        else:
            _score(row, res, ev, criterion, progress)
    except OnnxFp8Error as e:
        row.error = _one_line(e)
    row.seconds = time.perf_counter() - t
    return row


def _histograms(ws: Workspace, sens, limit: int) -> Dict[str, Dict[str, Any]]:
    """The calibration histograms of the activations the ``limit`` most sensitive layers read."""
    stats = ws.stats()
    plan = ws.first.plan
    out: Dict[str, Dict[str, Any]] = {}
    for l in (sens.layers if sens is not None else []):
        for t in l.tensors:
            spec = plan.tensors.get(t)
            if spec is None or spec.role != "activation" or t in out or t not in stats.histograms:
                continue
            lo, hi = stats.minmax.get(t, (0.0, 0.0))
            out[t] = {"hist": stats.histograms[t], "amax": max(abs(lo), abs(hi)), "layer": l.node}
        if len(out) >= limit:
            break
    return dict(list(out.items())[:limit])


def _one_line(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text
