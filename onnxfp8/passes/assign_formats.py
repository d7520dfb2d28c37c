"""assign_formats: turn node decisions and calibrated ranges into QuantSpecs (format, scale, axis) in the plan.

Weights get per-output-channel scales (``amax_c / format max`` over the channel, axis from the op: see
rules.weight_axis), activations one per-tensor scale shared by all quantized consumers. A zero, NaN or Inf
range gets a safe scale (Format.scale_for). Per-tensor overrides from the config (format, scale, axis,
amax) win. An activation produced by a Relu is quantized on the Relu's input with the Relu output's scale:
``relu(q(x)) == q(relu(x))`` for symmetric quantization, so the function is the same, and it keeps
onnxruntime from dropping a Relu that feeds an FP8 QuantizeLinear."""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import numpy as np
import onnx_graphsurgeon as gs

from onnxfp8.errors import ConfigError
from onnxfp8.formats import get_format
from onnxfp8.pipeline import Pass, PassContext, PassResult
from onnxfp8.plan import DynamicSpec, QuantSpec, tolist
from onnxfp8.rules import weight_axis
from onnxfp8.verify.compare import ErrorStats


def channel_amax(w: np.ndarray, axis) -> np.ndarray:
    a = np.abs(w.astype(np.float32))
    if axis is None:
        return np.asarray(a.max() if a.size else 0.0, dtype=np.float32)
    axes = tuple(i for i in range(a.ndim) if i != axis)
    return a.max(axis=axes) if axes else a


class AssignFormats(Pass):
    name = "assign_formats"

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        """Static scales need statistics (calibrate) for every activation without a given scale or amax."""
        if ctx.config.dynamic:
            return
        from onnxfp8.passes.calibrate import activation_tensors

        missing = [t for t in activation_tensors(graph, ctx)
                   if t not in ctx.stats and "amax" not in ctx.config.overrides.get(t, {})]
        if missing:
            raise ValueError(f"no calibration statistics for {len(missing)} activation(s), e.g. '{missing[0]}': "
                             f"run calibrate before assign_formats")

    def ensures(self, graph: gs.Graph, ctx: PassContext) -> None:
        """Every planned scale is finite and > 0; only a dynamic activation has none."""
        for spec in ctx.plan.tensors.values():
            if spec.scale is None:
                if spec.dynamic is None:
                    raise ValueError(f"{spec.tensor}: no scale and not dynamic")
                continue
            s = np.asarray(spec.scale, np.float64)
            if s.size == 0 or not (np.isfinite(s).all() and (s > 0).all()):
                raise ValueError(f"{spec.tensor}: scale must be finite and > 0")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        cfg = ctx.config
        plan = ctx.plan
        by_name = {n.name: n for n in graph.nodes}
        weight_axes: Dict[str, List] = {}
        weight_consts: Dict[str, gs.Constant] = {}
        act_consumers: Dict[str, List[str]] = {}
        for d in plan.quantized_nodes():
            node = by_name[d.node]
            for idx, role in d.inputs.items():
                t = node.inputs[idx]
                if role == "weight":
                    weight_consts[t.name] = t
                    ax = weight_axis(node, idx, len(t.shape)) if cfg.per_channel else None
                    weight_axes.setdefault(t.name, []).append((d.node, ax))
                else:
                    act_consumers.setdefault(t.name, [])
                    if d.node not in act_consumers[t.name]:
                        act_consumers[t.name].append(d.node)
        notes = []
        tensors = graph.tensors()
        graph_outputs = {o.name for o in graph.outputs}
        hists = None
        if cfg.activations_auto and not cfg.dynamic:
            todo = [n for n in act_consumers if "format" not in cfg.overrides.get(n, {})]
            hists = activation_histograms(graph, ctx, todo) if todo else None
        for name, uses in weight_axes.items():
            over = dict(cfg.overrides.get(name, {}))
            w = weight_consts[name].values
            axes = {ax for _, ax in uses}
            if len(axes) > 1:
                notes.append(f"{name}: consumers disagree on the channel axis, per-tensor scale")
            axis = over.get("axis", axes.pop() if len(axes) == 1 else None)
            if axis is not None and not -w.ndim <= axis < w.ndim:
                raise ConfigError(f"{ctx.source}: override for {name}: axis {axis} out of range for rank {w.ndim}")
            if axis is not None and axis < 0:
                axis += w.ndim
            fmt = get_format(over.get("format", cfg.weight_format))
            chosen = None
            if cfg.weights_auto and "format" not in over:  # candidates judged on the axis the weight gets
                chosen = choose_weight_format(w, axis, cfg.formats)
                fmt = get_format(chosen[0])
            amax = channel_amax(w, axis)
            want = 1 if axis is None else w.shape[axis]
            if "amax" in over:  # a given range: one for the tensor, or one per channel along the axis
                a = np.asarray(over["amax"], np.float32).reshape(-1)
                if a.size not in (1, want):
                    raise ConfigError(f"{ctx.source}: override for {name}: {a.size} amax value(s), but the weight "
                                      f"has {want} channel(s) on axis {axis}")
                amax = np.full(np.shape(amax), a[0], np.float32) if a.size == 1 else a.reshape(np.shape(amax))
            scale = np.asarray(over["scale"], np.float32) if "scale" in over else fmt.scale_for(amax)
            if scale.size not in (1, want):
                raise ConfigError(f"{ctx.source}: override for {name}: {scale.size} scale(s), but the weight has "
                                  f"{want} channel(s) on axis {axis}")
            if scale.size == 1 and axis is not None and want != 1:
                scale = np.full(want, float(scale.reshape(-1)[0]), np.float32)
            plan.tensors[name] = QuantSpec(name, "weight", fmt.name, tolist(scale), axis, tolist(amax),
                                           [n for n, _ in uses])
            if chosen is not None:
                plan.tensors[name].candidates = chosen[1]
                plan.tensors[name].auto_reason = auto_reason(chosen[1], chosen[2])
                plan.tensors[name].notes.append("format auto: " + plan.tensors[name].auto_reason)
        for name, consumers in act_consumers.items():
            over = dict(cfg.overrides.get(name, {}))
            if "axis" in over:
                raise ConfigError(f"{ctx.source}: override for {name}: axis applies to weights; activations are "
                                  f"quantized per tensor")
            if isinstance(over.get("scale", 0.0), (list, tuple)) or isinstance(over.get("amax", 0.0), (list, tuple)):
                raise ConfigError(f"{ctx.source}: override for {name}: an activation takes one scale / amax "
                                  f"(per tensor)")
            fmt = get_format(over.get("format", cfg.activation_format))
            stats = ctx.stats.get(name, {})
            amax = float(over.get("amax", stats.get("amax", 0.0)))
            chosen = None
            if hists is not None and "format" not in over and name in hists["hists"] and "amax" not in over:
                chosen = choose_activation_format(name, hists, cfg, amax)
                fmt, amax = get_format(chosen[0]), chosen[3]
            scale = float(over["scale"]) if "scale" in over else float(fmt.scale_for(np.float32(amax)))
            spec = QuantSpec(name, "activation", fmt.name, scale, None, amax, consumers)
            if chosen is not None:
                spec.candidates = chosen[1]
                spec.auto_reason = auto_reason(chosen[1], chosen[2])
                spec.notes.append("format auto: " + spec.auto_reason)
            elif hists is not None and "format" not in over:
                spec.notes.append(f"format auto: no histogram of this tensor (never finite on the data), "
                                  f"{fmt.name} used")
            if cfg.dynamic and "scale" not in over:
                spec.scale, spec.amax = None, None
                spec.dynamic, note = dynamic_info(name, consumers, by_name, plan, cfg.dynamic_granularity)
                spec.notes.append(note)
            elif "method" in stats and "scale" not in over and "amax" not in over:
                spec.method = stats["method"]
            tensor = tensors.get(name)
            producer = tensor.inputs[0] if tensor is not None and len(tensor.inputs) == 1 else None
            # (not for TensorRT, whose documented form is layer -> Relu -> Q -> DQ: lint's [dq-relu])
            if producer is not None and producer.op == "Relu" and name not in graph_outputs \
                    and cfg.target != "tensorrt":
                spec.placement = f"before:{producer.name}"
                spec.notes.append("quantized on the Relu input (relu(q(x)) == q(relu(x)))")
            if spec.scale is not None and (amax == 0.0 or not np.isfinite(amax)):
                spec.notes.append(f"range {amax}: safe scale {scale}")
            plan.tensors[name] = spec
        notes.extend(_keep_mask_values_fp32(plan, tensors, cfg, ctx.stats))
        unknown = sorted(set(cfg.overrides) - set(plan.tensors))
        if unknown:
            raise ConfigError(f"{ctx.source}: override for '{unknown[0]}', which is not a quantized tensor")
        notes.insert(0, f"{len(weight_axes)} weight(s), {len(act_consumers)} activation(s) planned")
        if cfg.weights_auto or (cfg.activations_auto and not cfg.dynamic):
            won: Dict[str, int] = {}
            for sp in plan.tensors.values():
                if sp.candidates:
                    won[sp.format] = won.get(sp.format, 0) + 1
            notes.append("format auto: " + ", ".join(f"{f} chosen for {k} tensor(s)" for f, k in sorted(won.items()))
                         + (" (INT8 wins tensors whose values are spread evenly)" if "int8" in won else ""))
        if cfg.dynamic:
            notes.append(f"dynamic quantization: {len(act_consumers)} activation scale(s) computed at run time "
                         f"(granularity {cfg.dynamic_granularity})")
        return PassResult(False, notes)


def _keep_mask_values_fp32(plan, tensors, cfg, stats=None) -> List[str]:
    """Leave FP32 the nodes that read an activation holding a mask value: exporters write attention masks as
    the float type's lowest value (-3.4e38, or -65504 in FP16) or as -inf added to the scores, so a calibrated
    range of half the type's max or more is a sentinel, not data (the collector counts an infinity as the
    type's extreme value). One per-tensor scale covering it rounds every real value to zero (a transformers
    BERT export, extended scheme: logits cosine 0.21); one scale for the real values turns -inf into a finite
    value and unmasks. The observed min/max count too, so a percentile / MSE / entropy range that left the
    mask value out still keeps the readers FP32."""
    notes: List[str] = []
    stats = stats or {}
    for name, spec in list(plan.tensors.items()):
        if spec.role != "activation" or spec.dynamic is not None or name in cfg.overrides:
            continue
        t = tensors.get(name)
        dtype = np.dtype(t.dtype) if t is not None and t.dtype is not None and np.dtype(t.dtype).kind == "f" \
            else np.dtype(np.float32)
        amax = float(spec.amax) if isinstance(spec.amax, (int, float)) else 0.0
        st = stats.get(name, {})
        seen = [abs(float(st[k])) for k in ("min", "max") if isinstance(st.get(k), (int, float))]
        amax = max([amax] + [v for v in seen if np.isfinite(v)])
        if not amax >= float(np.finfo(dtype).max) / 2:
            continue
        reason = (f"reads '{name}', whose range ({amax:.3g}) is a mask value of {dtype.name}: one scale for it "
                  f"would round every other value to zero")
        for node in list(spec.consumers):
            if node in plan.nodes and plan.nodes[node].quantized:
                plan.keep_fp32(node, reason)
        notes.append(f"{name}: holds a mask value ({amax:.3g}); its reader(s) left FP32")
    return notes


def sqnr_db(signal: float, noise: float) -> float:
    return ErrorStats(signal=signal, noise=noise).sqnr_db


def choose_weight_format(w: np.ndarray, axis, candidates: Sequence[str]) -> Tuple[str, Dict[str, float], str]:
    """The candidate format with the highest SQNR of the weight with max scaling (per channel along ``axis``):
    (format, {format: SQNR dB}, a remark on the data). Ties go to the earlier candidate."""
    w = np.asarray(w, dtype=np.float32)
    w64 = w.astype(np.float64)
    amax = channel_amax(w, axis)
    signal = float(np.sum(w64 ** 2))
    errs: Dict[str, float] = {}
    for f in candidates:
        fmt = get_format(f)
        fq = fmt.fake_quant(w, fmt.scale_for(amax), axis if np.ndim(amax) else None)
        errs[fmt.name] = round(sqnr_db(signal, float(np.sum((w64 - fq) ** 2))), 3)
    rms = math.sqrt(signal / max(w.size, 1))
    crest = float(np.max(np.abs(w))) / rms if rms > 0 else 0.0
    return _best(errs), errs, _shape_remark(crest)


def _best(errs: Dict[str, float]) -> str:
    top = max(errs.values())
    return next(f for f, e in errs.items() if e >= top - 1e-9)


def _shape_remark(crest: float) -> str:
    if crest >= 12:
        return f"this tensor has outliers (max/rms {crest:.1f})"
    if crest and crest < 4:
        return f"this tensor is evenly spread (max/rms {crest:.1f})"
    return f"max/rms {crest:.1f}"


def auto_reason(errs: Dict[str, float], remark: str) -> str:
    """'this tensor has outliers (max/rms 25.3): E4M3 beats E3M4 by 6.1 dB (SQNR e4m3 31.2, ...)' (QuantSpec.auto_reason)"""
    ranked = sorted(errs.items(), key=lambda kv: -kv[1])
    best, e0 = ranked[0]
    text = f"{remark}: {best.upper()}"
    if len(ranked) > 1:
        second, e1 = ranked[1]
        text += f" beats {second.upper()} by {e0 - e1:.1f} dB"
    text += " (SQNR " + ", ".join(f"{f} {e:.1f}" for f, e in errs.items()) + " dB)"
    if best == "int8":
        text += "; INT8 wins this tensor"
    return text


def activation_histograms(graph: gs.Graph, ctx: PassContext, names: List[str]) -> Dict[str, object]:
    """Histograms of |x| for the activations whose format is chosen from data: the ones the calibrate pass
    collected (``ctx.histograms``; with format auto it collects every activation's). assign_formats reads
    statistics and never calibrates; a tensor never finite on the data has no histogram (a note says so)."""
    from onnxfp8.calibrators.histogram import HistogramCalibrator

    cal = ctx.histograms
    if not isinstance(cal, HistogramCalibrator):
        raise ValueError(f"format auto: no activation histograms for {len(names)} activation(s) (e.g. "
                         f"'{names[0]}'): the calibrate pass collects them")
    return {"hists": cal.histograms(), "calibrator": cal}


def choose_activation_format(name: str, hists: Dict[str, object], cfg, amax: float
                             ) -> Tuple[str, Dict[str, float], str, float]:
    """Per candidate format, the SQNR the tensor's histogram predicts for saturating fake quantization with
    that format's range (the calibrated amax; with --calibration mse the format's own MSE-optimal range),
    computed with the MSE calibrator's exact in-bin error integral. Returns (format, {format: SQNR dB},
    remark, amax of the winner)."""
    from onnxfp8.calibrators.mse import MSECalibrator, Bins

    h = hists["hists"][name]
    cal = hists["calibrator"]
    if h.max <= 0:
        f = cfg.formats[0]
        return f, {f: math.inf}, "all-zero tensor", amax
    bins = Bins(h)
    counts = h.counts.astype(np.float64)
    top = int(np.flatnonzero(counts)[-1])
    centers = (np.arange(top) + 0.5) * h.width
    signal = float(np.sum(counts[:top] * (centers ** 2 + h.width ** 2 / 12.0)) + counts[top] * h.max ** 2)
    errs: Dict[str, float] = {}
    ranges: Dict[str, float] = {}
    for f in cfg.formats:
        fmt = get_format(f)
        a = amax
        if cfg.calibration == "mse" and isinstance(cal, MSECalibrator):
            a = cal.amax_for(name, fmt)
        a = a if a > 0 else h.max
        ranges[fmt.name] = float(a)
        mse = float(bins.mse(fmt, np.asarray([a]))[0]) * bins.total
        errs[fmt.name] = round(sqnr_db(signal, mse), 3)
    rms = math.sqrt(signal / max(bins.total, 1.0))
    best = _best(errs)
    return best, errs, _shape_remark(h.max / rms if rms > 0 else 0.0), ranges[best]


def dynamic_info(name: str, consumers: List[str], by_name, plan, granularity: str) -> Tuple[DynamicSpec, str]:
    """How the run-time scale of activation ``name`` is computed: per tensor, or (granularity token) per row
    when every quantized consumer reads it as a MatMul / Gemm operand reduced along the same axis (left
    operand: its last axis, one scale per row/token; right operand: axis -2, one scale per column)."""
    if granularity == "token":
        axes = set()
        for c in consumers:
            node = by_name.get(c)
            d = plan.nodes.get(c)
            for idx, t in enumerate(node.inputs if node is not None else []):
                if t.name != name or d is None or d.inputs.get(idx) != "activation":
                    continue
                if node.op == "MatMul":
                    axes.add(-1 if idx == 0 else -2)
                elif node.op == "Gemm" and idx == 0 and not node.attrs.get("transA", 0):
                    axes.add(-1)
                else:
                    axes.add(None)
        if len(axes) == 1 and None not in axes:
            axis = axes.pop()
            what = "row (token)" if axis == -1 else "column"
            return (DynamicSpec("token", axis),
                    f"dynamic: scale per {what} computed at run time (ReduceMax(Abs(x)) over axis {axis})")
        return (DynamicSpec("tensor"), "dynamic: scale per tensor computed at run time (consumers are not all "
                                       "MatMul/Gemm operands reduced along one axis, so no per-token scale)")
    return DynamicSpec("tensor"), "dynamic: scale per tensor computed at run time (ReduceMax(Abs(x)) / format max)"
