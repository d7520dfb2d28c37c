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
   when it changes nothing or with --load-stats only); unguarded: the validation data judges it; its plan
   replays the transform, so it is rebuilt (and edited by the fallback) like any other;
5. **fallback**: the most sensitive layers (lowest own SQNR in their format) left in high precision, 1, 2, 4...
   of them up to ``max_fallback``, then the smallest count that meets the target between the last two tried;
   each is the best plan so far edited (QuantPlan.keep_fp32) and rebuilt by onnxfp8.apply_plan.

A candidate whose graph is the same as one scored already (tune._graph_digest: per-layer formats that repeat
format auto's choices, say) takes that one's scores without another onnxruntime pass; a transform the best plan
has already (bias correction comes with equalize) is not tried again.

Every step is a plan realised from the one set of statistics (no calibration data read again) and one
onnxruntime pass over the validation data. When no plan meets the target the best one found is returned with
``met = False``. The returned plan says for every quantized or fallen-back layer why (NodeDecision.reason,
QuantSpec.notes), and the report lists every step: what was tried and the metric it reached.

Candidate formats (``formats``, default ``config.formats``: ``--formats`` on the command line): by default
config.AUTO_CANDIDATES, E4M3, E5M2 and INT8, the formats a runtime executes (onnxruntime runs their Q/DQ, TensorRT
E4M3 and INT8), because the tuned model is meant to be deployed. E3M4 has no ONNX type and no runtime executes it:
a model with E3M4 tensors computes their numerics in float ops (passes/emulate.py), which measures what an E3M4
kernel would compute but runs slower than FP32. It is a candidate only when named (``--formats
e4m3,e5m2,e3m4,int8``); the report then lists it among the candidates, says how many tensors of the chosen plan are
in it, and every layer in it says in the plan that it is emulate-only.

Fallback precision (``fallback_precision``): "auto" (default) runs a fallen-back layer as an FP16 island
(passes/fp16_fallback.py) when it is FP16-safe on the calibration data (tuning/fp16.py: ranges of its inputs
and output within FP16's with headroom, finite, weights that round to FP16 cleanly; one max pass of the FP32
model over the calibration data, made only when the search reaches the fallback step), else in FP32; "fp32"
forces FP32 for every fallen-back layer. The plan records each layer's precision (NodeDecision.fallback) and
the reason (the FP16 verdict). When the FP16 islands miss the target at the full budget, the same layers in
FP32 are tried once.
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
FALLBACK_PRECISIONS = ("auto", "fp32")
AUTO_COLUMN = "auto"  # the sensitivity column of format auto's per-tensor choice
# fallback ranking: this many layers (lowest own SQNR first) are scored alone in high precision
RANK_POOL_MIN, RANK_POOL_FACTOR, RANK_POOL_MAX = 6, 2, 16
# MB of tensors the sensitivity pass exposes per onnxruntime run: a chunk of layers costs one FP32 run over the
# samples, so a small budget multiplies them (zoo-sized ResNet-50 at 224 px: 506 s = 5x the FP32 floor at 64 MB)
SENSITIVITY_MEMORY_MB = 1024
SCREEN_SAMPLES = 16  # candidates are scored on this many validation samples first ...
SCREEN_MARGIN_DB = 1.0  # ... and on the whole set only when within this of an SQNR target
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
    samples: int = 0  # validation samples the metric is on (the screening subset, or all)
    screened: Optional[float] = None  # the metric on the screening subset (when screening)

    def to_dict(self) -> Dict[str, Any]:
        return json_plain({"step": self.name, "tried": self.tried, "metric": self.metric, "met": self.met,
                           "fallback": self.fallback, "kept": self.kept, "seconds": round(self.seconds, 3),
                           "samples": self.samples, "screened": self.screened,
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
    fallback_precision: Dict[str, str] = field(default_factory=dict)  # fallen-back node -> fp16 / fp32
    fp16: Dict[str, Any] = field(default_factory=dict)  # node -> FP16Verdict of the layers judged
    seconds: float = 0.0
    timings: Dict[str, float] = field(default_factory=dict)
    val_samples: int = 0
    candidates: List[str] = field(default_factory=list)  # the candidate formats searched
    emulated: Dict[str, int] = field(default_factory=dict)  # emulate-only format -> tensors of the chosen plan in it

    def _emulation(self) -> str:
        """What the candidates and the chosen plan say about emulate-only formats (E3M4: no runtime executes it)."""
        from onnxfp8.formats import get_format

        opted = [f for f in self.candidates if get_format(f).emulated]
        if not opted:
            if self.met or not self.candidates:
                return ""
            return ("; E3M4 was not searched (emulate-only, no runtime executes it): --formats "
                    f"{','.join(self.candidates + ['e3m4'])} adds it")
        used = ", ".join(f"{n} tensor(s) in {f.upper()}" for f, n in self.emulated.items() if n)
        names = "/".join(f.upper() for f in opted)
        if used:
            return (f"; {used}: emulate-only (no ONNX type, no runtime executes it as 8-bit kernels; "
                    f"the model computes its numerics in float ops), opted in with --formats")
        return f"; {names} among the candidates (emulate-only, opted in with --formats) but not chosen"

    @property
    def message(self) -> str:
        best = self.steps[self.best_step]
        if self.met:
            return (f"target {self.target.describe()} met: {self.target.fmt(self.reached)} on {self.val_samples} "
                    f"validation sample(s) ({best.tried}; {len(self.fallback)} of {self.quantized_layers} layer(s) "
                    f"in fallback{self._precisions()}){self._emulation()}")
        return (f"target {self.target.describe()} ({self.target.flag}) not met within the fallback budget of "
                f"{self.max_fallback} layer(s): best reached {self.target.fmt(self.reached)} ({best.tried}); "
                f"wrote the best model found{self._emulation()}")

    def _precisions(self) -> str:
        n16 = sum(1 for p in self.fallback_precision.values() if p == "fp16")
        if not self.fallback:
            return ""
        return f": {n16} in FP16, {len(self.fallback) - n16} in FP32"

    def to_dict(self) -> Dict[str, Any]:
        return json_plain({"target": self.target.to_dict(), "met": self.met, "reached": self.reached,
                           "message": self.message, "best_step": self.best_step,
                           "quantized_layers": self.quantized_layers, "fallback": self.fallback,
                           "max_fallback": self.max_fallback, "val_samples": self.val_samples,
                           "candidates": self.candidates, "emulated": self.emulated,
                           "fallback_precision": self.fallback_precision,
                           "fp16": {k: v.to_dict() for k, v in self.fp16.items()},
                           "seconds": round(self.seconds, 3),
                           "timings": {k: round(v, 3) for k, v in self.timings.items()},
                           "steps": [s.to_dict() for s in self.steps], "config": self.config,
                           "sensitivity": self.sensitivity.to_dict() if self.sensitivity else None})

    def summary(self) -> str:
        lines = [f"tuning to {self.target.describe()} on {self.val_samples} validation sample(s)"
                 + (f", candidate formats {','.join(self.candidates)}" if self.candidates else "") + ":"]
        for i, s in enumerate(self.steps):
            mark = "*" if i == self.best_step else " "
            lines.append(f" {mark} {i + 1:2d}. {s.name:11s} {s.tried}: {self.target.fmt(s.metric)}"
                         + (" (met)" if s.met else "")
                         + (f" (screened on {s.samples} samples)" if s.samples and s.samples < self.val_samples else ""))
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
    precision: Dict[str, str] = field(default_factory=dict)  # fallen-back node -> fp16 / fp32
    why: str = ""  # the step that made this plan
    per_layer: Dict[str, str] = field(default_factory=dict)  # node -> format, when formats come per layer
    column: Optional[str] = None  # the sensitivity column of its layers when not per layer (AUTO_COLUMN: format auto)
    screened: Optional[Evaluation] = None  # on the screening subset (every candidate, when screening)
    full: bool = True  # ``evaluation`` is on the whole validation set
    step: int = 0


@dataclass
class _Lazy:
    """A candidate's result without its model (memory: one model kept, the best); ``plan`` rebuilds it."""

    plan: Any
    model: Any = None


def _screen(ev: Evaluator, target: Target, samples: Optional[int]) -> Optional[Evaluator]:
    """The screening evaluator: the first ``samples`` validation samples, when the set is at least twice that
    and the metric is not an accuracy (one sample moves it in steps too coarse to screen on)."""
    if not samples or target.metric == "accuracy_loss" or ev.samples < 2 * samples:
        return None
    sub = ev.subset(samples)
    return sub if sub.samples < ev.samples else None


def _promising(target: Target, v: Optional[float], offset: float = 0.0) -> bool:
    """Whether a screening figure, less ``offset`` (how much the screening samples overstated the whole set so
    far), leaves the target within reach on the whole set (cosine: within a quarter of the gap to 1; SQNR: within
    1 dB)."""
    if v is None or math.isnan(v):
        return False
    v = v - offset
    if target.metric == "cosine":
        return v >= target.value - max(0.25 * (1.0 - target.value), 1e-4)
    return v >= target.value - SCREEN_MARGIN_DB


# the calibration methods in the order tried: the least clipping first (entropy, the most clipping and the
# slowest to realise from histograms, only after a clipping method helped)
_METHOD_ORDER = tuple(m for m in ("max", "mse", "percentile", "entropy") if m in CALIBRATION_METHODS) + tuple(
    m for m in CALIBRATION_METHODS if m not in ("max", "mse", "percentile", "entropy"))


def _improved(anchor: "_Candidate", best: "_Candidate") -> bool:
    return best is not anchor and best.config.calibration != anchor.config.calibration


def tune(model, calib: Any, val: Any, target: Target, config: Optional[QuantConfig] = None, *,
         labels: Any = None, max_fallback: Union[str, int, None] = None, output: Optional[str] = None,
         formats: Optional[Sequence[str]] = None, methods: Optional[Sequence[str]] = None,
         samples: Optional[int] = None, sensitivity_samples: Optional[int] = 16, max_memory_mb: float = SENSITIVITY_MEMORY_MB,
         progress=None, workspace: Optional[Workspace] = None, evaluator: Optional[Evaluator] = None,
         outputs=None, fallback_precision: str = "auto", screen_samples: Optional[int] = SCREEN_SAMPLES,
         transforms: Optional[Sequence[str]] = None) -> TuneResult:
    """Search plans for ``model`` until ``target`` holds on ``val``; see the module docstring. ``formats``:
    candidate formats (default config.formats); ``methods``: calibration methods tried (default every other
    one); ``samples``: at most this many validation samples; ``fallback_precision``: "auto" (FP16 where the layer
    is FP16-safe, else FP32) or "fp32"; ``screen_samples``: candidates are scored on this many validation samples
    first and on the whole set only when the target is within reach (None / 0: every candidate on the whole set);
    ``transforms``: the transform steps tried (default TRANSFORM_KEYS; ``()`` none). Writes the chosen model to ``output`` when given
    (``outputs``: an outputs.Outputs the caller commits, as quantize() takes; else written before returning)."""
    from onnxfp8.outputs import Outputs

    start = time.perf_counter()
    config = config or QuantConfig()
    if not isinstance(target, Target):
        raise ConfigError(f"target: expected a Target, got {type(target).__name__}")
    if config.dynamic:
        raise ConfigError("tuning searches calibrated plans; dynamic quantization has no calibration to tune")
    if fallback_precision not in FALLBACK_PRECISIONS:
        raise ConfigError(f"--fallback-precision: expected one of {', '.join(FALLBACK_PRECISIONS)}, got "
                          f"'{fallback_precision}'")
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
                       sensitivity_samples, max_memory_mb, progress, workspace, evaluator, timings,
                       fallback_precision, screen_samples, keys)
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
          max_memory_mb, progress, workspace, evaluator, timings, fallback_precision="auto",
          screen_samples=SCREEN_SAMPLES, transforms=TRANSFORM_KEYS) -> TuneResult:
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
                         sensitivity_samples, fallback_precision, screen_samples, calib=calib,
                         extra_workspaces=extra, transforms=transforms)
    finally:
        for w in extra:
            w.close()
        if own_ws:
            ws.close()
    return result


def _search(ws: Workspace, ev: Evaluator, target: Target, config: QuantConfig, max_fallback, formats, methods,
            max_memory_mb: float, bar, timings: Dict[str, float], sensitivity_samples: Optional[int] = 16,
            fallback_precision: str = "auto", screen_samples: Optional[int] = SCREEN_SAMPLES, calib: Any = None,
            extra_workspaces: Optional[List[Workspace]] = None, transforms: Sequence[str] = ()) -> TuneResult:
    extra_workspaces = extra_workspaces if extra_workspaces is not None else []
    steps: List[Step] = []
    best: Optional[_Candidate] = None
    best_index = 0

    screen = _screen(ev, target, screen_samples)
    counts = {"screen": 0, "full": 0}
    every: List[_Candidate] = []
    pairs: List[Tuple[float, float]] = []  # (screening, whole-set) metric of the candidates scored on both
    seen: Dict[bytes, _Candidate] = {}  # graph digest -> the first candidate scored with that graph

    def offset() -> float:
        """How much the screening samples overstate the whole set, from the candidates scored on both (0 before
        any; never negative: a screening set that understates keeps the plain margin)."""
        d = [a - b for a, b in pairs if math.isfinite(a) and math.isfinite(b)]
        return max(0.0, sum(d) / len(d)) if d else 0.0

    def met(c: Optional[_Candidate]) -> bool:
        return c is not None and c.full and target.met(c.evaluation.value(target.metric))

    def better(c: _Candidate, b: Optional[_Candidate]) -> bool:
        if b is None or (met(c) and not met(b)):
            return True
        if met(b) and not met(c):
            return False
        if met(c) and met(b) or screen is None or (c.full and b.full):  # whole-set figures where both have them
            return c.evaluation.key(target) > b.evaluation.key(target)
        return c.screened.key(target) > b.screened.key(target)  # the same samples for every candidate

    def attempt(name: str, tried: str, cfg: QuantConfig, result=None, fallback=(), per_layer=None,
                precision=None, column: Optional[str] = None) -> _Candidate:
        nonlocal best, best_index
        t = time.perf_counter()
        result = result if result is not None else ws.realize(cfg)
        digest = _graph_digest(result.model)
        twin = seen.get(digest) if digest is not None else None
        if twin is not None:  # the same graph as a candidate scored already (e.g. per-layer formats that are
            es, e, full = twin.screened, twin.evaluation, twin.full  # format auto's choices): its scores hold
            tried = f"{tried} (the same model as step {twin.step + 1}: its scores reused)"
        else:
            es = None
            if screen is not None:  # a quarter of the cost: the whole validation set only for a plan that may meet
                es = screen.evaluate(result.model, bar, f"tuning: {name} (screening)")
                counts["screen"] += 1
            full = es is None or _promising(target, es.value(target.metric), offset())
            e = ev.evaluate(result.model, bar, f"tuning: {name}") if full else es
            counts["full"] += int(full)
            if full and es is not None:
                pairs.append((es.value(target.metric), e.value(target.metric)))
        cand = _Candidate(cfg, result, e, tuple(fallback), dict(precision or {}), tried, dict(per_layer or {}),
                          screened=es, full=full, column=column)
        v = e.value(target.metric)
        step = Step(name, tried, v, full and target.met(v), len(fallback), e.metrics(), time.perf_counter() - t,
                    samples=e.samples, screened=es.value(target.metric) if es is not None else None)
        steps.append(step)
        cand.step = len(steps) - 1
        every.append(cand)
        if digest is not None and twin is None:
            seen[digest] = cand
        if better(cand, best):
            if best is not None:
                best.result = _Lazy(best.result.plan)  # only the best plan keeps its model in memory
            best, best_index = cand, len(steps) - 1
        else:
            cand.result = _Lazy(cand.result.plan)
        return cand

    def done() -> bool:
        return met(best)

    t = time.perf_counter()
    base = attempt("baseline", _describe(config), config, result=ws.first)
    plan0 = ws.first.plan
    quantized = [d.node for d in plan0.quantized_nodes()]
    budget = parse_max_fallback(max_fallback, len(quantized))
    sens: Optional[SensitivityReport] = None
    verdicts: Dict[str, Any] = {}
    timings["baseline"] = time.perf_counter() - t
    cands = [f for f in (formats or config.formats) if f != "auto"]
    try:
        from onnxfp8.formats import get_format

        cands = list(dict.fromkeys(get_format(f).name for f in cands))
    except (ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"formats: {e}") from None
    if config.target == "tensorrt":
        cands = [f for f in cands if f in ("e4m3", "int8")]
    if not done() and len(cands) > 1 and config.target != "tensorrt" and not (config.weights_auto and
                                                                               config.activations_auto):
        t = time.perf_counter()
        auto = config.replace(format="auto", weights_format=None, activations_format=None, formats=tuple(cands))
        auto_made = ws.realize(auto)
        attempt("formats", "format auto (per tensor, from the calibration histograms)", auto, result=auto_made,
                column=AUTO_COLUMN)
        timings["formats"] = time.perf_counter() - t
    else:
        auto = auto_made = None
    if not done():
        t = time.perf_counter()
        sub = ev.subset(sensitivity_samples) if sensitivity_samples else ev
        made = {}  # the realisations made already serve their columns (no second graph build)
        if config.format != "auto" and not config.weights_format and not config.activations_format:
            made[config.format] = ws.first
        columns = list(cands)
        if auto_made is not None:  # format auto's per-tensor choice is a column of its own: layer by layer,
            made[AUTO_COLUMN] = auto_made  # the sensitivity then says where it beats one format and where not
            columns.append(AUTO_COLUMN)
        sens = analyse(ws, sub, columns, config, top=0, max_memory_mb=max_memory_mb, bar=bar, results=made)
        auto_made = made = None  # the models go; the plans stay in the candidates
        timings["sensitivity"] = time.perf_counter() - t
    if not done() and len(cands) > 1:
        t = time.perf_counter()
        per_layer = {l.node: l.best_format for l in sens.layers if l.node in quantized}
        if set(per_layer.values()) - {sens.base_format}:
            use_auto = AUTO_COLUMN in per_layer.values()
            cfg = _with_formats(auto if use_auto else config, plan0, per_layer, sens)
            attempt("formats", "per-layer formats from the sensitivity analysis ("
                    + ", ".join(f"{f} {k}" for f, k in _count(per_layer).items()) + ")", cfg, per_layer=per_layer)
        timings["formats"] = timings.get("formats", 0.0) + time.perf_counter() - t
    if not done():
        t = time.perf_counter()
        anchor = best
        label = anchor.why.split(" (")[0] if anchor.config is not config else _describe(config).split(", calib")[0]
        given = methods is not None
        todo = [m for m in (methods if given else _METHOD_ORDER) if m != anchor.config.calibration]
        for m in todo:
            if not given and m == "entropy" and not _improved(anchor, best):
                # the most clipping method, and the slowest to realise: tried only when a clipping method
                # (mse, percentile) did better than the anchor's ranges
                steps.append(Step("calibration", f"{label}, calibration entropy: skipped (neither mse nor "
                                  f"percentile improved on {anchor.config.calibration})", None, False, 0, {}, 0.0))
                continue
            attempt("calibration", f"{label}, calibration {m}", anchor.config.replace(calibration=m),
                    per_layer=anchor.per_layer, column=anchor.column)
            if done():
                break
        timings["calibration_methods"] = time.perf_counter() - t
    from onnxfp8.passes import requested_transforms

    for key in transforms:  # each transform on top of the best plan so far; it rewrites the graph, so it
        # calibrates a Workspace of its own: skipped when the best plan has it already (bias correction comes
        # with equalize: a second calibration for the same model cost ResNet-50 at 224 px ~190 s under load)
        if done() or calib is None or key in requested_transforms(best.config):
            continue
        t = time.perf_counter()
        step = _transform_step(key, best, ws, calib, bar, extra_workspaces)
        if step is not None:  # its plan replays the transform (apply_plan), so ws.apply rebuilds it like any other
            cfg, tws, tried = step
            attempt("transforms", tried, cfg, result=tws.first, per_layer=best.per_layer)
        timings["transforms"] = timings.get("transforms", 0.0) + time.perf_counter() - t
    if not done() and budget > 0:
        t = time.perf_counter()
        anchor = best
        order = _fallback_order(sens, anchor, quantized)
        tried: Dict[int, _Candidate] = {}
        pool = order[:min(len(order), max(RANK_POOL_MIN, RANK_POOL_FACTOR * budget), RANK_POOL_MAX)]
        t16 = time.perf_counter()
        verdicts = _fp16_verdicts(ws, pool, fallback_precision, bar)
        timings["fp16_safety"] = time.perf_counter() - t16
        precision = {n: ("fp16" if v.safe else "fp32") for n, v in verdicts.items()}

        def realise(nodes: Tuple[str, ...], prec: Dict[str, str], name: str = "fallback", extra: str = ""):
            plan = anchor.result.plan.copy()
            k = len(nodes)
            for i, n in enumerate(nodes):
                plan.fall_back(n, prec[n], f"tuning: left in {prec[n].upper()} (fallback {i + 1} of {k})")
            return attempt(name, f"{k} most sensitive layer(s) in {_precision_words(nodes, prec)}{extra} "
                                 f"({', '.join(nodes)})",
                           _without(anchor.config, nodes, anchor.result.plan), result=ws.apply(plan),
                           fallback=nodes, per_layer=anchor.per_layer, precision={n: prec[n] for n in nodes},
                           column=anchor.column)

        def fall(k: int) -> _Candidate:
            if k not in tried:
                tried[k] = realise(tuple(order[:k]), precision)
            return tried[k]

        # ranking by what a fallback buys at the output: the own SQNR ranks the pool, then each of its layers
        # alone in high precision is scored (on the screening subset) and the pool is ordered by that
        tr = time.perf_counter()
        alone: Dict[str, _Candidate] = {}
        if budget > 0 and len(pool) > 1:
            for n in pool:
                alone[n] = realise((n,), precision, extra=" alone (ranking the fallback by output gain)")
                if done():
                    break
            gain = {n: (c.screened or c.evaluation).key(target) for n, c in alone.items()}
            order = sorted(alone, key=lambda n: gain[n], reverse=True) + [n for n in order if n not in alone]
            tried[1] = alone[order[0]]
        timings["fallback_ranking"] = time.perf_counter() - tr

        ks, k = [], 1
        while k < min(budget, len(order)):
            ks.append(k)
            k *= 2
        ks.append(min(budget, len(order)))
        lo = 0
        for k in ks if not done() else []:
            if met(fall(k)):
                hi = k
                while hi - lo > 1:  # the smallest count that meets the target
                    mid = (lo + hi) // 2
                    if met(fall(mid)):
                        hi = mid
                    else:
                        lo = mid
                if tried[hi] is not best:
                    if not isinstance(best.result, _Lazy):
                        best.result = _Lazy(best.result.plan)
                    best, best_index = tried[hi], tried[hi].step
                break
            lo = k
        if not done() and best.fallback and any(p == "fp16" for p in best.precision.values()):
            # the FP16 islands' own rounding may be what is missing: the same layers once in FP32
            realise(best.fallback, {n: "fp32" for n in best.fallback}, extra=" (FP16 islands missed the target)")
        timings["fallback"] = time.perf_counter() - t
    if isinstance(best.result, _Lazy):  # rebuilt from its plan (byte for byte the model it was scored as)
        best.result = ws.apply(best.result.plan)
    if not best.full:  # the reported figure is always on the whole validation set
        t = time.perf_counter()
        e = ev.evaluate(best.result.model, bar, "tuning: the best plan on the whole validation set")
        counts["full"] += 1
        best.evaluation, best.full = e, True
        st = steps[best_index]
        st.metric, st.met, st.evaluation, st.samples = (e.value(target.metric), target.met(e.value(target.metric)),
                                                        e.metrics(), e.samples)
        st.seconds += time.perf_counter() - t
    if not met(best):  # not met: the best whole-set figure of every candidate scored on the whole set
        top = max((c for c in every if c.full), key=lambda c: c.evaluation.key(target))
        if top is not best:
            best, best_index = top, top.step
            if isinstance(best.result, _Lazy):
                best.result = ws.apply(best.result.plan)
    steps[best_index].kept = True
    met = target.met(best.evaluation.value(target.metric))
    timings["evaluations_screening"] = float(counts["screen"])
    timings["evaluations_full"] = float(counts["full"])
    _annotate(best, base, sens, target, quantized, verdicts)
    report = TuneReport(target, met, best.evaluation.value(target.metric), steps, best_index, len(quantized),
                        list(best.fallback), budget, best.config.to_dict(), sens, timings=timings,
                        val_samples=ev.samples, fallback_precision=dict(best.precision), fp16=verdicts,
                        candidates=list(cands), emulated=_emulated_tensors(best.result.plan))
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


def _graph_digest(model) -> Optional[bytes]:
    """A digest of the model's graph (nodes, initializers, inputs, outputs): two candidates with the same digest
    compute the same function (same prepared model, same opsets), so the second is not scored again. Hashed
    piece by piece (no 2 GB protobuf limit); None when a piece cannot be serialised."""
    import hashlib

    h = hashlib.sha1()
    try:
        g = model.graph
        for part in (g.input, g.output, g.initializer, g.node, g.sparse_initializer):
            for item in part:
                h.update(item.SerializeToString())
            h.update(b"|")
        for o in model.opset_import:
            h.update(o.SerializeToString())
    except Exception:  # noqa: BLE001 - an unserialisable piece: no deduplication, every candidate scored
        return None
    return h.digest()


def _is_emulated(name: str) -> bool:
    from onnxfp8.formats import get_format

    try:
        return get_format(name).emulated
    except ValueError:
        return False


def _emulated_tensors(plan) -> Dict[str, int]:
    """Emulate-only format (E3M4) -> how many of the plan's tensors are in it."""
    out: Dict[str, int] = {}
    for spec in plan.tensors.values():
        if spec.format and _is_emulated(spec.format):
            out[spec.format] = out.get(spec.format, 0) + 1
    return out


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
        if per_layer[node] == AUTO_COLUMN:  # format auto's own choice for this tensor (``config`` is auto)
            continue
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
        col = cand.per_layer.get(l.node) or cand.column or fmt_of.get(l.node, l.base_format)
        v = l.own.get(col, l.own.get(fmt_of.get(l.node, l.base_format), l.own_db))
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


def _precision_words(nodes: Sequence[str], prec: Dict[str, str]) -> str:
    n16 = sum(1 for n in nodes if prec.get(n) == "fp16")
    if n16 == len(nodes):
        return "FP16"
    if n16 == 0:
        return "FP32"
    return f"high precision ({n16} FP16, {len(nodes) - n16} FP32)"


def _fp16_verdicts(ws: Workspace, nodes: Sequence[str], fallback_precision: str, bar) -> Dict[str, Any]:
    """node -> FP16Verdict for the fallback candidates (tuning/fp16.py); every one FP32 when forced or when
    there is no calibration data to judge FP16-safety on."""
    from onnxfp8.tuning.fp16 import FP16Verdict, workspace_safety

    if not nodes:
        return {}
    if fallback_precision == "fp32":
        return {n: FP16Verdict(n, False, "FP32 fallback forced (--fallback-precision fp32)") for n in nodes}
    if ws.calib is None:
        return {n: FP16Verdict(n, False, "no calibration data to judge FP16-safety on (statistics loaded)")
                for n in nodes}
    if bar is not None and hasattr(bar, "begin"):
        from onnxfp8.progress import count_samples

        bar.begin("tuning: FP16 ranges", count_samples(ws.calib))
    try:
        return workspace_safety(ws, nodes, progress=bar)
    finally:
        if bar is not None and hasattr(bar, "close"):
            bar.close()


def _annotate(best: _Candidate, base: _Candidate, sens: Optional[SensitivityReport], target: Target,
              quantized: List[str], verdicts: Optional[Dict[str, Any]] = None) -> None:
    """Say in the plan, for every layer, why it has its format or fell back."""
    plan = best.result.plan
    by_node = {l.node: l for l in sens.layers} if sens else {}
    reached = target.fmt(best.evaluation.value(target.metric))
    before = target.fmt(base.evaluation.value(target.metric)) + ("" if base.full else
                                                                  f" (on {base.evaluation.samples} samples)")
    for i, node in enumerate(best.fallback):
        d = plan.nodes.get(node)
        if d is None:
            continue
        l = by_node.get(node)
        own = f"own SQNR {l.own_db:.1f} dB in {l.base_format}, rank {l.rank} of {len(by_node)}" if l else "sensitive"
        p = best.precision.get(node, "fp32")
        v = (verdicts or {}).get(node)
        d.reason = (f"tuning: left in {p.upper()} (fallback {i + 1} of {len(best.fallback)}; {own}); the target "
                    f"{target.describe()} needed it: {before} with every layer quantized, {reached} with the fallback"
                    + (f"; {v.reason}" if v is not None else ""))
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
        emulated = [x for x in fmts if _is_emulated(x)]
        if emulated:
            why += (f"; {'/'.join(x.upper() for x in emulated)} is emulate-only (no ONNX type, no runtime executes "
                    f"it as 8-bit kernels), a candidate only because --formats named it")
        d.reason = f"{d.reason}; {why}"
    for spec in plan.tensors.values():
        spec.notes.append(f"tuning: kept in the plan that {'met' if target.met(best.evaluation.value(target.metric)) else 'came closest to'} "
                          f"{target.describe()} ({best.why})")
