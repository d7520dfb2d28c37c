"""Entropy (KL-divergence) calibration, the TensorRT INT8 calibrator's algorithm on the histogram of |x|.

For every candidate threshold ``i`` (in bins, from ``start_bin`` = ``num_quantized_bins`` up to the bin holding
the max, step ``stride``):

* the reference distribution ``P`` is bins ``[0, i)`` with the count of everything above (the clipped
  outliers) added to its last bin;
* the candidate ``Q`` quantizes bins ``[0, i)`` into ``num_quantized_bins`` levels (bin ``j`` -> level
  ``floor(num_quantized_bins * j / i)``) and spreads each level's count evenly over its non-empty bins
  (empty bins stay empty);
* ``KL(P || Q)`` (``inf`` when ``P`` has mass where ``Q`` has none).

The threshold is the upper edge of bin ``i`` with the smallest divergence (the largest such ``i`` on ties), as
in TensorRT / pytorch-quantization's ``_compute_amax_entropy``, including its habit of replacing the count of
the zero bin by that of bin 1 (ReLU outputs put a huge spike at 0 that would otherwise dominate the
divergence). onnxruntime's ``HistogramCollector.compute_entropy`` is the same idea on a *signed* histogram,
quantizing both sides together into ``num_quantized_bins`` levels (i.e. half as many levels per side); our
``num_quantized_bins=128`` corresponds to its ``num_quantized_bins=256``.

Unlike the reference loops (O(num_bins^2) Python), all candidates are evaluated at once from prefix sums:
``Q``'s level sums and non-empty-bin counts are differences of cumulative sums at the level boundaries
``ceil(g * i / num_quantized_bins)``, and ``sum p log p`` is a prefix sum of ``c log c``.

FP8: the divergence models a uniform grid of ``num_quantized_bins`` levels, i.e. INT8 (128 magnitudes). FP8's
grid is not uniform; we keep the INT8 default of 128 for every format (an FP8 tensor calibrated with entropy
gets the INT8 clipping point, which is conservative: FP8 tolerates larger ranges). ``format`` is accepted and
ignored.

Options: ``num_quantized_bins`` (128), ``num_bins`` (2048), ``start_bin`` (None: ``num_quantized_bins``),
``stride`` (1), ``format`` (ignored).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from onnxfp8.calibrators.base import register
from onnxfp8.calibrators.histogram import CalibrationOptionError, Histogram, HistogramCalibrator, check_int


def kl_divergences(counts: np.ndarray, num_quantized_bins: int = 128, start_bin: int = 128,
                   stride: int = 1) -> tuple:
    """KL divergence of every candidate threshold of a |x| histogram ``counts`` (the last bin holds the max).

    Returns ``(candidates, divergences)``: candidate ``i`` means "clip at the upper edge of bin ``i - 1``".
    """
    nq = int(num_quantized_bins)
    bins = np.asarray(counts, dtype=np.float64).copy()
    nb = bins.size
    if nb > 1:
        bins[0] = bins[1]
    cand = np.arange(max(start_bin, nq, 1), nb + 1, stride, dtype=np.int64)
    if cand.size == 0:
        return cand, np.zeros(0)
    total = bins.sum()
    if total <= 0:
        return cand, np.full(cand.size, np.inf)
    nonzero = bins > 0
    C = np.concatenate([[0.0], np.cumsum(bins)])
    NZ = np.concatenate([[0], np.cumsum(nonzero)])
    with np.errstate(divide="ignore", invalid="ignore"):
        clogc = np.where(nonzero, bins * np.log(np.where(nonzero, bins, 1.0)), 0.0)
    L = np.concatenate([[0.0], np.cumsum(clogc)])

    levels = np.arange(nq + 1, dtype=np.int64)
    starts = (levels[None, :] * cand[:, None] + (nq - 1)) // nq  # first bin of each level; starts[:, nq] == i
    S = C[starts[:, 1:]] - C[starts[:, :-1]]  # count per level
    N = NZ[starts[:, 1:]] - NZ[starts[:, :-1]]  # non-empty bins per level (0 exactly when S == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        # log of Q's (unnormalised) density per level: S / N
        logd = np.where(S > 0, np.log(np.where(S > 0, S, 1.0)) - np.log(np.maximum(N, 1)), 0.0)
        t_in = C[cand]  # mass inside [0, i)
        outside = total - t_in
        last = bins[cand - 1]
        log_dlast = logd[:, -1]  # bin i-1 is in the last level
        # sum over j < i-1 of c_j * log(S_g / N_g), from the per-level sums minus the last bin's share
        g_sum = (S * logd).sum(axis=1) - np.where(last > 0, last * log_dlast, 0.0)
        log_t, log_tin = np.log(total), np.log(np.where(t_in > 0, t_in, 1.0))
        head = (L[cand - 1] - C[cand - 1] * (log_t - log_tin) - g_sum) / total
        p_last = last + outside
        tail = np.where(p_last > 0,
                        p_last / total * (np.log(np.where(p_last > 0, p_last, 1.0)) - log_t - log_dlast + log_tin),
                        0.0)
        kl = head + tail
    kl = np.where((t_in <= 0) | ((last <= 0) & (outside > 0)), np.inf, kl)
    return cand, kl


@register
class EntropyCalibrator(HistogramCalibrator):
    method = "entropy"
    extra_options = {"num_quantized_bins": 128, "start_bin": None, "stride": 1}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.num_quantized_bins = check_int("num_quantized_bins", self.options["num_quantized_bins"], 2,
                                             self.num_bins)
        sb = self.options["start_bin"]
        self.start_bin = self.num_quantized_bins if sb is None else check_int("start_bin", sb, 1, self.num_bins)
        if self.start_bin < self.num_quantized_bins:
            raise CalibrationOptionError(
                f"start_bin ({self.start_bin}) must be >= num_quantized_bins ({self.num_quantized_bins})")
        self.stride = check_int("stride", self.options["stride"], 1)

    def compute_amax(self, name: str, hist: Histogram) -> float:
        nb = hist.used_bins()  # what a histogram over [0, max] would hold (a grown range has empty top bins)
        if nb < self.start_bin:  # too few bins below the max to choose among: keep the max
            return hist.max
        cand, kl = kl_divergences(hist.counts[:nb], self.num_quantized_bins, self.start_bin, self.stride)
        if not np.isfinite(kl).any():
            return hist.max
        best = cand.size - 1 - int(np.argmin(kl[::-1]))
        return float(cand[best]) * hist.width
