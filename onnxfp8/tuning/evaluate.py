"""Calibrate once, evaluate many: the two pieces every search over plans stands on.

* ``Workspace`` loads and prepares the model once (quantize.prepare) and calibrates it once (min/max and
  histograms of every calibrated tensor, the statistics cache of calibrators/cache.py); then it realises any
  number of configurations from those statistics without touching the calibration data again (``realize``:
  other formats per tensor, other calibration methods), and edited plans through onnxfp8.apply_plan
  (``apply``: nodes left in high precision, formats per tensor). A realisation is a graph build, not a
  calibration: 0.06-0.2 s on the example transformer.
* ``Evaluator`` runs the FP32 model over the validation data once, keeps its outputs, and then scores each
  candidate with one onnxruntime pass of the quantized model (the level where Q/DQ numerics are exact), through
  verify/measure.measure_outputs (the measurement quantize and BatchNorm recalibration use): per output SQNR and cosine (verify/compare.ErrorStats), top-1 agreement and, with labels, the relative accuracy
  loss (ClassifierStats).
* ``Target``: what "good enough" means (``cosine`` / ``sqnr`` at least a value, or ``accuracy_loss`` at most
  one), judged on the validation data, never on the calibration data.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from onnxfp8.calibrators.data import as_data
from onnxfp8.config import QuantConfig
from onnxfp8.errors import ConfigError, DataError
from onnxfp8.modelio import ModelLike, load_model, make_session
from onnxfp8.plan import json_plain
from onnxfp8.verify.compare import ClassifierStats, ErrorStats, is_classifier

METRICS = ("cosine", "sqnr", "accuracy_loss")
CRITERION_COSINE = 0.995  # the FP8 paper's pass criterion: cosine >= 0.995 vs FP32 ...
CRITERION_ACCURACY_LOSS = 0.01  # ... or < 1 % relative accuracy loss where labels exist


@dataclass(frozen=True)
class Target:
    """``metric`` (cosine, sqnr in dB: at least ``value``; accuracy_loss, a fraction: at most ``value``), taken
    over the model's outputs (the worst output counts)."""

    metric: str
    value: float

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"target: unknown metric '{self.metric}'; choose one of {', '.join(METRICS)}")
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"target {self.metric}: expected a finite number, got {v!r}")
        if self.metric == "cosine" and not -1.0 <= v <= 1.0:
            raise ConfigError(f"target cosine must be in [-1, 1], got {v}")
        if self.metric == "accuracy_loss" and not 0.0 <= v < 1.0:
            raise ConfigError(f"target accuracy loss must be a fraction in [0, 1) (1% = 0.01), got {v}")

    @property
    def flag(self) -> str:
        return {"cosine": "--target-cosine", "sqnr": "--target-sqnr", "accuracy_loss": "--max-accuracy-loss"}[self.metric]

    def met(self, value: Optional[float]) -> bool:
        if value is None or math.isnan(value):
            return False
        return value <= self.value if self.metric == "accuracy_loss" else value >= self.value

    def fmt(self, value: Optional[float]) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "n/a"
        if self.metric == "cosine":
            return f"cosine {value:.5f}"
        if self.metric == "sqnr":
            return f"SQNR {value:.2f} dB"
        return f"accuracy loss {100 * value:.2f} %"

    def describe(self) -> str:
        if self.metric == "accuracy_loss":
            return f"relative accuracy loss <= {100 * self.value:g} %"
        return f"{self.metric} >= {self.value:g}" + (" dB" if self.metric == "sqnr" else "")

    def to_dict(self) -> Dict[str, Any]:
        return {"metric": self.metric, "value": self.value, "describe": self.describe()}


@dataclass
class Evaluation:
    """One candidate on the validation data: per output error and (classifier outputs) agreement/accuracy."""

    outputs: Dict[str, ErrorStats]
    classifiers: Dict[str, ClassifierStats]
    samples: int
    seconds: float = 0.0

    @property
    def cosine(self) -> float:
        vals = [s.cosine for s in self.outputs.values() if s.count]
        return min(vals) if vals else math.nan

    @property
    def sqnr_db(self) -> float:
        vals = [s.sqnr_db for s in self.outputs.values() if s.count]
        return min(vals) if vals else math.nan

    @property
    def accuracy_loss(self) -> Optional[float]:
        vals = [c.accuracy_loss for c in self.classifiers.values() if c.labelled]
        return max(vals) if vals else None

    @property
    def accuracy(self) -> Optional[float]:
        vals = [c.accuracy_quant for c in self.classifiers.values() if c.labelled]
        return min(vals) if vals else None

    @property
    def accuracy_fp32(self) -> Optional[float]:
        vals = [c.accuracy_fp32 for c in self.classifiers.values() if c.labelled]
        return min(vals) if vals else None

    @property
    def top1_agreement(self) -> Optional[float]:
        vals = [c.top1_agreement for c in self.classifiers.values() if c.samples]
        return min(vals) if vals else None

    def value(self, metric: str) -> Optional[float]:
        return {"cosine": self.cosine, "sqnr": self.sqnr_db, "accuracy_loss": self.accuracy_loss}[metric]

    def key(self, target: Target) -> Tuple[float, float]:
        """Sort key, larger is better: the target's metric, then cosine (an accuracy loss moves in steps of one
        sample, so two candidates often tie on it)."""
        v = self.value(target.metric)
        v = -math.inf if v is None or math.isnan(v) else (-v if target.metric == "accuracy_loss" else v)
        c = self.cosine
        return v, (-math.inf if math.isnan(c) else c)

    def metrics(self) -> Dict[str, Any]:
        return json_plain({"cosine": self.cosine, "sqnr_db": self.sqnr_db, "accuracy_loss": self.accuracy_loss,
                           "accuracy": self.accuracy, "accuracy_fp32": self.accuracy_fp32,
                           "top1_agreement": self.top1_agreement})

    def to_dict(self) -> Dict[str, Any]:
        return json_plain({**self.metrics(), "samples": self.samples, "seconds": round(self.seconds, 4),
                           "outputs": {n: s.to_dict() for n, s in self.outputs.items()},
                           "classifiers": {n: c.to_dict() for n, c in self.classifiers.items()}})


class Evaluator:
    """FP32 outputs on the validation data, computed once; ``evaluate(quant)`` scores a quantized model."""

    def __init__(self, fp32: ModelLike, val: Any, labels: Any = None, *, batch_size: int = 16,
                 samples: Optional[int] = None, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int = 0, what: str = "validation data"):
        from onnxfp8.verify.check import load_labels

        start = time.perf_counter()
        proto = load_model(fp32)
        self.providers, self.threads = tuple(providers), threads
        self.data = as_data(val, proto, batch_size=batch_size, limit=samples, what=what)
        label_array, label_source = load_labels(labels)
        self.names = [o.name for o in proto.graph.output]
        sess = make_session(fp32 if isinstance(fp32, (str, os.PathLike)) else proto, level="basic",
                            providers=self.providers, threads=threads)
        self.batches: List[Tuple[Dict[str, np.ndarray], List[np.ndarray], Optional[np.ndarray]]] = []
        seen = 0
        for batch, lab in self.data.batches(with_labels=True):
            n = next(iter(batch.values())).shape[0]
            if label_array is not None:
                if seen + n > label_array.shape[0]:
                    raise DataError(f"{label_source}: holds {label_array.shape[0]} labels, the data has more samples")
                lab = label_array[seen:seen + n]
            refs = [np.asarray(r) for r in sess.run(self.names, batch)]
            self.batches.append((batch, refs, lab))
            seen += n
        if seen == 0:
            raise DataError(f"{self.data.describe()}: the validation data holds no samples")
        if label_array is not None and samples is None and label_array.shape[0] != seen:
            raise DataError(f"{label_source}: holds {label_array.shape[0]} labels for {seen} samples")
        self.samples = seen
        self.labelled = any(lab is not None for _, _, lab in self.batches)
        self.classifier_outputs = [n for n, r in zip(self.names, self.batches[0][1])
                                   if r.dtype.kind == "f" and is_classifier(r.shape)]
        if self.labelled and not self.classifier_outputs:
            raise DataError(f"{label_source or self.data.describe()}: labels given, but no output is classifier-like "
                            f"([N, C] scores, C >= 2)")
        self.fp32_seconds = time.perf_counter() - start  # one plain FP32 pass over the data (session included)
        self.evaluations = 0

    def evaluate(self, quant: ModelLike, progress=None, label: str = "evaluating") -> Evaluation:
        """Score ``quant`` on the stored batches against the FP32 outputs through verify/measure.measure_outputs
        (the one output measurement quantize's summary and BatchNorm recalibration's guard use)."""
        from onnxfp8.verify.measure import measure_outputs

        start = time.perf_counter()
        # outputs that are not numbers (strings...) are not compared
        refs = [{n: r for n, r in zip(self.names, rs) if r.dtype.kind in "fiub"} for _, rs, _ in self.batches]
        if progress is not None:
            progress.begin(label, self.samples)
        try:
            m = measure_outputs(quant, _Stored(self.batches), refs, providers=self.providers, threads=self.threads,
                                progress=progress)
        finally:
            if progress is not None:
                progress.close()
        outs = {n: m.outputs.get(n, ErrorStats()) for n in self.names}
        cls = {n: m.classifiers.get(n, ClassifierStats()) for n in self.classifier_outputs}
        self.evaluations += 1
        return Evaluation(outs, cls, self.samples, time.perf_counter() - start)

    def subset(self, samples: int) -> "Evaluator":
        """The same evaluator on the first ``samples`` samples (whole batches), sharing the FP32 outputs."""
        sub = object.__new__(Evaluator)
        sub.__dict__.update(self.__dict__)
        keep, seen = [], 0
        for b in self.batches:
            if seen >= samples:
                break
            keep.append(b)
            seen += next(iter(b[0].values())).shape[0]
        sub.batches, sub.samples, sub.evaluations = keep, seen, 0
        return sub


class _Stored:
    """The Evaluator's stored batches as a DataSource for measure_outputs: each batch with its labels."""

    def __init__(self, batches):
        self._batches = batches

    def batches(self, with_labels: bool = False):
        for batch, _, lab in self._batches:
            yield (batch, lab) if with_labels else batch


class Workspace:
    """One calibration of ``model`` with ``config``, realised as many configurations as needed.

    The first quantization saves the statistics (min/max and histograms of every calibrated tensor) to a
    temporary file (or to ``config.save_stats`` when given; ``config.load_stats`` is used as it is); every
    ``realize(config)`` after it quantizes from those statistics, without calibration data. The configurations
    must keep the graph the statistics belong to (same scheme and BatchNorm folding); anything that only changes
    formats, scales, methods or which nodes are quantized qualifies."""

    def __init__(self, model: ModelLike, calib: Any, config: Optional[QuantConfig] = None, progress=None):
        from onnxfp8.quantize import quantize

        config = config or QuantConfig()
        self.model = model
        self.config = config
        self.calib = calib  # kept for the FP16-safety ranges (tuning/fp16.py), read only when fallback needs them
        self.source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else "model"
        self._tmp: Optional[str] = None
        if config.load_stats:
            self.stats_path = config.load_stats
        elif config.save_stats:
            self.stats_path = config.save_stats
        else:
            self._tmp = tempfile.mkdtemp(prefix="onnxfp8-tune-")
            self.stats_path = os.path.join(self._tmp, "stats.json")
        from onnxfp8.quantize import prepare

        start = time.perf_counter()
        self.prepared = prepare(model, config)  # loaded and prepared once; every realisation copies its graph
        first = config.replace(summary_samples=0)
        if not config.load_stats:
            first = first.replace(save_stats=self.stats_path)
        try:
            self.first = self._users_files(quantize(self.prepared, calib, first, progress=progress))
        except BaseException:
            self.close()
            raise
        self.calibration_seconds = time.perf_counter() - start
        self.realizations = 0

    def realize(self, config: QuantConfig):
        """quantize() with ``config`` from the saved statistics (no data): a QuantResult."""
        from onnxfp8.quantize import quantize

        self.realizations += 1
        return self._users_files(quantize(self.prepared, None, config.replace(load_stats=self.stats_path,
                                                                              save_stats=None, summary_samples=0)))

    def _users_files(self, res):
        """The result's plan names the user's statistics files, not the workspace's temporary one (a tuned plan
        is reviewed and re-applied after the workspace is gone)."""
        if res.plan is not None and res.plan.config:
            res.plan.config["load_stats"] = self.config.load_stats
            res.plan.config["save_stats"] = self.config.save_stats
        return res

    def apply(self, plan):
        """The model of an (edited) plan, through onnxfp8.apply_plan: no statistics, no data."""
        from onnxfp8.quantize import apply_plan

        self.realizations += 1
        return apply_plan(self.prepared, plan)

    def stats(self):
        """The saved statistics (calibrators/cache.CalibrationStats): ranges and histograms per tensor."""
        from onnxfp8.calibrators.cache import CalibrationStats

        return CalibrationStats.load(self.stats_path)

    def close(self) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> "Workspace":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
