"""fold_batchnorm: fold an inference-mode BatchNormalization into the Conv / ConvTranspose / Gemm before it.

BatchNormalization computes ``y = s * (x - mean) + beta`` per channel with ``s = gamma / sqrt(var + eps)``.
When ``x = W * a + b`` (Conv, ConvTranspose, Gemm with output channel c), then

    y = (s_c * W_c) * a + (s_c * (b_c - mean_c) + beta_c)

so the weight's output channel c is scaled by ``s_c`` and the bias becomes ``s_c * (b - mean) + beta``.
The output-channel axis of the weight is 0 for Conv, 1 for ConvTranspose (with groups: output channel
``g * (C_out / group) + j`` is column j of group g's rows), 0 for Gemm with transB=1 and 1 with transB=0.
For Gemm ``Y = alpha * A @ B + beta_g * C``: B is scaled by ``s`` and C becomes ``s * (beta_g * C - mean) + beta``
with beta_g set to 1. The BN's output tensor keeps its name (it now comes from the folded node).

Left alone, with a note: weights or biases shared with other nodes, non-constant parameters, BN in training
mode, a producer whose output has other consumers or is a graph output.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import onnx_graphsurgeon as gs

from onnxfp8.pipeline import Pass, PassContext, PassResult

FOLDABLE = ("Conv", "ConvTranspose", "Gemm")


def bn_producer(bn: gs.Node) -> Optional[gs.Node]:
    """The node whose output ``bn`` normalizes (None for a graph input)."""
    x = bn.inputs[0]
    return x.inputs[0] if len(x.inputs) == 1 else None


def ensure_finite_biases(graph: gs.Graph) -> None:
    """The postcondition of folding: no foldable node was left with a non-finite bias."""
    for n in graph.nodes:
        if n.op in FOLDABLE and len(n.inputs) > 2 and isinstance(n.inputs[2], gs.Constant):
            if not np.isfinite(n.inputs[2].values).all():
                raise ValueError(f"folding produced a non-finite bias in {n.name}")


def fold_into(node: gs.Node, bn: gs.Node) -> Optional[str]:
    """Fold ``bn`` into ``node`` in place; return a reason string when it cannot."""
    if any(not isinstance(t, gs.Constant) for t in bn.inputs[1:5]):
        return "BatchNormalization parameters are not constants"
    if bn.attrs.get("training_mode", 0) or len([o for o in bn.outputs if o.name]) > 1:
        return "BatchNormalization is in training mode"
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if not isinstance(w, gs.Constant):
        return f"{node.op} weight is not a constant"
    if len(w.outputs) > 1:
        return f"{node.op} weight {w.name} is shared with other nodes"
    b = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if b is not None and (not isinstance(b, gs.Constant) or len(b.outputs) > 1):
        return f"{node.op} bias is not a constant of its own"
    out = node.outputs[0]
    if len(out.outputs) != 1:
        return f"{node.op} output has other consumers"
    gamma, beta, mean, var = (t.values.astype(np.float64) for t in bn.inputs[1:5])
    eps = float(bn.attrs.get("epsilon", 1e-5))
    s = gamma / np.sqrt(var + eps)
    W = w.values.astype(np.float64)
    C = s.shape[0]
    if node.op == "Conv":
        if W.shape[0] != C:
            return "channel count mismatch"
        W = W * s.reshape((-1,) + (1,) * (W.ndim - 1))
        bias = np.zeros(C) if b is None else b.values.astype(np.float64)
        new_b = s * (bias - mean) + beta
    elif node.op == "ConvTranspose":
        group = int(node.attrs.get("group", 1))
        cout_g = W.shape[1]
        if cout_g * group != C:
            return "channel count mismatch"
        cin_g = W.shape[0] // group
        # row r belongs to group r // cin_g; column j of that group is output channel g * cout_g + j
        g_of_row = np.arange(W.shape[0]) // cin_g
        factors = s[g_of_row[:, None] * cout_g + np.arange(cout_g)[None, :]]
        W = W * factors.reshape(factors.shape + (1,) * (W.ndim - 2))
        bias = np.zeros(C) if b is None else b.values.astype(np.float64)
        new_b = s * (bias - mean) + beta
    elif node.op == "Gemm":
        transB = int(node.attrs.get("transB", 0))
        n_out = W.shape[0] if transB else W.shape[1]
        if n_out != C:
            return "channel count mismatch"
        W = W * (s[:, None] if transB else s[None, :])
        beta_g = float(node.attrs.get("beta", 1.0))
        if b is None:
            bias = np.zeros(C)
        else:
            bias = b.values.astype(np.float64)
            if bias.size not in (1, C) or bias.ndim > 1 and bias.shape[0] != 1:
                return "Gemm bias is not per output channel"
            bias = np.broadcast_to(bias.reshape(-1), (C,))
        new_b = s * (beta_g * bias - mean) + beta
        node.attrs["beta"] = 1.0
    else:
        return f"cannot fold into {node.op}"
    dtype = w.values.dtype
    node.inputs[1] = gs.Constant(w.name, W.astype(dtype))
    bias_name = b.name if b is not None else f"{node.name}.bias"
    bias_const = gs.Constant(bias_name, new_b.astype(dtype))
    if len(node.inputs) > 2:
        node.inputs[2] = bias_const
    else:
        node.inputs.append(bias_const)
    # the folded node now produces the BN's output tensor
    bn_out = bn.outputs[0]
    bn.outputs.clear()
    bn.inputs.clear()
    node.outputs[0] = bn_out
    return None


def fold_candidates(graph: gs.Graph, notes: List[str], kept: str = "kept"):
    """The BatchNormalization nodes that may fold into the Conv/ConvTranspose/Gemm before them, as
    ``(bn, producer)``; the others get a note ending in ``kept``."""
    graph_outputs = set(id(t) for t in graph.outputs)
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        producer = bn_producer(bn)
        if producer is None or producer.op not in FOLDABLE:
            notes.append(f"{bn.name}: not after Conv/ConvTranspose/Gemm, {kept}")
            continue
        if id(bn.inputs[0]) in graph_outputs:
            notes.append(f"{bn.name}: {producer.name} output is a graph output, kept")
            continue
        yield bn, producer


class FoldBatchNorm(Pass):
    name = "fold_batchnorm"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if not ctx.config.fold_batchnorm:
            return PassResult(False, ["BatchNorm folding disabled"])
        notes: List[str] = []
        folded = 0
        for bn, producer in fold_candidates(graph, notes):
            reason = fold_into(producer, bn)
            if reason:
                notes.append(f"{bn.name}: not folded into {producer.name}: {reason}")
            else:
                folded += 1
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        notes.insert(0, f"folded {folded} BatchNormalization node(s)")
        return PassResult(folded > 0, notes)

    def ensures(self, graph: gs.Graph, ctx: PassContext) -> None:
        ensure_finite_biases(graph)
