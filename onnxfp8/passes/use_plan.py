"""use_plan: take the decisions from a saved (possibly hand-edited) QuantPlan instead of making them.

``apply_plan`` puts the plan in ``ctx.plan``; this pass stands where ``select_ops`` stands and the deciding
passes after it (calibrate, assign_formats, passthrough) are left out (passes.plan_pipeline). It checks the
plan against the graph, so that an edit that cannot work fails here with one line naming the plan and the
entry, not deep inside insert_qdq:

- every node the plan decides and every consumer of a spec is a node of the graph, and a consumer is a
  quantized node (``QuantPlan.resolve`` first drops the nodes an edit marked ``"quantized": false``);
- every spec's tensor is in the graph (a weight: a constant), its format is known, its scale is finite and
  > 0 (one per channel along ``axis`` for a weight, one for an activation), or it is dynamic;
- the placement ``before:<node>`` names a Relu that produces the tensor;
- a node's ``fallback`` is "fp16" or "fp32" on a node that is not quantized, "fp16" only on FALLBACK_FP16_OPS.
"""
from __future__ import annotations

import math
from typing import List

import numpy as np
import onnx_graphsurgeon as gs

from onnxfp8.errors import ConfigError
from onnxfp8.formats import get_format
from onnxfp8.pipeline import Pass, PassContext, PassResult
from onnxfp8.plan import FALLBACK_FP16_OPS, FALLBACKS


class UsePlan(Pass):
    name = "use_plan"

    def __init__(self, source: str = "plan"):
        self.source = source

    def _fail(self, message: str) -> None:
        raise ConfigError(f"{self.source}: {message}")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        plan = ctx.plan
        dropped = plan.resolve()
        by_name = {n.name: n for n in graph.nodes}
        tensors = graph.tensors()
        missing = [n for n in plan.nodes if n not in by_name]
        if missing:
            self._fail(f"node '{missing[0]}' is not in the model ({len(missing)} planned node(s) missing): the plan "
                       f"belongs to another model or export")
        for d in plan.nodes.values():
            if d.fallback is None:
                continue
            what = f"node '{d.node}'"
            if d.fallback not in FALLBACKS:
                self._fail(f"{what}: unknown fallback '{d.fallback}' ({' or '.join(FALLBACKS)})")
            if d.quantized:
                self._fail(f"{what}: fallback '{d.fallback}' on a quantized node; set \"quantized\": false")
            if d.fallback == "fp16" and by_name[d.node].op not in FALLBACK_FP16_OPS:
                self._fail(f"{what} ({by_name[d.node].op}): FP16 fallback is made for {', '.join(FALLBACK_FP16_OPS)} only")
        for spec in plan.tensors.values():
            t = tensors.get(spec.tensor)
            what = f"tensor '{spec.tensor}'"
            if t is None:
                self._fail(f"{what} is not in the model")
            try:
                fmt = get_format(spec.format)
            except (ValueError, TypeError, AttributeError) as e:
                self._fail(f"{what}: {e}")
            for c in spec.consumers:
                d = plan.nodes.get(c)
                if c not in by_name:
                    self._fail(f"{what}: consumer '{c}' is not in the model")
                if d is None or not d.quantized:
                    self._fail(f"{what}: consumer '{c}' is not a quantized node of the plan")
            if spec.role == "weight":
                if not isinstance(t, gs.Constant):
                    self._fail(f"{what} is planned as a weight but is not a constant of the model")
                self._check_weight_scale(spec, t.values.shape, what)
            elif spec.role == "activation":
                if spec.scale is None:
                    if spec.dynamic is None:
                        self._fail(f"{what}: no scale and not dynamic; give a scale (amax / {fmt.name} max)")
                else:
                    s = np.asarray(spec.scale, np.float64)
                    if s.size != 1:
                        self._fail(f"{what}: an activation takes one scale, got {s.size}")
                    self._check_finite(s, what)
                if spec.placement.startswith("before:"):
                    relu = by_name.get(spec.placement.split(":", 1)[1])
                    if relu is None or relu.op != "Relu" or not relu.outputs or relu.outputs[0].name != spec.tensor:
                        self._fail(f"{what}: placement '{spec.placement}' does not name the Relu producing it")
                elif spec.placement != "output":
                    self._fail(f"{what}: unknown placement '{spec.placement}' (output or before:<Relu node>)")
            else:
                self._fail(f"{what}: unknown role '{spec.role}' (weight or activation)")
        q = len(plan.quantized_nodes())
        notes = [f"plan: {q} of {len(plan.nodes)} node(s) quantized, {len(plan.weights())} weight(s) and "
                 f"{len(plan.activations())} activation(s) planned"]
        if dropped:
            notes.append(f"{len(dropped)} tensor(s) no quantized node reads any more, left FP32: "
                         + ", ".join(dropped[:8]) + (" ..." if len(dropped) > 8 else ""))
        return PassResult(False, notes)

    def _check_weight_scale(self, spec, shape, what: str) -> None:
        s = np.asarray(spec.scale, np.float64)
        if spec.axis is not None and not -len(shape) <= spec.axis < len(shape):
            self._fail(f"{what}: axis {spec.axis} out of range for rank {len(shape)}")
        want = 1 if spec.axis is None else shape[spec.axis]
        if s.size not in (1, want) or (spec.axis is None and s.size != 1):
            self._fail(f"{what}: {s.size} scale(s), but the weight has {want} channel(s)"
                       + (f" on axis {spec.axis}" if spec.axis is not None else " (no axis: one scale)"))
        self._check_finite(s, what)

    def _check_finite(self, s: np.ndarray, what: str) -> None:
        bad: List[float] = [float(v) for v in s.reshape(-1) if not (math.isfinite(v) and v > 0)]
        if bad:
            self._fail(f"{what}: scale {bad[0]} is not a finite number > 0")
