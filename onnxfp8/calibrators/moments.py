"""BatchNorm moment statistics: the per-channel mean and variance every BatchNormalization's input takes over a
data stream, computed in training-mode form and pooled exactly. A statistic like the ranges and histograms of
calibration (calibration.Calibration.moments produces it); BatchNorm recalibration
(passes/recalibrate_batchnorm.py) judges and applies it.

* ``training_mode_model(graph, names)``: a working copy (an ONNX model, never the pipeline's graph) where each
  named inference-mode BatchNormalization is replaced by its training-mode computation from explicit ONNX ops::

      axes = [0] + [2 .. rank-1]                  (N and the spatial axes, computed in-graph: any rank)
      mean = ReduceMean(x, axes, keepdims=1);  d = x - mean;  var = ReduceMean(d * d, axes, keepdims=1)
      y    = d / Sqrt(var + eps) * gamma + beta

  so every downstream layer (and the downstream BatchNorms) sees values normalized with statistics of the
  upstream values, as a framework's train-mode forward does; ``mean``, ``var`` and ``Size(x)`` of every BN
  are extra outputs;
* ``free_batch(model)``: a static batch dimension made dynamic (batch statistics need real batches);
* ``PooledMoments``: Chan et al.'s exact parallel update of (count, mean, sum of squared deviations) in
  float64, O(channels) memory: the mean and population variance of all the values a BN saw, whatever the
  batching (averaging per-batch variances, PyTorch's cumulative update, leaves out the spread of the batch
  means);
* ``pooled_moments(models, channels, data, ...)``: one onnxruntime run per model and batch (level basic, as for
  every quantized model), pooled per model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from onnxfp8.calibrators.data import batch_size
from onnxfp8.errors import DataError
from onnxfp8.modelio import make_session, to_model

SUFFIX = "__onnxfp8_bnrecal"

try:
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

    ORT_ERRORS = (Fail, InvalidArgument, RuntimeException)
except ImportError:  # pragma: no cover - older onnxruntime layouts
    ORT_ERRORS = (RuntimeError,)


class FreedBatchFailed(Exception):
    """onnxruntime refused the working copy whose static batch dimension was freed."""


class PooledMoments:
    """Exact streaming pooling of per-channel (count, mean, M2 = sum of squared deviations), float64."""

    def __init__(self, channels: int):
        self.n = 0.0
        self.mean = np.zeros(channels, np.float64)
        self.m2 = np.zeros(channels, np.float64)

    def update(self, n: float, mean: np.ndarray, var: np.ndarray) -> None:
        """Fold in a batch of ``n`` values per channel with (population) ``mean`` and ``var``."""
        if n <= 0:
            return
        mean = np.asarray(mean, np.float64).reshape(-1)
        var = np.asarray(var, np.float64).reshape(-1)
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + var * n + delta * delta * (self.n * n / total)
        self.n = total

    @property
    def var(self) -> np.ndarray:
        return self.m2 / self.n if self.n else np.zeros_like(self.m2)


def training_mode_model(graph: gs.Graph, names: List[str]) -> onnx.ModelProto:
    """Export a copy of ``graph`` with the named BatchNormalization nodes in training-mode form (explicit
    ops), each exposing ``<bn>__onnxfp8_bnrecal_{mean,var,size}`` as graph outputs."""
    # the statistics in the BN input's own float type (float16 models: ReduceMean of float16 is float16)
    from onnxfp8.passes.emulate import float_type  # the graph's own float types

    ftype = {n.name: float_type(n.inputs[0]) for n in graph.nodes if n.op == "BatchNormalization"}
    model = to_model(graph.copy())
    g = model.graph
    wanted = set(names)
    nodes = list(g.node)
    del g.node[:]
    i64 = lambda name, v: numpy_helper.from_array(np.asarray(v, np.int64), name)  # noqa: E731
    for node in nodes:
        if node.op_type != "BatchNormalization" or node.name not in wanted:
            g.node.append(node)
            continue
        x, gamma, beta = node.input[0], node.input[1], node.input[2]
        y = node.output[0]
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        p = node.name + SUFFIX
        g.initializer.extend([i64(f"{p}_zero", [0]), i64(f"{p}_two", 2), i64(f"{p}_one", 1),
                              numpy_helper.from_array(np.asarray(eps, ftype.get(node.name, np.float32)), f"{p}_eps")])

        def add(op, ins, outs, **attrs):
            g.node.append(helper.make_node(op, ins, outs, name=f"{p}/{op}_{len(g.node)}", **attrs))

        add("Shape", [x], [f"{p}_shape"])
        add("Size", [f"{p}_shape"], [f"{p}_rank"])
        add("Range", [f"{p}_two", f"{p}_rank", f"{p}_one"], [f"{p}_spatial"])
        add("Concat", [f"{p}_zero", f"{p}_spatial"], [f"{p}_axes"], axis=0)
        add("ReduceMean", [x, f"{p}_axes"], [f"{p}_mean"], keepdims=1)
        add("Sub", [x, f"{p}_mean"], [f"{p}_d"])
        add("Mul", [f"{p}_d", f"{p}_d"], [f"{p}_d2"])
        add("ReduceMean", [f"{p}_d2", f"{p}_axes"], [f"{p}_var"], keepdims=1)
        add("Add", [f"{p}_var", f"{p}_eps"], [f"{p}_vareps"])
        add("Sqrt", [f"{p}_vareps"], [f"{p}_std"])
        add("Shape", [f"{p}_mean"], [f"{p}_cshape"])
        add("Reshape", [gamma, f"{p}_cshape"], [f"{p}_gamma"])
        add("Reshape", [beta, f"{p}_cshape"], [f"{p}_beta"])
        add("Div", [f"{p}_d", f"{p}_std"], [f"{p}_xhat"])
        add("Mul", [f"{p}_xhat", f"{p}_gamma"], [f"{p}_scaled"])
        add("Add", [f"{p}_scaled", f"{p}_beta"], [y])
        add("Size", [x], [f"{p}_size"])
        et = helper.np_dtype_to_tensor_dtype(np.dtype(ftype.get(node.name, np.float32)))
        g.output.extend([helper.make_tensor_value_info(f"{p}_mean", et, None),
                         helper.make_tensor_value_info(f"{p}_var", et, None),
                         helper.make_tensor_value_info(f"{p}_size", onnx.TensorProto.INT64, [])])
    return model


def free_batch(model: onnx.ModelProto) -> bool:
    """Make the batch dimension of a working copy dynamic when every input has the same static one (an export
    with batch 1 would otherwise give the upstream BNs one sample's statistics): inputs' and outputs' first
    dimension become a parameter and value_info is dropped. Returns True when something changed."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in inits]
    firsts = {vi.type.tensor_type.shape.dim[0].dim_value if len(vi.type.tensor_type.shape.dim)
              and vi.type.tensor_type.shape.dim[0].HasField("dim_value") else None for vi in inputs}
    if not inputs or len(firsts) != 1 or None in firsts:
        return False
    batch = firsts.pop()
    for vi in inputs + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value == batch:
            dims[0].dim_param = "onnxfp8_bn_batch"
    del model.graph.value_info[:]
    return True


@dataclass
class MomentsResult:
    """Per model (in the order given) the pooled moments of every BN; the samples and batches read."""

    pooled: List[Dict[str, PooledMoments]] = field(default_factory=list)
    samples: int = 0
    batches: int = 0


def pooled_moments(models: Sequence[onnx.ModelProto], channels: Dict[str, int], data: Any, *,
                   providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0, source: str = "model",
                   freed: bool = False) -> MomentsResult:
    """Run the training-mode working copies ``models`` (training_mode_model) once per batch of ``data`` and
    pool the moments of the BNs named in ``channels`` (BN name -> channel count). ``freed``: the models' static
    batch dimension was freed; onnxruntime refusing them then raises FreedBatchFailed (the caller retries
    with the static batch)."""

    def ort(fn, *args):
        try:
            return fn(*args)
        except ORT_ERRORS as e:
            if freed:
                raise FreedBatchFailed(str(e)) from e
            raise

    sessions = [ort(make_session, m, "basic", providers, threads) for m in models]
    names = list(channels)
    fetch = [f"{n}{SUFFIX}_{k}" for n in names for k in ("mean", "var", "size")]
    out = MomentsResult([{n: PooledMoments(int(c)) for n, c in channels.items()} for _ in sessions])
    for batch in data.batches():
        for sess, acc_of in zip(sessions, out.pooled):  # one run per batch and model, never one per layer
            values = ort(sess.run, fetch, batch)
            for i, n in enumerate(names):
                mean, var, size = values[3 * i], values[3 * i + 1], int(values[3 * i + 2])
                acc = acc_of[n]
                if mean.size != acc.mean.size:
                    raise DataError(f"{source}: {n} has {acc.mean.size} channels but its input has {mean.size}")
                acc.update(size / mean.size, mean, var)
        out.samples += batch_size(batch)  # along each input's batch axis (a state [2, batch, C] on axis 1)
        out.batches += 1
    return out
