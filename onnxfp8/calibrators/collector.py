"""The streaming collector: runs the FP32 model in onnxruntime over the calibration data and feeds
calibrators batch by batch. Nothing is stored across batches but the calibrators' statistics.

**Max pass.** Max-like statistics are reduced inside onnxruntime: the collector adds reduction nodes for every
tensor to calibrate and fetches two scalars per tensor and batch, so calibration costs about one FP32 inference
pass. The reduction is chosen so that it does not slow the model down:

* a rank >= 3 tensor is reduced with ``GlobalMaxPool`` (per channel) and then ``ReduceMax`` on the small
  ``[N, C, 1, 1]`` result. At ``ENABLE_ALL`` onnxruntime runs convolution networks in its blocked NCHWc layout;
  ``GlobalMaxPool`` runs in that layout, while a plain ``ReduceMax``/``ReduceMin`` on a conv activation forces
  a reorder back to NCHW for every exposed tensor, which made calibration of a ResNet-50 cost 2-2.5x a plain
  inference pass (see benchmarks/README.md);
* the minimum is only reduced for tensors that can be negative. A tensor that is non-negative by construction
  (the output of Relu, Sigmoid, Softmax, Abs, Exp..., or of a layout op / pooling / Concat of such tensors)
  has ``max |x| == max x``; its recorded minimum is the bound 0.0 (``CollectResult.min_bounded`` lists them);
* other tensors (rank < 3 or unknown) use ``ReduceMax`` / ``ReduceMin``.

**Histogram passes.** Methods that need whole tensors (percentile, mse, entropy) get the ranges of the max pass
(``set_ranges``), then the tensors are exposed as outputs in groups whose float32 arrays of one batch fit
``max_memory_mb``, one pass over the data per group. Sizes come from ``Size`` outputs of the max pass, so
dynamic dimensions (batch, sequence length varying between files) just work. When the ranges are already known
(``known_ranges``, e.g. from a statistics cache) the max pass is skipped.

**Observers.** What else happens per batch is not the collector's business: ``observers`` get
``passes(n)`` once the number of passes is known and ``batch(pass_no, samples_done, batch, outputs)`` after
every batch (``outputs``: the model's outputs in the pass that fetches them, else None). The output capture
(capture.OutputCapture) and the progress display (progress.ProgressObserver) are such observers; an observer
with ``wants_outputs`` true makes the first pass fetch the model outputs even when nothing else needs a pass.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set

import numpy as np
import onnx
from onnx import helper

from onnxfp8.calibrators.base import Calibrator
from onnxfp8.calibrators.data import DataSource, batch_size
from onnxfp8.calibrators.max import MaxCalibrator
from onnxfp8.modelio import make_session
from onnxfp8.names import SIZE_SUFFIX
from onnxfp8.progress import ProgressObserver

MAX_SUFFIX = "__onnxfp8_max"
MIN_SUFFIX = "__onnxfp8_min"

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
_GMP_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
# outputs >= 0 whatever the input
_NONNEG_OPS = {"Relu", "Sigmoid", "Softmax", "Abs", "Exp", "Sqrt", "Softplus", "HardSigmoid", "ReduceL1",
               "ReduceL2", "ReduceSumSquare"}
# outputs >= 0 when every (data) input is >= 0: they only move, select, average or add values
_NONNEG_PRESERVING = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Flatten", "Reshape",
                      "Transpose", "Squeeze", "Unsqueeze", "Identity", "Resize", "Upsample", "Concat",
                      "Slice", "Gather", "Expand", "Tile", "Add", "Mul", "Max", "Min", "ReduceMax", "ReduceMean",
                      "ReduceSum", "DepthToSpace", "SpaceToDepth"}
# ops whose only data input is the first (the others are shapes / indices / scales)
_FIRST_INPUT_ONLY = {"Reshape", "Squeeze", "Unsqueeze", "Slice", "Gather", "Expand", "Tile", "Resize",
                     "Upsample", "ReduceMax", "ReduceMean", "ReduceSum"}

Progress = Callable[[int, int], None]


@dataclass
class CollectResult:
    ranges: Dict[str, float]  # tensor -> amax chosen by the calibrator
    minmax: Dict[str, tuple]  # tensor -> (min, max) observed
    samples: int = 0
    batches: int = 0
    passes: int = 0
    seconds: float = 0.0
    sizes: Dict[str, int] = field(default_factory=dict)  # tensor -> elements per batch (largest seen)
    min_bounded: List[str] = field(default_factory=list)  # non-negative tensors: min is the bound 0.0
    max_calibrator: Optional[MaxCalibrator] = None  # the max statistics (always collected or given)
    # tensors (reduced ones and graph outputs) seen NaN -> index of the first batch where they were: the
    # reductions carry NaN when onnxruntime's max/min propagate it (not always); the graph outputs, fetched
    # anyway, are checked whole. An infinity is no error (a mask: FP16 exports write -inf into attention scores)
    nonfinite: Dict[str, int] = field(default_factory=dict)
    # reduced tensors seen +-Inf -> first batch: their range counts the infinity as the type's extreme value
    infinite: Dict[str, int] = field(default_factory=dict)


# -- graph analysis ------------------------------------------------------------------------------------
def tensor_types(model: onnx.ModelProto) -> Dict[str, onnx.TypeProto]:
    out = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        out[vi.name] = vi.type
    return out


def _rank(tp: Optional[onnx.TypeProto]) -> Optional[int]:
    if tp is None or not tp.HasField("tensor_type") or not tp.tensor_type.HasField("shape"):
        return None
    return len(tp.tensor_type.shape.dim)


def elem_type(tp: Optional[onnx.TypeProto]) -> Optional[int]:
    if tp is None or not tp.HasField("tensor_type"):
        return None
    return tp.tensor_type.elem_type or None


def nonnegative_tensors(model: onnx.ModelProto, arrays: Optional[Dict[str, Any]] = None) -> Set[str]:
    """Tensors that are >= 0 by construction (in graph order, so producers are seen first). ``arrays``: the
    values of a light model's weights (modelio.to_light_model)."""
    inits: Dict[str, Any] = {t.name: t for t in model.graph.initializer}
    inits.update(arrays or {})
    consts: Dict[str, np.ndarray] = {}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = onnx.numpy_helper.to_array(n.attribute[0].t)
    nonneg: Set[str] = set()

    def const_nonneg(name: str) -> bool:
        if name in inits:
            v = inits[name]
            arr = onnx.numpy_helper.to_array(v) if isinstance(v, onnx.TensorProto) else np.asarray(v)
        elif name in consts:
            arr = consts[name]
        else:
            return False
        return arr.dtype.kind in "fiu" and bool(np.all(arr >= 0))

    for n in model.graph.node:
        op = n.op_type
        ok = False
        if n.domain not in ("", "ai.onnx"):
            ok = False
        elif op in _NONNEG_OPS:
            ok = True
        elif op == "Clip":
            ok = len(n.input) > 1 and bool(n.input[1]) and const_nonneg(n.input[1])
        elif op in _NONNEG_PRESERVING:
            data = [n.input[0]] if op in _FIRST_INPUT_ONLY else [i for i in n.input if i]
            ok = bool(data) and all(i in nonneg or const_nonneg(i) for i in data)
        if ok:
            nonneg.update(o for o in n.output if o)
    return nonneg


def _float_tensors(model: onnx.ModelProto, tensors: Sequence[str]) -> List[str]:
    """Keep tensors that exist in the graph (produced by a node or a graph input) and are not known to hold
    anything but floats."""
    produced = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    types = tensor_types(model)
    out = []
    for t in tensors:
        et = elem_type(types.get(t))
        if t in produced and (et is None or et in _FLOAT_TYPES):
            out.append(t)
    return out


def augment_reduce(model: onnx.ModelProto, tensors: Sequence[str], sized: Set[str] = frozenset(),
                    nonneg: Set[str] = frozenset()) -> onnx.ModelProto:
    """A copy of ``model`` with per-tensor reductions as extra outputs ``<t>__onnxfp8_max`` (and ``_min``
    unless ``t`` is in ``nonneg``, ``_size`` when ``t`` is in ``sized``)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    types = tensor_types(model)
    added: Dict[str, List[onnx.NodeProto]] = {}  # tensor -> its reduction nodes
    for i, t in enumerate(tensors):
        rank = _rank(types.get(t))
        et = elem_type(types.get(t))
        src = t
        nodes = added.setdefault(t, [])
        if rank is not None and rank >= 3 and (et is None or et in _GMP_TYPES):
            # per-channel max in onnxruntime's own layout, then a reduction of [N, C, 1...] values
            src = t + "__onnxfp8_gmp"
            nodes.append(helper.make_node("GlobalMaxPool", [t], [src], name=f"onnxfp8_calib_gmp_{i}"))
        nodes.append(helper.make_node("ReduceMax", [src], [t + MAX_SUFFIX], keepdims=0, name=f"onnxfp8_calib_max_{i}"))
        g.output.append(helper.make_tensor_value_info(t + MAX_SUFFIX, et or onnx.TensorProto.FLOAT, []))
        if t not in nonneg:
            nodes.append(helper.make_node("ReduceMin", [t], [t + MIN_SUFFIX], keepdims=0, name=f"onnxfp8_calib_min_{i}"))
            g.output.append(helper.make_tensor_value_info(t + MIN_SUFFIX, et or onnx.TensorProto.FLOAT, []))
        if t in sized:
            nodes.append(helper.make_node("Size", [t], [t + SIZE_SUFFIX], name=f"onnxfp8_calib_size_{i}"))
            g.output.append(helper.make_tensor_value_info(t + SIZE_SUFFIX, onnx.TensorProto.INT64, []))
    # onnxruntime orders nodes by a depth-first walk from the graph's leaves, the one of highest index first:
    # reductions appended in the order of their tensors were walked from the last, so every reduction ran after
    # the whole network and held its tensor to the end (ResNet-50, batch 16 at 224x224: 1.8 GB peak RSS
    # against 0.6 GB for the plain model). Appended in reverse order, each runs as soon as its tensor exists.
    produced = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    first = sorted(added, key=lambda t: produced.get(t, -1))  # tensors in the order the graph makes them
    for t in reversed(first):
        g.node.extend(added[t])
    return m


def _augment_expose(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    outputs = {o.name for o in m.graph.output}
    types = tensor_types(model)
    for t in tensors:
        if t not in outputs:
            m.graph.output.append(helper.make_tensor_value_info(t, elem_type(types.get(t)) or onnx.TensorProto.FLOAT,
                                                                None))
    return m



# -- collection ----------------------------------------------------------------------------------------
def collect(model: onnx.ModelProto, tensors: Sequence[str], data: DataSource, calibrator: Calibrator, *,
            providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0, max_memory_mb: int = 2048,
            level: str = "all", progress: Optional[Progress] = None, observers: Sequence[Any] = (),
            known_ranges: Optional[MaxCalibrator] = None,
            hist_tensors: Optional[Sequence[str]] = None, arrays: Optional[Dict[str, Any]] = None) -> CollectResult:
    """Calibrate ``tensors`` of ``model`` on ``data``. ``observers`` see every batch (see the module docstring:
    the output capture, the progress display); ``progress(samples, pass_number)``, a callable called after
    every batch, is shorthand for a progress.ProgressObserver. ``known_ranges``: max statistics of (some of) the tensors already known (the max
    pass then only runs for the others, and not at all for histogram methods when every range is known).
    ``hist_tensors``: with a histogram calibrator, the subset of ``tensors`` it histograms (default: all);
    the others only get max statistics (``result.max_calibrator``), from the same max pass. ``arrays``: the
    values of a light model's weights (modelio.to_light_model)."""
    start = time.perf_counter()
    observers = list(observers) + ([ProgressObserver(progress)] if progress is not None else [])
    wants_outputs = any(getattr(o, "wants_outputs", False) for o in observers)
    tensors = _float_tensors(model, list(dict.fromkeys(tensors)))
    out_names = [o.name for o in model.graph.output]
    max_cal = calibrator if isinstance(calibrator, MaxCalibrator) else MaxCalibrator()
    if known_ranges is not None and known_ranges is not max_cal:
        max_cal.load_state(known_ranges.state())
    known = set(max_cal.result())
    hist_calibrator = bool(tensors) and (calibrator.needs_range or not calibrator.accepts_reduced)
    if not hist_calibrator:
        hist: List[str] = []
    elif hist_tensors is None:
        hist = list(tensors)
    else:
        wanted = set(hist_tensors)
        hist = [t for t in tensors if t in wanted]
    needs_hist = bool(hist)
    result = CollectResult({}, {}, max_calibrator=max_cal)
    todo_max = [t for t in tensors if t not in known]
    if needs_hist:  # the max pass also measures the sizes of every histogrammed tensor
        run_max_pass = bool(todo_max)
        reduced = list(dict.fromkeys(todo_max + hist)) if run_max_pass else []
    else:
        run_max_pass = bool(todo_max) or wants_outputs or not tensors
        reduced = todo_max
    bounded = nonnegative_tensors(model, arrays) & set(reduced) if reduced else set()
    result.min_bounded = [t for t in todo_max if t in bounded]
    sized = set(hist)
    pass_no = 0
    if run_max_pass:
        pass_no += 1
        session = make_session(augment_reduce(model, reduced, sized, bounded), level=level, arrays=arrays,
                               providers=providers, threads=threads)
        fetch = list(out_names)
        slots = []
        for t in reduced:
            hi_i = len(fetch)
            fetch.append(t + MAX_SUFFIX)
            lo_i = None
            if t not in bounded:
                lo_i = len(fetch)
                fetch.append(t + MIN_SUFFIX)
            size_i = None
            if t in sized:
                size_i = len(fetch)
                fetch.append(t + SIZE_SUFFIX)
            slots.append((t, hi_i, lo_i, size_i))
        k = len(out_names)
        update = set(todo_max)
        for batch in data.batches():
            values = session.run(fetch, batch)
            for t, hi_i, lo_i, size_i in slots:
                hi = float(values[hi_i])
                lo = float(values[lo_i]) if lo_i is not None else min(0.0, hi)
                if np.isnan(hi) or np.isnan(lo):
                    result.nonfinite.setdefault(t, result.batches)
                    continue
                if np.isinf(hi) or np.isinf(lo):
                    # an infinity is a mask (FP16 exports write masked attention scores as -inf): it counts as
                    # the tensor type's extreme finite value, which assign_formats treats as a mask value
                    # (its readers stay FP32), so it breaks no scale
                    big = float(np.finfo(np.asarray(values[hi_i]).dtype).max)
                    hi, lo = float(np.clip(hi, -big, big)), float(np.clip(lo, -big, big))
                    result.infinite.setdefault(t, result.batches)
                if t in update:
                    max_cal.observe_reduced(t, hi, lo)
                if size_i is not None:
                    result.sizes[t] = max(result.sizes.get(t, 0), int(values[size_i]))
            note_nonfinite(result, out_names, values[:k])
            result.samples += batch_size(batch)
            result.batches += 1
            outputs = dict(zip(out_names, values[:k]))
            for o in observers:
                o.batch(pass_no, result.samples, batch, outputs)
        del session
    if needs_hist:
        calibrator.set_ranges({t: r for t, r in max_cal.result().items() if t in sized})
        budget = max(1, max_memory_mb) * 2**20
        if run_max_pass:
            groups = _groups(hist, result.sizes, budget)
        else:  # no max pass measured the sizes: take them from the inferred shapes
            groups = _groups_by_static_size(model, hist, data, budget)
        for o in observers:
            if hasattr(o, "passes"):
                o.passes(pass_no + len(groups))
        for gi, group in enumerate(groups):
            pass_no += 1
            need_outputs = not run_max_pass and gi == 0
            fetch = list(group) + ([o for o in out_names if o not in group] if need_outputs else [])
            sess = make_session(_augment_expose(model, group), level=level, providers=providers, threads=threads,
                                arrays=arrays)
            seen = 0
            for batch in data.batches():
                values = sess.run(fetch, batch)
                for t, v in zip(group, values):
                    calibrator.observe(t, v)
                outputs = None
                if need_outputs:
                    by_name = dict(zip(fetch, values))
                    note_nonfinite(result, out_names, [by_name[o] for o in out_names])
                    outputs = {o: by_name[o] for o in out_names}
                    result.samples += batch_size(batch)
                    result.batches += 1
                seen += batch_size(batch)
                del values
                for o in observers:
                    o.batch(pass_no, seen, batch, outputs)
                outputs = None
            del sess
    result.passes = pass_no
    calibrated = set(tensors)
    result.minmax = {t: v for t, v in max_cal.minmax().items() if t in calibrated}
    result.ranges = {t: v for t, v in max_cal.result().items() if t in calibrated}
    if needs_hist:
        result.ranges.update({t: v for t, v in calibrator.result().items() if t in sized})
    for t in tensors:  # a tensor never seen finite gets range 0 (the scale code makes that safe)
        result.ranges.setdefault(t, 0.0)
    result.seconds = time.perf_counter() - start
    return result


def note_nonfinite(result: CollectResult, names: Sequence[str], values: Sequence[Any]) -> None:
    for name, v in zip(names, values):
        v = np.asarray(v)
        if name not in result.nonfinite and v.dtype.kind == "f" and v.size and np.isnan(v).any():
            result.nonfinite[name] = result.batches


def _groups(tensors: Sequence[str], sizes: Dict[str, int], budget_bytes: int) -> List[List[str]]:
    """Pack tensors into groups whose exposed float32 arrays of one batch fit the budget (a tensor larger
    than the budget gets a group of its own)."""
    groups: List[List[str]] = []
    cur: List[str] = []
    used = 0
    for t in tensors:
        b = 4 * sizes.get(t, 0)
        if cur and used + b > budget_bytes:
            groups.append(cur)
            cur, used = [], 0
        cur.append(t)
        used += b
    if cur:
        groups.append(cur)
    return groups


def _groups_by_static_size(model: onnx.ModelProto, tensors: Sequence[str], data: DataSource,
                           budget_bytes: int) -> List[List[str]]:
    """Groups from the inferred shapes (batch dimension = the data's batch size) when no max pass measured the
    sizes. A tensor with an unknown dimension counts as the whole budget (a group of its own)."""
    types = tensor_types(model)
    sizes: Dict[str, int] = {}
    for t in tensors:
        tp = types.get(t)
        n = None
        if _rank(tp) is not None:
            n = 1
            for i, d in enumerate(tp.tensor_type.shape.dim):
                if d.HasField("dim_value") and d.dim_value > 0:
                    n *= d.dim_value
                elif i == 0:
                    n *= max(1, data.batch_size)
                else:
                    n = None
                    break
        sizes[t] = n if n is not None else budget_bytes // 4 + 1
    return _groups(tensors, sizes, budget_bytes)


# -- per-channel statistics ----------------------------------------------------------------------------
CHANNEL_KINDS = ("absmax", "min", "max", "mean")


@dataclass
class ChannelRequest:
    """Per-channel statistics of one tensor along ``axis``: ``kinds`` from CHANNEL_KINDS, and ``rows`` > 0
    keeps up to that many sampled rows of the tensor flattened to ``[-1, C]`` (``axis`` must be the last)."""

    axis: int
    kinds: tuple = ("absmax",)
    rows: int = 0


def _channel_nodes(t: str, rank: int, req: ChannelRequest, i: int, g: onnx.GraphProto,
                   elem: Optional[int] = None) -> List[str]:
    """Append to ``g`` the reductions of ``req`` for tensor ``t`` of rank ``rank``; return their output names in
    the order (kinds..., shape, rows). A tensor of another float type (``elem``: FLOAT16, BFLOAT16, DOUBLE) is
    cast to float first: the statistics come out as float32, and sums of FP16 values cannot overflow."""
    axis = req.axis % rank
    others = [a for a in range(rank) if a != axis]
    nodes: List[onnx.NodeProto] = []
    outs: List[str] = []
    source = t
    if elem is not None and elem != onnx.TensorProto.FLOAT:
        t = f"{source}__onnxfp8_ch_f32"
        nodes.append(helper.make_node("Cast", [source], [t], to=onnx.TensorProto.FLOAT, name=f"onnxfp8_ch_{i}_cast"))
    spatial = rank >= 3 and axis == 1  # NCHW: reduce in onnxruntime's blocked layout first (see the max pass)

    def axes_const(name: str, axes) -> str:
        g.initializer.append(onnx.numpy_helper.from_array(np.asarray(axes, np.int64), name))
        return name

    ax = axes_const(f"{t}__onnxfp8_ch_axes", others)
    pre = f"onnxfp8_ch_{i}"
    for kind in req.kinds:
        out = f"{t}__onnxfp8_ch_{kind}"
        if kind in ("absmax", "max", "min"):
            src = t
            if kind == "absmax":
                src = f"{t}__onnxfp8_ch_abs"
                nodes.append(helper.make_node("Abs", [t], [src], name=f"{pre}_abs"))
            elif kind == "min":
                src = f"{t}__onnxfp8_ch_neg"
                nodes.append(helper.make_node("Neg", [t], [src], name=f"{pre}_neg"))
            if spatial:
                gmp = f"{src}__gmp"
                nodes.append(helper.make_node("GlobalMaxPool", [src], [gmp], name=f"{pre}_{kind}_gmp"))
                src = gmp
            red = out if kind != "min" else f"{t}__onnxfp8_ch_negmax"
            nodes.append(helper.make_node("ReduceMax", [src, ax], [red], keepdims=0, name=f"{pre}_{kind}_reduce"))
            if kind == "min":
                nodes.append(helper.make_node("Neg", [red], [out], name=f"{pre}_min_neg"))
        elif kind == "mean":  # a sum per channel (the count comes from the shape)
            src = t
            if spatial:
                src = f"{t}__onnxfp8_ch_gap"
                nodes.append(helper.make_node("GlobalAveragePool", [t], [src], name=f"{pre}_gap"))
            nodes.append(helper.make_node("ReduceSum", [src, ax], [out], keepdims=0, name=f"{pre}_sum"))
        else:
            raise ValueError(f"unknown channel statistic '{kind}'; choose from {', '.join(CHANNEL_KINDS)}")
        outs.append(out)
    shape = f"{source}__onnxfp8_ch_shape"
    nodes.append(helper.make_node("Shape", [t], [shape], name=f"{pre}_shape"))
    outs.append(shape)
    if req.rows > 0:
        if axis != rank - 1:
            raise ValueError(f"row samples of '{t}' need the channel axis last")
        flat, rows = f"{t}__onnxfp8_ch_flat", f"{t}__onnxfp8_ch_rows"
        nodes.append(helper.make_node("Flatten", [t], [flat], axis=rank - 1, name=f"{pre}_flat"))
        # every 7th row (tokens of one sequence are alike), at most req.rows of them per batch
        nodes.append(helper.make_node("Slice", [flat, axes_const(f"{t}__onnxfp8_ch_s0", [0]),
                                                axes_const(f"{t}__onnxfp8_ch_s1", [7 * req.rows]),
                                                axes_const(f"{t}__onnxfp8_ch_s2", [0]),
                                                axes_const(f"{t}__onnxfp8_ch_s3", [7])], [rows], name=f"{pre}_rows"))
        outs.append(rows)
    g.node.extend(nodes)
    for o in outs:
        g.output.append(helper.make_tensor_value_info(o, onnx.TensorProto.INT64 if o == shape else
                                                      onnx.TensorProto.FLOAT, None))
    return outs


def channel_stats(model: onnx.ModelProto, requests: Dict[str, ChannelRequest], data: DataSource, *,
                  providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0, level: str = "all",
                  arrays: Optional[Dict[str, Any]] = None, rank: Optional[Dict[str, int]] = None,
                  ) -> Dict[str, Dict[str, np.ndarray]]:
    """Per-channel statistics of float tensors over ``data`` in one pass, reduced inside onnxruntime to one
    value per channel and batch (``GlobalMaxPool`` / ``GlobalAveragePool`` first for NCHW tensors, as the max
    pass does): ``{tensor: {"absmax" | "min" | "max": [C], "mean": [C], "rows": [R, C], "samples": n}}``.
    Means are exact over every element (sums and element counts). ``rank``: tensor ranks where the model's
    shapes do not tell (a tensor of unknown rank is left out)."""
    types = tensor_types(model)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    slots = {}
    for i, (t, req) in enumerate(requests.items()):
        r = (rank or {}).get(t) or _rank(types.get(t))
        if r is None or r < 1:
            continue
        slots[t] = (req, r, _channel_nodes(t, r, req, i, m.graph, elem_type(types.get(t))))
    out: Dict[str, Dict[str, np.ndarray]] = {}
    if not slots:
        return out
    acc: Dict[str, Dict[str, Any]] = {t: {"samples": 0} for t in slots}
    fetch = [o for _, _, outs in slots.values() for o in outs]
    sess = make_session(m, level=level, providers=providers, threads=threads, arrays=arrays)
    for batch in data.batches():
        values = dict(zip(fetch, sess.run(fetch, batch)))
        n = batch_size(batch)
        for t, (req, r, outs) in slots.items():
            a = acc[t]
            shape = values[outs[len(req.kinds)]]
            c = int(shape[req.axis % r])
            a["samples"] += n
            for kind, o in zip(req.kinds, outs):
                v = np.asarray(values[o], np.float64).reshape(-1)
                if kind == "mean":
                    if r >= 3 and req.axis % r == 1:  # GlobalAveragePool then a sum over the batch
                        v = v * float(np.prod(shape[2:]))
                    a["sum"] = a.get("sum", 0.0) + v
                    a["count"] = a.get("count", 0) + int(np.prod(shape)) // max(c, 1)
                elif kind == "min":
                    a[kind] = np.minimum(a[kind], v) if kind in a else v
                else:
                    a[kind] = np.maximum(a[kind], v) if kind in a else v
            if req.rows > 0:
                rows = values[outs[-1]]
                kept = a.setdefault("rows", [])
                have = sum(x.shape[0] for x in kept)
                if have < req.rows:
                    kept.append(np.array(rows[:req.rows - have], np.float32))
    del sess
    for t, a in acc.items():
        req = slots[t][0]
        res: Dict[str, Any] = {"samples": a["samples"]}
        for kind in req.kinds:
            if kind == "mean":
                res["mean"] = a["sum"] / max(a["count"], 1) if "sum" in a else None
            else:
                res[kind] = a.get(kind)
        if req.rows > 0:
            res["rows"] = np.concatenate(a["rows"]) if a.get("rows") else np.zeros((0, 0), np.float32)
        out[t] = res
    return out
