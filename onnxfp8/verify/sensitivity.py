"""Per-layer sensitivity: which quantized layers cost the accuracy, and which format suits each of them.

Cheap by design. The model is calibrated once (tuning/evaluate.Workspace) and realised in every candidate format
from the same statistics, without data. Then **one shared pass** over the validation data measures every
layer in every format at once: the FP32 model runs once per micro-batch with the tensors the layers read (their
*boundaries*, see verify/layers.py) exposed, and each format's isolated layers (verify/layers.own_model: every
quantized layer with its Q/DQ fragment, fed the FP32 boundaries) run on them. That gives, per layer and format,
its **own SQNR**: the error of the layer's output when only this layer is quantized, on exact inputs. The
ranking is by the own SQNR in the base format (worst first), and ``best_format`` / ``margin_db`` say which format
wins the layer and by how much (over the base format).

For the ``top`` most sensitive layers the **output-level** effect is measured too, with whole-model runs on
the validation data: the model outputs when *only this layer* is quantized (``only_quantized``) and when *only
this layer* is left in high precision (``only_fp32``, the gain a fallback of this one layer buys). These cost
two evaluations per layer, so they are bounded by ``top`` (0: none).

Memory: the exposed tensors per onnxruntime run fit ``max_memory_mb`` (layers are chunked as in
verify/layers.py, each output counted once for the reference and once per format).
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import onnx

from onnxfp8.config import ALL_FORMATS, QuantConfig
from onnxfp8.modelio import ModelLike, load_model, make_session
from onnxfp8.plan import json_plain
from onnxfp8.verify.compare import ErrorStats
from onnxfp8.verify.layers import (LOCAL_PREFIX, Layer, chunks, expose, find_layers, layout, micro_batches,
                                   own_model, release_memory, shrinking_run_options)


@dataclass
class LayerSensitivity:
    node: str
    op_type: str
    output: str
    tensors: List[str]  # the plan's quantized input tensors of the layer (weights and activations)
    own: Dict[str, float]  # format -> own SQNR (dB): the layer alone quantized in that format, on FP32 inputs
    base_format: str
    only_quantized: Optional[Dict[str, Any]] = None  # model outputs with only this layer quantized (base format)
    only_fp32: Optional[Dict[str, Any]] = None  # model outputs with only this layer in high precision
    rank: int = 0

    @property
    def own_db(self) -> float:
        return self.own.get(self.base_format, math.nan)

    @property
    def best_format(self) -> str:
        """The format with the highest own SQNR (ties: the base format, then the candidates' order)."""
        top = max(self.own.values())
        if self.own.get(self.base_format, -math.inf) >= top - 1e-9:
            return self.base_format
        return next(f for f, v in self.own.items() if v >= top - 1e-9)

    @property
    def margin_db(self) -> float:
        """How much the best format beats the base format on this layer (dB, >= 0)."""
        b = self.own.get(self.base_format, math.nan)
        d = self.own[self.best_format] - b
        return d if math.isfinite(d) else 0.0

    def to_dict(self) -> Dict[str, Any]:
        return json_plain({"rank": self.rank, "node": self.node, "op_type": self.op_type, "output": self.output,
                           "tensors": self.tensors, "own_sqnr_db": self.own, "base_format": self.base_format,
                           "best_format": self.best_format, "margin_db": self.margin_db,
                           "only_quantized": self.only_quantized, "only_fp32": self.only_fp32})


@dataclass
class SensitivityReport:
    source: str
    base_format: str
    formats: List[str]
    layers: List[LayerSensitivity]  # ranked: worst own SQNR in the base format first
    samples: int = 0
    passes: int = 0
    micro_batch: int = 0
    skipped: List[Dict[str, str]] = field(default_factory=list)
    model: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # format -> whole-model metrics (when measured)
    seconds: float = 0.0
    timings: Dict[str, float] = field(default_factory=dict)

    def layer(self, node: str) -> Optional[LayerSensitivity]:
        return next((l for l in self.layers if l.node == node), None)

    def wins(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for l in self.layers:
            out[l.best_format] = out.get(l.best_format, 0) + 1
        return out

    def to_dict(self) -> Dict[str, Any]:
        return json_plain({"source": self.source, "base_format": self.base_format, "formats": self.formats,
                           "samples": self.samples, "passes": self.passes, "micro_batch": self.micro_batch,
                           "wins": self.wins(), "model": self.model, "seconds": round(self.seconds, 3),
                           "timings": {k: round(v, 3) for k, v in self.timings.items()},
                           "layers": [l.to_dict() for l in self.layers], "skipped": self.skipped})

    def to_json(self, indent: int = 1) -> str:
        import json

        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def summary(self, limit: int = 20) -> str:
        lines = [f"sensitivity of {len(self.layers)} quantized layer(s) on {self.samples} validation sample(s), "
                 f"{self.passes} shared pass(es); own SQNR = the layer alone quantized, on FP32 inputs (dB); "
                 f"ranked worst first in {self.base_format}"]
        head = ["#", "layer", "op"] + [f.upper() for f in self.formats] + ["best", "by dB"]
        show_out = any(l.only_quantized or l.only_fp32 for l in self.layers)
        if show_out:
            head += ["out cos only-q", "out cos only-fp32"]
        rows = []
        for l in self.layers[:limit]:
            r = [str(l.rank), l.node, l.op_type] + [_db(l.own.get(f)) for f in self.formats] + [
                l.best_format, f"{l.margin_db:.1f}"]
            if show_out:
                r += [_cos(l.only_quantized), _cos(l.only_fp32)]
            rows.append(r)
        lines += _table(head, rows)
        if len(self.layers) > limit:
            lines.append(f"(+{len(self.layers) - limit} more layer(s) in the JSON)")
        if self.model:
            lines.append("whole model per format (every layer quantized): " + ", ".join(
                f"{f} cosine {m.get('cosine', math.nan):.5f} / {m.get('sqnr_db', math.nan):.1f} dB"
                for f, m in self.model.items()))
        lines.append("best format per layer: " + ", ".join(f"{f} {k}" for f, k in
                                                          sorted(self.wins().items(), key=lambda kv: -kv[1])))
        return "\n".join(lines)


def _db(v: Optional[float]) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return "inf" if v == math.inf else f"{v:.1f}"


def _cos(m: Optional[Dict[str, Any]]) -> str:
    if not m or m.get("cosine") is None:
        return "-"
    return f"{float(m['cosine']):.5f}"


def _table(head: List[str], rows: List[List[str]]) -> List[str]:
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i in (1, 2) else str(c).rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    return [fmt(head).rstrip()] + [fmt(r).rstrip() for r in rows]


# -- the shared pass --------------------------------------------------------------------------------------
def own_sqnr_by_format(fp32: onnx.ModelProto, quants: Dict[str, onnx.ModelProto], data, *,
                       max_memory_mb: float = 32, providers: Sequence[str] = ("CPUExecutionProvider",),
                       threads: int = 0, progress: Optional[Callable[[str], None]] = None):
    """Own error of every quantized layer in every format, in shared passes: per chunk of layers one FP32 run
    per micro-batch exposes the boundaries and reference outputs, and every format's isolated layers run on
    them. Returns (layers of the first format, {format: {node: ErrorStats}}, skipped, passes, micro_batch)."""
    fmts = list(quants)
    per_fmt = {f: {l.node: l for l in find_layers(fp32, quants[f])[0]} for f in fmts}
    layers, skipped = find_layers(fp32, quants[fmts[0]])
    layers = [l for l in layers if all(l.node in per_fmt[f] for f in fmts)]
    stats = {f: {l.node: ErrorStats() for l in layers} for f in fmts}
    if not layers:
        return layers, stats, skipped, 0, 0
    fp32_inputs = {i.name for i in fp32.graph.input} - {t.name for t in fp32.graph.initializer}
    lay = layout(fp32, quants[fmts[0]], layers, data, max_memory_mb=max_memory_mb, providers=providers,
                 threads=threads, copies=1 + len(fmts))
    # chunks() counts 3 copies of each output; the formats' own outputs make it 1 + len(fmts)
    groups = chunks(layers, {k: int(v * (1 + len(fmts)) / 3) for k, v in lay.nbytes.items()}, lay.budget)
    opts = shrinking_run_options()
    passes = 0
    for gi, group in enumerate(groups):
        outs = [l.output for l in group]
        bounds = sorted({b for f in fmts for l in group for b in per_fmt[f][l.node].boundaries})
        ref_fetch = list(dict.fromkeys(outs + [b for b in bounds if b not in fp32_inputs]))
        fp32_sess = make_session(expose(fp32, ref_fetch, lay.types), level="basic", providers=providers,
                                 threads=threads)
        own = {}
        for f in fmts:
            mine = [per_fmt[f][l.node] for l in group]
            own[f] = (make_session(own_model(quants[f], mine, lay.types), level="basic", providers=providers,
                                   threads=threads), sorted({b for l in mine for b in l.boundaries}))
        own_outs = [LOCAL_PREFIX + o for o in outs]
        for batch in micro_batches(data.batches(), lay.micro_batch):
            ref = dict(zip(ref_fetch, fp32_sess.run(ref_fetch, batch, opts)))
            for f, (sess, fb) in own.items():
                got = sess.run(own_outs, {b: (batch[b] if b in batch else ref[b]) for b in fb}, opts)
                for l, v in zip(group, got):
                    stats[f][l.node].update(ref[l.output], v)
                del got
            del ref
            release_memory()
        del fp32_sess, own
        passes += 1
        if progress:
            progress(f"sensitivity: chunk {gi + 1}/{len(groups)} ({len(group)} layer(s))")
    return layers, stats, skipped, passes, lay.micro_batch


def node_pattern(node: str) -> str:
    """A node-selection pattern (rules.compile_pattern) matching exactly this node name."""
    return "re:^" + re.escape(node) + "$"


def layer_tensors(plan, node: str) -> List[str]:
    """The plan's quantized tensors read by ``node`` (its weights and activations)."""
    return [s.tensor for s in plan.tensors.values() if node in s.consumers]


def analyse(workspace, evaluator, formats: Sequence[str] = ALL_FORMATS, base: Optional[QuantConfig] = None, *,
            top: int = 0, model_metrics: bool = False, max_memory_mb: float = 32,
            progress: Optional[Callable[[str], None]] = None, bar=None, results: Optional[Dict[str, Any]] = None
            ) -> SensitivityReport:
    """The sensitivity of ``workspace``'s model (tuning/evaluate.Workspace: calibrated once) on ``evaluator``'s
    validation data. ``base``: the configuration whose format ranks the layers (default the workspace's);
    ``formats``: the candidates measured per layer; ``top``: output-level runs for this many of the most
    sensitive layers; ``model_metrics``: also score each format's whole model. ``results`` (format ->
    QuantResult) can hand in realisations already made."""
    start = time.perf_counter()
    base = base or workspace.config
    base_format = base.activation_format if base.format != "auto" else base.formats[0]
    results = dict(results or {})
    # "auto" is a column too when asked for: format auto's per-tensor choice among the other formats, per layer
    fmts = list(dict.fromkeys([base_format] + list(formats)))
    plain = tuple(f for f in fmts if f != "auto")
    timings: Dict[str, float] = {}
    t = time.perf_counter()
    for f in fmts:
        if f not in results:
            cfg = base.replace(format=f, weights_format=None, activations_format=None)
            results[f] = workspace.realize(cfg.replace(formats=plain) if f == "auto" else cfg)
    timings["realize"] = time.perf_counter() - t
    fp32 = load_model(workspace.model)
    t = time.perf_counter()
    data = _Batches(evaluator)
    layers, stats, skipped, passes, micro = own_sqnr_by_format(
        fp32, {f: results[f].model for f in fmts}, data, max_memory_mb=max_memory_mb,
        providers=evaluator.providers, threads=evaluator.threads, progress=progress)
    timings["shared_pass"] = time.perf_counter() - t
    plan = results[base_format].plan
    out: List[LayerSensitivity] = []
    for l in layers:
        own = {f: stats[f][l.node].sqnr_db for f in fmts}
        out.append(LayerSensitivity(l.node, l.op_type, l.output, layer_tensors(plan, l.node), own, base_format))
    out.sort(key=lambda s: (s.own_db if not math.isnan(s.own_db) else math.inf, s.node))
    for i, s in enumerate(out):
        s.rank = i + 1
    report = SensitivityReport(workspace.source, base_format, fmts, out, samples=evaluator.samples, passes=passes,
                               micro_batch=micro, skipped=skipped)
    t = time.perf_counter()
    if model_metrics:
        for f in fmts:
            report.model[f] = evaluator.evaluate(results[f].model, bar, f"sensitivity: {f} model").metrics()
    planned = {d.node for d in plan.quantized_nodes()}
    for s in [s for s in out if s.node in planned][:max(0, top)]:
        only_q = plan.copy()  # the base plan edited (QuantPlan.keep_fp32), rebuilt by onnxfp8.apply_plan
        for n in planned - {s.node}:
            only_q.keep_fp32(n, "sensitivity: only another layer quantized")
        m = workspace.apply(only_q).model
        s.only_quantized = evaluator.evaluate(m, bar, f"sensitivity: only {s.node} quantized").metrics()
        only_f = plan.copy()
        only_f.keep_fp32(s.node, "sensitivity: this layer alone in FP32")
        m = workspace.apply(only_f).model
        s.only_fp32 = evaluator.evaluate(m, bar, f"sensitivity: only {s.node} in FP32").metrics()
    timings["output_level"] = time.perf_counter() - t
    report.timings = timings
    report.seconds = time.perf_counter() - start
    return report


class _Batches:
    """The evaluator's validation batches as the re-iterable data verify/layers.py reads."""

    def __init__(self, evaluator) -> None:
        self._ev = evaluator
        self.specs = getattr(evaluator.data, "specs", {})
        self.batch_size = evaluator.data.batch_size

    def batches(self):
        for batch, _, _ in self._ev.batches:
            yield batch


def sensitivity(model: ModelLike, calib: Any, val: Any, config: Optional[QuantConfig] = None, *,
                formats: Sequence[str] = ALL_FORMATS, labels: Any = None, top: int = 0,
                samples: Optional[int] = None, model_metrics: bool = True, max_memory_mb: float = 32,
                progress=None) -> SensitivityReport:
    """Per-layer sensitivity of ``model`` quantized with ``config`` (its format ranks the layers): calibrate
    once on ``calib``, measure on ``val`` (at most ``samples`` samples). See the module docstring."""
    from onnxfp8.tuning.evaluate import Evaluator, Workspace

    config = config or QuantConfig()
    start = time.perf_counter()
    with Workspace(model, calib, config, progress=progress) as ws:
        ev = Evaluator(model, val, labels, batch_size=config.batch_size, samples=samples,
                       providers=config.providers, threads=config.threads)
        report = analyse(ws, ev, formats, config, top=top, model_metrics=model_metrics,
                         max_memory_mb=max_memory_mb, bar=progress)
    report.seconds = time.perf_counter() - start
    return report
