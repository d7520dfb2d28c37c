"""tune(): search quantization plans until a target holds on validation data.

Calibrate once (evaluate.Workspace), evaluate many plans (evaluate.Evaluator), judged on the validation data,
never on the calibration data. The search, in order, stopping at the first plan that meets the target:

1. **baseline**: the configuration as given;
2. **formats**: ``format auto`` (per tensor, the candidate with the best SQNR on the calibration histograms), and
   per-layer formats from the sensitivity analysis (verify/sensitivity.py: one shared pass measures every
   layer's own SQNR in every candidate format; each layer gets the format that wins it), the best of these kept;
3. **calibration**: the best plan so far with each other calibration method (mse, percentile, entropy...);
4. **transforms**: SmoothQuant (alpha per layer), cross-layer equalization (with bias correction) and bias
   correction alone (docs/transforms.md), each on top of the best plan so far; a transform rewrites the graph,
   so each is calibrated in a Workspace of its own (one more pass over the calibration data each; skipped
   when it changes nothing or with --load-stats only); unguarded: the validation data judges it;
5. **fallback**: the most sensitive layers (lowest own SQNR in their format) left in high precision, 1, 2, 4...
   of them up to ``max_fallback``, then the smallest count that meets the target between the last two tried;
   each is the best plan so far edited (QuantPlan.keep_fp32) and rebuilt by onnxfp8.apply_plan.

Every step but the transforms is a plan realised from the one set of statistics (no calibration data read
again) and one onnxruntime pass over the validation data. When no plan meets the target the best one found is returned with
``met = False``. The returned plan says for every quantized or fallen-back layer why (NodeDecision.reason,
QuantSpec.notes), and the report lists every step: what was tried and the metric it reached.

Fallback precision: FP32 (the layer's Q/DQ removed). FP16 fallback is not implemented (onnxruntime's CPU
provider lacks FP16 kernels for Conv/Gemm, so a FP16 island cannot be evaluated where the tuner runs).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from onnxfp8.config import AUTO_CANDIDATES, CALIBRATION_METHODS, QuantConfig
from onnxfp8.errors import ConfigError
from onnxfp8.plan import json_plain
from onnxfp8.tuning.evaluate import Evaluation, Evaluator, Target, Workspace
from onnxfp8.verify.sensitivity import SensitivityReport, analyse, layer_tensors, node_pattern

DEFAULT_MAX_FALLBACK = "10%"
# the transforms (passes/equalize.py, passes/smoothquant.py) tried as search steps, each with the value it is
# tried at, in this order, each on top of the best plan so far (docs/transforms.md)
TRANSFORM_KEYS = ("smoothquant", "equalize", "bias_correction")
TRANSFORM_VALUES = {"smoothquant": "auto", "equalize": True, "bias_correction": True}


def parse_max_fallback(value: Union[str, int, float, None], layers: int) -> int:
    """``N`` layers or ``P%`` of ``layers`` (rounded down, at least 0)."""
    if value is None:
        value = DEFAULT_MAX_FALLBACK
    text = str(value).strip()
    try:
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0 <= pct <= 100:
                raise ValueError
            return int(math.floor(layers * pct / 100 + 1e-9))
        n = float(text)
        if n < 0 or n != int(n):
            raise ValueError
        return int(n)
    except ValueError:
        raise ConfigError(f"--max-fallback: expected a layer count N >= 0 or a percentage P%, got '{value}'") from None


@dataclass
class Step:
    name: str  # baseline, formats, calibration, fallback
    tried: str  # what, in words
    metric: Optional[float]
    met: bool
    fallback: int
    evaluation: Dict[str, Any]
    seconds: float
    kept: bool = False  # the best plan so far after this step

    def to_dict(self) -> Dict[str, Any]:
        return json_plain({"step": self.name, "tried": self.tried, "metric": self.metric, "met": self.met,
                           "fallback": self.fallback, "kept": self.kept, "seconds": round(self.seconds, 3),
                           **self.evaluation})


@dataclass
class TuneReport:
    target: Target
    met: bool
    reached: Optional[float]
    steps: List[Step]
    best_step: int
    quantized_layers: int
    fallback: List[str]
    max_fallback: int
    config: Dict[str, Any]
    sensitivity: Optional[SensitivityReport] = None
    seconds: float = 0.0
    timings: Dict[str, float] = field(default_factory=dict)
    val_samples: int = 0

    @property
    def message(self) -> str:
        best = self.steps[self.best_step]
        if self.met:
            return (f"target {self.target.describe()} met: {self.target.fmt(self.reached)} on {self.val_samples} "
                    f"validation sample(s) ({best.tried}; {len(self.fallback)} of {self.quantized_layers} layer(s) "
                    f"in fallback)")
        return (f"target {self.target.describe()} ({self.target.flag}) not met within the fallback budget of "
                f"{self.max_fallback} layer(s): best reached {self.target.fmt(self.reached)} ({best.tried}); "
                f"wrote the best model found")

    def to_dict(self) -> Dict[str, Any]:
        return json_plain({"target": self.target.to_dict(), "met": self.met, "reached": self.reached,
                           "message": self.message, "best_step": self.best_step,
                           "quantized_layers": self.quantized_layers, "fallback": self.fallback,
                           "max_fallback": self.max_fallback, "val_samples": self.val_samples,
                           "seconds": round(self.seconds, 3),
                           "timings": {k: round(v, 3) for k, v in self.timings.items()},
                           "steps": [s.to_dict() for s in self.steps], "config": self.config,
                           "sensitivity": self.sensitivity.to_dict() if self.sensitivity else None})

    def summary(self) -> str:
        lines = [f"tuning to {self.target.describe()} on {self.val_samples} validation sample(s):"]
        for i, s in enumerate(self.steps):
            mark = "*" if i == self.best_step else " "
            lines.append(f" {mark} {i + 1:2d}. {s.name:11s} {s.tried}: {self.target.fmt(s.metric)}"
                         + (" (met)" if s.met else ""))
        lines.append(self.message)
        return "\n".join(lines)


@dataclass
class TuneResult:
    model: Any  # onnx.ModelProto
    plan: Any  # QuantPlan
    report: Any  # QuantReport of the chosen plan
    tuning: TuneReport
    config: QuantConfig
    output: Optional[str] = None

    @property
    def met(self) -> bool:
        return self.tuning.met


@dataclass
class _Candidate:
    config: QuantConfig
    result: Any
    evaluation: Evaluation
    fallback: Tuple[str, ...] = ()
    why: str = ""  # the step that made this plan
    per_layer: Dict[str, str] = field(default_factory=dict)  # node -> format, when formats come per layer
    workspace: Any = None  # the Workspace the plan belongs to, when not the search's (a transform step's)


def tune(model, calib: Any, val: Any, target: Target, config: Optional[QuantConfig] = None, *,
         labels: Any = None, max_fallback: Union[str, int, None] = None, output: Optional[str] = None,
         formats: Optional[Sequence[str]] = None, methods: Optional[Sequence[str]] = None,
         samples: Optional[int] = None, sensitivity_samples: Optional[int] = 16, max_memory_mb: float = 64,
         progress=None, workspace: Optional[Workspace] = None, evaluator: Optional[Evaluator] = None,
         outputs=None, transforms: Optional[Sequence[str]] = None) -> TuneResult:
    """Search plans for ``model`` until ``target`` holds on ``val``; see the module docstring. ``formats``:
    candidate formats (default config.formats); ``methods``: calibration methods tried (default every other
    one); ``samples``: at most this many validation samples; ``transforms``: the transform steps tried (default
    TRANSFORM_KEYS; ``()`` none). Writes the chosen model to ``output`` when given
    (``outputs``: an outputs.Outputs the caller commits, as quantize() takes; else written before returning)."""
    from onnxfp8.outputs import Outputs

    start = time.perf_counter()
    config = config or QuantConfig()
    if not isinstance(target, Target):
        raise ConfigError(f"target: expected a Target, got {type(target).__name__}")
    if config.dynamic:
        raise ConfigError("tuning searches calibrated plans; dynamic quantization has no calibration to tune")
    timings: Dict[str, float] = {}
    own_outs = outputs is None
    outs = Outputs() if own_outs else outputs
    source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
    outs.protect_model(source, "the input model")
    if isinstance(calib, (str, os.PathLike)):
        outs.protect(calib, "the calibration data")
    if isinstance(val, (str, os.PathLike)):
        outs.protect(val, "the validation data")
    outs.add(output, "the output model (-o)", model=True)
    outs.validate()  # before any work
    try:
        keys = TRANSFORM_KEYS if transforms is None else tuple(transforms)
        bad = [k for k in keys if k not in TRANSFORM_KEYS]
        if bad:
            raise ConfigError(f"transforms: unknown transform '{bad[0]}' (known: {', '.join(TRANSFORM_KEYS)})")
        result = _tune(model, calib, val, target, config, labels, max_fallback, formats, methods, samples,
                       sensitivity_samples, max_memory_mb, progress, workspace, evaluator, timings, keys)
        if output:
            outs.write_model(output, result.model)
            result.output = output
            result.report.output = output
        if own_outs:
            outs.commit()
    finally:
        if own_outs:
            outs.discard()
    result.tuning.seconds = time.perf_counter() - start
    return result


def _tune(model, calib, val, target, config, labels, max_fallback, formats, methods, samples, sensitivity_samples,
          max_memory_mb, progress, workspace, evaluator, timings, transforms=TRANSFORM_KEYS) -> TuneResult:
    own_ws = workspace is None
    extra: List[Workspace] = []  # the transform steps' workspaces
    t = time.perf_counter()
    ws = workspace or Workspace(model, calib, config, progress=progress)
    timings["calibration"] = time.perf_counter() - t
    try:
        t = time.perf_counter()
        ev = evaluator or Evaluator(model, val, labels, batch_size=config.batch_size, samples=samples,
                                    providers=config.providers, threads=config.threads)
        timings["fp32_validation"] = ev.fp32_seconds
        if target.metric == "accuracy_loss" and not ev.labelled:
            raise ConfigError(f"{target.flag} needs labels: pass --labels FILE (or a 'label' key in the validation "
                              f"files)")
        result = _search(ws, ev, target, config, max_fallback, formats, methods, max_memory_mb, progress, timings,
                         sensitivity_samples, calib=calib, extra_workspaces=extra, transforms=transforms)
    finally:
        for w in extra:
            w.close()
        if own_ws:
            ws.close()
    return result


def _search(ws: Workspace, ev: Evaluator, target: Target, config: QuantConfig, max_fallback, formats, methods,
            max_memory_mb: float, bar, timings: Dict[str, float], sensitivity_samples: Optional[int] = 16,
            calib: Any = None, extra_workspaces: Optional[List[Workspace]] = None,
            transforms: Sequence[str] = ()) -> TuneResult:
    extra_workspaces = extra_workspaces if extra_workspaces is not None else []
    steps: List[Step] = []
    best: Optional[_Candidate] = None
    best_index = 0

    def attempt(name: str, tried: str, cfg: QuantConfig, result=None, fallback=(), per_layer=None,
                workspace=None) -> _Candidate:
        nonlocal best, best_index
        t = time.perf_counter()
        result = result if result is not None else ws.realize(cfg)
        e = ev.evaluate(result.model, bar, f"tuning: {name}")
        cand = _Candidate(cfg, result, e, tuple(fallback), tried, dict(per_layer or {}), workspace)
        v = e.value(target.metric)
        step = Step(name, tried, v, target.met(v), len(fallback), e.metrics(), time.perf_counter() - t)
        steps.append(step)
        if best is None or e.key(target) > best.evaluation.key(target) or (
                target.met(v) and not target.met(best.evaluation.value(target.metric))):
            best, best_index = cand, len(steps) - 1
        return cand

    def done() -> bool:
        return best is not None and target.met(best.evaluation.value(target.metric))

    t = time.perf_counter()
    base = attempt("baseline", _describe(config), config, result=ws.first)
    plan0 = ws.first.plan
    quantized = [d.node for d in plan0.quantized_nodes()]
    budget = parse_max_fallback(max_fallback, len(quantized))
    sens: Optional[SensitivityReport] = None
    timings["baseline"] = time.perf_counter() - t
    cands = [f for f in (formats or config.formats) if f != "auto"]
    if config.target == "tensorrt":
        cands = [f for f in cands if f in ("e4m3", "int8")]
    if not done() and len(cands) > 1 and config.target != "tensorrt" and not (config.weights_auto and
                                                                               config.activations_auto):
        t = time.perf_counter()
        auto = config.replace(format="auto", weights_format=None, activations_format=None, formats=tuple(cands))
        attempt("formats", "format auto (per tensor, from the calibration histograms)", auto)
        timings["formats"] = time.perf_counter() - t
    if not done():
        t = time.perf_counter()
        sub = ev.subset(sensitivity_samples) if sensitivity_samples else ev
        sens = analyse(ws, sub, cands, config, top=0, max_memory_mb=max_memory_mb, bar=bar)
        timings["sensitivity"] = time.perf_counter() - t
    if not done() and len(cands) > 1:
        t = time.perf_counter()
        per_layer = {l.node: l.best_format for l in sens.layers if l.node in quantized}
        if set(per_layer.values()) - {sens.base_format}:
            cfg = _with_formats(config, plan0, per_layer, sens)
            attempt("formats", "per-layer formats from the sensitivity analysis ("
                    + ", ".join(f"{f} {k}" for f, k in _count(per_layer).items()) + ")", cfg, per_layer=per_layer)
        timings["formats"] = timings.get("formats", 0.0) + time.perf_counter() - t
    if not done():
        t = time.perf_counter()
        anchor = best
        label = anchor.why.split(" (")[0] if anchor.config is not config else _describe(config).split(", calib")[0]
        for m in (methods if methods is not None else CALIBRATION_METHODS):
            if m == anchor.config.calibration:
                continue
            attempt("calibration", f"{label}, calibration {m}", anchor.config.replace(calibration=m),
                    per_layer=anchor.per_layer)
            if done():
                break
        timings["calibration_methods"] = time.perf_counter() - t
    for key in transforms:  # each transform on top of the best plan so far; it rewrites the graph, so it
        if done() or calib is None or getattr(best.config, key, None):  # calibrates a Workspace of its own
            continue
        t = time.perf_counter()
        cand = _transform_step(key, best, ws, calib, bar, extra_workspaces)
        if cand is not None:
            cfg, tws, tried = cand
            attempt("transforms", tried, cfg, result=tws.first, per_layer=best.per_layer, workspace=tws)
        timings["transforms"] = timings.get("transforms", 0.0) + time.perf_counter() - t
    if not done() and budget > 0:
        t = time.perf_counter()
        anchor = best
        order = _fallback_order(sens, anchor, quantized)
        tried: Dict[int, _Candidate] = {}

        def fall(k: int) -> _Candidate:
            if k not in tried:
                nodes = tuple(order[:k])
                plan = anchor.result.plan.copy()
                for i, n in enumerate(nodes):
                    plan.keep_fp32(n, f"tuning: left in FP32 (fallback {i + 1} of {k})")
                home = anchor.workspace or ws
                tried[k] = attempt("fallback", f"{k} most sensitive layer(s) in FP32 ({', '.join(nodes)})",
                                   _without(anchor.config, nodes, anchor.result.plan), result=home.apply(plan),
                                   fallback=nodes, per_layer=anchor.per_layer, workspace=anchor.workspace)
            return tried[k]

        ks, k = [], 1
        while k < min(budget, len(order)):
            ks.append(k)
            k *= 2
        ks.append(min(budget, len(order)))
        lo = 0
        for k in ks:
            if target.met(fall(k).evaluation.value(target.metric)):
                hi = k
                while hi - lo > 1:  # the smallest count that meets the target
                    mid = (lo + hi) // 2
                    if target.met(fall(mid).evaluation.value(target.metric)):
                        hi = mid
                    else:
                        lo = mid
                best = tried[hi]
                best_index = next(i for i, s in enumerate(steps) if s.fallback == hi and s.name == "fallback")
                break
            lo = k
        timings["fallback"] = time.perf_counter() - t
    steps[best_index].kept = True
    met = target.met(best.evaluation.value(target.metric))
    _annotate(best, base, sens, target, quantized)
    report = TuneReport(target, met, best.evaluation.value(target.metric), steps, best_index, len(quantized),
                        list(best.fallback), budget, best.config.to_dict(), sens, timings=timings,
                        val_samples=ev.samples)
    best.result.report.plan = best.result.plan
    return TuneResult(best.result.model, best.result.plan, best.result.report, report, best.config)


def _transform_step(key: str, best: _Candidate, ws: Workspace, calib: Any, bar, extra: List[Workspace]):
    """The best plan's configuration with transform ``key`` on (unguarded: the tuner judges on the validation
    data), calibrated in a Workspace of its own; (config, workspace, what was tried), or None when the
    transform changes nothing or cannot apply to this configuration."""
    from onnxfp8.errors import OnnxFp8Error

    value = TRANSFORM_VALUES[key]
    cfg = best.config.replace(**{key: value}, transform_guard=False, load_stats=None, save_stats=None)
    try:
        tws = Workspace(ws.prepared, calib, cfg, progress=bar)
    except OnnxFp8Error:  # e.g. per-tensor overrides naming a tensor the transform renamed: the step is skipped
        return None
    extra.append(tws)
    if not any(r.get("pass") == key and r.get("kind") != "left_alone" for r in tws.first.plan.transforms):
        return None
    label = best.why.split(" (")[0] if best.why else _describe(best.config)
    shown = f"{key} {value}" if not isinstance(value, bool) else key
    return cfg, tws, f"{label} + {shown}"


def _describe(cfg: QuantConfig) -> str:
    w, a = cfg.weights_format or cfg.format, cfg.activations_format or cfg.format
    f = w if w == a else f"weights {w}, activations {a}"
    return f"format {f}, calibration {cfg.calibration}"


def _count(per_layer: Dict[str, str]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for f in per_layer.values():
        out[f] = out.get(f, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _with_formats(config: QuantConfig, plan, per_layer: Dict[str, str], sens: SensitivityReport) -> QuantConfig:
    """``config`` with a format override per tensor from the per-layer choice: a weight takes its layer's
    format; an activation read by several layers the format of its most sensitive reader."""
    rank = {l.node: l.rank for l in sens.layers}
    overrides = {k: dict(v) for k, v in config.overrides.items()}
    for spec in plan.tensors.values():
        readers = [c for c in spec.consumers if c in per_layer]
        if not readers or "format" in overrides.get(spec.tensor, {}):
            continue
        node = min(readers, key=lambda c: rank.get(c, 1 << 30))
        overrides.setdefault(spec.tensor, {})["format"] = per_layer[node]
    return config.replace(overrides=overrides)


def _fallback_order(sens: Optional[SensitivityReport], cand: _Candidate, quantized: List[str]) -> List[str]:
    """Quantized layers, most sensitive first: lowest own SQNR in the format the candidate gives each layer."""
    if sens is None:
        return list(quantized)
    q = set(quantized)
    fmt_of: Dict[str, str] = {}
    for spec in cand.result.plan.tensors.values():
        for c in spec.consumers:
            if spec.role == "weight" or c not in fmt_of:
                fmt_of[c] = spec.format
    scored = []
    for l in sens.layers:
        if l.node not in q:
            continue
        v = l.own.get(fmt_of.get(l.node, l.base_format), l.own_db)
        scored.append((v if not math.isnan(v) else math.inf, l.rank, l.node))
    ranked = [n for _, _, n in sorted(scored)]
    return ranked + [n for n in quantized if n not in set(ranked)]


def _without(config: QuantConfig, nodes: Sequence[str], plan) -> QuantConfig:
    """``config`` with ``nodes`` left in high precision, dropping overrides of tensors no quantized node reads."""
    gone = set(nodes)
    keep = {s.tensor for s in plan.tensors.values() if any(c not in gone for c in s.consumers)}
    overrides = {k: v for k, v in config.overrides.items() if k in keep or k not in plan.tensors}
    return config.replace(exclude_nodes=tuple(config.exclude_nodes) + tuple(node_pattern(n) for n in nodes),
                          overrides=overrides)


def _annotate(best: _Candidate, base: _Candidate, sens: Optional[SensitivityReport], target: Target,
              quantized: List[str]) -> None:
    """Say in the plan, for every layer, why it has its format or fell back."""
    plan = best.result.plan
    by_node = {l.node: l for l in sens.layers} if sens else {}
    reached = target.fmt(best.evaluation.value(target.metric))
    before = target.fmt(base.evaluation.value(target.metric))
    for i, node in enumerate(best.fallback):
        d = plan.nodes.get(node)
        if d is None:
            continue
        l = by_node.get(node)
        own = f"own SQNR {l.own_db:.1f} dB in {l.base_format}, rank {l.rank} of {len(by_node)}" if l else "sensitive"
        d.reason = (f"tuning: left in FP32 (fallback {i + 1} of {len(best.fallback)}; {own}); the target "
                    f"{target.describe()} needed it: {before} with every layer quantized, {reached} with the fallback")
    for d in plan.quantized_nodes():
        l = by_node.get(d.node)
        fmts = sorted({s.format for s in plan.tensors.values() if d.node in s.consumers})
        f = "/".join(fmts)
        if best.per_layer.get(d.node) and l is not None:
            why = (f"tuning: {f}, the format that wins this layer in the sensitivity analysis (own SQNR "
                   + ", ".join(f"{k} {v:.1f}" for k, v in l.own.items()) + " dB)")
        elif "per tensor, from the calibration" in best.why:
            why = f"tuning: {f} chosen per tensor by format auto (the plan's candidates say by how much)"
        else:
            why = f"tuning: {f} ({best.why.split(', calibration')[0] if best.why else 'the configured format'})"
        if l is not None and not best.per_layer:
            why += f"; own SQNR {l.own_db:.1f} dB in {l.base_format}"
        d.reason = f"{d.reason}; {why}"
    for spec in plan.tensors.values():
        spec.notes.append(f"tuning: kept in the plan that {'met' if target.met(best.evaluation.value(target.metric)) else 'came closest to'} "
                          f"{target.describe()} ({best.why})")
