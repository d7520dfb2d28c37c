"""insert_qdq: realise the plan in the graph.

Weights: the FP32 initializer is replaced by its quantized twin (an FP8 / INT8 / E3M4-code initializer, so the
file really shrinks) followed by DequantizeLinear (or the emulated decode); when every consumer of the weight
is quantized the dequantized tensor keeps the weight's name. Activations: one QuantizeLinear ->
DequantizeLinear per tensor, shared by all quantized consumers, the original tensor name kept on the FP32
producer's output (so per-layer comparison can match tensors by name). Zero points are 0 of the format's
type; biases stay FP32. The fragments themselves come from passes/emulate.py (``qdq`` or ``emulate`` style).
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import onnx_graphsurgeon as gs

from onnxfp8 import names
from onnxfp8.formats import get_format
from onnxfp8.passes.emulate import DynamicScale, emitter_for
from onnxfp8.pipeline import Pass, PassContext, PassResult
from onnxfp8.plan import DynamicSpec


def _rewire(node: gs.Node, old: gs.Tensor, new: gs.Tensor, indices=None) -> None:
    for i, t in enumerate(node.inputs):
        if t is old and (indices is None or i in indices):
            node.inputs[i] = new


class InsertQDQ(Pass):
    name = "insert_qdq"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        plan = ctx.plan
        style = ctx.config.style
        by_name = {n.name: n for n in graph.nodes}
        tensors = graph.tensors()
        counts: Dict[str, int] = {}
        emulated: List[str] = []
        for spec in plan.tensors.values():
            fmt = get_format(spec.format)
            em = emitter_for(style, fmt, graph, ctx.twin_of)
            if fmt.emulated and style != "emulate":
                emulated.append(spec.tensor)
            consumers = [by_name[c] for c in spec.consumers if c in by_name]
            t = tensors.get(spec.tensor)
            if t is None:
                raise ValueError(f"planned tensor {spec.tensor} is not in the graph")
            if spec.role == "weight":
                all_quantized = all(n.name in spec.consumers for n in t.outputs)
                out_name = spec.tensor if all_quantized else names.dq(spec.tensor)
                if all_quantized:
                    t.name = names.fp32(spec.tensor)  # frees the name for the dequantized tensor
                    w = gs.Constant(spec.tensor, t.values)
                else:
                    w = t
                dq = em.weight(w, spec, fmt, out_name)
                for n in consumers:
                    _rewire(n, t, dq, self._weight_indices(n, plan))
            else:
                if spec.placement.startswith("before:"):
                    relu = by_name[spec.placement.split(":", 1)[1]]
                    x = relu.inputs[0]
                    dq = em.activation(x, spec, fmt, spec.tensor, self._dynamic(em, x, spec, fmt, True))
                    others = [n for n in t.outputs if n.name not in spec.consumers]
                    if others:  # other readers keep the FP32 Relu: quantized consumers get a clone
                        out = gs.Variable(names.relu_q(spec.tensor), dtype=t.dtype, shape=t.shape)
                        graph.nodes.append(gs.Node("Relu", name=f"{relu.name}/quantized", inputs=[dq], outputs=[out]))
                        for n in consumers:
                            _rewire(n, t, out)
                    else:
                        relu.inputs[0] = dq
                else:
                    dq = em.activation(t, spec, fmt, spec.tensor, self._dynamic(em, t, spec, fmt))
                    for n in consumers:
                        _rewire(n, t, dq)
            counts[spec.role] = counts.get(spec.role, 0) + 1
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        notes = [f"{counts.get('weight', 0)} weight(s) and {counts.get('activation', 0)} activation(s) quantized "
                 f"({style} style)"]
        if emulated:
            notes.append(f"{len(emulated)} E3M4 tensor(s) emulated in-graph (E3M4 has no ONNX type)")
        return PassResult(bool(counts), notes)

    @staticmethod
    def _dynamic(em, x, spec, fmt, before_relu: bool = False):
        """A run-time scale for an activation spec without a scale (dynamic quantization), else None.
        ``spec.dynamic`` (from assign_formats / passthrough): granularity, axis, signed."""
        if spec.scale is not None:
            return None
        info = spec.dynamic or DynamicSpec()
        axis = info.axis if info.granularity == "token" else None
        return DynamicScale(em, x, fmt, spec.tensor, axis=axis, signed=before_relu or info.signed)

    @staticmethod
    def _weight_indices(node: gs.Node, plan) -> List[int]:
        d = plan.nodes.get(node.name)
        return [i for i, r in d.inputs.items() if r == "weight"] if d else None

    def ensures(self, graph: gs.Graph, ctx: PassContext) -> None:
        for node in graph.nodes:
            if node.op in ("QuantizeLinear", "DequantizeLinear"):
                scale = node.inputs[1]
                if isinstance(scale, gs.Constant):
                    s = scale.values.astype(np.float32)
                    if not (np.isfinite(s).all() and (s > 0).all()):
                        raise ValueError(f"{node.name}: scale must be finite and > 0")
                if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
                    zp = node.inputs[2].values
                    if np.any(zp.astype(np.float32) != 0):
                        raise ValueError(f"{node.name}: zero point must be 0")
