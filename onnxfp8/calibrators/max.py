"""Max calibration (the FP8 paper's "max scaling"): amax = max |x| over every batch seen."""
from __future__ import annotations

from typing import Any, Dict

import numpy as np

from onnxfp8.calibrators.base import Calibrator, register


@register
class MaxCalibrator(Calibrator):
    method = "max"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._min: Dict[str, float] = {}
        self._max: Dict[str, float] = {}

    def observe(self, name: str, batch: np.ndarray) -> None:
        b = np.asarray(batch)
        if b.size == 0:
            return
        hi, lo = np.max(b), np.min(b)
        if not (np.isfinite(hi) and np.isfinite(lo)):  # NaN propagates through max/min, Inf is one: filter only then
            b = b[np.isfinite(b)]
            if b.size == 0:
                return
            hi, lo = np.max(b), np.min(b)
        self.observe_reduced(name, hi, lo)

    def observe_reduced(self, name: str, hi: float, lo: float) -> None:
        self._max[name] = max(self._max.get(name, -np.inf), float(hi))
        self._min[name] = min(self._min.get(name, np.inf), float(lo))

    def result(self) -> Dict[str, float]:
        return {k: max(abs(hi), abs(self._min[k])) for k, hi in self._max.items()}

    def minmax(self) -> Dict[str, tuple]:
        return {k: (self._min[k], hi) for k, hi in self._max.items()}

    def state(self) -> Dict[str, Any]:
        return {"method": self.method, "min": dict(self._min), "max": dict(self._max)}

    def load_state(self, state: Dict[str, Any]) -> None:
        for k, hi in state["max"].items():
            self.observe_reduced(k, hi, state["min"][k])
