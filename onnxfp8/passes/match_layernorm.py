"""match_layernorm: fuse the decomposed LayerNorm that exporters emit into one ``LayerNormalization`` node, so
that the extended scheme quantizes its input like any LayerNormalization.

The pattern (torch.onnx below opset 17, many TF exporters)::

    mean = ReduceMean(x, axes)            d = Sub(x, mean)
    var  = ReduceMean(Pow(d, 2) | Mul(d, d), axes)
    y    = Div(d, Sqrt(Add(var, eps)))    [* gamma]  [+ beta]

becomes ``LayerNormalization(x, gamma, beta, axis, epsilon)`` writing the pattern's output tensor (so names
stay stable). ``axes`` must be the trailing axes (``[-1]``, ``[-2, -1]`` or their positive spelling when the
rank is known); gamma / beta must be constants of the normalized shape (absent gamma = ones, absent
beta = zeros, which needs the normalized shape). Left alone: intermediate tensors read elsewhere or
exported as graph outputs, non-constant eps / gamma / beta, other exponents. The fused node computes the
same function; float results differ in the last bits (onnxruntime's kernel sums in another order).
The pass runs only when LayerNormalization is among the selected op types."""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import onnx_graphsurgeon as gs

from onnxfp8.passes.emulate import float_type
from onnxfp8.pipeline import Pass, PassContext, PassResult


def _const_value(t) -> Optional[np.ndarray]:
    return t.values if isinstance(t, gs.Constant) else None


def _only_consumer(t: gs.Tensor, graph_outputs) -> Optional[gs.Node]:
    if t.name in graph_outputs or len(t.outputs) != 1:
        return None
    return t.outputs[0]


def _reduce_axes(node: gs.Node) -> Optional[List[int]]:
    if node.attrs.get("keepdims", 1) != 1:
        return None
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > 1:
        v = _const_value(node.inputs[1])
        if v is not None:
            return [int(a) for a in np.asarray(v).reshape(-1)]
    return None


def _trailing_axis(axes: List[int], rank: Optional[int]) -> Optional[int]:
    """The LayerNormalization axis for reduction ``axes`` when they are the trailing axes, else None."""
    if not axes:
        return None
    if any(a >= 0 for a in axes):
        if rank is None:
            return None
        axes = [a - rank if a >= 0 else a for a in axes]
    axes = sorted(axes)
    if axes != list(range(-len(axes), 0)):
        return None
    return axes[0]


def _scalar(t) -> Optional[float]:
    v = _const_value(t)
    if v is None or v.size != 1:
        return None
    return float(np.asarray(v).reshape(-1)[0])


def match(node: gs.Node, graph_outputs) -> Optional[dict]:
    """Match the pattern starting at the first ReduceMean ``node``; a dict describing it, or None."""
    if node.op != "ReduceMean" or not node.inputs:
        return None
    x = node.inputs[0]
    rank = len(x.shape) if getattr(x, "shape", None) is not None else None
    axes = _reduce_axes(node)
    axis = _trailing_axis(axes, rank) if axes is not None else None
    if axis is None:
        return None
    mean = node.outputs[0]
    sub = _only_consumer(mean, graph_outputs)
    if sub is None or sub.op != "Sub" or sub.inputs[0] is not x or sub.inputs[1] is not mean:
        return None
    d = sub.outputs[0]
    if d.name in graph_outputs:
        return None
    readers = list(d.outputs)
    sq = next((n for n in readers if n.op in ("Pow", "Mul") and n.inputs[0] is d), None)
    div = next((n for n in readers if n.op == "Div" and n.inputs[0] is d), None)
    if sq is None or div is None:
        return None
    if sq.op == "Pow" and _scalar(sq.inputs[1]) != 2.0:
        return None
    if sq.op == "Mul" and sq.inputs[1] is not d:
        return None
    if len(readers) != (3 if sq.op == "Mul" else 2):
        return None
    rm2 = _only_consumer(sq.outputs[0], graph_outputs)
    axes2 = _reduce_axes(rm2) if rm2 is not None and rm2.op == "ReduceMean" else None
    if axes2 is None or _trailing_axis(axes2, rank) != axis:
        return None
    add = _only_consumer(rm2.outputs[0], graph_outputs)
    if add is None or add.op != "Add":
        return None
    eps = _scalar(add.inputs[1]) if add.inputs[0] is rm2.outputs[0] else _scalar(add.inputs[0])
    if eps is None or eps < 0:
        return None
    sqrt = _only_consumer(add.outputs[0], graph_outputs)
    if sqrt is None or sqrt.op != "Sqrt" or _only_consumer(sqrt.outputs[0], graph_outputs) is not div \
            or div.inputs[1] is not sqrt.outputs[0]:
        return None
    nodes = [node, sub, sq, rm2, add, sqrt, div]
    out = div.outputs[0]
    params = {}  # [* gamma] [+ beta], in that order
    for op in ("Mul", "Add"):
        nxt = _only_consumer(out, graph_outputs)
        if nxt is not None and nxt.op == op:
            other = nxt.inputs[1] if nxt.inputs[0] is out else nxt.inputs[0]
            if _const_value(other) is not None:
                params[op], out = other.values, nxt.outputs[0]
                nodes.append(nxt)
    gamma, beta = params.get("Mul"), params.get("Add")
    norm_shape = None
    if rank is not None and all(isinstance(s, int) for s in x.shape[axis:]):
        norm_shape = tuple(x.shape[axis:])
    for p in (gamma, beta):
        if p is not None:
            p = np.asarray(p)
            if p.ndim > -axis or (norm_shape is None and p.ndim != -axis):
                return None
            if norm_shape is None:
                norm_shape = p.shape
    if norm_shape is None:
        return None
    try:
        ft = float_type(x)  # LayerNormalization's scale and bias have the type of its input (float16 models)
        gamma = np.broadcast_to(np.asarray(1.0 if gamma is None else gamma).astype(ft), norm_shape).copy()
        beta = np.broadcast_to(np.asarray(0.0 if beta is None else beta).astype(ft), norm_shape).copy()
    except ValueError:
        return None
    return {"x": x, "out": out, "nodes": nodes, "axis": axis, "epsilon": eps, "gamma": gamma, "beta": beta}


class MatchLayerNorm(Pass):
    name = "match_layernorm"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        cfg = ctx.config
        if "LayerNormalization" not in cfg.selected_op_types or "LayerNormalization" in cfg.exclude_ops:
            return PassResult(False, [])
        outputs = {t.name for t in graph.outputs}
        fused: List[str] = []
        used = {n.name for n in graph.nodes}
        for node in list(graph.nodes):
            if node.op != "ReduceMean" or not node.outputs:
                continue
            m = match(node, outputs)
            if m is None:
                continue
            scope = node.name.rsplit("/", 1)[0] if "/" in node.name else f"{node.name}_layernorm"
            name = scope
            k = 1
            while name in used:
                name = f"{scope}_{k}"
                k += 1
            used.add(name)
            out = m["out"]
            for n in m["nodes"]:
                n.outputs.clear()
            graph.nodes.append(gs.Node(
                "LayerNormalization", name=name,
                attrs={"axis": int(m["axis"]), "epsilon": float(m["epsilon"])},
                inputs=[m["x"], gs.Constant(f"{name}.gamma", m["gamma"]), gs.Constant(f"{name}.beta", m["beta"])],
                outputs=[out]))
            fused.append(name)
        if fused:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        notes = [f"{len(fused)} decomposed LayerNorm(s) fused into LayerNormalization: {', '.join(fused[:6])}"
                 + (" ..." if len(fused) > 6 else "")] if fused else []
        return PassResult(bool(fused), notes)
