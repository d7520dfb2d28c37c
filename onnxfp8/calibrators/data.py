"""Calibration / validation data: reading, validating against the model's inputs, and batching; and the one
data-source protocol every stream of model inputs follows.

Sources: a folder of ``.npz`` files (keys = model input names; a file holds one sample or a batch along
axis 0) or ``.npy`` files (single-input models), a single such file, or in Python any iterable of
``{input_name: array}`` (or a dict of arrays holding a batch). Every problem is reported as one line naming the
file and the input. Batches are streamed: only one batch is held at a time.

**The data-source protocol** (``DataSource``): ``specs`` (input name -> InputSpec), ``batch_size``,
``batches(with_labels=False)`` (re-iterable: each call streams the data again; yields ``Batch`` or
``(Batch, labels or None)``) and ``describe()`` (one phrase for reports). Every consumer (the calibration
collector, BatchNorm recalibration, range re-measurement, the transforms' channel statistics, check and the
tuner's validation) reads data only through it, and every stream provides it:

* ``CalibrationData``: files, folders, in-memory lists, readers (this module);
* ``HeldOut``: a stream without its first samples (the BN recalibration data when the evaluation samples are
  held out of it);
* ``augment.AugmentedData``: a stream of augmented batches (``--augment``);
* ``cache.FingerprintingData``: a stream hashed on the fly for the statistics cache;
* ``Samples``: batches already in memory (the captured calibration samples, a validation set read once).

``recalibration_stream`` builds the BatchNorm recalibration stream from the config (``--bn-calib`` or the
calibration data, ``--bn-samples``, the held-out evaluation samples, ``--augment``).
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, replace
from typing import Any, Dict, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

import ml_dtypes
import numpy as np
import onnx

from onnxfp8.errors import DataError

LABEL_KEYS = ("label", "labels")


def _np_dtype(elem_type: int) -> np.dtype:
    """The numpy dtype of an ONNX element type (onnx's own mapping); float32 when the type is unset or has no
    numeric numpy counterpart (strings)."""
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        return np.dtype(np.float32)
    return np.dtype(np.float32) if dtype.kind == "O" else dtype


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: Any  # numpy dtype
    shape: Tuple[Any, ...]  # ints for static dims, None/str for dynamic ones
    ranked: bool = False  # the model states the rank (shape () with ranked: a scalar)
    batch_axis: Optional[int] = 0  # the axis that counts samples (batch_axes); None: fed whole, never split

    @property
    def static_batch(self) -> Optional[int]:
        ax = self.batch_axis
        if ax is not None and len(self.shape) > ax and isinstance(self.shape[ax], int) and self.shape[ax] > 0:
            return self.shape[ax]
        return None


def input_specs(model: onnx.ModelProto) -> Dict[str, InputSpec]:
    """The inputs the data feeds, with their dtype (float32 for a bfloat16 input: the float32 twin's) and
    batch axis."""
    inits = {t.name for t in model.graph.initializer}
    specs = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        # a bfloat16 input is fed float32: every session runs a bfloat16 model as its float32 twin (bfloat16.py)
        dtype = np.dtype(np.float32) if tt.elem_type == onnx.TensorProto.BFLOAT16 else _np_dtype(tt.elem_type)
        shape = tuple((d.dim_value if d.HasField("dim_value") else (d.dim_param or None)) for d in tt.shape.dim) \
            if tt.HasField("shape") else ()
        specs[vi.name] = InputSpec(vi.name, dtype, shape, ranked=tt.HasField("shape"))
    axes, _ = batch_axes(specs)
    return {n: replace(sp, batch_axis=axes[n]) for n, sp in specs.items()}


def batch_axes(specs: Mapping[str, InputSpec]) -> Tuple[Dict[str, Optional[int]], Optional[str]]:
    """Each input's batch axis, from the model's symbolic dimensions, and the batch symbol (or None).

    The batch is the symbolic dimension the most inputs share (ties: the one found at axis 0 most often, then the
    first seen): a state input ``[2, batch, 128]`` beside ``x [batch, T, F]`` is batched on axis 1. Inputs without
    that dimension (a scalar ``sr``, a fixed table) have no batch axis: they are fed as they are, never split or
    concatenated. Without a shared symbol, axis 0 when every ranked input has a dynamic or the same static first
    dimension (the usual single-input model, static batches); otherwise no input has a batch axis and every file
    is fed whole, as one sample."""
    ranked = {n: sp for n, sp in specs.items() if sp.shape}
    scalars = {n: None for n, sp in specs.items() if not sp.shape and sp.ranked}
    count: Dict[str, int] = {}
    first: Dict[str, int] = {}
    for sp in ranked.values():
        for i, d in enumerate(dict.fromkeys(d for d in sp.shape if isinstance(d, str))):
            count[d] = count.get(d, 0) + 1
        for d in sp.shape[:1]:
            if isinstance(d, str):
                first[d] = first.get(d, 0) + 1
    shared = [d for d, c in count.items() if c >= 2]
    if shared:
        sym = max(shared, key=lambda d: (count[d], first.get(d, 0)))  # max keeps the first of equals
        axes = {n: (list(sp.shape).index(sym) if sym in sp.shape else None) for n, sp in ranked.items()}
        axes.update(scalars)
        return {n: axes.get(n, 0) for n in specs}, sym
    dim0 = {sp.shape[0] if isinstance(sp.shape[0], int) and sp.shape[0] > 0 else None for sp in ranked.values()}
    sym = next((sp.shape[0] for sp in ranked.values() if isinstance(sp.shape[0], str)), None) if len(ranked) == 1 else None
    if len(dim0) <= 1:
        axes = {n: 0 for n in ranked}
    else:
        axes = {n: None for n in ranked}
    axes.update(scalars)
    return {n: axes.get(n, 0) for n in specs}, sym


class Batch(dict):
    """A batch ``{input: array}`` that knows each input's batch axis (``axes``; None: the input has no batch
    axis, a scalar or a shared table, and is the same for every sample). onnxruntime takes it as a dict."""

    def __init__(self, arrays: Mapping[str, np.ndarray], axes: Mapping[str, Optional[int]]):
        super().__init__(arrays)
        self.axes = {k: axes.get(k, 0) for k in arrays}


def batch_size(batch: Mapping[str, Any]) -> int:
    """Samples in ``batch``: the length of the first batched input along its batch axis (axis 0 of the first
    input for a plain dict); 1 when no input has a batch axis (a file fed whole)."""
    axes = getattr(batch, "axes", None)
    for k, v in batch.items():
        ax = axes.get(k, 0) if axes is not None else 0
        if ax is not None and np.ndim(v) > ax:
            return int(np.shape(v)[ax])
    return 1


def take_samples(batch: Mapping[str, Any], stop: int, start: int = 0, axes: Optional[Mapping[str, Optional[int]]] = None):
    """Samples ``start:stop`` of ``batch`` along each input's batch axis (views); inputs without one stay whole.
    ``axes`` (default: the batch's own, else axis 0) names the axes, e.g. for a dict of model outputs."""
    if axes is None:
        axes = getattr(batch, "axes", None)
    out = {}
    for k, v in batch.items():
        ax = axes.get(k, 0) if axes is not None else 0
        if ax is None or np.ndim(v) <= ax:
            out[k] = v
        else:
            idx = [slice(None)] * np.ndim(v)
            idx[ax] = slice(start, stop)
            out[k] = v[tuple(idx)]
    return Batch(out, axes or {}) if axes is not None or isinstance(batch, Batch) else out


def output_batch_axes(model: onnx.ModelProto, data: Any) -> Optional[Dict[str, Optional[int]]]:
    """The batch axis of each graph output of ``model`` (the input batch symbol's position; None for an output
    without it), or None when that cannot be told (the output shapes name no such symbol and the inputs are not
    all batched on axis 0: cutting a captured batch then would cut outputs wrongly)."""
    sym = getattr(data, "batch_symbol", None)
    in_axes = {sp.batch_axis for sp in getattr(data, "specs", {}).values() if sp.shape}
    out: Dict[str, Optional[int]] = {}
    for vi in model.graph.output:
        tt = vi.type.tensor_type
        dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in tt.shape.dim] \
            if tt.HasField("shape") else None
        if sym is not None and dims and sym in dims:
            out[vi.name] = dims.index(sym)
        elif dims is not None and not dims:
            out[vi.name] = None  # a scalar
        elif in_axes <= {0}:
            out[vi.name] = 0  # the usual layout; take_outputs checks the length before cutting
        else:
            return None
    return out


def take_outputs(outputs: Mapping[str, np.ndarray], n: int, take: int,
                 axes: Optional[Mapping[str, Optional[int]]]) -> Dict[str, np.ndarray]:
    """The first ``take`` of ``n`` samples of a batch's model outputs; an output whose batch axis does not have
    length ``n`` (a constant output, say) is kept whole."""
    out = {}
    for k, v in outputs.items():
        v = np.asarray(v)
        ax = (axes or {}).get(k, 0)
        if take < n and ax is not None and v.ndim > ax and v.shape[ax] == n:
            idx = [slice(None)] * v.ndim
            idx[ax] = slice(0, take)
            v = v[tuple(idx)]
        out[k] = v
    return out


Sample = Dict[str, np.ndarray]


class _Replay:
    """A one-shot iterator (a generator) made re-iterable: items are cached as the first pass draws them and
    replayed by later passes (calibration reads the data more than once). A pass that starts before an earlier
    one finished draws the rest from the iterator too."""

    def __init__(self, it: Iterator):
        self._it = it
        self._cache: List[Any] = []
        self._done = False

    def __iter__(self):
        i = 0
        while True:
            if i < len(self._cache):
                yield self._cache[i]
            elif self._done:
                return
            else:
                try:
                    item = next(self._it)
                except StopIteration:
                    self._done = True
                    return
                self._cache.append(item)
                yield item
            i += 1


class _Reader:
    """onnxruntime's CalibrationDataReader convention: ``get_next()`` returns a dict until ``None``; a pass
    starts with ``rewind()`` when the reader has one, else the first pass is cached and replayed."""

    def __init__(self, reader: Any):
        self.reader = reader
        rewind = getattr(reader, "rewind", None)
        self._rewind = rewind if callable(rewind) else None
        self._replay = None if self._rewind else _Replay(iter(reader.get_next, None))

    def __iter__(self):
        if self._replay is not None:
            return iter(self._replay)
        self._rewind()
        return iter(self.reader.get_next, None)


def reiterable(source: Any) -> Any:
    """Data sources the Python API takes besides folders, files and lists, made re-iterable: onnxruntime
    ``CalibrationDataReader``-style objects (``get_next`` / ``rewind``) and one-shot iterators (generators),
    which are streamed once and cached for the passes after the first."""
    if isinstance(source, (str, os.PathLike, Mapping)):
        return source
    if callable(getattr(source, "get_next", None)):
        return _Reader(source)
    if isinstance(source, Iterator):
        return _Replay(source)
    return source


class CalibrationData:
    """Re-iterable stream of validated batches ``{input_name: array}`` for one model.

    ``batch_size`` samples per batch (the model's static batch dimension wins), at most ``limit`` samples in
    all. ``labels`` collects a ``label`` key when present (validation data)."""

    def __init__(self, source: Any, specs: Mapping[str, InputSpec], batch_size: int = 16,
                 limit: Optional[int] = None, what: str = "calibration data"):
        self.source = source
        self.specs = dict(specs)
        self.what = what
        self.limit = limit
        self.axes, self.batch_symbol = {n: sp.batch_axis for n, sp in self.specs.items()}, None
        if any(sp.ranked for sp in self.specs.values()):
            _, self.batch_symbol = batch_axes(self.specs)
        static = {s.static_batch for s in self.specs.values() if s.static_batch}
        self.batch_size = static.pop() if len(static) == 1 else batch_size
        if self.specs and all(ax is None for ax in self.axes.values()):
            self.batch_size = 1  # no shared batch axis: every file is fed whole, as one sample
        self._files = self._list_files(source) if isinstance(source, (str, os.PathLike)) else None
        if self._files is None:
            self.source = source = reiterable(source)
        self.skip = 0  # samples left out at the start (held out: see without_first)

    def without_first(self, n: int) -> "CalibrationData":
        """This data without its first ``n`` samples (held out to judge something calibrated on the rest);
        ``limit`` still bounds the samples read in all."""
        import copy

        other = copy.copy(self)
        other.skip = self.skip + int(n)
        other.limit = None if self.limit is None else max(0, self.limit - int(n))
        return other

    # -- sources ------------------------------------------------------------------------------------
    def _list_files(self, source: Union[str, os.PathLike]) -> List[str]:
        path = os.fspath(source)
        if not os.path.exists(path):
            raise DataError(f"{path}: no such file or folder ({self.what})")
        if os.path.isdir(path):
            files = sorted(glob.glob(os.path.join(path, "*.npz")) + glob.glob(os.path.join(path, "*.npy")))
            if not files:
                raise DataError(f"{path}: folder holds no .npz or .npy files ({self.what})")
        else:
            if not path.endswith((".npz", ".npy")):
                raise DataError(f"{path}: {self.what} must be .npz or .npy files")
            files = [path]
        if any(f.endswith(".npy") for f in files) and len(self.specs) != 1:
            bad = next(f for f in files if f.endswith(".npy"))
            raise DataError(f"{bad}: .npy data only works for single-input models; this model has inputs "
                            f"{', '.join(self.specs)}: use .npz files keyed by input name")
        return files

    def _raw(self) -> Iterator[Tuple[str, Mapping[str, Any]]]:
        if self._files is not None:
            only = next(iter(self.specs)) if len(self.specs) == 1 else None
            for f in self._files:
                try:
                    if f.endswith(".npy"):
                        yield f, {only: np.load(f, allow_pickle=False)}
                    else:
                        with np.load(f, allow_pickle=False) as z:
                            yield f, {k: z[k] for k in z.files}
                except DataError:
                    raise
                except Exception as e:
                    raise DataError(f"{f}: cannot read {self.what} ({str(e).splitlines()[0]})") from None
            return
        src = self.source
        if isinstance(src, Mapping):
            yield f"{self.what}", src
            return
        try:
            items = iter(src)
        except TypeError:
            raise DataError(f"{self.what}: expected a folder, a file or an iterable of {{input: array}} dicts, "
                            f"got {type(src).__name__}") from None
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise DataError(f"{self.what}[{i}]: expected a dict {{input_name: array}}, got {type(item).__name__}")
            yield f"{self.what}[{i}]", item

    # -- validation ---------------------------------------------------------------------------------
    def _validate(self, where: str, item: Mapping[str, Any]) -> Tuple[Sample, Optional[np.ndarray], int]:
        unknown = [k for k in item if k not in self.specs and k not in LABEL_KEYS]
        if unknown:
            raise DataError(f"{where}: unknown input '{unknown[0]}' (model inputs: {', '.join(self.specs)})")
        out: Sample = {}
        n = None
        for name, spec in self.specs.items():
            if name not in item:
                raise DataError(f"{where}: missing input '{name}' (model inputs: {', '.join(self.specs)})")
            arr = np.asarray(item[name])
            arr = self._check_shape(where, spec, arr)
            arr = _cast(arr, spec, where)
            if arr.dtype.kind == "f" and np.isnan(arr).any():  # an Inf is a mask value (an additive -inf mask)
                raise DataError(f"{where}: input '{name}' contains NaN values")
            ax = spec.batch_axis
            if ax is None:
                pass  # fed as it is (a scalar, a table): it does not count samples
            elif n is None:
                n = arr.shape[ax] if arr.ndim > ax else 1
            elif arr.ndim > ax and arr.shape[ax] != n:
                raise DataError(f"{where}: inputs disagree on the number of samples ({n} vs {arr.shape[ax]} in "
                                f"'{name}', batch axis {ax})")
            out[name] = arr
        if n is None:
            n = 1  # no input has a batch axis: the file is one sample
        labels = None
        for key in LABEL_KEYS:
            if key in item:
                labels = np.asarray(item[key]).reshape(-1)
                if labels.shape[0] != n:
                    raise DataError(f"{where}: '{key}' holds {labels.shape[0]} labels for {n} samples")
        return Batch(out, self.axes), labels, int(n or 0)

    def _check_shape(self, where: str, spec: InputSpec, arr: np.ndarray) -> np.ndarray:
        """``arr`` against the input's rank and static dimensions; one rank short is one sample (the batch axis
        is added). The batch axis itself may have any length unless the model fixes it."""
        name, rank, ax = spec.name, len(spec.shape), spec.batch_axis
        if spec.shape and arr.ndim == rank - 1 and ax is not None:
            arr = np.expand_dims(arr, ax)
        elif (spec.shape or spec.ranked) and arr.ndim != rank:
            raise DataError(f"{where}: input '{name}' has shape {tuple(arr.shape)}, the model expects rank {rank} "
                            f"{fmt_shape(spec.shape)}")
        for i, (got, want) in enumerate(zip(arr.shape, spec.shape)):
            if i == ax and spec.static_batch is None:
                continue
            if isinstance(want, int) and want > 0 and got != want:
                raise DataError(f"{where}: input '{name}' has shape {tuple(arr.shape)}, the model expects "
                                f"{fmt_shape(spec.shape)} (dimension {i} must be {want})")
        return arr

    # -- iteration ----------------------------------------------------------------------------------
    def batches(self, with_labels: bool = False) -> Iterator[Any]:
        """Yield batches of ``batch_size`` samples (a short last one), re-batching across files whose
        shapes agree. Yields ``batch`` or, with labels, ``(batch, labels or None)``."""
        bs = self.batch_size
        limit = self.limit
        seen = 0
        pending: List[Tuple[Sample, Optional[np.ndarray]]] = []
        pending_n = 0
        count_any = False

        def flush():
            nonlocal pending, pending_n
            if not pending:
                return None
            batch = Batch({k: _concat([p[0][k] for p in pending], self.axes.get(k, 0)) for k in self.specs},
                          self.axes)
            labels = None
            if all(p[1] is not None for p in pending):
                labels = np.concatenate([p[1] for p in pending])
            pending, pending_n = [], 0
            return batch, labels

        skip = self.skip
        for where, item in self._raw():
            sample, labels, n = self._validate(where, item)
            count_any = True
            if skip:
                if skip >= n:
                    skip -= n
                    continue
                sample = take_samples(sample, n, skip)
                labels = labels[skip:] if labels is not None else None
                n, skip = n - skip, 0
            if limit is not None:
                n_take = min(n, limit - seen)
                if n_take <= 0:
                    break
                if n_take < n:
                    sample = take_samples(sample, n_take)
                    labels = labels[:n_take] if labels is not None else None
                    n = n_take
            seen += n
            start = 0
            while start < n:
                if pending and not _compatible(pending[0][0], sample):
                    out = flush()
                    yield out if with_labels else out[0]
                take = min(bs - pending_n, n - start)
                part = take_samples(sample, start + take, start)
                pending.append((part, labels[start:start + take] if labels is not None else None))
                pending_n += take
                start += take
                if pending_n == bs:
                    out = flush()
                    yield out if with_labels else out[0]
            if limit is not None and seen >= limit:
                break
        out = flush()
        if out is not None:
            yield out if with_labels else out[0]
        if not count_any:
            raise DataError(f"{self.what}: no samples")

    def __iter__(self) -> Iterator[Sample]:
        return self.batches()

    def count(self) -> int:
        """Number of samples (reads the data once)."""
        return sum(batch_size(b) for b in self.batches())

    def describe(self) -> str:
        if self._files is not None:
            return f"{len(self._files)} file(s) in {os.fspath(self.source)}"
        return "in-memory data"


def _compatible(a: Sample, b: Sample) -> bool:
    """Two parts can share a batch: equal shapes but along the batch axis, and inputs without a batch axis
    equal (one value serves the batch)."""
    axes = getattr(a, "axes", {})
    for k in a:
        ax = axes.get(k, 0)
        if ax is None:
            if a[k].shape != b[k].shape or not np.array_equal(a[k], b[k]):
                return False
        elif a[k].shape[:ax] + a[k].shape[ax + 1:] != b[k].shape[:ax] + b[k].shape[ax + 1:]:
            return False
    return True


def _concat(parts: List[np.ndarray], axis: Optional[int]) -> np.ndarray:
    if len(parts) == 1 or axis is None or parts[0].ndim <= axis:
        return parts[0]  # no batch axis: the parts are equal (_compatible)
    return np.concatenate(parts, axis=axis)


def _cast(arr: np.ndarray, spec: InputSpec, where: str) -> np.ndarray:
    want = np.dtype(spec.dtype)
    if arr.dtype == want:
        return arr
    if want == np.float32 and arr.dtype == np.dtype(ml_dtypes.bfloat16):
        return arr.astype(np.float32)  # bfloat16 data for a bfloat16 model's float32 twin (exact)
    if arr.dtype.kind == want.kind or (arr.dtype.kind in "iu" and want.kind in "iu"):
        cast = arr.astype(want)
        if arr.dtype.kind in "iu" and not np.array_equal(cast, arr):
            raise DataError(f"{where}: input '{spec.name}' values do not fit {want.name}")
        return cast
    raise DataError(f"{where}: input '{spec.name}' has dtype {arr.dtype.name}, the model expects {want.name}")


def fmt_shape(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) and d > 0 else (d or "?") for d in shape) + "]"


def as_data(source: Any, model: onnx.ModelProto, batch_size: int = 16, limit: Optional[int] = None,
            what: str = "calibration data") -> CalibrationData:
    if isinstance(source, CalibrationData):
        return source
    return CalibrationData(source, input_specs(model), batch_size=batch_size, limit=limit, what=what)


# -- the data-source protocol ----------------------------------------------------------------------------
@runtime_checkable
class DataSource(Protocol):
    """A re-iterable stream of model inputs: what every consumer of data reads (see the module docstring)."""

    specs: Dict[str, InputSpec]
    batch_size: int

    def batches(self, with_labels: bool = False) -> Iterator[Any]:
        """Stream the data again: ``Batch`` per batch, or ``(Batch, labels or None)`` with labels."""

    def describe(self) -> str:
        """One phrase naming the data, for reports."""


class Samples:
    """Batches already in memory as a DataSource (the inputs captured during calibration, a validation set
    read once): ``batches`` yields them as they are, with ``labels`` (one array over all samples, cut per
    batch) when given."""

    def __init__(self, batches: Sequence[Mapping[str, np.ndarray]], labels: Optional[np.ndarray] = None,
                 specs: Optional[Mapping[str, InputSpec]] = None, what: str = "samples"):
        self._batches = list(batches)
        self.labels = labels
        self.specs = dict(specs or {})
        self.batch_size = max((batch_size(b) for b in self._batches), default=1)
        self.what = what

    def batches(self, with_labels: bool = False) -> Iterator[Any]:
        start = 0
        for b in self._batches:
            n = batch_size(b)
            if with_labels:
                lab = self.labels[start:start + n] if self.labels is not None else None
                yield b, lab
            else:
                yield b
            start += n

    def __iter__(self):
        return self.batches()

    def __len__(self) -> int:
        return len(self._batches)

    @property
    def samples(self) -> int:
        return sum(batch_size(b) for b in self._batches)

    def describe(self) -> str:
        return f"{self.samples} {self.what}"


class HeldOut:
    """The stream of ``data`` without its first ``skip`` samples, re-batched to ``data.batch_size``: the
    recalibration data when the first samples (those captured during calibration for the FP32 comparison)
    are held out to judge recalibration."""

    def __init__(self, data: DataSource, skip: int):
        self.data, self.skip = data, int(skip)
        self.specs, self.batch_size = data.specs, data.batch_size

    def batches(self, with_labels: bool = False):
        # cut and joined along each input's batch axis (batch_axes: a state [2, batch, C] on axis 1); an input
        # without one (a scalar) is the same for every sample and kept whole
        skip, bs = self.skip, self.batch_size
        buf: List[Any] = []  # (batch, labels) parts, all of one sample shape

        def axis(part, k):
            return getattr(part, "axes", {}).get(k, 0)

        def join(parts, k):
            ax = axis(parts[0], k)
            if len(parts) == 1 or ax is None or np.ndim(parts[0][k]) <= ax:
                return parts[0][k]
            return np.concatenate([b[k] for b in parts], axis=ax)

        def emit(n):
            nonlocal buf
            parts = [b for b, _ in buf]
            batch = Batch({k: join(parts, k) for k in parts[0]}, getattr(parts[0], "axes", {}))
            labels = None if any(lab is None for _, lab in buf) else np.concatenate([lab for _, lab in buf])
            total = batch_size(batch)
            rest = take_samples(batch, total, n)
            buf = [(rest, labels[n:] if labels is not None else None)] if total > n else []
            out = (take_samples(batch, n), labels[:n] if labels is not None else None)
            return out if with_labels else out[0]

        def same_shape(a, b):
            for k in b:
                ax = axis(b, k)
                sa, sb = np.shape(a[k]), np.shape(b[k])
                if ax is None or len(sb) <= ax:
                    if sa != sb:
                        return False
                elif sa[:ax] + sa[ax + 1:] != sb[:ax] + sb[ax + 1:]:
                    return False
            return True

        count = lambda: sum(batch_size(b) for b, _ in buf)  # noqa: E731
        for batch, labels in self.data.batches(with_labels=True):
            n = batch_size(batch)
            if skip >= n:
                skip -= n
                continue
            if skip:
                batch = take_samples(batch, n, skip)
                labels = labels[skip:] if labels is not None else None
                skip = 0
            if buf and not same_shape(buf[0][0], batch):
                yield emit(count())
            buf.append((batch, labels))
            while count() >= bs:
                yield emit(bs)
        if buf:
            yield emit(count())

    def __iter__(self):
        return self.batches()

    def describe(self) -> str:
        return f"{self.data.describe()} without its first {self.skip} sample(s)"


def holds_at_least(data: Any, samples: int) -> bool:
    """Whether ``data`` yields at least ``samples`` samples (reads only as far as needed)."""
    seen = 0
    for b in data.batches():
        seen += batch_size(b)
        if seen >= samples:
            return True
    return False


def first_labels(data: Any, count: int) -> Optional[np.ndarray]:
    """The labels of the first ``count`` samples of ``data``, or None when the data has no labels (or fewer)."""
    if not count or data is None or not hasattr(data, "batches"):
        return None
    parts, got = [], 0
    try:
        for _, lab in data.batches(with_labels=True):
            if lab is None:
                return None
            parts.append(lab)
            got += len(lab)
            if got >= count:
                break
    except TypeError:  # a data source without labels support
        return None
    return np.concatenate(parts)[:count] if parts and got >= count else None


BN_MIN_BATCH = 64  # BatchNorm recalibration batches at least this many samples (unless the model fixes it)


def recalibration_stream(model: onnx.ModelProto, config: Any, calib: Any, source: str = "model",
                         hold_out: int = 0) -> DataSource:
    """The BatchNorm recalibration stream (also what remeasure_ranges reads): ``config.bn_calib`` or the
    calibration data ``calib``, at most ``config.bn_samples`` samples, in batches of at least BN_MIN_BATCH (the
    model's static batch wins), augmented with ``config.augment``. ``hold_out``: leave out the first samples of
    the calibration data (not of bn_calib data)."""
    specs = input_specs(model)
    static = {s.static_batch for s in specs.values() if s.static_batch}
    bs = max(config.batch_size, BN_MIN_BATCH)
    limit = None if config.augment else config.bn_samples
    if config.bn_calib:
        hold_out = 0
        data: Any = CalibrationData(config.bn_calib, specs, batch_size=bs, limit=limit,
                                    what="BatchNorm recalibration data")
    elif calib is not None:
        src = getattr(calib, "source", calib)
        if hold_out and limit is not None:
            limit += hold_out
        data = CalibrationData(src, specs, batch_size=bs, limit=limit, what="calibration data")
    else:
        raise DataError(f"{source}: BatchNorm recalibration needs data: pass --calib DIR or --bn-calib DIR")
    if static:
        data.batch_size = static.pop()
    if hold_out:
        data = HeldOut(data, hold_out)
    if config.augment:  # refuses non-image inputs before any data is read
        from onnxfp8.calibrators.augment import AugmentedData

        return AugmentedData(data, config.augment, seed=config.augment_seed, samples=config.bn_samples, source=source)
    return data
