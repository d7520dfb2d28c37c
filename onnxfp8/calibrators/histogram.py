"""Shared machinery of the histogram methods (percentile, mse, entropy): a streaming histogram of |x| per tensor.

Each tensor gets a :class:`Histogram` of ``num_bins`` equal bins over ``[0, range]``. It never stores data:
every batch is binned on its own (``np.bincount`` on computed bin indices, ~3 ms per 1M float32 values, about
3x faster than ``np.histogram`` with a fixed range) and added to the counts, so memory is O(num_bins) per
tensor whatever the number of batches.

The range is fixed in advance or grows:

* **fixed** - the collector runs a max pass first and hands the max |x| over with ``set_ranges()``; the
  histogram then spans exactly ``[0, max]`` (what TensorRT / onnxruntime do).
* **growing** - without ``set_ranges`` the first batch sets the range to its max |x|. When a later batch
  exceeds the range, the range is doubled by merging adjacent bin pairs (the upper half becomes empty) as
  often as needed. Doubling is exact (no count moves across a value it did not straddle), keeps ``num_bins``
  fixed, and costs resolution of at most a factor 2. A tensor whose values so far are all 0 has range 0 (all
  counts in bin 0, which holds 0 for any range); its first non-zero batch sets the range.

Values a hair above a fixed range (relative ``RANGE_TOLERANCE``, e.g. a max pass and a histogram pass that
differ in the last bits) go into the last bin instead of halving the resolution. The exact max |x| is tracked
beside the counts, so the methods never return more than the data's max. NaN and +-Inf values are ignored.

``state()`` is plain data (``counts`` as a list of ints, ``range``, ``max``) and all three methods share it: a
histogram cached once can be turned into a percentile, mse or entropy range later. Histograms merge exactly
when their ranges differ by a power of two (the usual case: a fixed range or doublings of the same start);
otherwise the one with the smaller range is re-binned by linear interpolation of its cumulative counts (total
count kept exactly).
"""
from __future__ import annotations

import abc
import math
from typing import Any, Dict, Iterable, Mapping, Optional

import numpy as np

from onnxfp8.calibrators.base import Calibrator
from onnxfp8.errors import ConfigError

DEFAULT_NUM_BINS = 2048
#: relative overshoot of a fixed range that still goes into the last bin instead of doubling the range
RANGE_TOLERANCE = 1e-5


class CalibrationOptionError(ConfigError, ValueError):
    """A bad calibrator option (a ``ValueError`` for the Python API, a ``ConfigError`` for the CLI)."""


# ------------------------------------------------------------------------------------------- histogram


class Histogram:
    """Counts of |x| in ``num_bins`` equal bins over ``[0, range]``, plus the exact max |x| seen.

    The last bin is closed (holds ``range``); bin ``k`` holds ``[k * width, (k + 1) * width)``.
    """

    __slots__ = ("counts", "range", "max")

    def __init__(self, num_bins: int, range_: float = 0.0) -> None:
        self.counts = np.zeros(int(num_bins), dtype=np.int64)
        self.range = float(range_)
        self.max = 0.0

    # -- facts
    @property
    def num_bins(self) -> int:
        return self.counts.size

    @property
    def width(self) -> float:
        return self.range / self.num_bins

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def edges(self) -> np.ndarray:
        return np.arange(self.num_bins + 1, dtype=np.float64) * self.width

    def centers(self) -> np.ndarray:
        return (np.arange(self.num_bins, dtype=np.float64) + 0.5) * self.width

    def used_bins(self) -> int:
        """Number of leading bins up to the one holding the max (what a histogram over [0, max] would have)."""
        if self.range <= 0 or self.max <= 0:
            return 1
        return int(min(self.num_bins, math.floor(self.max / self.width) + 1))

    def copy(self) -> "Histogram":
        h = Histogram(self.num_bins, self.range)
        h.counts = self.counts.copy()
        h.max = self.max
        return h

    # -- growth
    def grow_to(self, value: float) -> None:
        """Make the range cover ``value``: set it if the range is 0, else double it (merging bin pairs)."""
        if not value > self.range:
            return
        if self.range <= 0:  # everything so far is 0 and sits in bin 0 whatever the range
            self.range = float(value)
            return
        doublings = 0
        r = self.range
        while r < value:
            r *= 2.0
            doublings += 1
        self._double(doublings)

    def _double(self, times: int) -> None:
        n = self.num_bins
        c = self.counts
        for _ in range(times):
            if c[1:].any():  # (num_bins is even)
                c = np.concatenate([c.reshape(-1, 2).sum(axis=1), np.zeros(n // 2, dtype=np.int64)])
            self.range *= 2.0
        self.counts = c

    # -- data
    def add(self, a: np.ndarray, amax: float) -> None:
        """Add finite magnitudes ``a`` (1-D, >= 0) whose max is ``amax``. ``a`` is consumed (scaled in place)."""
        if a.size == 0:
            return
        self.max = max(self.max, amax)
        if amax > self.range * (1.0 + RANGE_TOLERANCE):
            self.grow_to(amax)
        n = self.num_bins
        if self.range <= 0:  # all values are 0
            self.counts[0] += a.size
            return
        k = n / self.range
        if a.dtype != np.float32 or k >= 1e30:  # (a tiny range: the float32 factor would overflow)
            a = a.astype(np.float64, copy=False)
        a *= a.dtype.type(k)
        c = np.bincount(a.astype(np.intp), minlength=n)
        if c.size > n:  # values at (or a hair above) the range belong to the last bin
            c[n - 1] += c[n:].sum()
            c = c[:n]
        self.counts += c

    def merge(self, other: "Histogram") -> None:
        """Add ``other``'s counts (exact when the ranges differ by a power of two, else re-binned)."""
        if other.total == 0:  # nothing binned: at most a range to adopt
            if self.total == 0 and other.range > self.range:
                self.range = other.range
            return
        self.max = max(self.max, other.max)
        o = other
        if o.num_bins != self.num_bins:
            o = _resample(o, max(o.range, self.range), self.num_bins)
        if o.range > self.range * (1 + 1e-9):
            if self.range <= 0 or _pow2_ratio(o.range, self.range) is not None:
                self.grow_to(o.range)
            else:
                resampled = _resample(self, o.range, self.num_bins)
                self.counts, self.range = resampled.counts, resampled.range
        if o.range < self.range * (1 - 1e-9):
            k = _pow2_ratio(self.range, o.range) if o.range > 0 else 0
            if k is None:
                o = _resample(o, self.range, self.num_bins)
            else:
                o = o.copy()
                o._double(k)
                o.range = self.range
        self.counts = self.counts + o.counts

    # -- plain data
    def to_dict(self) -> Dict[str, Any]:
        return {"range": self.range, "max": self.max, "counts": self.counts.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Histogram":
        counts = np.asarray(d["counts"], dtype=np.int64)
        if counts.ndim != 1 or counts.size < 2 or counts.size % 2 or (counts < 0).any():
            raise ValueError("histogram counts must be an even-length list of non-negative integers")
        rng, mx = float(d["range"]), float(d["max"])
        if not (math.isfinite(rng) and math.isfinite(mx) and rng >= 0 and mx >= 0):
            raise ValueError(f"histogram range/max must be finite and >= 0, got {rng}, {mx}")
        h = cls(counts.size, rng)
        h.counts = counts.copy()
        h.max = mx
        return h


def _pow2_ratio(big: float, small: float) -> Optional[int]:
    """k if big == small * 2**k (to rounding), else None."""
    if small <= 0 or big <= 0:
        return None
    k = round(math.log2(big / small))
    return k if k >= 0 and abs(small * 2.0**k - big) <= 1e-9 * big else None


def _resample(h: Histogram, new_range: float, num_bins: int) -> Histogram:
    """Re-bin ``h`` onto ``num_bins`` bins over ``[0, new_range]`` (new_range >= h.range), assuming values are
    uniform inside each old bin. The total count is kept exactly."""
    out = Histogram(num_bins, new_range)
    out.max = h.max
    if h.range <= 0 or new_range <= 0:
        out.counts[0] = h.total
        return out
    cum = np.concatenate([[0], np.cumsum(h.counts)]).astype(np.float64)
    new_edges = np.arange(num_bins + 1, dtype=np.float64) * (new_range / num_bins)
    at = np.rint(np.interp(new_edges, h.edges(), cum)).astype(np.int64)
    at[-1] = h.total
    out.counts = np.diff(at)
    return out


def _magnitudes(batch: Any) -> tuple:
    """Flat |x| of the finite values of ``batch`` (float32 unless the batch is float64) and their max."""
    b = np.asarray(batch)
    if b.dtype != np.float32 and b.dtype != np.float64:
        b = b.astype(np.float64 if b.dtype.kind in "iu" and b.dtype.itemsize > 2 else np.float32)
    a = np.abs(b.reshape(-1))
    if a.size == 0:
        return a, 0.0
    m = a.max()
    if not np.isfinite(m):  # NaN propagates through max, Inf is the max: filter only then
        a = a[np.isfinite(a)]
        if a.size == 0:
            return a, 0.0
        m = a.max()
    return a, float(m)


# ------------------------------------------------------------------------------------------ calibrator


def _plain(v: Any) -> Any:
    """Options as JSON-able data (Format objects by name)."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (str, int, float, bool, type(None))):
        return v
    return getattr(v, "name", str(v))


def check_int(name: str, value: Any, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo or (
            hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise CalibrationOptionError(f"{name} must be an integer {bound}, got {value!r}")
    return int(value)


def check_number(name: str, value: Any, lo: float, hi: float, include_hi: bool = False) -> float:
    """``value`` as a float in ``(lo, hi)`` (``(lo, hi]`` with ``include_hi``), else a CalibrationOptionError."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
          and math.isfinite(value) and lo < value and (value <= hi if include_hi else value < hi))
    if not ok:
        raise CalibrationOptionError(f"{name} must be a number in ({lo:g}, {hi:g}{']' if include_hi else ')'}, "
                                     f"got {value!r}")
    return float(value)


def check_format(value: Any, what: str):
    """The Format named by ``value``, else a CalibrationOptionError starting with ``what``."""
    from onnxfp8.formats import get_format

    try:
        return get_format(value)
    except (ValueError, AttributeError, TypeError) as e:
        raise CalibrationOptionError(f"{what}: {e}") from None


class HistogramCalibrator(Calibrator):
    """Base of the histogram methods: one :class:`Histogram` of |x| per tensor; subclasses implement
    :meth:`compute_amax` (histogram -> clipping magnitude).

    Options shared by every histogram method:

    * ``num_bins`` (default :attr:`default_num_bins`, 2048): bins per tensor.
    * ``format`` (default ``"e4m3"``): the target format. Only ``mse`` uses it; it is accepted everywhere so
      that a caller can pass it to any method.

    Subclasses list their own options with defaults in ``extra_options``; an unknown option name raises
    :class:`CalibrationOptionError` (a ``ValueError``).
    """

    needs_range = True
    default_num_bins = DEFAULT_NUM_BINS
    min_num_bins = 16
    extra_options: Dict[str, Any] = {}

    def __init__(self, **options: Any) -> None:
        known = {"num_bins", "format", *self.extra_options}
        unknown = sorted(set(options) - known)
        if unknown:
            raise CalibrationOptionError(
                f"{self.method} calibration: unknown option(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}")
        merged = {"num_bins": self.default_num_bins, "format": "e4m3", **self.extra_options, **options}
        super().__init__(**merged)
        self.num_bins = check_int("num_bins", merged["num_bins"], self.min_num_bins)
        if self.num_bins % 2:
            raise CalibrationOptionError(f"num_bins must be even (the range grows by merging bin pairs), "
                                         f"got {self.num_bins}")
        self.format = check_format(merged["format"], f"{self.method} calibration")
        self._hists: Dict[str, Histogram] = {}

    # -- collecting
    def set_ranges(self, ranges: Dict[str, float]) -> None:
        for name, amax in ranges.items():
            amax = float(amax)
            if not (math.isfinite(amax) and amax >= 0):
                continue
            h = self._hists.get(name)
            if h is None:
                self._hists[name] = Histogram(self.num_bins, amax)
            elif h.total == 0 and h.max == 0:
                h.range = amax  # nothing binned yet: take the range as is
            else:
                h.grow_to(amax)

    def observe(self, name: str, batch: np.ndarray) -> None:
        a, amax = _magnitudes(batch)
        if a.size == 0:
            return
        h = self._hists.get(name)
        if h is None:
            h = self._hists[name] = Histogram(self.num_bins, amax)
        h.add(a, amax)

    # -- results
    def histograms(self) -> Dict[str, Histogram]:
        """The histograms of the tensors that received data."""
        return {k: h for k, h in self._hists.items() if h.total > 0}

    def names(self) -> Iterable[str]:
        return list(self.histograms())

    def result(self) -> Dict[str, float]:
        out = {}
        for name, h in self.histograms().items():
            out[name] = 0.0 if h.max <= 0 else float(min(max(self.compute_amax(name, h), 0.0), h.max))
        return out

    @abc.abstractmethod
    def compute_amax(self, name: str, hist: Histogram) -> float:
        """Clipping magnitude of one tensor from its (non-empty, not all-zero) histogram."""

    # -- plain data
    def state(self) -> Dict[str, Any]:
        opts = {k: _plain(v) for k, v in self.options.items()}
        return {"method": self.method, "kind": "histogram", "num_bins": self.num_bins, "options": opts,
                "tensors": {k: h.to_dict() for k, h in self._hists.items()}}

    def load_state(self, state: Dict[str, Any]) -> None:
        """Restore (merge into this calibrator) histograms written by ``state()`` of any histogram method."""
        if state.get("kind") != "histogram" or "tensors" not in state:
            raise ValueError(f"not a histogram calibration state (method {state.get('method')!r})")
        for name, d in state["tensors"].items():
            self._merge_one(name, Histogram.from_dict(d))

    def merge(self, other: "HistogramCalibrator") -> None:
        """Add another histogram calibrator's statistics (e.g. from another process or data shard)."""
        if not isinstance(other, HistogramCalibrator):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        for name, h in other._hists.items():
            self._merge_one(name, h)

    def _merge_one(self, name: str, h: Histogram) -> None:
        mine = self._hists.get(name)
        if mine is None:
            mine = self._hists[name] = Histogram(self.num_bins, 0.0)
            if h.num_bins == self.num_bins:
                mine.range = h.range
        mine.merge(h)
