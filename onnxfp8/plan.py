"""QuantPlan: the quantization decisions as plain data, separate from graph mutation.

A plan says which nodes are quantized (and why others are not), and for every quantized tensor its
QuantSpec: role, format, scale(s), axis and the calibrated range. It round-trips through JSON so that it can be
saved, diffed, overridden per tensor and reviewed in CI.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional

import numpy as np


@dataclass
class QuantSpec:
    tensor: str
    role: str  # "weight" | "activation"
    format: str
    scale: Any = None  # float (per tensor) or list of floats (per channel)
    axis: Optional[int] = None
    amax: Any = None  # calibrated range: float, or list per channel for weights
    consumers: List[str] = field(default_factory=list)  # node names that read the quantized tensor
    placement: str = "output"  # "output": on the tensor; "before:<node>": on the input of a commuting node (Relu)
    notes: List[str] = field(default_factory=list)
    candidates: Dict[str, float] = field(default_factory=dict)  # format -> measured error (dB), when chosen from data

    def scale_array(self) -> np.ndarray:
        return np.asarray(self.scale, dtype=np.float32)


@dataclass
class NodeDecision:
    node: str
    op_type: str
    quantized: bool
    reason: str
    inputs: Dict[int, str] = field(default_factory=dict)  # input index -> "weight" | "activation"


@dataclass
class QuantPlan:
    nodes: Dict[str, NodeDecision] = field(default_factory=dict)
    tensors: Dict[str, QuantSpec] = field(default_factory=dict)
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

    # -- JSON ---------------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {
            "nodes": [asdict(d) for d in self.nodes.values()],
            # not asdict: it deep-copies every per-channel scale list before json_plain copies it again
            "tensors": [json_plain({f.name: getattr(s, f.name) for f in fields(s)}) for s in self.tensors.values()],
            "transforms": [json_plain(t) for t in self.transforms],
        }

    def to_json(self, indent: int = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "QuantPlan":
        plan = cls()
        for d in data.get("nodes", []):
            d = dict(d)
            d["inputs"] = {int(k): v for k, v in d.get("inputs", {}).items()}
            plan.nodes[d["node"]] = NodeDecision(**d)
        for s in data.get("tensors", []):
            s = dict(s)
            s["candidates"] = {k: float(v) for k, v in s.get("candidates", {}).items()}  # "inf" -> inf
            plan.tensors[s["tensor"]] = QuantSpec(**s)
        plan.transforms = [dict(t) for t in data.get("transforms", [])]
        return plan

    @classmethod
    def from_json(cls, text: str) -> "QuantPlan":
        return cls.from_dict(json.loads(text))


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
