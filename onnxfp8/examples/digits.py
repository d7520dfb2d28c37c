"""A small CNN with BatchNormalization, trained in numpy on real data: the handwritten digits scikit-learn bundles.

``digits.npz`` beside this file holds the 1797 real 8x8 grey-level images (pixel values 0..16, uint8) and their
labels, as ``sklearn.datasets.load_digits`` returns them (the test set of the UCI "Optical Recognition of
Handwritten Digits" data, E. Alpaydin and C. Kaynak, 1998, CC BY 4.0; distributed with scikit-learn, BSD-3):
45 KB, so the example trains from ``pip install onnxfp8`` alone, without scikit-learn. The network::

    input [N,1,8,8] -> conv1 3x3 (16) -> bn1 -> relu1 -> pool1 (AveragePool 2x2) -> conv2 3x3 (32) -> bn2
    -> relu2 -> flatten -> fc (Gemm, 512 -> 10) -> logits

is trained here from scratch with plain numpy (im2col convolutions, batch-statistics BatchNorm with
PyTorch's running-average update, momentum 0.1 and unbiased running variance, softmax cross-entropy, Adam),
in a few seconds on one core. The exported model holds the running statistics, as a framework's checkpoint
does. Inputs are the pixel values / 16, standardized with the training set's mean and standard deviation.

Data split (seeded): 1437 training images (the BN statistics and weights come from them) and 360 held-out
test images. ``write_digits`` writes ``<out>/digits.onnx`` and ``<out>/data/digits/{calib,val}/*.npz``:
calib = 1024 training images (for calibration and BN recalibration), val = the 360 test images with
``label``.

    onnxfp8 example digits --out ex        (or: python -m onnxfp8.examples.digits [--out models] [--epochs 12])
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

EPS = 1e-5
MOMENTUM = 0.1


def load_split(seed: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): float32 NCHW images, standardized; int64 labels."""
    images, target = load_digits()
    x = (images.astype(np.float32) / 16.0)[:, None]
    y = target.astype(np.int64)
    idx = np.random.default_rng(seed).permutation(len(x))
    tr, te = idx[:1437], idx[1437:]
    mu, sd = x[tr].mean(), x[tr].std()
    x = ((x - mu) / sd).astype(np.float32)
    return x[tr], y[tr], x[te], y[te]


def load_digits() -> Tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8] uint8 in 0..16, labels [1797] uint8) from the bundled ``digits.npz``."""
    with np.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.npz")) as z:
        return z["images"], z["target"]


# -- numpy layers ------------------------------------------------------------------------------------
def _im2col(x: np.ndarray) -> np.ndarray:
    """3x3, pad 1, stride 1: [N,C,H,W] -> [N,H,W,C*9]."""
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # N,C,H,W,3,3
    N, C, H, W = x.shape
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(N, H, W, C * 9)


def _col2im(dcols: np.ndarray, shape) -> np.ndarray:
    N, C, H, W = shape
    d = dcols.reshape(N, H, W, C, 3, 3)
    dxp = np.zeros((N, C, H + 2, W + 2), dcols.dtype)
    for i in range(3):
        for j in range(3):
            dxp[:, :, i:i + H, j:j + W] += d[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return dxp[:, :, 1:-1, 1:-1]


def conv_fwd(x, w, b):
    cols = _im2col(x)
    out = cols @ w.reshape(w.shape[0], -1).T + b
    return out.transpose(0, 3, 1, 2), cols


def conv_bwd(dy, cols, w, xshape):
    dyt = dy.transpose(0, 2, 3, 1)  # N,H,W,Cout
    dw = (dyt.reshape(-1, dyt.shape[-1]).T @ cols.reshape(-1, cols.shape[-1])).reshape(w.shape)
    db = dyt.sum(axis=(0, 1, 2))
    dx = _col2im(dyt @ w.reshape(w.shape[0], -1), xshape)
    return dx, dw, db


def bn_fwd(x, gamma, beta):
    mean = x.mean(axis=(0, 2, 3))
    var = x.var(axis=(0, 2, 3))
    inv = 1.0 / np.sqrt(var + EPS)
    xhat = (x - mean[None, :, None, None]) * inv[None, :, None, None]
    return xhat * gamma[None, :, None, None] + beta[None, :, None, None], (xhat, inv, mean, var)


def bn_bwd(dy, cache, gamma):
    xhat, inv, _, _ = cache
    m = dy.shape[0] * dy.shape[2] * dy.shape[3]
    dgamma = (dy * xhat).sum(axis=(0, 2, 3))
    dbeta = dy.sum(axis=(0, 2, 3))
    dxhat = dy * gamma[None, :, None, None]
    dx = (inv[None, :, None, None] / m) * (m * dxhat - dxhat.sum(axis=(0, 2, 3))[None, :, None, None]
                                           - xhat * (dxhat * xhat).sum(axis=(0, 2, 3))[None, :, None, None])
    return dx, dgamma, dbeta


def init_params(seed: int = 0) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    he = lambda shape, fan: (rng.standard_normal(shape) * np.sqrt(2.0 / fan)).astype(np.float32)  # noqa: E731
    return {
        "conv1.weight": he((16, 1, 3, 3), 9), "conv1.bias": np.zeros(16, np.float32),
        "bn1.gamma": np.ones(16, np.float32), "bn1.beta": np.zeros(16, np.float32),
        "conv2.weight": he((32, 16, 3, 3), 144), "conv2.bias": np.zeros(32, np.float32),
        "bn2.gamma": np.ones(32, np.float32), "bn2.beta": np.zeros(32, np.float32),
        "fc.weight": he((10, 512), 512) * np.float32(0.5), "fc.bias": np.zeros(10, np.float32),
    }


def forward_train(p, x):
    c = {}
    h, c["cols1"] = conv_fwd(x, p["conv1.weight"], p["conv1.bias"])
    c["x1shape"] = x.shape
    h, c["bn1"] = bn_fwd(h, p["bn1.gamma"], p["bn1.beta"])
    c["r1"] = h > 0
    h = h * c["r1"]
    N, C, H, W = h.shape
    h = h.reshape(N, C, H // 2, 2, W // 2, 2).mean(axis=(3, 5))
    c["x2shape"] = h.shape
    h, c["cols2"] = conv_fwd(h, p["conv2.weight"], p["conv2.bias"])
    h, c["bn2"] = bn_fwd(h, p["bn2.gamma"], p["bn2.beta"])
    c["r2"] = h > 0
    h = h * c["r2"]
    c["flat"] = h.reshape(N, -1)
    logits = c["flat"] @ p["fc.weight"].T + p["fc.bias"]
    return logits, c


def backward(p, c, dlogits):
    g = {}
    g["fc.weight"] = dlogits.T @ c["flat"]
    g["fc.bias"] = dlogits.sum(0)
    dh = (dlogits @ p["fc.weight"]).reshape(c["r2"].shape) * c["r2"]
    dh, g["bn2.gamma"], g["bn2.beta"] = bn_bwd(dh, c["bn2"], p["bn2.gamma"])
    dh, g["conv2.weight"], g["conv2.bias"] = conv_bwd(dh, c["cols2"], p["conv2.weight"], c["x2shape"])
    dh = np.repeat(np.repeat(dh, 2, axis=2), 2, axis=3) / 4.0
    dh = dh * c["r1"]
    dh, g["bn1.gamma"], g["bn1.beta"] = bn_bwd(dh, c["bn1"], p["bn1.gamma"])
    _, g["conv1.weight"], g["conv1.bias"] = conv_bwd(dh, c["cols1"], p["conv1.weight"], c["x1shape"])
    return g


def softmax_xent(logits, y):
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    prob = e / e.sum(1, keepdims=True)
    loss = -np.log(prob[np.arange(len(y)), y] + 1e-12).mean()
    d = prob
    d[np.arange(len(y)), y] -= 1
    return loss, d / len(y)


def train(epochs: int = 12, seed: int = 0, batch: int = 64, lr: float = 3e-3, verbose: bool = False):
    """Train the CNN; returns (params, running stats, (x_tr, y_tr, x_te, y_te))."""
    x_tr, y_tr, x_te, y_te = load_split(seed)
    p = init_params(seed)
    run = {"bn1.mean": np.zeros(16), "bn1.var": np.ones(16), "bn2.mean": np.zeros(32), "bn2.var": np.ones(32)}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(v) for k, v in p.items()}
    rng = np.random.default_rng(seed + 1)
    t = 0
    for ep in range(epochs):
        order = rng.permutation(len(x_tr))
        for s in range(0, len(order) - batch + 1, batch):
            idx = order[s:s + batch]
            logits, c = forward_train(p, x_tr[idx])
            loss, d = softmax_xent(logits, y_tr[idx])
            g = backward(p, c, d)
            t += 1
            for k in p:
                m[k] = 0.9 * m[k] + 0.1 * g[k]
                v[k] = 0.999 * v[k] + 0.001 * g[k] ** 2
                p[k] = (p[k] - lr * (m[k] / (1 - 0.9 ** t)) / (np.sqrt(v[k] / (1 - 0.999 ** t)) + 1e-8)).astype(np.float32)
            for bn in ("bn1", "bn2"):
                _, _, bmean, bvar = c[bn]
                n = c[bn][0].shape[0] * c[bn][0].shape[2] * c[bn][0].shape[3]
                run[f"{bn}.mean"] = (1 - MOMENTUM) * run[f"{bn}.mean"] + MOMENTUM * bmean
                run[f"{bn}.var"] = (1 - MOMENTUM) * run[f"{bn}.var"] + MOMENTUM * bvar * n / (n - 1)
        if verbose:
            print(f"epoch {ep + 1}: loss {loss:.4f}", file=sys.stderr)
    return p, run, (x_tr, y_tr, x_te, y_te)


def to_onnx(p, run) -> onnx.ModelProto:
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(f32(v), k) for k, v in p.items()]
    inits += [numpy_helper.from_array(f32(v), k) for k, v in run.items()]
    inits.append(numpy_helper.from_array(np.asarray([-1, 512], np.int64), "flatten.shape"))
    n = helper.make_node
    nodes = [
        n("Conv", ["input", "conv1.weight", "conv1.bias"], ["conv1/output"], name="conv1", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        n("BatchNormalization", ["conv1/output", "bn1.gamma", "bn1.beta", "bn1.mean", "bn1.var"], ["bn1/output"],
          name="bn1", epsilon=EPS),
        n("Relu", ["bn1/output"], ["relu1/output"], name="relu1"),
        n("AveragePool", ["relu1/output"], ["pool1/output"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        n("Conv", ["pool1/output", "conv2.weight", "conv2.bias"], ["conv2/output"], name="conv2", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        n("BatchNormalization", ["conv2/output", "bn2.gamma", "bn2.beta", "bn2.mean", "bn2.var"], ["bn2/output"],
          name="bn2", epsilon=EPS),
        n("Relu", ["bn2/output"], ["relu2/output"], name="relu2"),
        n("Reshape", ["relu2/output", "flatten.shape"], ["flatten/output"], name="flatten"),
        n("Gemm", ["flatten/output", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "digits_cnn",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], producer_name="onnxfp8-models")
    model.ir_version = 9
    helper.set_model_props(model, {"onnxfp8.example": "digits"})
    onnx.checker.check_model(model, full_check=True)
    return model


def build_digits(epochs: int = 12, seed: int = 0, verbose: bool = False):
    """Train and export: returns (model, {"calib": x, "val": (x, y), "train": (x, y)})."""
    p, run, (x_tr, y_tr, x_te, y_te) = train(epochs, seed, verbose=verbose)
    return to_onnx(p, run), {"calib": x_tr[:1024], "train": (x_tr, y_tr), "val": (x_te, y_te)}


def _fp32_accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return float((sess.run(None, {"input": x})[0].argmax(1) == y).mean())


def write_digits(out: str = "models", epochs: int = 12, seed: int = 0, per_file: int = 64) -> Dict[str, object]:
    """Train, then write ``<out>/digits.onnx`` and ``<out>/data/digits/{calib,val}`` (each file written to a
    temporary name and renamed: no partial file). Returns the paths, the sample counts and the FP32 accuracy
    on the held-out images."""
    from onnxfp8.modelio import save_model

    model, data = build_digits(epochs, seed)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "digits.onnx")
    save_model(model, path)
    folders = {}
    for split in ("calib", "val"):
        folder = os.path.join(out, "data", "digits", split)
        folders[split] = folder
        os.makedirs(folder, exist_ok=True)
        for f in os.listdir(folder):
            if f.endswith(".npz"):
                os.unlink(os.path.join(folder, f))
        x, y = (data[split], None) if split == "calib" else data[split]
        for i in range(0, len(x), per_file):
            arrays = {"input": x[i:i + per_file]}
            if y is not None:
                arrays["label"] = y[i:i + per_file]
            target = os.path.join(folder, f"{i // per_file:05d}.npz")
            tmp = target + ".tmp.npz"
            np.savez(tmp, **arrays)
            os.replace(tmp, target)
    x_te, y_te = data["val"]
    return {"model": path, "calib": folders["calib"], "val": folders["val"], "calib_samples": len(data["calib"]),
            "val_samples": len(x_te), "labels": True, "accuracy": _fp32_accuracy(model, x_te, y_te),
            "epochs": epochs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="models")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    start = time.perf_counter()
    info = write_digits(a.out, a.epochs, a.seed)
    print(f"wrote {info['model']} (test accuracy {100 * info['accuracy']:.2f} %) and its data in "
          f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
