"""passthrough: let pooling, Resize, Concat and layout ops carry a quantized tensor instead of re-quantizing it.

Ops that only select, move or copy values (MaxPool, Reshape, Transpose, Flatten, Squeeze, Unsqueeze, Slice,
Identity, Resize in mode "nearest", Concat, and Relu, which maps a grid value to a grid value) commute with
symmetric quantization by a common scale ``s``::

    q_s(P(x)) == P(q_s(x))        (P applied elementwise-monotone or as a pure selection)

So an activation quantized on a pass-through op's *output* is quantized on its *input* instead, with the same
scale and format: the op then runs on the quantized tensor (what TensorRT turns into an FP8/INT8 kernel or a
no-op on FP8 data) and its consumers read its output directly, with no DQ -> Q round trip. The spec climbs
chains (Relu -> MaxPool -> Reshape -> Transpose) as long as every tensor on the way is read only by the next
op of the chain (and the last one only by quantized consumers) and is not a graph output. Concat moves the
spec onto each of its inputs with the shared scale (TensorRT's requirement for a quantized Concat). When the
tensor reached is already quantized for another consumer in the same format, that quantization is reused
(when both come from this pass, the range is the larger of the two). The function of the model does not
change for static scales: the scale of the chain's output is valid on its input since the elements the
chain drops or zeroes do not reach its consumers.

Dynamic scales: a chain through Relu computes the scale from the signed max (``ReduceMax(x)``, the max of
``relu(x)``), others from ``max |x|`` on the input; per-token dynamic specs stay where they are (a reshape or
transpose changes what a row is).

An op passes quantized tensors through only when its op type is selected (the extended scheme lists them),
it is not excluded by --exclude-op / --exclude-node and matches --include-node when given.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Set

import numpy as np
import onnx_graphsurgeon as gs

from onnxfp8.formats import get_format
from onnxfp8.pipeline import Pass, PassContext, PassResult
from onnxfp8.plan import QuantSpec
from onnxfp8.rules import PASSTHROUGH_OPS, NodeNameRule, is_const


def _data_input(node: gs.Node) -> Optional[gs.Tensor]:
    """The single data input of a pass-through op (others must be constants or integer shape tensors)."""
    if node.op == "Concat" or not node.inputs:
        return None
    x = node.inputs[0]
    if is_const(x) or not x.name:
        return None
    for t in node.inputs[1:]:
        if t is None or not getattr(t, "name", ""):
            continue
        if not is_const(t) and np.dtype(t.dtype if t.dtype is not None else np.float32).kind == "f":
            return None  # e.g. Resize with computed float scales: keep it simple, not a pass-through
    return x


def _float(t: gs.Tensor) -> bool:
    dt = getattr(t, "dtype", None)
    return dt is None or np.dtype(dt).kind == "f"


class PassThrough(Pass):
    name = "passthrough"

    def _allowed(self, node: gs.Node, ctx: PassContext, name_rules: List[NodeNameRule]) -> bool:
        cfg = ctx.config
        if node.op not in PASSTHROUGH_OPS or node.op not in cfg.selected_op_types or node.op in cfg.exclude_ops:
            return False
        if node.op == "Resize" and node.attrs.get("mode", "nearest") != "nearest":
            return False
        if node.op == "MaxPool" and len([o for o in node.outputs if o.outputs]) > 1:
            return False  # the Indices output is read
        return all(rule.decide(node, None) is None for rule in name_rules)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        plan = ctx.plan
        cfg = ctx.config
        name_rules = [NodeNameRule(cfg.exclude_nodes)]  # --exclude-node / --include-node, as select_ops reads them
        if cfg.include_nodes:
            name_rules.append(NodeNameRule(cfg.include_nodes, include=True))
        outputs = {t.name for t in graph.outputs}
        tensors = graph.tensors()
        order = {n.name: i for i, n in enumerate(graph.nodes)}
        created: Set[str] = set()  # specs this pass created (their range may grow on a merge)
        carried: Dict[str, str] = {}  # pass-through node -> tensor it carries
        moved = 0

        def producer_pos(spec: QuantSpec) -> int:
            t = tensors.get(spec.tensor)
            return order.get(t.inputs[0].name, -1) if t is not None and len(t.inputs) == 1 else -1

        # deepest tensors first, so a chain's spec can merge into one that climbs further later
        for spec in sorted(plan.activations(), key=producer_pos, reverse=True):
            if plan.tensors.get(spec.tensor) is not spec:
                continue
            info = spec.dynamic
            if info is not None and info.granularity == "token":
                continue
            t = tensors.get(spec.tensor)
            if t is None or spec.tensor in outputs or len(t.inputs) != 1:
                continue
            readers = {n.name for n in t.outputs}
            if not readers or not readers <= set(spec.consumers):
                continue
            chain: List[gs.Node] = []
            cur = t
            heads: List[gs.Tensor] = []
            while True:
                if len(cur.inputs) != 1:
                    break
                p = cur.inputs[0]
                if not self._allowed(p, ctx, name_rules) or cur.name in outputs:
                    break
                if chain and (len(cur.outputs) != 1 or cur.outputs[0] is not chain[-1]):
                    break
                if p.op == "Concat":
                    ins = list(p.inputs)
                    if all(not is_const(x) and x.name and _float(x) for x in ins) and len({x.name for x in ins}) == len(ins):
                        chain.append(p)
                        heads = ins
                    break
                x = _data_input(p)
                if x is None or not _float(x):
                    break
                chain.append(p)
                cur = x
                heads = [x]
            if not chain:
                continue
            head = chain[-1]
            fmt = get_format(spec.format)
            signed = any(n.op == "Relu" for n in chain)
            # every landing tensor must accept the spec before anything moves
            landing = []
            ok = True
            for x in heads:
                sx = plan.tensors.get(x.name)
                if sx is None:
                    landing.append((x, None))
                    continue
                same_kind = (sx.scale is None) == (spec.scale is None)
                if sx.role != "activation" or sx.format != spec.format or not same_kind:
                    ok = False
                    break
                if sx.dynamic is not None and sx.dynamic.granularity == "token":
                    ok = False
                    break
                if head.op == "Concat" and not (x.name in created and sx.scale is not None):
                    ok = False  # a Concat's inputs must share one scale: only specs this pass made can adapt
                    break
                if signed != bool(sx.dynamic is not None and sx.dynamic.signed) and spec.scale is None:
                    ok = False
                    break
                landing.append((x, sx))
            if not ok:
                continue
            path = " -> ".join(n.name for n in reversed(chain))
            amax = spec.amax
            if head.op == "Concat":  # one shared range over every input
                for _, sx in landing:
                    if sx is not None and sx.amax is not None and amax is not None:
                        amax = max(float(amax), float(sx.amax))
            for x, sx in landing:
                if sx is None:
                    new = QuantSpec(x.name, "activation", spec.format, spec.scale, None, amax, [head.name],
                                    "output", list(spec.notes), dict(spec.candidates), method=spec.method,
                                    auto_reason=spec.auto_reason)
                    new.notes.append(f"quantized before {path} (pass-through of {spec.tensor}'s quantization)")
                    if spec.placement.startswith("before:"):
                        new.notes = [n for n in new.notes if "Relu input" not in n]
                    plan.tensors[x.name] = new
                    created.add(x.name)
                    if info is not None:
                        new.dynamic = dataclasses.replace(info, signed=signed or info.signed)
                else:
                    if head.name not in sx.consumers:
                        sx.consumers.append(head.name)
                    if x.name in created and sx.scale is not None and amax is not None:
                        sx.amax = max(float(sx.amax or 0.0), float(amax))
                        sx.scale = float(fmt.scale_for(np.float32(sx.amax)))
                    sx.notes.append(f"also carried through {path} to the consumers of {spec.tensor}")
            if head.op == "Concat":  # the shared range may have grown: every input gets the same scale
                for x, _ in landing:
                    s = plan.tensors[x.name]
                    s.amax = max(float(s.amax or 0.0), float(amax or 0.0))
                    s.scale = float(fmt.scale_for(np.float32(s.amax))) if s.scale is not None else None
            del plan.tensors[spec.tensor]
            moved += 1
            for n in chain:
                carried[n.name] = spec.tensor
                d = plan.nodes.get(n.name)
                if d is not None:
                    d.quantized = True
                    d.reason = f"carries the quantized tensor of {spec.tensor} (same scale, no DQ->Q round trip)"
                    d.inputs = {}
        notes = []
        if moved:
            notes.append(f"{moved} quantization(s) moved before {len(carried)} pass-through op(s): "
                         + ", ".join(sorted(carried)[:8]) + (" ..." if len(carried) > 8 else ""))
        return PassResult(False, notes)
