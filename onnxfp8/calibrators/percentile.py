"""Percentile calibration: amax = the ``percentile``-th percentile of |x| over all calibration data.

Computed from the streaming histogram of |x| (see ``histogram.py``): the bin where the cumulative count
reaches ``percentile / 100 * N`` is found and the value is interpolated linearly inside it, so the result is
within about one bin width (``range / num_bins``) of ``np.percentile(|x|, percentile)`` on the concatenated
data, and never above the max |x|. ``percentile=100`` gives the max exactly.

Options: ``percentile`` (default 99.99, in (0, 100]), ``num_bins`` (default 2048), ``format`` (ignored).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from onnxfp8.calibrators.base import register
from onnxfp8.calibrators.histogram import Histogram, HistogramCalibrator, check_number


@register
class PercentileCalibrator(HistogramCalibrator):
    method = "percentile"
    extra_options = {"percentile": 99.99}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.percentile = check_number("percentile", self.options["percentile"], 0, 100, include_hi=True)

    def compute_amax(self, name: str, hist: Histogram) -> float:
        if self.percentile >= 100:
            return hist.max
        counts = hist.counts
        cum = np.cumsum(counts)
        target = self.percentile / 100.0 * cum[-1]
        k = int(np.searchsorted(cum, target, side="left"))
        k = min(k, counts.size - 1)
        below = float(cum[k] - counts[k])
        frac = (target - below) / counts[k] if counts[k] else 1.0
        return (k + min(max(frac, 0.0), 1.0)) * hist.width
