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
        self._amax: Dict[str, float] = {}
        self._min: Dict[str, float] = {}
        self._max: Dict[str, float] = {}

    def observe(self, name: str, batch: np.ndarray) -> None:
        b = np.asarray(batch)
        if b.size == 0:
            return
        finite = b[np.isfinite(b)] if not np.isfinite(b).all() else b
        if finite.size == 0:
            return
        self.observe_reduced(name, float(np.max(finite)), float(np.min(finite)))

    def observe_reduced(self, name: str, hi: float, lo: float) -> None:
        hi, lo = float(hi), float(lo)
        self._max[name] = max(self._max.get(name, -np.inf), hi)
        self._min[name] = min(self._min.get(name, np.inf), lo)
        self._amax[name] = max(abs(self._max[name]), abs(self._min[name]))

    def result(self) -> Dict[str, float]:
        return dict(self._amax)

    def minmax(self) -> Dict[str, tuple]:
        return {k: (self._min[k], self._max[k]) for k in self._amax}

    def state(self) -> Dict[str, Any]:
        return {"method": self.method, "min": dict(self._min), "max": dict(self._max)}

    def load_state(self, state: Dict[str, Any]) -> None:
        for k, hi in state["max"].items():
            self.observe_reduced(k, hi, state["min"][k])
