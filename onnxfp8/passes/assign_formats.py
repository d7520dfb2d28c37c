"""assign_formats: turn node decisions and calibrated ranges into QuantSpecs (format, scale, axis) in the plan.

Weights get per-output-channel scales (``amax_c / format max`` over the channel, axis from the op: see
rules.weight_axis), activations one per-tensor scale shared by all quantized consumers. A zero, NaN or Inf
range gets a safe scale (Format.scale_for). Per-tensor overrides from the config (format, scale, axis,
amax) win. An activation produced by a Relu is quantized on the Relu's input with the Relu output's scale:
``relu(q(x)) == q(relu(x))`` for symmetric quantization, so the function is the same, and it keeps
onnxruntime from dropping a Relu that feeds an FP8 QuantizeLinear."""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import onnx_graphsurgeon as gs

from onnxfp8.errors import ConfigError
from onnxfp8.formats import get_format
from onnxfp8.pipeline import Pass, PassContext, PassResult
from onnxfp8.plan import QuantSpec
from onnxfp8.rules import weight_axis


def channel_amax(w: np.ndarray, axis) -> np.ndarray:
    a = np.abs(w.astype(np.float32))
    if axis is None:
        return np.asarray(a.max() if a.size else 0.0, dtype=np.float32)
    axes = tuple(i for i in range(a.ndim) if i != axis)
    return a.max(axis=axes) if axes else a


class AssignFormats(Pass):
    name = "assign_formats"

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
                    ax = weight_axis(node, idx, t.values.ndim) if cfg.per_channel else None
                    weight_axes.setdefault(t.name, []).append((d.node, ax))
                else:
                    act_consumers.setdefault(t.name, [])
                    if d.node not in act_consumers[t.name]:
                        act_consumers[t.name].append(d.node)
        notes = []
        for name, uses in weight_axes.items():
            over = dict(cfg.overrides.get(name, {}))
            fmt = get_format(over.get("format", cfg.weight_format))
            axes = {ax for _, ax in uses}
            axis = axes.pop() if len(axes) == 1 else None
            if len({ax for _, ax in uses}) > 1:
                notes.append(f"{name}: consumers disagree on the channel axis, per-tensor scale")
            axis = over.get("axis", axis)
            w = weight_consts[name].values
            if axis is not None and not -w.ndim <= axis < w.ndim:
                raise ConfigError(f"override for {name}: axis {axis} out of range for rank {w.ndim}")
            if axis is not None and axis < 0:
                axis += w.ndim
            amax = channel_amax(w, axis)
            scale = np.asarray(over["scale"], np.float32) if "scale" in over else fmt.scale_for(amax)
            plan.tensors[name] = QuantSpec(name, "weight", fmt.name, _tolist(scale), axis, _tolist(amax),
                                           [n for n, _ in uses])
        for name, consumers in act_consumers.items():
            over = dict(cfg.overrides.get(name, {}))
            fmt = get_format(over.get("format", cfg.activation_format))
            stats = ctx.stats.get(name, {})
            amax = float(over.get("amax", stats.get("amax", 0.0)))
            scale = float(over["scale"]) if "scale" in over else float(fmt.scale_for(np.float32(amax)))
            spec = QuantSpec(name, "activation", fmt.name, scale, None, amax, consumers)
            tensor = graph.tensors().get(name)
            producer = tensor.inputs[0] if tensor is not None and len(tensor.inputs) == 1 else None
            if producer is not None and producer.op == "Relu" and name not in [o.name for o in graph.outputs]:
                spec.placement = f"before:{producer.name}"
                spec.notes.append("quantized on the Relu input (relu(q(x)) == q(relu(x)))")
            if amax == 0.0 or not np.isfinite(amax):
                spec.notes.append(f"range {amax}: safe scale {scale}")
            plan.tensors[name] = spec
        unknown = sorted(set(cfg.overrides) - set(plan.tensors))
        if unknown:
            raise ConfigError(f"{ctx.source}: override for '{unknown[0]}', which is not a quantized tensor")
        notes.insert(0, f"{len(weight_axes)} weight(s), {len(act_consumers)} activation(s) planned")
        return PassResult(False, notes)


def _tolist(a):
    a = np.asarray(a)
    return a.item() if a.ndim == 0 else a.astype(np.float64).tolist()
