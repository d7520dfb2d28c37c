"""Shared pieces of the zoo's torch-built models (CNN, RNN, tabular families).

* ``crops``: real images. Random resized crops of scikit-image's bundled photographs (nothing downloaded),
  resized with antialiasing and normalized with the ImageNet mean/std, as a torchvision pipeline would.
  The photographs are split in two disjoint sets: ``train`` (BatchNorm statistics and calibration, with
  different crop seeds) and ``val`` (validation only: other photographs).
* ``settle_batchnorm``: BatchNorm running statistics from train-mode forward passes over real crops
  (cumulative average of the batch statistics, ``momentum=None``), then eval; untouched statistics
  (mean 0, var 1) would give activations no trained model has.
* ``center_head``: sets a classifier's (or per-pixel head's) bias so its logits average zero over the
  training crops, as a trained head's bias does; without it, a randomly initialized head's output is a
  constant vector plus a small input-dependent part, and the cosine against FP32 would measure nothing.
* ``export``: the TorchScript exporter (``dynamo=False``, opset 17, dynamic axes) with BatchNormalization
  kept (``TrainingMode.PRESERVE``) or folded (eval, the exporter's default), written atomically and checked
  (onnx.checker, the BN nodes there or not, onnxruntime's output against torch's).
* ``write_batches``: ``calib/NNNNN.npz`` / ``val/NNNNN.npz``, keys = input names, each file one batch along
  each input's own batch axis (a scalar input is stored whole in every file).
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

OPSET = 17
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

# Disjoint photograph sets (skimage.data, bundled with scikit-image). ``cat`` is ``chelsea``: listed once.
TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "hubble_deep_field", "stereo_motorcycle",
                "camera", "coins", "moon", "brick", "grass", "page")
MAX_SIDE = 512
VAL_PHOTOS = ("chelsea", "immunohistochemistry", "retina", "gravel", "clock", "cell", "text")


# -- images ------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _photo(name: str):
    """One photograph as a float32 torch tensor [3, H, W] in [0, 1] (grey images replicated)."""
    import skimage.data
    import torch

    img = getattr(skimage.data, name)()
    if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity): the left view
        img = img[0]
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.float32)
    elif img.dtype == np.uint8:
        img = img.astype(np.float32) / 255.0
    else:
        img = img.astype(np.float32)
        img = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    img = img[:, :, :3]
    t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
    longest = max(t.shape[1:])
    if longest > MAX_SIDE:  # crops are resized to <= 128 px: a 512 px copy loses nothing and crops faster
        import torch.nn.functional as F

        size = [int(round(d * MAX_SIDE / longest)) for d in t.shape[1:]]
        t = F.interpolate(t[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return t.contiguous()


def crops(split: str, n: int, size: int, seed: int, *, scale=(0.08, 1.0), normalize: bool = True
          ) -> np.ndarray:
    """``n`` random resized crops [n, 3, size, size] (float32) of the ``split`` photographs.

    torchvision's RandomResizedCrop recipe (area fraction in ``scale``, aspect ratio 3/4..4/3, horizontal
    flip), bilinear resize with antialiasing, then (x - mean) / std with the ImageNet figures."""
    import torch
    import torch.nn.functional as F

    names = {"train": TRAIN_PHOTOS, "val": VAL_PHOTOS}[split]
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        img = _photo(names[int(rng.integers(len(names)))])
        _, H, W = img.shape
        for _ in range(10):
            area = H * W * rng.uniform(*scale)
            ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            w = int(round(np.sqrt(area * ratio)))
            h = int(round(np.sqrt(area / ratio)))
            if 0 < w <= W and 0 < h <= H:
                break
        else:
            h = w = min(H, W)
        top = int(rng.integers(H - h + 1))
        left = int(rng.integers(W - w + 1))
        c = img[:, top:top + h, left:left + w][None]
        c = F.interpolate(c, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
        if rng.random() < 0.5:
            c = c.flip(-1)
        out[i] = c.clamp(0, 1).numpy()
    if normalize:
        out = (out - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]
    return out.astype(np.float32)


# -- batch norm and heads ----------------------------------------------------------------------------
def spread_bn_affine(model, gamma=(0.4, 1.2), beta_std=0.1) -> None:
    """Give every BatchNorm a trained-like spread of scale (uniform in ``gamma``) and shift (normal,
    ``beta_std``) instead of the 1/0 init (a trained network's BN affine parameters are not constant; the
    constant init also makes the exporter deduplicate them into Identity nodes, which no trained export has).
    Uses torch's global generator: seed it first."""
    import torch

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.uniform_(*gamma)
                m.bias.normal_(0.0, beta_std)


def settle_batchnorm(model, batches: Sequence[np.ndarray], forward: Optional[Callable] = None) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them from train-mode forward passes over
    ``batches`` (cumulative average: ``momentum=None``), then put the model in eval mode. Returns the number
    of BatchNorm layers settled. ``forward(model, batch)`` runs one batch (default ``model(tensor)``)."""
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        for b in batches:
            if forward is None:
                model(torch.from_numpy(b))
            else:
                forward(model, b)
    for bn, mom in zip(bns, saved):
        bn.momentum = mom
    model.eval()
    return len(bns)


def center_head(model, head, batches: Sequence[np.ndarray], forward: Optional[Callable] = None,
                channel_dim: int = 1) -> None:
    """Shift ``head``'s bias (an nn.Linear or nn.Conv*) so its outputs average zero over ``batches``, the
    way a trained head's bias absorbs the mean feature. Averages over every axis but ``channel_dim`` (the
    output channel: 1 for a Conv head and a [N, C] Linear, -1 for a Linear applied on the last axis)."""
    import torch

    outs: List[torch.Tensor] = []
    hook = head.register_forward_hook(lambda mod, inp, out: outs.append(out.detach()))
    model.eval()
    try:
        with torch.no_grad():
            for b in batches:
                model(torch.from_numpy(b)) if forward is None else forward(model, b)
    finally:
        hook.remove()
    y = torch.cat([o.movedim(channel_dim, -1).reshape(-1, o.shape[channel_dim]) for o in outs])
    with torch.no_grad():
        if head.bias is None:
            raise ValueError("center_head needs a head with a bias")
        head.bias -= y.mean(0).to(head.bias.dtype)


def batched(x: np.ndarray, bs: int) -> List[np.ndarray]:
    return [x[i:i + bs] for i in range(0, len(x), bs)]


# -- export ------------------------------------------------------------------------------------------
def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def export(model, args: Tuple, path: Path, input_names: Sequence[str], output_names: Sequence[str],
           dynamic_axes: Mapping[str, Mapping[int, str]], *, keep_bn: bool,
           check_feed: Optional[Dict[str, np.ndarray]] = None, rtol: float = 1e-3,
           ref_outputs: Optional[Sequence[np.ndarray]] = None, min_cosine: Optional[float] = None):
    """Export ``model`` with the TorchScript exporter (opset 17) to ``path`` and verify the file.

    ``keep_bn``: BatchNormalization nodes stay, with their scale/bias/running_mean/running_var initializers
    (``training=TrainingMode.PRESERVE`` on an eval model); otherwise the exporter folds them into the Conv
    weights (its eval default). Checks: onnx.checker; BN nodes there (``keep_bn``) or gone; onnxruntime's
    outputs on ``check_feed`` (default: ``args``) against torch's (or ``ref_outputs``) within ``rtol`` of
    the output's magnitude (or, with ``min_cosine``, their cosine at least that: for FP16 models checked against
    the FP32 model's outputs). Returns the loaded ModelProto."""
    import onnx
    import torch

    model.eval()
    kw = dict(training=torch.onnx.TrainingMode.PRESERVE) if keep_bn else {}
    buf = io.BytesIO()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, buf, dynamo=False, opset_version=OPSET, input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes={k: dict(v) for k, v in
                                                                         dynamic_axes.items()}, **kw)
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto, full_check=True)
    inits = {i.name for i in proto.graph.initializer}
    bn = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    has_bn_module = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if keep_bn and has_bn_module:
        if not bn:
            raise RuntimeError(f"{path}: BatchNormalization was folded although keep_bn")
        for n in bn:
            missing = [i for i in n.input[1:] if i not in inits]
            if missing:
                raise RuntimeError(f"{path}: BatchNormalization {n.name} inputs not initializers: {missing}")
    if not keep_bn:  # a BN right after a Conv is folded; one after a Concat/Add (pre-activation) cannot be
        producer = {o: n.op_type for n in proto.graph.node for o in n.output}
        after_conv = [n.name for n in bn if producer.get(n.input[0]) == "Conv"]
        if after_conv:
            raise RuntimeError(f"{path}: BatchNormalization after Conv left in the folded export: {after_conv}")
    _atomic_write(Path(path), buf.getvalue())

    feed = check_feed
    if feed is None:
        feed = {n: a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
                for n, a in zip(input_names, args)}
    if ref_outputs is None:
        with torch.no_grad():
            t = model(*[torch.from_numpy(np.asarray(feed[n])) for n in input_names])
        ref_outputs = [o.detach().numpy() for o in (t if isinstance(t, (tuple, list)) else (t,))]
    got = run_onnx(path, feed)
    for name, r, g in zip(output_names, ref_outputs, got):
        r64, g64 = np.asarray(r, np.float64), np.asarray(g, np.float64)
        if r64.shape != g64.shape:
            raise RuntimeError(f"{path}: output {name} shape {g64.shape}, torch {r64.shape}")
        if min_cosine is not None:
            cos = float(np.dot(r64.ravel(), g64.ravel()) / max(np.linalg.norm(r64) * np.linalg.norm(g64), 1e-30))
            if not cos >= min_cosine:
                raise RuntimeError(f"{path}: output {name} cosine {cos:.5f} against the reference < {min_cosine}")
            continue
        err = float(np.max(np.abs(r64 - g64))) if r64.size else 0.0
        scale = float(np.max(np.abs(r64))) if r64.size else 1.0
        if not err <= rtol * max(scale, 1e-6):
            raise RuntimeError(f"{path}: output {name} differs from torch by {err:.3g} (max |y| {scale:.3g})")
    return proto


def run_onnx(path: Path, feed: Mapping[str, np.ndarray]) -> List[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, dict(feed))


def to_fp16(model, fold_bn: bool = False):
    """The model converted to float16 (weights, buffers: BN statistics too), as ``model.half()`` exports
    are written: float16 inputs, outputs and initializers. ``fold_bn``: first fold every Conv -> BatchNorm
    pair of an nn.Sequential in FP32 (torch.nn.utils.fusion, the exporter's arithmetic), as converting a
    folded FP32 export to FP16 does; the exporter folding an FP16 model would round the folded weights in
    FP16 arithmetic (MobileNetV2: logits cosine 0.9977 against FP32 instead of >= 0.9999)."""
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if fold_bn:
        model.eval()
        for seq in [m for m in model.modules() if isinstance(m, torch.nn.Sequential)]:
            kids = list(seq)
            for i in range(len(kids) - 1):
                if isinstance(kids[i], torch.nn.Conv2d) and isinstance(kids[i + 1], torch.nn.BatchNorm2d):
                    seq[i] = fuse_conv_bn_eval(kids[i], kids[i + 1])
                    seq[i + 1] = torch.nn.Identity()
    return model.half()


# -- data files --------------------------------------------------------------------------------------
def write_batches(folder: Path, arrays: Mapping[str, np.ndarray], batch_size: int,
                  batch_axes: Optional[Mapping[str, Optional[int]]] = None) -> int:
    """Write ``folder/NNNNN.npz`` files, one batch each: every array is cut along its batch axis
    (``batch_axes[name]``, default 0; ``None`` = no batch axis, stored whole in every file, e.g. a scalar).
    Old .npz files in ``folder`` are removed first. Returns the number of files."""
    axes = {k: (batch_axes or {}).get(k, 0) for k in arrays}
    sizes = {arrays[k].shape[a] for k, a in axes.items() if a is not None}
    if len(sizes) != 1:
        raise ValueError(f"inputs disagree on the number of samples: {sizes}")
    n = sizes.pop()
    batches = []
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        batches.append({k: a if axes[k] is None else np.take(a, idx, axis=axes[k]) for k, a in arrays.items()})
    return write_npz_files(folder, batches)


def write_npz_files(folder: Path, batches: Sequence[Mapping[str, np.ndarray]]) -> int:
    """``folder/00000.npz``, ``00001.npz``, ... one per dict (old .npz files removed first)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.npz"):
        old.unlink()
    for i, batch in enumerate(batches):
        buf = io.BytesIO()
        np.savez(buf, **batch)
        _atomic_write(folder / f"{i:05d}.npz", buf.getvalue())
    return len(batches)


def write_labels(folder: Path, labels: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(labels, np.int64))
    _atomic_write(Path(folder) / "val_labels.npy", buf.getvalue())


def output_spread(y: np.ndarray) -> float:
    """How much an output depends on its input: std across samples / RMS of the output (0 = constant)."""
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    rms = float(np.sqrt(np.mean(y ** 2)))
    return float(np.mean(np.std(y, axis=0))) / max(rms, 1e-12)


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """Run torch on ``n`` threads inside the block (restored after). The builds run on a shared 2-core
    machine: one thread is several times faster there than two contending ones (measured: ResNet-18 forward
    of 32 64x64 crops 0.95 s on 1 thread vs 4.6 s on 2 at load 12)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def threaded_build(fn: Callable[[Path, int], None]) -> Callable[[Path, int], None]:
    """A ZooModel build: creates ``folder`` and runs ``fn(folder, seed)`` on one torch thread."""
    def build(folder: Path, seed: int) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with torch_threads(1):
            fn(folder, seed)

    return build


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def fitted_head(x, w, rng: np.random.Generator):
    """A trained classifier's head for features ``x`` [samples, in] (float64 torch) and a random weight ``w``
    [out, in]: the weight reads the directions in which the features vary across samples (a random mix of their
    top 8 principal directions plus 10 % of ``w``), scaled so the logits vary by ~2 across samples; the bias
    centres every class (+ N(0, 0.1) priors). Returns (weight, bias) as float32 torch tensors."""
    import torch

    _, s, vt = np.linalg.svd((x - x.mean(0)).numpy(), full_matrices=False)
    r = int(min(8, (s > 1e-6 * s[0]).sum()))
    mix = rng.standard_normal((w.shape[0], r)) @ vt[:r]
    mix *= float(w.norm()) / max(float(np.linalg.norm(mix)), 1e-12)
    w = torch.from_numpy(mix) + 0.1 * w
    y = x @ w.T
    scale = 2.0 / max(float((y - y.mean(0)).std()), 1e-6)
    bias = -y.mean(0) * scale + 0.1 * torch.from_numpy(rng.standard_normal(y.shape[1]))
    return (w * scale).float(), bias.float()
