"""Example FP32 ONNX models built in code, with calibration and validation data (nothing downloaded).

``digits`` is a CNN trained here on real handwritten digits (the data ships as ``digits.npz``); ``cnn``,
``mlp`` and ``transformer`` have seeded, untrained weights (see :mod:`onnxfp8.examples.build`).
``onnxfp8 example NAME --out DIR`` writes ``DIR/NAME.onnx`` and ``DIR/data/NAME/{calib,val}/*.npz``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Union

NAMES = ("digits", "cnn", "mlp", "transformer")


def write_example(name: str, out_dir: Union[str, os.PathLike] = "examples", epochs: int = 12,
                  calib: int = 64, val: int = 64) -> Dict[str, object]:
    """Write one example and its data; returns ``{"model", "calib", "val"}`` paths, the sample counts
    (``calib_samples``, ``val_samples``), whether ``val`` carries labels, and for ``digits`` the FP32 test
    accuracy. ``epochs`` is for ``digits``; ``calib`` / ``val`` sample counts for the seeded examples."""
    from onnxfp8.errors import ConfigError

    if name not in NAMES:
        raise ConfigError(f"unknown example '{name}' (known: {', '.join(NAMES)})")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: not a folder")
    if name == "digits":
        from onnxfp8.examples.digits import write_digits

        info = write_digits(str(out), epochs=epochs)
        return info
    from onnxfp8.examples.build import build_all

    r = build_all(out, calib=calib, val=val, only=[name])[name]
    return {"model": r["model"], "calib": r["calib"], "val": r["val"], "calib_samples": calib,
            "val_samples": val, "labels": False}
