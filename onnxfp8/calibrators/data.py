"""Calibration / validation data: reading, validating against the model's inputs, and batching.

Sources: a folder of ``.npz`` files (keys = model input names; a file holds one sample or a batch along
axis 0) or ``.npy`` files (single-input models), a single such file, or in Python any iterable of
``{input_name: array}`` (or a dict of arrays holding a batch). Every problem is reported as one line naming the
file and the input. Batches are streamed: only one batch is held at a time.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

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

    @property
    def static_batch(self) -> Optional[int]:
        if self.shape and isinstance(self.shape[0], int) and self.shape[0] > 0:
            return self.shape[0]
        return None


def input_specs(model: onnx.ModelProto) -> Dict[str, InputSpec]:
    inits = {t.name for t in model.graph.initializer}
    specs = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = _np_dtype(tt.elem_type)
        shape = tuple((d.dim_value if d.HasField("dim_value") else (d.dim_param or None)) for d in tt.shape.dim) \
            if tt.HasField("shape") else ()
        specs[vi.name] = InputSpec(vi.name, dtype, shape)
    return specs


Sample = Dict[str, np.ndarray]


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
        static = {s.static_batch for s in self.specs.values() if s.static_batch}
        self.batch_size = static.pop() if len(static) == 1 else batch_size
        self._files = self._list_files(source) if isinstance(source, (str, os.PathLike)) else None
        if self._files is None and isinstance(source, Iterator):
            raise DataError(f"{what}: pass a list or a folder, not a one-shot iterator (the data is read more than once)")

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
            rank = len(spec.shape)
            if spec.shape and arr.ndim == rank - 1:
                arr = arr[None]
            elif spec.shape and arr.ndim != rank:
                raise DataError(f"{where}: input '{name}' has shape {tuple(arr.shape)}, the model expects rank {rank} "
                                f"{_fmt_shape(spec.shape)}")
            for i, (got, want) in enumerate(zip(arr.shape, spec.shape)):
                if i == 0 and spec.static_batch is None:
                    continue
                if isinstance(want, int) and want > 0 and got != want:
                    raise DataError(f"{where}: input '{name}' has shape {tuple(arr.shape)}, the model expects "
                                    f"{_fmt_shape(spec.shape)} (dimension {i} must be {want})")
            arr = _cast(arr, spec, where)
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                bad = "NaN" if np.isnan(arr).any() else "Inf"
                raise DataError(f"{where}: input '{name}' contains {bad} values")
            if n is None:
                n = arr.shape[0] if arr.ndim else 1
            elif arr.ndim and arr.shape[0] != n:
                raise DataError(f"{where}: inputs disagree on the number of samples ({n} vs {arr.shape[0]} in '{name}')")
            out[name] = arr
        labels = None
        for key in LABEL_KEYS:
            if key in item:
                labels = np.asarray(item[key]).reshape(-1)
                if labels.shape[0] != n:
                    raise DataError(f"{where}: '{key}' holds {labels.shape[0]} labels for {n} samples")
        return out, labels, int(n or 0)

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
            batch = {k: np.concatenate([p[0][k] for p in pending]) if len(pending) > 1 else pending[0][0][k]
                     for k in self.specs}
            labels = None
            if all(p[1] is not None for p in pending):
                labels = np.concatenate([p[1] for p in pending])
            pending, pending_n = [], 0
            return batch, labels

        for where, item in self._raw():
            sample, labels, n = self._validate(where, item)
            count_any = True
            if limit is not None:
                n_take = min(n, limit - seen)
                if n_take <= 0:
                    break
                if n_take < n:
                    sample = {k: v[:n_take] for k, v in sample.items()}
                    labels = labels[:n_take] if labels is not None else None
                    n = n_take
            seen += n
            start = 0
            while start < n:
                if pending and not _compatible(pending[0][0], sample):
                    out = flush()
                    yield out if with_labels else out[0]
                take = min(bs - pending_n, n - start)
                part = {k: v[start:start + take] for k, v in sample.items()}
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
        return sum(next(iter(b.values())).shape[0] for b in self.batches())

    def describe(self) -> str:
        if self._files is not None:
            return f"{len(self._files)} file(s) in {os.fspath(self.source)}"
        return "in-memory data"


def _compatible(a: Sample, b: Sample) -> bool:
    return all(a[k].shape[1:] == b[k].shape[1:] for k in a)


def _cast(arr: np.ndarray, spec: InputSpec, where: str) -> np.ndarray:
    want = np.dtype(spec.dtype)
    if arr.dtype == want:
        return arr
    if arr.dtype.kind == want.kind or (arr.dtype.kind in "iu" and want.kind in "iu"):
        cast = arr.astype(want)
        if arr.dtype.kind in "iu" and not np.array_equal(cast, arr):
            raise DataError(f"{where}: input '{spec.name}' values do not fit {want.name}")
        return cast
    raise DataError(f"{where}: input '{spec.name}' has dtype {arr.dtype.name}, the model expects {want.name}")


def _fmt_shape(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) and d > 0 else (d or "?") for d in shape) + "]"


def as_data(source: Any, model: onnx.ModelProto, batch_size: int = 16, limit: Optional[int] = None,
            what: str = "calibration data") -> CalibrationData:
    if isinstance(source, CalibrationData):
        return source
    return CalibrationData(source, input_specs(model), batch_size=batch_size, limit=limit, what=what)
