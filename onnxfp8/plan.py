"""QuantPlan: the quantization decisions as plain data, separate from graph mutation.

A plan says which nodes are quantized (and why others are not), and for every quantized tensor its
QuantSpec: role, format, scale(s), axis, the calibrated range and method, the dynamic (run-time) scale when
there is one, where the Q/DQ goes, and (with BatchNorm recalibration) the statistics written into each
BatchNormalization before it is folded. It holds every decision: ``onnxfp8.apply_plan(model, plan)`` (and
``onnxfp8 quantize MODEL --apply-plan plan.json``) rebuilds the quantized model from it without calibration
data, byte for byte. It round-trips through JSON so that it can be saved, diffed, edited per tensor,
reviewed in CI and searched over by the tuner.

Editing a plan (in Python or in its JSON):
- a tensor's format: ``plan.set_format("conv1.weight", "e5m2")`` (the scale is recomputed from the tensor's
  ``amax`` for the new format's range), or in JSON set ``"format"`` *and* ``"scale"`` (= amax / format max);
- a tensor's scale: ``plan.set_scale("x", 0.02)`` or ``"scale"`` in JSON (a list per channel for a weight
  with an ``axis``);
- a node left in high precision: ``plan.keep_fp32("conv3", "too sensitive")``, or in JSON set the node's
  ``"quantized": false`` and a ``"reason"``: the node then reads FP32 values (it is dropped from the
  ``consumers`` of the tensors it read; a tensor no quantized node reads any more is not quantized).
- a node in high-precision fallback: ``plan.fall_back("conv3", "fp16", "why")`` (or ``"fp32"``), or in JSON
  ``"quantized": false, "fallback": "fp16"``: an FP16 island (inputs cast to FP16, FP16 weights and bias, the
  output cast back to FP32; FALLBACK_FP16_OPS only).
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Union

import numpy as np

from onnxfp8.errors import ConfigError


@dataclass
class DynamicSpec:
    """A scale computed in the graph at run time (dynamic quantization, passes/emulate.py DynamicScale):
    ``granularity`` "tensor" (one scale) or "token" (one per row, ``axis`` -1, or per column, ``axis`` -2,
    of a MatMul/Gemm operand); ``signed``: the max of x rather than of |x| (a chain through Relu)."""

    granularity: str = "tensor"
    axis: Optional[int] = None
    signed: bool = False

    @property
    def kind(self) -> str:
        """'per row (token)', 'per column' or 'per tensor'."""
        if self.granularity == "token" and self.axis == -1:
            return "per row (token)"
        if self.granularity == "token" and self.axis == -2:
            return "per column"
        return "per tensor"


@dataclass
class QuantSpec:
    tensor: str
    role: str  # "weight" | "activation"
    format: str
    scale: Any = None  # float (per tensor) or list of floats (per channel); None: dynamic (see ``dynamic``)
    axis: Optional[int] = None
    amax: Any = None  # calibrated range: float, or list per channel for weights
    consumers: List[str] = field(default_factory=list)  # node names that read the quantized tensor
    placement: str = "output"  # "output": on the tensor; "before:<node>": on the input of a commuting node (Relu)
    notes: List[str] = field(default_factory=list)
    candidates: Dict[str, float] = field(default_factory=dict)  # format -> measured error (dB), when chosen from data
    dynamic: Optional[DynamicSpec] = None  # run-time scale (scale is None then)
    method: Optional[str] = None  # calibration method of the range (activations): max, percentile, mse, entropy
    folded: Optional[str] = None  # weights: the BatchNormalization folded in after recalibration (scale is the folded one's)
    auto_reason: str = ""  # format auto: why the chosen candidate won, in words (the summary prints this field)

    def scale_array(self) -> np.ndarray:
        return np.asarray(self.scale, dtype=np.float32)


@dataclass
class NodeDecision:
    node: str
    op_type: str
    quantized: bool
    reason: str
    inputs: Dict[int, str] = field(default_factory=dict)  # input index -> "weight" | "activation"
    # a quantizable node the tuner (or a reviewer) left in high precision: "fp16" (an FP16 island: its float
    # inputs cast to FP16, FP16 weights, its output cast back to FP32; passes/fp16_fallback.py) or "fp32"
    # (it reads FP32 values); None: not a fallback (quantized, or never selected)
    fallback: Optional[str] = None


@dataclass
class BatchNormStats:
    """The statistics written into a BatchNormalization by recalibration (before it is folded)."""

    mean: List[float]
    var: List[float]


FALLBACKS = ("fp16", "fp32")
# op types an FP16 island is made for (onnxruntime's CPU provider has FP16 kernels for all of them)
FALLBACK_FP16_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather")

PLAN_VERSION = 2
_SPEC_KEYS = {f.name for f in fields(QuantSpec)}
_NODE_KEYS = {f.name for f in fields(NodeDecision)}
_PLAN_KEYS = {"version", "software", "config", "nodes", "tensors", "batchnorm", "transforms"}


@dataclass
class QuantPlan:
    nodes: Dict[str, NodeDecision] = field(default_factory=dict)
    tensors: Dict[str, QuantSpec] = field(default_factory=dict)
    # the settings the plan was made with (QuantConfig.to_dict()): apply_plan rebuilds the same pipeline
    # (scheme, style, BatchNorm folding and recalibration) from them
    config: Dict[str, Any] = field(default_factory=dict)
    batchnorm: Dict[str, BatchNormStats] = field(default_factory=dict)  # BN node -> recalibrated statistics
    # function-preserving FP32 rewrites done before quantization, in order, each a dict with "pass" and "kind"
    # (passes/equalize.py: equalize.scale / equalize.absorb / bias_correction.bias; passes/smoothquant.py:
    # smoothquant.smooth): which nodes and tensors were rescaled and by what, enough to redo them
    # without data (equalize.replay, smoothquant.replay)
    transforms: List[Dict[str, Any]] = field(default_factory=list)

    # -- queries ------------------------------------------------------------------------------------
    def quantized_nodes(self) -> List[NodeDecision]:
        return [d for d in self.nodes.values() if d.quantized]

    def skipped_nodes(self) -> List[NodeDecision]:
        return [d for d in self.nodes.values() if not d.quantized]

    def activations(self) -> List[QuantSpec]:
        return [s for s in self.tensors.values() if s.role == "activation"]

    def weights(self) -> List[QuantSpec]:
        return [s for s in self.tensors.values() if s.role == "weight"]

    def counts_by_op(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for d in self.quantized_nodes():
            out[d.op_type] = out.get(d.op_type, 0) + 1
        return dict(sorted(out.items()))

    # -- edits (the tuner's and a reviewer's vocabulary) ---------------------------------------------
    def copy(self) -> "QuantPlan":
        """An independent copy to edit (per-channel lists included)."""
        return copy.deepcopy(self)

    def set_format(self, tensor: str, fmt: str, scale: Any = None) -> QuantSpec:
        """Quantize ``tensor`` to ``fmt``: the scale is ``scale`` when given, else recomputed from the spec's
        calibrated ``amax`` for the new format's range (a dynamic spec keeps its run-time scale)."""
        from onnxfp8.formats import get_format

        spec = self._spec(tensor)
        f = get_format(fmt)
        spec.format = f.name
        if scale is not None:
            spec.scale = _plain_scale(scale)
        elif spec.dynamic is None:
            if spec.amax is None:
                raise ConfigError(f"plan: {tensor} has no amax to compute a {f.name} scale from; give the scale")
            spec.scale = _plain_scale(f.scale_for(np.asarray(spec.amax, np.float32)))
        return spec

    def set_scale(self, tensor: str, scale: Any) -> QuantSpec:
        """A given scale (a float, or a list per channel for a weight with an axis)."""
        spec = self._spec(tensor)
        spec.scale, spec.dynamic = _plain_scale(scale), None
        return spec

    def keep_fp32(self, node: str, reason: str) -> None:
        """Leave ``node`` unquantized with ``reason``: it reads FP32 values (see ``resolve``)."""
        if node not in self.nodes:
            raise ConfigError(f"plan: no node named '{node}'")
        d = self.nodes[node]
        d.quantized, d.reason, d.inputs = False, reason, {}
        self.resolve()

    def fall_back(self, node: str, precision: str, reason: str) -> None:
        """Leave ``node`` in high precision as a fallback: ``precision`` "fp32" (it reads FP32 values, as
        ``keep_fp32``) or "fp16" (an FP16 island, FALLBACK_FP16_OPS only)."""
        if precision not in FALLBACKS:
            raise ConfigError(f"plan: fallback precision must be one of {', '.join(FALLBACKS)}, got '{precision}'")
        self.keep_fp32(node, reason)
        d = self.nodes[node]
        if precision == "fp16" and d.op_type not in FALLBACK_FP16_OPS:
            raise ConfigError(f"plan: node '{node}' ({d.op_type}): FP16 fallback is made for "
                              f"{', '.join(FALLBACK_FP16_OPS)} only")
        d.fallback = precision

    def fallbacks(self) -> Dict[str, str]:
        """node -> "fp16" / "fp32" for every node in high-precision fallback."""
        return {n: d.fallback for n, d in self.nodes.items() if d.fallback and not d.quantized}

    def resolve(self) -> List[str]:
        """Drop unquantized nodes from the consumers of every spec and drop specs no quantized node reads any
        more (what a node marked ``"quantized": false`` in an edited plan means). Returns the tensors dropped;
        a plan as the pipeline made it is unchanged."""
        off = {n for n, d in self.nodes.items() if not d.quantized}
        dropped = []
        for name, spec in list(self.tensors.items()):
            if off and any(c in off for c in spec.consumers):
                spec.consumers = [c for c in spec.consumers if c not in off]
                if not spec.consumers:
                    del self.tensors[name]
                    dropped.append(name)
        return dropped

    def _spec(self, tensor: str) -> QuantSpec:
        if tensor not in self.tensors:
            raise ConfigError(f"plan: '{tensor}' is not a quantized tensor of this plan")
        return self.tensors[tensor]

    # -- JSON ---------------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        from onnxfp8.versions import software

        return {
            "version": PLAN_VERSION, "software": software(),
            "config": json_plain(self.config),
            "nodes": [asdict(d) for d in self.nodes.values()],
            # not asdict: it deep-copies every per-channel scale list before json_plain copies it again
            "tensors": [json_plain({f.name: (asdict(getattr(s, f.name)) if f.name == "dynamic" and s.dynamic
                                             else getattr(s, f.name)) for f in fields(s)})
                        for s in self.tensors.values()],
            "transforms": [json_plain(t) for t in self.transforms],
            "batchnorm": {k: {"mean": v.mean, "var": v.var} for k, v in self.batchnorm.items()},
        }

    def to_json(self, indent: int = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Dict[str, Any], source: str = "plan") -> "QuantPlan":
        """A plan from its JSON data; a malformed one raises ConfigError naming ``source`` and the entry."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a plan is a JSON object with nodes and tensors")
        bad = sorted(set(data) - _PLAN_KEYS)
        if bad:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(bad)}; a plan holds {', '.join(sorted(_PLAN_KEYS))}")
        plan = cls(config=dict(data.get("config") or {}))
        try:
            for d in data.get("nodes", []):
                d = dict(d)
                _known(d, _NODE_KEYS, source, f"node {d.get('node')!r}")
                d["inputs"] = {int(k): v for k, v in d.get("inputs", {}).items()}
                plan.nodes[d["node"]] = NodeDecision(**d)
            for s in data.get("tensors", []):
                s = dict(s)
                _known(s, _SPEC_KEYS, source, f"tensor {s.get('tensor')!r}")
                s["candidates"] = {k: float(v) for k, v in s.get("candidates", {}).items()}  # "inf" -> inf
                if s.get("dynamic") is not None:
                    s["dynamic"] = DynamicSpec(**s["dynamic"])
                plan.tensors[s["tensor"]] = QuantSpec(**s)
            plan.transforms = [dict(t) for t in data.get("transforms") or []]
            for name, st in (data.get("batchnorm") or {}).items():
                plan.batchnorm[name] = BatchNormStats(list(st["mean"]), list(st["var"]))
        except (TypeError, KeyError, ValueError, AttributeError) as e:
            raise ConfigError(f"{source}: malformed plan ({type(e).__name__}: {e})") from None
        return plan

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> "QuantPlan":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{source}: not a JSON plan ({e})") from None
        return cls.from_dict(data, source)

    @classmethod
    def load(cls, path: str) -> "QuantPlan":
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the plan ({e.strerror or e})") from None
        return cls.from_json(text, source=path)


def _known(d: Dict[str, Any], keys, source: str, what: str) -> None:
    bad = sorted(set(d) - keys)
    if bad:
        raise ConfigError(f"{source}: {what}: unknown key(s) {', '.join(bad)}; known keys: {', '.join(sorted(keys))}")


def _plain_scale(scale: Any) -> Union[float, List[float]]:
    a = np.asarray(scale, dtype=np.float32)
    return float(a) if a.ndim == 0 else a.astype(np.float64).tolist()


def tolist(a: Any) -> Union[float, List[float]]:
    """A numpy scale or range as plan data: a float, or a list of floats per channel."""
    a = np.asarray(a)
    return a.item() if a.ndim == 0 else a.astype(np.float64).tolist()


def json_plain(obj: Any) -> Any:
    """``obj`` as strict JSON data: numpy arrays and scalars as lists and numbers, and the non-finite floats
    JSON has no literal for (an infinite SQNR, say) as the strings "inf", "-inf", "nan"."""
    if isinstance(obj, dict):
        return {k: json_plain(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if isinstance(obj, (list, tuple)):
        if all(type(v) is int or (type(v) is float and math.isfinite(v)) for v in obj):
            return list(obj)  # finite numbers (a per-channel scale list): as they are, without a call per value
        return [json_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else ("-inf" if obj < 0 else "nan")
    return obj
