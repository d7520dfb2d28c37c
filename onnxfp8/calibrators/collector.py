"""The streaming collector: runs the FP32 model in onnxruntime over the calibration data and feeds
calibrators batch by batch. Nothing is stored across batches but the calibrators' statistics.

Max-like methods let onnxruntime do the reduction: the collector adds ``ReduceMax``/``ReduceMin`` nodes for
every tensor to calibrate and fetches two scalars per tensor and batch, so calibration costs about one FP32
inference pass. Histogram methods need the tensors themselves: after the max pass they are exposed as outputs
in groups that fit ``max_memory_mb`` per batch, one pass per group.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import onnx
from onnx import helper

from onnxfp8.calibrators.base import Calibrator
from onnxfp8.calibrators.data import CalibrationData
from onnxfp8.calibrators.max import MaxCalibrator
from onnxfp8.modelio import make_session

MAX_SUFFIX = "__onnxfp8_max"
MIN_SUFFIX = "__onnxfp8_min"
SIZE_SUFFIX = "__onnxfp8_size"


@dataclass
class CollectResult:
    ranges: Dict[str, float]  # tensor -> amax chosen by the calibrator
    minmax: Dict[str, tuple]  # tensor -> (min, max) observed
    samples: int = 0
    batches: int = 0
    passes: int = 0
    seconds: float = 0.0
    captured_inputs: List[Dict[str, np.ndarray]] = field(default_factory=list)
    captured_outputs: List[Dict[str, np.ndarray]] = field(default_factory=list)
    sizes: Dict[str, int] = field(default_factory=dict)  # tensor -> elements per batch (largest seen)


def _augment_reduce(model: onnx.ModelProto, tensors: Sequence[str], with_size: bool) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for i, t in enumerate(tensors):
        g.node.append(helper.make_node("ReduceMax", [t], [t + MAX_SUFFIX], keepdims=0, name=f"onnxfp8_calib_max_{i}"))
        g.node.append(helper.make_node("ReduceMin", [t], [t + MIN_SUFFIX], keepdims=0, name=f"onnxfp8_calib_min_{i}"))
        g.output.append(helper.make_tensor_value_info(t + MAX_SUFFIX, onnx.TensorProto.FLOAT, []))
        g.output.append(helper.make_tensor_value_info(t + MIN_SUFFIX, onnx.TensorProto.FLOAT, []))
        if with_size:
            g.node.append(helper.make_node("Size", [t], [t + SIZE_SUFFIX], name=f"onnxfp8_calib_size_{i}"))
            g.output.append(helper.make_tensor_value_info(t + SIZE_SUFFIX, onnx.TensorProto.INT64, []))
    return m


def _augment_expose(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    outputs = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in outputs:
            m.graph.output.append(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    return m


def _float_tensors(model: onnx.ModelProto, tensors: Sequence[str]) -> List[str]:
    """Keep tensors that exist in the graph (produced by a node or a graph input)."""
    produced = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    return [t for t in tensors if t in produced]


def collect(model: onnx.ModelProto, tensors: Sequence[str], data: CalibrationData, calibrator: Calibrator, *,
            providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0, max_memory_mb: int = 2048,
            capture: int = 0, level: str = "all",
            progress: Optional[Callable[[int, int], None]] = None) -> CollectResult:
    """Calibrate ``tensors`` of ``model`` on ``data``. ``capture`` keeps the inputs and the model outputs of
    the first ``capture`` samples (for the post-quantization summary). ``progress(samples, passes)`` is
    called after every batch."""
    start = time.perf_counter()
    tensors = _float_tensors(model, list(dict.fromkeys(tensors)))
    out_names = [o.name for o in model.graph.output]
    max_cal = calibrator if isinstance(calibrator, MaxCalibrator) else MaxCalibrator()
    needs_hist = calibrator.needs_range or not calibrator.accepts_reduced
    session = make_session(_augment_reduce(model, tensors, with_size=needs_hist), level=level,
                           providers=providers, threads=threads)
    fetch = out_names + [t + s for t in tensors for s in (MAX_SUFFIX, MIN_SUFFIX)]
    if needs_hist:
        fetch += [t + SIZE_SUFFIX for t in tensors]
    result = CollectResult({}, {})
    captured = 0
    for batch in data.batches():
        values = session.run(fetch, batch)
        n = next(iter(batch.values())).shape[0]
        k = len(out_names)
        for i, t in enumerate(tensors):
            hi, lo = values[k + 2 * i], values[k + 2 * i + 1]
            if np.isfinite(hi) and np.isfinite(lo):
                max_cal.observe_reduced(t, hi, lo)
                if calibrator is not max_cal and calibrator.accepts_reduced and not needs_hist:
                    calibrator.observe_reduced(t, hi, lo)
        if needs_hist:
            base = k + 2 * len(tensors)
            for i, t in enumerate(tensors):
                result.sizes[t] = max(result.sizes.get(t, 0), int(values[base + i]))
        if captured < capture:
            take = min(capture - captured, n)
            result.captured_inputs.append({name: v[:take] for name, v in batch.items()})
            result.captured_outputs.append({name: np.asarray(v)[:take] for name, v in zip(out_names, values[:k])})
            captured += take
        result.samples += n
        result.batches += 1
        if progress:
            progress(result.samples, 1)
    result.passes = 1
    del session
    if needs_hist:
        calibrator.set_ranges(max_cal.result())
        budget = max(1, max_memory_mb) * 2**20
        for group in _groups(tensors, result.sizes, budget):
            sess = make_session(_augment_expose(model, group), level=level, providers=providers, threads=threads)
            for batch in data.batches():
                for t, v in zip(group, sess.run(group, batch)):
                    calibrator.observe(t, v)
                if progress:
                    progress(result.samples, result.passes + 1)
            result.passes += 1
            del sess
    result.minmax = max_cal.minmax()
    result.ranges = calibrator.result()
    for t in tensors:  # a tensor never seen finite gets range 0 (the scale code makes that safe)
        result.ranges.setdefault(t, 0.0)
    result.seconds = time.perf_counter() - start
    return result


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
