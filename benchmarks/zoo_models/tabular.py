"""Small models trained here, in torch, on scikit-learn's bundled datasets: real labels, real accuracy.

* ``digits-cnn``: load_digits (1797 8x8 images; the split and standardization of onnxfp8.examples.digits),
  conv 3x3 (16) -> BN -> ReLU -> max-pool -> conv 3x3 (32) -> BN -> ReLU -> global average pool -> Linear 10.
  BN kept in the export.
* ``wine-mlp``: load_wine (178 x 13 features, 3 classes), ``breast-cancer-mlp``: load_breast_cancer (569 x 30,
  2 classes): standardization baked into the graph (Sub/Div with the training set's mean/std, as a
  scikit-learn pipeline export has it: the inputs are the raw features, whose ranges span 1e-3..4e3), then
  Linear 64 -> ReLU -> Linear 32 -> ReLU -> Linear classes.

Seeded stratified split (75 % train / 25 % held out); full-batch Adam for a few hundred steps (a few
seconds). calib = the training rows, val = the held-out rows with ``val_labels.npy``; outputs ``logits``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ZooModel
from .common import export, threaded_build, write_batches, write_labels


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class MLP(nn.Module):
    def __init__(self, mean: np.ndarray, std: np.ndarray, n_classes: int, hidden=(64, 32)):
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(mean.astype(np.float32)))
        self.register_buffer("std", torch.from_numpy(std.astype(np.float32)))
        dims = (len(mean),) + hidden
        layers: List[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(dims[-1], n_classes))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def _split(x: np.ndarray, y: np.ndarray, seed: int) -> Tuple[np.ndarray, ...]:
    from sklearn.model_selection import train_test_split

    return train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed)


def _fit(model: nn.Module, x: np.ndarray, y: np.ndarray, steps: int, lr: float = 1e-2, batch: int = 0) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randperm(len(xt), generator=g)[:batch] if batch else slice(None)
        loss = F.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def _finish(folder: Path, model: nn.Module, xtr, xte, yte, batch: int) -> None:
    name = "input"
    export(model, (torch.from_numpy(xtr[:2]),), folder / "model.onnx", [name], ["logits"],
           {name: {0: "batch"}, "logits": {0: "batch"}}, keep_bn=True, check_feed={name: xtr[:batch]})
    write_batches(folder / "calib", {name: xtr}, batch)
    write_batches(folder / "val", {name: xte}, batch)
    write_labels(folder, yte)


def _digits(folder: Path, seed: int) -> None:
    from onnxfp8.examples.digits import load_split

    torch.manual_seed(seed)
    xtr, ytr, xte, yte = load_split(seed)
    model = DigitsCNN()
    _fit(model, xtr, ytr, 300, lr=3e-3, batch=128)
    _finish(folder, model, xtr[:512], xte, yte, 64)


def _sklearn(loader: str) -> Callable[[Path, int], None]:
    def build(folder: Path, seed: int) -> None:
        import sklearn.datasets

        torch.manual_seed(seed)
        d = getattr(sklearn.datasets, loader)()
        x, y = d.data.astype(np.float32), d.target.astype(np.int64)
        xtr, xte, ytr, yte = _split(x, y, seed)
        model = MLP(xtr.mean(0), xtr.std(0) + 1e-6, int(y.max()) + 1)
        _fit(model, xtr, ytr, 300)
        _finish(folder, model, xtr, xte, yte, 32)

    return build


MODELS: List[ZooModel] = [
    ZooModel("digits-cnn", "tabular", threaded_build(_digits), frozenset({"labels", "bn", "smoke"}),
             "CNN with BatchNormalization trained on scikit-learn's digits (8x8), BN kept"),
    ZooModel("wine-mlp", "tabular", threaded_build(_sklearn("load_wine")), frozenset({"labels"}),
             "MLP on scikit-learn's wine (13 raw features, standardization in the graph, 3 classes)"),
    ZooModel("breast-cancer-mlp", "tabular", threaded_build(_sklearn("load_breast_cancer")), frozenset({"labels"}),
             "MLP on scikit-learn's breast cancer (30 raw features, standardization in the graph, 2 classes)"),
]
