"""check(): measure how far a quantized model strays from its FP32 graph, judge it against thresholds, and
say where the error comes from. The CI gate behind ``onnxfp8 check`` and ``onnxfp8 quantize --check``.

Both models run in onnxruntime at ``ORT_ENABLE_BASIC`` (``modelio.make_session(level="basic")``): at
ENABLE_ALL onnxruntime fuses Q/DQ into kernels that change the numbers (tests/test_runtime_levels.py pins
which), so the quantized model is run the way its Q/DQ nodes define it. The FP32 model runs at the same level,
so a model checked against itself is bit-identical (infinite SQNR). ``reference=True`` also runs the quantized
model in ``onnx.reference.ReferenceEvaluator`` on a few samples and reports the largest difference between the
two runtimes.

Everything streams: per output the sums of ``ErrorStats`` and the counts of ``ClassifierStats``; per layer
(``layers=True``) chunks of exposed tensors bounded by ``max_memory_mb`` (see verify/layers.py).

Per output: SQNR (dB), cosine similarity, relative L2 error, max and mean absolute error; for classifier-like
outputs ([N, C], C >= 2) top-1 and top-5 agreement with FP32; with labels, the accuracy of both models and the
relative accuracy loss ``(acc_fp32 - acc_quant) / acc_fp32``. A quantized output that is NaN/Inf where FP32 is
finite always fails.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx

from onnxfp8.calibrators.data import CalibrationData, as_data, input_specs, take_samples
from onnxfp8.calibrators.data import batch_size as samples_in
from onnxfp8.errors import ConfigError, DataError, ModelError
from onnxfp8.bfloat16 import TWIN_NOTE, is_bfloat16, runnable
from onnxfp8.modelio import ModelLike, load_model, make_session
from onnxfp8.plan import json_plain
from onnxfp8.verify.compare import ClassifierStats, ErrorStats, is_classifier, max_abs_diff
from onnxfp8.verify.layers import LayerResult, compare_layers, release_memory, shrinking_run_options

# metric -> (value getter key, comparison, unit for messages)
_METRICS = {
    "min_sqnr": ("sqnr_db", ">=", "SQNR", " dB"),
    "min_cosine": ("cosine", ">=", "cosine", ""),
    "max_rel_error": ("rel_l2", "<=", "relative L2 error", ""),
    "min_top1_agreement": ("top1_agreement", ">=", "top-1 agreement", ""),
    "max_accuracy_loss": ("accuracy_loss", "<=", "relative accuracy loss", ""),
}
_PERCENT = {"min_top1_agreement", "max_accuracy_loss"}


@dataclass(frozen=True)
class Thresholds:
    """Pass criteria. ``None`` turns a criterion off. ``overrides`` maps an output name to
    ``{criterion: value or None}`` for that output. Top-1 agreement applies to classifier-like outputs, the
    accuracy loss only when labels are given.

    The defaults are a gate for FP8 E4M3/E5M2 post-training quantization: output SQNR >= 15 dB (a noise
    power 3% of the signal's), cosine >= 0.98, relative L2 error <= 0.2, top-1 agreement >= 90% and, with
    labels, a relative accuracy loss under 1% (the FP8 paper's pass criterion)."""

    min_sqnr: Optional[float] = 15.0
    min_cosine: Optional[float] = 0.98
    max_rel_error: Optional[float] = 0.2
    min_top1_agreement: Optional[float] = 0.90
    max_accuracy_loss: Optional[float] = 0.01
    overrides: Mapping[str, Mapping[str, Optional[float]]] = field(default_factory=dict)
    # every quantized layer's own SQNR (the error it adds alone, on FP32 inputs) must reach this; off by
    # default, and setting it turns the per-layer attribution on. It catches a layer a residual path hides.
    min_layer_sqnr: Optional[float] = None

    def __post_init__(self) -> None:
        for metric in _METRICS:
            check_threshold(metric, getattr(self, metric), metric)
        for out, per in self.overrides.items():
            for metric, v in per.items():
                check_threshold(metric, v, f"{metric} for output '{out}'")

    def for_output(self, name: str) -> Dict[str, Optional[float]]:
        out = {k: getattr(self, k) for k in _METRICS}
        out.update(self.overrides.get(name, {}))
        return out

    def to_dict(self) -> Dict[str, Any]:
        d = {k: getattr(self, k) for k in _METRICS}
        d["overrides"] = {k: dict(v) for k, v in self.overrides.items()}
        d["min_layer_sqnr"] = self.min_layer_sqnr
        return d

    @classmethod
    def from_options(cls, options: Mapping[str, Iterable[str]], base: Optional["Thresholds"] = None) -> "Thresholds":
        """Build from CLI-style values: per criterion a list of ``VALUE`` (all outputs) or ``OUTPUT=VALUE``;
        ``VALUE`` is a number, a percentage (``99%``) or ``none`` (off)."""
        base = base or cls()
        kw: Dict[str, Any] = {}
        overrides: Dict[str, Dict[str, Optional[float]]] = {k: dict(v) for k, v in base.overrides.items()}
        for metric, values in options.items():
            if metric not in _METRICS:
                raise ConfigError(f"unknown threshold '{metric}' (known: {', '.join(_METRICS)})")
            flag = "--" + metric.replace("_", "-")
            for raw in values or ():
                text = str(raw).strip()
                target, _, val = text.rpartition("=")
                value = _parse_value(val, flag, metric)
                if target:
                    overrides.setdefault(target.strip(), {})[metric] = value
                else:
                    kw[metric] = value
        return replace(base, overrides=overrides, **kw)

    def validate(self, outputs: Sequence[str], source: str) -> None:
        unknown = [o for o in self.overrides if o not in outputs]
        if unknown:
            raise ConfigError(f"threshold override for '{unknown[0]}': {source} has no such output "
                              f"(outputs: {', '.join(outputs)})")


def _parse_value(text: str, flag: str, metric: str) -> Optional[float]:
    t = text.strip().lower()
    if t in ("none", "off"):
        return None
    try:
        if t.endswith("%"):
            value = float(t[:-1]) / 100.0
            if metric in _PERCENT and not 0.0 <= value <= 1.0:
                raise ConfigError(f"{flag}: '{text}' is not a percentage between 0% and 100%")
            return value
        value = float(t)
    except ValueError:
        raise ConfigError(f"{flag}: '{text}' is not a number, a percentage or 'none' "
                          f"(use {flag} VALUE or {flag} OUTPUT=VALUE)") from None
    if metric in _PERCENT and not 0.0 <= value <= 1.0:
        raise ConfigError(f"{flag}: '{text}' is a fraction over 1 (or below 0): write {text}% for a percentage "
                          f"or a fraction like {value / 100:g}")
    return value


def check_threshold(metric: str, value: Optional[float], where: str) -> None:
    """A threshold's range (ConfigError naming ``where``): fractions in [0, 1], cosine in [-1, 1], a relative
    error >= 0, a finite SQNR."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if metric in _PERCENT and not 0.0 <= value <= 1.0:
        raise ConfigError(f"{where}: {value!r} is not a fraction in [0, 1] (80% is 0.8)")
    if metric == "min_cosine" and not -1.0 <= value <= 1.0:
        raise ConfigError(f"{where}: {value!r} is not a cosine in [-1, 1]")
    if metric == "max_rel_error" and value < 0:
        raise ConfigError(f"{where}: {value!r} is below 0")


@dataclass
class Criterion:
    metric: str  # threshold name, e.g. "min_sqnr"
    limit: float
    value: Optional[float]
    passed: bool
    detail: Optional[Tuple[int, int]] = None  # "finite": (NaN/Inf in FP32, NaN/Inf in quantized only)

    def describe(self) -> str:
        if self.metric == "finite":
            ref, q = self.detail or (0, int(self.value or 0))
            return (f"{int(self.value or 0)} element(s) NaN/Inf (FP32 model {ref}, quantized model {q}); the "
                    f"metrics cover only the finite rest")
        key, op, label, unit = _METRICS.get(self.metric, (self.metric, "", self.metric, ""))
        shown = _fmt_value(self.metric, self.value) + unit
        limit = _fmt_value(self.metric, self.limit) + unit
        bad = {">=": "<", "<=": ">"}.get(op, "vs")
        return f"{label} {shown} {op if self.passed else bad} {limit}"

    def to_dict(self) -> Dict[str, Any]:
        return json_plain({"metric": self.metric, "limit": self.limit, "value": self.value, "passed": self.passed})


def _fmt_value(metric: str, v: Optional[float]) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
    if metric in _PERCENT:
        return f"{100 * v:.2f}%"
    if metric == "min_sqnr":
        return f"{v:.2f}"
    return f"{v:.4g}"


@dataclass
class OutputResult:
    name: str
    shape: List[Any]  # per-sample shape as seen ([N, ...] with N the batch of the first run)
    error: ErrorStats
    classifier: Optional[ClassifierStats] = None
    criteria: List[Criterion] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.criteria)

    @property
    def failures(self) -> List[str]:
        return [f"{self.name}: {c.describe()}" for c in self.criteria if not c.passed]

    def metric(self, key: str) -> Optional[float]:
        if key in ("sqnr_db", "cosine", "rel_l2", "max_abs", "mean_abs"):
            return getattr(self.error, key)
        if self.classifier is None:
            return None
        return getattr(self.classifier, key)

    # shortcuts for the Python API
    sqnr_db = property(lambda self: self.error.sqnr_db)
    cosine = property(lambda self: self.error.cosine)
    rel_l2 = property(lambda self: self.error.rel_l2)
    max_abs = property(lambda self: self.error.max_abs)
    mean_abs = property(lambda self: self.error.mean_abs)
    top1_agreement = property(lambda self: self.classifier.top1_agreement if self.classifier else None)
    top5_agreement = property(lambda self: self.classifier.top5_agreement if self.classifier else None)
    accuracy_fp32 = property(lambda self: self.classifier.accuracy_fp32 if self.classifier else None)
    accuracy_quant = property(lambda self: self.classifier.accuracy_quant if self.classifier else None)
    accuracy_loss = property(lambda self: self.classifier.accuracy_loss if self.classifier else None)

    def judge(self, limits: Mapping[str, Optional[float]]) -> None:
        self.criteria = []
        if self.error.nonfinite:  # NaN/Inf on either side fails: the metrics then cover only the finite rest
            self.criteria.append(Criterion("finite", 0, float(self.error.nonfinite), False,
                                           detail=(self.error.ref_nonfinite, self.error.q_nonfinite)))
        for metric, (key, op, _, _) in _METRICS.items():
            limit = limits.get(metric)
            if limit is None:
                continue
            value = self.metric(key)
            if value is None:
                continue  # not applicable: not a classifier, or no labels
            ok = (value >= limit) if op == ">=" else (value <= limit)
            self.criteria.append(Criterion(metric, float(limit), float(value), bool(ok and not math.isnan(value))))

    def to_dict(self) -> Dict[str, Any]:
        d = {"name": self.name, "shape": self.shape, "passed": self.passed, **self.error.to_dict()}
        if self.classifier is not None:
            d.update(self.classifier.to_dict())
        d["criteria"] = [c.to_dict() for c in self.criteria]
        return d


@dataclass
class CheckReport:
    fp32: str
    quant: str
    outputs: Dict[str, OutputResult]
    thresholds: Thresholds
    samples: int = 0
    batches: int = 0
    labelled: bool = False
    layers: Optional[List[LayerResult]] = None
    layers_skipped: List[Dict[str, str]] = field(default_factory=list)
    layer_passes: int = 0
    layer_bytes_per_batch: int = 0
    layer_batch: int = 0
    reference: Optional[Dict[str, Any]] = None
    runtime: Dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def failures(self) -> List[str]:
        out = [f for o in self.outputs.values() for f in o.failures]
        limit = self.thresholds.min_layer_sqnr
        if limit is not None:
            for layer in self.layers or []:
                own = layer.own_sqnr_db
                if own is not None and not own >= limit:  # NaN fails too
                    out.append(f"layer {layer.node} ({layer.op_type}): own SQNR {own:.2f} dB < {limit:g} dB "
                               f"(cumulative {layer.cumulative_sqnr_db:.2f} dB)")
        return out

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def to_dict(self) -> Dict[str, Any]:
        from onnxfp8.versions import software

        d: Dict[str, Any] = {
            "software": software(),
            "passed": self.passed, "failures": self.failures, "fp32": self.fp32, "quant": self.quant,
            "samples": self.samples, "batches": self.batches, "labels": self.labelled,
            "thresholds": self.thresholds.to_dict(), "runtime": self.runtime,
            "outputs": [o.to_dict() for o in self.outputs.values()],
        }
        if self.layers is not None:
            d["layers"] = [l.to_dict() for l in self.layers]
            d["layers_skipped"] = self.layers_skipped
            d["layer_passes"] = self.layer_passes
            d["layer_bytes_per_batch"] = self.layer_bytes_per_batch
            d["layer_batch"] = self.layer_batch
        if self.reference is not None:
            d["reference"] = self.reference
        d["seconds"] = round(self.seconds, 3)
        return d

    def to_json(self, indent: int = 1) -> str:
        return json.dumps(json_plain(self.to_dict()), indent=indent, allow_nan=False)

    def summary(self, max_layers: Optional[int] = 10, verbose: bool = False) -> str:
        """The compact table the CLI prints; ``verbose`` (check -v): every layer, and the thresholds each output
        was judged by, with the time taken."""
        if verbose:
            max_layers = None
        head = ["output", "SQNR dB", "cosine", "rel L2", "NaN/Inf fp32/q", "max|err|", "mean|err|", "top-1", "top-5", "acc fp32>q",
                "acc loss", ""]
        rows = []
        for o in self.outputs.values():
            c = o.classifier
            acc = "-"
            if c is not None and c.labelled:
                acc = f"{100 * c.accuracy_fp32:.1f}>{100 * c.accuracy_quant:.1f}%"
            bad = o.error.nonfinite > 0  # metrics of the finite rest would read as perfect: not shown
            rows.append([o.name, "-" if bad else _fmt_value("min_sqnr", o.sqnr_db), "-" if bad else f"{o.cosine:.5f}",
                         "-" if bad else f"{o.rel_l2:.4g}",
                         f"{o.error.ref_nonfinite}/{o.error.q_nonfinite}" if bad else "0",
                         f"{o.max_abs:.4g}", f"{o.mean_abs:.4g}",
                         _pct(c.top1_agreement) if c else "-", _pct(c.top5_agreement) if c else "-", acc,
                         _pct(c.accuracy_loss) if c is not None and c.labelled else "-",
                         "ok" if o.passed else "FAIL"])
        lines = [f"checked {self.quant} against {self.fp32} on {self.samples} sample(s)"
                 + (" with labels" if self.labelled else "") + f" (onnxruntime {self.runtime.get('level', 'basic')})"]
        lines += _table(head, rows)
        if self.runtime.get("measured_on"):
            lines.append(f"({self.runtime['measured_on']})")
        if self.reference is not None:
            if self.reference.get("skipped"):
                lines.append(f"reference runtime: skipped ({self.reference['skipped']})")
            else:
                diffs = ", ".join(f"{k} {v:.3g}" for k, v in self.reference["max_abs_diff"].items())
                lines.append(f"onnxruntime vs onnx.reference on {self.reference['samples']} sample(s): max |diff| {diffs}")
        if self.layers is not None and not self.layers:
            lines.append("per layer: the quantized model has no quantized layer to compare")
        elif self.layers is not None:
            lines.append(f"per layer ({len(self.layers)} quantized layer(s), worst first; own = the layer alone on "
                         f"FP32 inputs, cumulative = in the quantized model; {self.layer_passes} pass(es) at batch "
                         f"{self.layer_batch}):")
            lrows = [[l.node, l.op_type, _fmt_value("min_sqnr", l.own_sqnr_db), _fmt_value("min_sqnr", l.cumulative_sqnr_db),
                      f"{l.cumulative.rel_l2:.3g}", l.output] for l in self.layers[:max_layers]]
            lines += ["  " + s for s in _table(["layer", "op", "own dB", "cumul. dB", "cumul. rel L2", "output"], lrows)]
            if max_layers is not None and len(self.layers) > max_layers:
                lines.append(f"  ... {len(self.layers) - max_layers} more in the JSON report")
        if self.layers is not None:
            for s in self.layers_skipped:
                lines.append(f"  not compared: {s['node']}: {s['reason']}")
        if verbose:
            for name in self.outputs:
                t = self.thresholds.for_output(name)
                lines.append(f"thresholds for {name}: " + ", ".join(
                    f"{k} {_fmt_value(k, v)}" for k, v in t.items() if v is not None)
                    + (f", min_layer_sqnr {self.thresholds.min_layer_sqnr:g}" if self.thresholds.min_layer_sqnr
                       is not None else ""))
            lines.append(f"time: {self.seconds:.2f} s ({self.batches} batch(es) at batch size "
                         f"{self.runtime.get('batch_size', '?')})")
        if self.passed:
            lines.append("PASS: every threshold holds")
        else:
            lines.append(f"FAIL: {len(self.failures)} threshold(s) not met:")
            lines += [f"  {f}" for f in self.failures]
        return "\n".join(lines)


def _pct(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return f"{100 * v:.2f}%"


def _table(head: List[str], rows: List[List[str]]) -> List[str]:
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return [fmt(head).rstrip()] + [fmt(r).rstrip() for r in rows]


# -- labels --------------------------------------------------------------------------------------------
def _load_labels(labels: Any) -> Tuple[Optional[np.ndarray], str]:
    if labels is None:
        return None, ""
    if isinstance(labels, (str, os.PathLike)):
        path = os.fspath(labels)
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such labels file")
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:
            raise DataError(f"{path}: cannot read labels ({str(e).splitlines()[0]})") from None
        where = path
    else:
        arr = np.asarray(labels)
        where = "labels"
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{where}: labels must be a .npy array, not an .npz archive")
    arr = np.squeeze(arr) if arr.ndim > 1 else arr
    if arr.ndim != 1:
        raise DataError(f"{where}: labels must be a 1-D array of class indices, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise DataError(f"{where}: labels must be integer class indices, got dtype {arr.dtype.name}")
    return arr.astype(np.int64), where


load_labels = _load_labels  # public: (labels array or None, where they came from); the tuner reads them too


# -- the check -----------------------------------------------------------------------------------------
def check(fp32: ModelLike, quant: ModelLike, data: Any, thresholds: Optional[Thresholds] = None,
          labels: Any = None, layers: bool = False, *, batch_size: int = 16, samples: Optional[int] = None,
          reference: bool = False, reference_samples: int = 4, max_memory_mb: float = 32,
          providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0,
          progress: Optional[Callable[[str], None]] = None) -> CheckReport:
    """Compare ``quant`` with ``fp32`` (paths or ModelProtos) on ``data`` (a folder or file of .npz/.npy, an
    iterable of ``{input: array}`` dicts, or a CalibrationData; a ``label`` key gives labels) and judge the
    result against ``thresholds``. ``labels``: a .npy path or an array of class indices, one per sample in data
    order. ``layers``: also attribute the error to the quantized layers. ``reference``: also run the quantized
    model in onnx.reference on ``reference_samples`` samples and report the largest difference."""
    start = time.perf_counter()
    thresholds = _as_thresholds(thresholds)
    for name, v, low in (("batch_size", batch_size, 1), ("samples", samples, 1), ("reference_samples", reference_samples, 1),
                         ("threads", threads, 0)):  # max_memory_mb: verify/layers.py says "must be > 0 MB"
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise ConfigError(f"{name} must be a number >= {low}, got {v!r}")
    fp32_name = os.fspath(fp32) if isinstance(fp32, (str, os.PathLike)) else "fp32 model"
    quant_name = os.fspath(quant) if isinstance(quant, (str, os.PathLike)) else "quantized model"
    fp32_model = load_model(fp32)
    quant_model = load_model(quant)
    _check_interfaces(fp32_model, quant_model, fp32_name, quant_name)
    # bfloat16 models run as their float32 twins (bfloat16.py: onnxruntime's CPU provider has no bfloat16 kernels)
    twin = is_bfloat16(fp32_model) or is_bfloat16(quant_model)
    if twin:
        fp32_model, quant_model = runnable(fp32_model), runnable(quant_model)
        fp32, quant = fp32_model, quant_model
    out_names = [o.name for o in fp32_model.graph.output]
    thresholds.validate(out_names, quant_name)
    layers = layers or thresholds.min_layer_sqnr is not None  # a per-layer gate needs the per-layer table
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if samples is not None and samples < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}")
    if layers and not max_memory_mb > 0:
        raise ConfigError(f"the memory budget for --layers (--max-memory) must be > 0 MB, got {max_memory_mb}")
    dataset = as_data(data, fp32_model, batch_size=batch_size, limit=samples, what="validation data")
    label_array, label_source = _load_labels(labels)

    # sessions from the files when given paths: onnxruntime reads them itself, and without --layers/--reference
    # the Python copies of the models are dropped first, so they do not add to the peak memory of the run
    fp32_src = fp32 if isinstance(fp32, (str, os.PathLike)) else fp32_model
    quant_src = quant if isinstance(quant, (str, os.PathLike)) else quant_model
    if not (layers or reference):
        del fp32_model, quant_model
    total = None
    if progress:
        from onnxfp8.progress import count_samples

        total = count_samples(dataset)
        progress("outputs: creating the sessions")
    ref_sess = make_session(fp32_src, level="basic", providers=providers, threads=threads)
    q_sess = make_session(quant_src, level="basic", providers=providers, threads=threads)
    del fp32_src, quant_src
    run_opts = shrinking_run_options()
    results: Dict[str, OutputResult] = {n: OutputResult(n, [], ErrorStats()) for n in out_names}
    seen = 0
    batches = 0
    data_labels: Optional[bool] = None
    for batch, batch_labels in dataset.batches(with_labels=True):
        n = samples_in(batch)
        if label_array is not None:
            if seen + n > label_array.shape[0]:
                raise DataError(f"{label_source}: holds {label_array.shape[0]} labels, the data has more samples")
            batch_labels = label_array[seen:seen + n]
        else:
            has = batch_labels is not None
            if data_labels is not None and has != data_labels:
                raise DataError(f"{dataset.describe()}: some files have a 'label' key and some do not")
            data_labels = has
        refs = ref_sess.run(out_names, batch, run_opts)
        qs = q_sess.run(out_names, batch, run_opts)
        for name, r, q in zip(out_names, refs, qs):
            res = results[name]
            r, q = np.asarray(r), np.asarray(q)
            if r.shape != q.shape:
                raise ModelError(f"{quant_name}: output '{name}' has shape {list(q.shape)}, the FP32 model gives "
                                 f"{list(r.shape)}")
            if not res.shape:
                res.shape = list(r.shape)
                if r.dtype.kind == "f" and is_classifier(r.shape):
                    res.classifier = ClassifierStats()
            if r.dtype.kind not in "fiub":
                continue
            res.error.update(r, q)
            if res.classifier is not None and r.ndim == 2:
                lab = batch_labels
                if lab is not None and lab.size and (lab.min() < 0 or lab.max() >= r.shape[1]):
                    bad = int(lab[(lab < 0) | (lab >= r.shape[1])][0])
                    raise DataError(f"{label_source or dataset.describe()}: label {bad} is not a class of output "
                                    f"'{name}' ({r.shape[1]} classes)")
                res.classifier.update(r, q, lab)
        del refs, qs
        release_memory()
        if batches == 0:  # output shapes are known now: a per-output criterion that cannot apply is a mistake
            _check_overrides(thresholds, results, label_array is not None or batch_labels is not None)
        seen += n
        batches += 1
        if progress:
            progress(f"outputs: {seen}{f'/{total}' if total else ''} sample(s)")
    # with --samples N the first N labels are used; otherwise labels and samples must pair up one to one
    if label_array is not None and (label_array.shape[0] < seen or (samples is None and label_array.shape[0] != seen)):
        raise DataError(f"{label_source}: holds {label_array.shape[0]} labels for {seen} samples")
    labelled = label_array is not None or bool(data_labels)
    if labelled and not any(r.classifier is not None for r in results.values()):
        raise DataError(f"{label_source or dataset.describe()}: labels given, but no output of {fp32_name} is "
                        f"classifier-like ([N, C] scores, C >= 2): outputs "
                        + ", ".join(f"{r.name} {r.shape}" for r in results.values()))
    del ref_sess
    ref_result = _reference(quant_model, q_sess, dataset, out_names, reference_samples) if reference else None
    del q_sess
    release_memory()
    for name, res in results.items():
        res.judge(thresholds.for_output(name))

    report = CheckReport(fp32_name, quant_name, results, thresholds, samples=seen, batches=batches,
                         labelled=labelled, reference=ref_result,
                         runtime={"engine": "onnxruntime", "level": "basic", "providers": list(providers),
                                  "batch_size": dataset.batch_size, **({"measured_on": TWIN_NOTE} if twin else {})})
    if layers:
        run = compare_layers(fp32_model, quant_model, dataset, max_memory_mb=max_memory_mb, providers=providers,
                             threads=threads, progress=progress)
        report.layers = run.results
        report.layers_skipped = run.skipped
        report.layer_passes = run.passes
        report.layer_bytes_per_batch = run.bytes_per_batch
        report.layer_batch = run.micro_batch
    report.seconds = time.perf_counter() - start
    return report


def _check_overrides(thresholds: Thresholds, results: Mapping[str, OutputResult], labelled: bool) -> None:
    for name, per in thresholds.overrides.items():
        res = results[name]
        for metric in ("min_top1_agreement", "max_accuracy_loss"):
            if per.get(metric) is None:
                continue
            flag = f"--{metric.replace('_', '-')} {name}={_fmt_value(metric, per[metric])}"
            if res.classifier is None:
                raise ConfigError(f"{flag}: output '{name}' (shape {res.shape}) is not classifier-like "
                                  f"([N, C] scores, C >= 2)")
            if metric == "max_accuracy_loss" and not labelled:
                raise ConfigError(f"{flag}: needs labels (--labels FILE.npy or a 'label' key in the .npz files)")


def _as_thresholds(t: Any) -> Thresholds:
    """A Thresholds, from None (the defaults), a Thresholds, or a dict of criteria (and ``overrides``)."""
    if t is None:
        return Thresholds()
    if isinstance(t, Thresholds):
        return t
    if isinstance(t, Mapping):
        unknown = [k for k in t if k not in _METRICS and k not in ("overrides", "min_layer_sqnr")]
        if unknown:
            raise ConfigError(f"unknown threshold '{unknown[0]}' (known: {', '.join(_METRICS)}, min_layer_sqnr, "
                              f"overrides)")
        for name, per in dict(t.get("overrides") or {}).items():
            bad = [k for k in per if k not in _METRICS]
            if bad:
                raise ConfigError(f"threshold override for '{name}': unknown threshold '{bad[0]}' "
                                  f"(known: {', '.join(_METRICS)})")
        return Thresholds(**{k: (None if v is None else float(v)) if k != "overrides" else dict(v)
                             for k, v in t.items()})
    raise ConfigError(f"thresholds must be a Thresholds or a dict, not {type(t).__name__}")


def _check_interfaces(fp32: onnx.ModelProto, quant: onnx.ModelProto, fp32_name: str, quant_name: str) -> None:
    fo, qo = [o.name for o in fp32.graph.output], [o.name for o in quant.graph.output]
    missing = [o for o in fo if o not in qo]
    if missing:
        raise ModelError(f"{quant_name}: has no output '{missing[0]}' of {fp32_name} (outputs: {', '.join(qo)})")
    fi, qi = list(input_specs(fp32)), list(input_specs(quant))
    if set(fi) != set(qi):
        raise ModelError(f"{quant_name}: inputs {', '.join(qi)} differ from those of {fp32_name} ({', '.join(fi)})")
    ftypes = {i.name: _type_of(i) for i in fp32.graph.input}
    for i in quant.graph.input:
        if i.name not in ftypes:
            continue
        (fe, fs), (qe, qs) = ftypes[i.name], _type_of(i)
        same_rank = fs is None or qs is None or len(fs) == len(qs)
        same_dims = same_rank and (fs is None or qs is None or all(
            a == b or not isinstance(a, int) or not isinstance(b, int) for a, b in zip(fs, qs)))
        if fe != qe or not same_dims:
            raise ModelError(f"{quant_name}: input '{i.name}' is {_fmt_type(qe, qs)}, in {fp32_name} it is "
                             f"{_fmt_type(fe, fs)}: not a quantization of that model")


def _type_of(vi: onnx.ValueInfoProto) -> Tuple[int, Optional[List[Any]]]:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return t.elem_type, None
    return t.elem_type, [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]


def _fmt_type(elem: int, shape: Optional[List[Any]]) -> str:
    name = onnx.TensorProto.DataType.Name(elem).lower() if elem else "?"
    return name + ("" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]")


def _reference(model: onnx.ModelProto, sess: Any, dataset: CalibrationData, out_names: List[str],
               n: int) -> Dict[str, Any]:
    """Largest |onnxruntime - onnx.reference| per output on the first ``n`` samples (``sess``: the check's
    onnxruntime session of ``model``)."""
    import warnings

    from onnx.reference import ReferenceEvaluator

    try:
        evaluator = ReferenceEvaluator(model)
    except Exception as e:
        return {"skipped": f"onnx.reference cannot load the model: {str(e).splitlines()[0]}"}
    diffs = {o: 0.0 for o in out_names}
    done = 0
    for batch in dataset.batches():
        take = min(n - done, samples_in(batch))
        if take <= 0:
            break
        feed = take_samples(batch, take)
        got = sess.run(out_names, feed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # log(0) in the E3M4 emulation subgraph is -inf by design
            try:
                want = evaluator.run(out_names, feed)
            except Exception as e:
                return {"skipped": f"onnx.reference failed: {str(e).splitlines()[0]}"}
        for o, a, b in zip(out_names, got, want):
            diffs[o] = max(diffs[o], max_abs_diff(a, b))
        done += take
        if done >= n:
            break
    return {"engine": "onnx.reference.ReferenceEvaluator", "samples": done, "max_abs_diff": diffs}
