"""The typed state passes hand on to each other and to the report: each a small dataclass with ``to_dict()``.

PassContext (pipeline.py) holds one field per kind of state; nothing travels in an untyped dict, and the
report reads these fields (never a pass's notes, which are prose for people).

- ``CalibrationInfo``: what the calibration (or its dynamic stand-in) did: samples, batches, passes, time,
  the statistics file it read or wrote.
- ``Captured``: the inputs and FP32 outputs of the first calibration samples, kept for the summary's SQNR and
  the BatchNorm recalibration guard.
- ``PatternMatch``: what an --include-node / --exclude-node pattern matched.
- ``BatchNormReport``: what BatchNorm recalibration changed and how it judged the change.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional

import numpy as np


@dataclass
class CalibrationInfo:
    samples: int = 0
    batches: int = 0
    passes: int = 0
    seconds: float = 0.0
    dynamic: bool = False  # dynamic quantization: the pass only captured samples for the summary
    loaded_stats: Optional[str] = None  # statistics file read (--load-stats)
    cached_tensors: Optional[int] = None  # tensors whose statistics came from that file
    saved_stats: Optional[str] = None  # statistics file written (--save-stats)

    def to_dict(self) -> Dict[str, Any]:
        """The report's ``calibration`` object: the counts, and the optional facts only when they apply."""
        out: Dict[str, Any] = {"samples": self.samples, "batches": self.batches, "passes": self.passes,
                               "seconds": self.seconds}
        if self.dynamic:
            out["dynamic"] = True
        for key in ("loaded_stats", "cached_tensors", "saved_stats"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass
class Captured:
    """Inputs and FP32 outputs of the first calibration samples, batch by batch (``{name: array}`` each)."""

    inputs: List[Dict[str, np.ndarray]] = field(default_factory=list)
    outputs: List[Dict[str, np.ndarray]] = field(default_factory=list)

    @property
    def samples(self) -> int:
        from onnxfp8.calibrators.data import batch_size  # along each input's batch axis (a state [2, batch, C])

        return sum(batch_size(f) for f in self.inputs if f)

    def __bool__(self) -> bool:
        return bool(self.inputs)


@dataclass
class PatternMatch:
    """An --include-node / --exclude-node pattern and the nodes it matched (select_ops)."""

    flag: str  # "--include-node" | "--exclude-node"
    pattern: str
    nodes: List[str] = field(default_factory=list)

    def describe(self, limit: int = 8) -> str:
        more = " ..." if len(self.nodes) > limit else ""
        return f"{self.flag} '{self.pattern}' matched {len(self.nodes)} node(s): {', '.join(self.nodes[:limit])}{more}"

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class BatchNormReport:
    """BatchNorm recalibration (passes/recalibrate_batchnorm.py): per layer the mean shift (in old standard
    deviations), the variance ratio and the per-channel values; the output SQNR, top-1 agreement and accuracy
    (with labels) without and with recalibration on the evaluation samples; whether the new statistics were
    applied."""

    samples: int = 0
    batches: int = 0
    source: str = ""
    augment: List[str] = field(default_factory=list)
    statistics: str = "pooled"
    mode: str = "shift"
    layers: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    applied: bool = False
    guard: bool = True
    worse: Optional[str] = None
    eval_samples: int = 0
    eval_held_out: bool = False
    eval_labelled: bool = False
    sqnr_without: Optional[Dict[str, float]] = None
    sqnr_with: Optional[Dict[str, float]] = None
    top1_without: Optional[Dict[str, float]] = None
    top1_with: Optional[Dict[str, float]] = None
    accuracy_without: Optional[Dict[str, float]] = None
    accuracy_with: Optional[Dict[str, float]] = None
    seconds: float = 0.0

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
