"""PNG plots through matplotlib (optional extra ``plots``): ``require()`` gives a one-line error without it.

* ``sensitivity_png``: per-layer own SQNR in every format, ranked as the sensitivity table (worst first);
* ``histogram_png``: an activation's |x| histogram from the calibration statistics on each format's grid
  (the representable magnitudes at the tensor's scale, as ticks; the clipping point as a line);
* ``sweep_png``: the sweep's output metric per configuration.
"""
from __future__ import annotations

import io
import math
from typing import Dict, List, Optional, Sequence

import numpy as np

from onnxfp8.errors import ConfigError

COLORS = {"e4m3": "#1f77b4", "e3m4": "#2ca02c", "e5m2": "#d62728", "int8": "#9467bd", "auto": "#ff7f0e"}


def require():
    """matplotlib.pyplot with the Agg backend, or a one-line error naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install 'onnxfp8[plots]' (text and JSON reports work "
                          "without it)") from None
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    require().close(fig)
    return buf.getvalue()


def _finite(v: float, cap: float = 80.0) -> float:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return 0.0
    return min(float(v), cap) if math.isfinite(v) else cap


def sensitivity_png(report, limit: int = 40) -> bytes:
    """Grouped bars: own SQNR (dB) per layer (ranked, worst first) and format."""
    plt = require()
    layers = report.layers[:limit]
    fmts = list(report.formats)
    n = max(len(layers), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * n * max(1, len(fmts)) / 2 + 2), 4.2))
    width = 0.8 / max(len(fmts), 1)
    x = np.arange(len(layers))
    for i, f in enumerate(fmts):
        ax.bar(x + (i - (len(fmts) - 1) / 2) * width, [_finite(l.own.get(f, math.nan)) for l in layers], width,
               label=f.upper(), color=COLORS.get(f))
    ax.set_xticks(x)
    ax.set_xticklabels([l.node for l in layers], rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("own SQNR (dB)")
    ax.set_title(f"per-layer sensitivity (layer alone quantized, FP32 inputs), worst {report.base_format.upper()} first")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def format_grid(fmt, scale: float, upto: float) -> np.ndarray:
    """The non-negative magnitudes ``fmt`` represents at ``scale``, up to ``upto``."""
    vals = np.asarray(fmt.finite_values(), dtype=np.float64) if fmt.kind == "float" else np.arange(0, fmt.max + 1)
    vals = np.unique(np.abs(vals[np.isfinite(vals)])) * float(scale)
    return vals[vals <= upto * 1.0001]


def histogram_png(name: str, hist: Dict, formats: Sequence[str], amax: Optional[float] = None) -> bytes:
    """The |x| histogram of tensor ``name`` (a Histogram.to_dict() from the statistics), one panel per format
    with that format's grid at max scaling (scale = amax / format max) as ticks at the bottom."""
    from onnxfp8.calibrators.histogram import Histogram
    from onnxfp8.formats import get_format

    plt = require()
    h = Histogram.from_dict(hist)
    counts = h.counts.astype(np.float64)
    used = max(int(np.flatnonzero(counts)[-1]) + 1, 1) if counts.any() else 1
    centers = h.centers()[:used]
    counts = counts[:used]
    top = float(amax) if amax else float(h.max)
    fig, axes = plt.subplots(len(formats), 1, figsize=(7, 1.6 * len(formats) + 0.6), sharex=True, squeeze=False)
    for ax, f in zip(axes[:, 0], formats):
        fmt = get_format(f)
        ax.bar(centers, counts, width=h.width, color="#999999", log=True)
        grid = format_grid(fmt, top / fmt.max if top > 0 else 1.0, max(top, float(centers[-1]) if used else top))
        ax.vlines(grid, 0.5, max(counts.max(), 1.0) ** 0.25, color=COLORS.get(fmt.name, "k"), linewidth=0.6)
        ax.axvline(top, color="k", linestyle="--", linewidth=0.8)
        ax.set_ylabel(fmt.name.upper(), fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].set_title(f"|{name}| on each format's grid (max scaling; dashed: amax {top:.3g})", fontsize=9)
    axes[-1, 0].set_xlabel("|x|")
    return _png(fig)


def sweep_png(rows: List[Dict], metric: str = "sqnr_db") -> bytes:
    """Horizontal bars of ``metric`` per sweep configuration."""
    plt = require()
    labels = [r["label"] for r in rows]
    vals = [_finite(r.get(metric) if r.get(metric) is not None else math.nan, 120.0) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 0.22 * len(rows) + 1))
    ax.barh(np.arange(len(rows)), vals, color=[COLORS.get(r.get("format", ""), "#777777") for r in rows])
    ax.set_yticks(np.arange(len(rows)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel({"sqnr_db": "output SQNR vs FP32 (dB)", "cosine": "output cosine vs FP32"}.get(metric, metric))
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)
