"""fp16_fallback: realise the plan's FP16 fallback islands (``NodeDecision.fallback == "fp16"``).

A node in FP16 fallback computes what an FP16 kernel accumulating in FP32 computes (cuBLAS / TensorRT FP16
GEMM and convolution): its inputs and constants rounded to FP16, the products summed in FP32, the result
rounded once to FP16. In the graph (Cast-based, like the emulate style, so every onnxruntime level and
provider computes the same function):

- each float activation input ``x``: ``Cast(to=FLOAT16)`` -> ``<x>.fp16`` -> ``Cast(to=FLOAT)`` ->
  ``<x>.fp16_f32``, shared by every island that reads ``x``; an island reading another island's output
  reads it as it is (it is FP16-exact already);
- each float constant (weight, bias) ``w``: an FP16 initializer ``<w>.fp16`` (half the bytes) and
  ``Cast(to=FLOAT)`` -> ``<w>.fp16_f32``;
- the output ``y``: the node writes ``<y>.acc``, rounded by ``Cast(to=FLOAT16)`` -> ``<y>.fp16`` ->
  ``Cast(to=FLOAT)`` under the original name ``y`` (graph outputs and per-layer matching keep their names).

Why not FP16 operators: onnxruntime's CPU provider runs an FP16 Gemm / MatMul / Conv by inserting casts to
FP32 and then removes the lossy Cast pairs around it (measured with onnxruntime 1.32: an island written with
FP16 operators gave FP32 results), so such a graph would be evaluated as FP32 by the tuner. An FP16 runtime
can fuse the Casts into FP16 kernels; this pass does not emit that form.

Runs after insert_qdq: the island's inputs are the FP32 tensors (insert_qdq rewires only quantized consumers).
Whether a layer is FP16-safe is decided before, from calibration statistics (tuning/fp16.py); a constant that
does not fit FP16's range is refused here with one line naming the node.
"""
from __future__ import annotations

from typing import Dict, List, Set

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxfp8 import names
from onnxfp8.errors import ConfigError
from onnxfp8.pipeline import Pass, PassContext, PassResult

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
_F16, _F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT


def float_inputs(node: gs.Node) -> List[int]:
    """The input indices of ``node`` that carry float values (Gather: the data, not the indices)."""
    idx = [0] if node.op == "Gather" else list(range(len(node.inputs)))
    return [i for i in idx if i < len(node.inputs) and node.inputs[i] is not None and node.inputs[i].name]


def _dtype(t: gs.Tensor):
    dt = t.values.dtype if isinstance(t, gs.Constant) else t.dtype
    return None if dt is None else np.dtype(dt)


class FP16Fallback(Pass):
    name = "fp16_fallback"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        islands = [n for n, d in ctx.plan.nodes.items() if d.fallback == "fp16" and not d.quantized]
        if not islands:
            return PassResult(False, [])
        by_name = {n.name: n for n in graph.nodes}
        rounded: Dict[str, gs.Tensor] = {}  # tensor name -> its FP16-rounded FP32 value
        exact: Set[str] = set()  # island outputs: FP16-exact already
        weights = 0

        def cast(x: gs.Tensor, to: int, out_name: str, dtype, node_name: str) -> gs.Variable:
            out = gs.Variable(out_name, dtype=dtype, shape=x.shape)
            graph.nodes.append(gs.Node("Cast", name=node_name, attrs={"to": to}, inputs=[x], outputs=[out]))
            return out

        for name in islands:  # graph order of the plan: producers before consumers in a chain of islands
            node = by_name.get(name)
            if node is None:
                raise ValueError(f"FP16 fallback node {name} is not in the graph")
            y = node.outputs[0]
            exact.add(y.name)
        for name in islands:
            node = by_name[name]
            for i in float_inputs(node):
                t = node.inputs[i]
                if t.name in exact or _dtype(t) == np.float16:
                    continue
                r = rounded.get(t.name)
                if r is None:
                    if isinstance(t, gs.Constant):
                        v = np.asarray(t.values)
                        big = float(np.max(np.abs(v))) if v.size else 0.0
                        if not np.isfinite(big) or big > FP16_MAX:
                            raise ConfigError(f"plan: node '{name}': {t.name} holds |w| = {big:g}, beyond FP16's "
                                              f"{FP16_MAX:g}; leave it in FP32 (\"fallback\": \"fp32\")")
                        h = gs.Constant(names.fp16(t.name), v.astype(np.float16))
                        weights += 1
                    else:
                        h = cast(t, _F16, names.fp16(t.name), np.float16, f"{names.fp16(t.name)}/cast")
                    r = cast(h, _F32, names.fp16_f32(t.name), np.float32, f"{names.fp16_f32(t.name)}/cast")
                    rounded[t.name] = r
                node.inputs[i] = r
            y = node.outputs[0]
            if _dtype(y) == np.float16:
                continue
            a = gs.Variable(names.acc(y.name), dtype=y.dtype, shape=y.shape)
            node.outputs[0] = a
            h = cast(a, _F16, names.fp16(y.name), np.float16, f"{names.fp16(y.name)}/cast")
            back = onnx.helper.np_dtype_to_tensor_dtype(_dtype(y) or np.dtype(np.float32))
            graph.nodes.append(gs.Node("Cast", name=f"{y.name}/round_fp16", attrs={"to": back}, inputs=[h],
                                       outputs=[y]))
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(True, [f"{len(islands)} node(s) in FP16 fallback ({weights} constant(s) stored as FP16)"])
