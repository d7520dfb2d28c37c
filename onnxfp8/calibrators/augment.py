"""Seeded, numpy-only data augmentation for NCHW image inputs (used for BatchNorm recalibration data).

The FP8 paper re-estimates BatchNorm statistics on augmented calibration data. Three augmentations:

- ``flip``: horizontal flip (last axis) of each sample with probability 1/2;
- ``crop``: random resized crop: a window covering 50-100 % of the image area with aspect ratio in
  [3/4, 4/3] (clamped to the image), resized back to H x W by bilinear interpolation (align_corners=False,
  edge-clamped), independently per sample;
- ``jitter``: small brightness / contrast change per sample, relative to the sample's own statistics so
  that it is meaningful whatever the input normalisation: ``x' = (x - m) * c + m + b * s`` with m, s the
  sample's mean and standard deviation, ``c ~ U(0.8, 1.2)``, ``b ~ U(-0.1, 0.1)``, clipped to the value
  range of the un-augmented batch (as torchvision clamps jittered images to [0, 1]). Without the clip,
  brighter / higher-contrast samples leave the input range the activation scales were calibrated on, the
  quantized model saturates them, and recalibration measures a variance drop that real data never shows
  (measured on the digits CNN in INT8: 1.5 % less variance at bn1, output SQNR 43.2 -> 37.7 dB).

They apply to inputs that are float tensors of rank 4 (N, C, H, W); asking for them on a model with any other
input is a ConfigError naming the input. ``AugmentedData`` wraps a CalibrationData: every call to
``batches()`` restarts the same seeded stream (so results are reproducible), and ``samples`` larger than the
data makes it go over the data again with fresh random draws (an "epoch" of new augmentations each time).
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from onnxfp8.calibrators.data import fmt_shape
from onnxfp8.calibrators.data import batch_size, take_samples
from onnxfp8.errors import ConfigError

AUGMENTATIONS = ("flip", "crop", "jitter")


def check_image_inputs(specs, ops: Sequence[str], source: str = "model") -> None:
    """Raise ConfigError unless every model input is an NCHW float image (rank 4)."""
    if not ops:
        return
    for spec in specs.values():
        dtype = np.dtype(spec.dtype)
        if len(spec.shape) != 4 or dtype.kind != "f":
            raise ConfigError(f"{source}: --augment {','.join(ops)} needs NCHW image inputs (float, rank 4), but input "
                              f"'{spec.name}' is {dtype.name} {fmt_shape(spec.shape)}; drop --augment for this model")


def flip(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    mask = rng.random(x.shape[0]) < 0.5
    out = x.copy()
    out[mask] = x[mask][..., ::-1]
    return out


def _bilinear_crop(img: np.ndarray, top: float, left: float, h: float, w: float, H: int, W: int) -> np.ndarray:
    """Resize the window (top, left, h, w) of ``img`` (C, H0, W0) to (C, H, W), bilinear, edge-clamped."""
    H0, W0 = img.shape[-2:]
    ys = top + (np.arange(H) + 0.5) * (h / H) - 0.5
    xs = left + (np.arange(W) + 0.5) * (w / W) - 0.5
    ys = np.clip(ys, 0, H0 - 1)
    xs = np.clip(xs, 0, W0 - 1)
    y0 = np.floor(ys).astype(np.int64)
    x0 = np.floor(xs).astype(np.int64)
    y1 = np.minimum(y0 + 1, H0 - 1)
    x1 = np.minimum(x0 + 1, W0 - 1)
    wy = (ys - y0).astype(img.dtype)[:, None]
    wx = (xs - x0).astype(img.dtype)[None, :]
    a = img[:, y0][:, :, x0]
    b = img[:, y0][:, :, x1]
    c = img[:, y1][:, :, x0]
    d = img[:, y1][:, :, x1]
    top_row = a * (1 - wx) + b * wx
    bottom = c * (1 - wx) + d * wx
    return (top_row * (1 - wy) + bottom * wy).astype(img.dtype)


def crop(x: np.ndarray, rng: np.random.Generator, area: Tuple[float, float] = (0.5, 1.0),
         ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    N, _, H, W = x.shape
    out = np.empty_like(x)
    for i in range(N):
        a = rng.uniform(*area) * H * W
        r = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        w = float(np.clip(np.sqrt(a * r), 1.0, W))
        h = float(np.clip(np.sqrt(a / r), 1.0, H))
        top = rng.uniform(0, H - h)
        left = rng.uniform(0, W - w)
        out[i] = _bilinear_crop(x[i], top, left, h, w, H, W)
    return out


def jitter(x: np.ndarray, rng: np.random.Generator, contrast: float = 0.2, brightness: float = 0.1) -> np.ndarray:
    N = x.shape[0]
    axes = tuple(range(1, x.ndim))
    m = x.mean(axis=axes, keepdims=True)
    s = x.std(axis=axes, keepdims=True)
    shape = (N,) + (1,) * (x.ndim - 1)
    c = rng.uniform(1 - contrast, 1 + contrast, size=shape).astype(x.dtype)
    b = rng.uniform(-brightness, brightness, size=shape).astype(x.dtype)
    return np.clip((x - m) * c + m + b * s, x.min(), x.max()).astype(x.dtype)


_FUNCS = {"flip": flip, "crop": crop, "jitter": jitter}


def augment_batch(batch: Dict[str, np.ndarray], ops: Sequence[str], rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """Apply ``ops`` in the order flip, crop, jitter to every input of the batch (one draw per input)."""
    out = {}
    for name, x in batch.items():
        for op in AUGMENTATIONS:
            if op in ops:
                x = _FUNCS[op](x, rng)
        out[name] = x
    return out


class AugmentedData:
    """A DataSource (calibrators/data.py) of augmented batches (``batches()``, iteration, ``specs``, ``batch_size``).

    ``samples``: stop after this many samples, going over the data again (with new random draws) when it
    holds fewer; None: one pass over the data."""

    def __init__(self, data, ops: Sequence[str], seed: int = 0, samples: Optional[int] = None, source: str = "model"):
        unknown = [o for o in ops if o not in AUGMENTATIONS]
        if unknown:
            raise ConfigError(f"augment: unknown augmentation '{unknown[0]}'; choose from {', '.join(AUGMENTATIONS)}")
        check_image_inputs(data.specs, ops, source)
        self.data = data
        self.ops = tuple(ops)
        self.seed = seed
        self.samples = samples
        self.specs = data.specs
        self.batch_size = data.batch_size

    def batches(self, with_labels: bool = False) -> Iterator:
        rng = np.random.default_rng(self.seed)
        seen = 0
        while True:
            got = 0
            for item in self.data.batches(with_labels=with_labels):
                batch, labels = item if with_labels else (item, None)
                n = batch_size(batch)
                if self.samples is not None and seen + n > self.samples:
                    n = self.samples - seen
                    batch = take_samples(batch, n)
                    labels = labels[:n] if labels is not None else None
                if n <= 0:
                    return
                aug = augment_batch(batch, self.ops, rng)
                yield (aug, labels) if with_labels else aug
                seen += n
                got += n
                if self.samples is not None and seen >= self.samples:
                    return
            if self.samples is None or got == 0:
                return

    def __iter__(self):
        return self.batches()

    def describe(self) -> str:
        return f"{self.data.describe()}, augmented ({','.join(self.ops)}, seed {self.seed})"
