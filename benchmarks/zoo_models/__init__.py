"""The model zoo's registry: real architectures built in code (seeded weights, nothing downloaded).

Every family module (``cnn``, ``transformer``, ``rnn``, ``tabular``) defines ``MODELS``: a list of ZooModel.
``ZooModel.build(folder, seed)`` writes, into ``folder``:

* ``model.onnx`` (opset >= 17, the model as its exporter writes it: BN unfolded unless the name says
  ``-folded``, shape subgraphs kept);
* ``calib/NNNNN.npz`` and ``val/NNNNN.npz`` (disjoint: different images/crops/seeds), keys = input names,
  each file one batch along the model's batch axis;
* ``val_labels.npy`` where the model has real labels (the scikit-learn trained models).

Tags: ``bn`` (has BatchNormalization), ``folded``, ``fp16``, ``bf16``, ``depthwise``, ``labels``,
``stateful``, ``smoke`` (in CI's smoke subset), ``transformer``, ``shapes`` (keeps shape subgraphs).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, FrozenSet, List

FAMILIES = ("cnn", "transformer", "rnn", "tabular")


@dataclass(frozen=True)
class ZooModel:
    name: str
    family: str
    build: Callable[[Path, int], None]
    tags: FrozenSet[str] = field(default_factory=frozenset)
    description: str = ""


def all_models() -> List[ZooModel]:
    """Every zoo model, family by family (a family whose module is missing or whose extra is not installed
    raises ImportError: install ``.[zoo]``)."""
    out: List[ZooModel] = []
    for fam in FAMILIES:
        try:
            mod = importlib.import_module(f"zoo_models.{fam}")
        except ModuleNotFoundError as e:
            if e.name == f"zoo_models.{fam}":
                continue  # that family is not written yet
            raise
        out.extend(mod.MODELS)
    names = [m.name for m in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"zoo model names must be unique: {sorted(dup)}")
    return out


def by_name() -> Dict[str, ZooModel]:
    return {m.name: m for m in all_models()}
