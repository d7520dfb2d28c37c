"""FP32-vs-quantized comparison: streaming error statistics per tensor.

``ErrorStats`` accumulates, batch by batch, the sums that SQNR, cosine similarity, relative L2 error and the
absolute errors need, so memory does not grow with the data. SQNR = 10 log10(sum(ref^2) / sum((ref - q)^2)),
infinite when the tensors are equal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict

import numpy as np


@dataclass
class ErrorStats:
    signal: float = 0.0  # sum ref^2
    noise: float = 0.0  # sum (ref - q)^2
    dot: float = 0.0  # sum ref * q
    qq: float = 0.0  # sum q^2
    abs_sum: float = 0.0
    max_abs: float = 0.0
    count: int = 0
    nonfinite: int = 0

    def update(self, ref: np.ndarray, q: np.ndarray) -> "ErrorStats":
        r = np.asarray(ref, dtype=np.float64).reshape(-1)
        x = np.asarray(q, dtype=np.float64).reshape(-1)
        if r.shape != x.shape:
            raise ValueError(f"shape mismatch: {np.shape(ref)} vs {np.shape(q)}")
        bad = ~(np.isfinite(r) & np.isfinite(x))
        if bad.any():
            self.nonfinite += int(bad.sum())
            r, x = r[~bad], x[~bad]
        d = r - x
        self.signal += float(r @ r)
        self.noise += float(d @ d)
        self.dot += float(r @ x)
        self.qq += float(x @ x)
        ad = np.abs(d)
        self.abs_sum += float(ad.sum())
        self.max_abs = max(self.max_abs, float(ad.max()) if ad.size else 0.0)
        self.count += int(r.size)
        return self

    def merge(self, other: "ErrorStats") -> "ErrorStats":
        for f in ("signal", "noise", "dot", "qq", "abs_sum", "count", "nonfinite"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.max_abs = max(self.max_abs, other.max_abs)
        return self

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)

    @property
    def cosine(self) -> float:
        if self.signal == 0.0 and self.qq == 0.0:
            return 1.0
        if self.signal == 0.0 or self.qq == 0.0:
            return 0.0
        return self.dot / math.sqrt(self.signal * self.qq)

    @property
    def rel_l2(self) -> float:
        if self.signal == 0.0:
            return 0.0 if self.noise == 0.0 else math.inf
        return math.sqrt(self.noise / self.signal)

    @property
    def mean_abs(self) -> float:
        return self.abs_sum / self.count if self.count else 0.0

    def to_dict(self) -> Dict[str, Any]:
        return {"sqnr_db": _num(self.sqnr_db), "cosine": _num(self.cosine), "rel_l2": _num(self.rel_l2),
                "max_abs": _num(self.max_abs), "mean_abs": _num(self.mean_abs), "count": self.count,
                "nonfinite": self.nonfinite}


def sqnr_db(ref: np.ndarray, q: np.ndarray) -> float:
    return ErrorStats().update(ref, q).sqnr_db


def _num(v: float) -> Any:
    """JSON has no inf/nan: write them as strings."""
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
    return v
