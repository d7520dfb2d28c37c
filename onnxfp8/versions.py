"""The software that made a file: every JSON output (plan, reports, lint, statistics) carries it, so a figure
can be traced to the onnxfp8 and onnxruntime that produced it."""
from __future__ import annotations

import functools
from typing import Dict


@functools.lru_cache(maxsize=1)
def _software() -> Dict[str, str]:
    import importlib.metadata as md

    from onnxfp8 import __version__

    out = {"onnxfp8": __version__}
    for dist in ("onnxruntime", "onnx", "onnx-graphsurgeon", "ml_dtypes", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:  # e.g. onnxruntime-gpu: ask the module
            try:
                out[dist] = __import__(dist.replace("-", "_")).__version__
            except Exception:
                out[dist] = "unknown"
    return out


def software() -> Dict[str, str]:
    """``{"onnxfp8": "0.1.0", "onnxruntime": "1.32.0", "onnx": ..., "onnx-graphsurgeon": ..., "ml_dtypes": ...,
    "numpy": ...}`` (a fresh dict each call)."""
    return dict(_software())
