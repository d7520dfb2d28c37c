"""Calibrator contract: streaming statistics per tensor.

A calibrator sees each tensor batch by batch through ``observe(name, batch)`` and keeps only O(statistics)
state (a running max, a histogram), never the batches themselves. ``result()`` turns the state into the
clipping range (amax, a non-negative magnitude) per tensor. ``state()`` / ``load_state()`` make the state plain
data (numbers and lists) so that statistics can be cached and merged.

Some methods need the range of a tensor before they can histogram it: they set ``needs_range = True`` and the
collector first runs a max pass and hands the ranges over with ``set_ranges()``.
"""
from __future__ import annotations

import abc
from typing import Any, Dict, Iterable

import numpy as np


class Calibrator(abc.ABC):
    """Base class of calibration methods. Subclasses register themselves in ``CALIBRATORS`` by ``method``."""

    method: str = ""
    needs_range: bool = False

    def __init__(self, **options: Any) -> None:
        self.options = dict(options)

    @abc.abstractmethod
    def observe(self, name: str, batch: np.ndarray) -> None:
        """Fold one batch of tensor ``name`` into the statistics."""

    def observe_reduced(self, name: str, hi: float, lo: float) -> None:
        """Fold a batch that was already reduced (in-graph) to its largest and smallest value. Only max-like
        methods accept this; the collector uses it to let onnxruntime do the reduction."""
        raise NotImplementedError(f"{self.method} calibration needs whole tensors, not reduced values")

    @property
    def accepts_reduced(self) -> bool:
        return type(self).observe_reduced is not Calibrator.observe_reduced

    def set_ranges(self, ranges: Dict[str, float]) -> None:
        """Hand over per-tensor max |x| from a first pass (only used when ``needs_range``)."""

    @abc.abstractmethod
    def result(self) -> Dict[str, float]:
        """Clipping magnitude (amax >= 0) per observed tensor."""

    @abc.abstractmethod
    def state(self) -> Dict[str, Any]:
        """The statistics as plain data (JSON-able), to cache them."""

    @abc.abstractmethod
    def load_state(self, state: Dict[str, Any]) -> None:
        """Restore statistics written by ``state()``."""

    def names(self) -> Iterable[str]:
        return self.result().keys()


CALIBRATORS: Dict[str, type] = {}


def register(cls: type) -> type:
    CALIBRATORS[cls.method] = cls
    return cls


def make_calibrator(method: str, **options: Any) -> Calibrator:
    # import the method modules so that they register
    from onnxfp8.calibrators import max as _max  # noqa: F401
    try:
        from onnxfp8.calibrators import percentile as _p, mse as _m, entropy as _e  # noqa: F401
    except ImportError:  # pragma: no cover - while a method module is missing
        pass
    key = method.lower()
    if key not in CALIBRATORS:
        raise ValueError(f"unknown calibration method '{method}'; choose one of {', '.join(sorted(CALIBRATORS))}")
    return CALIBRATORS[key](**options)
