"""The statistics cache (``--save-stats FILE`` / ``--load-stats FILE``): calibrate once, quantize many times.

A cache file is JSON holding, per calibrated activation, the observed ``min`` / ``max`` and a histogram of |x|
(``histogram.Histogram.to_dict()``: counts over ``[0, range]`` and the exact max). That is enough for every
method: max uses min/max, percentile / mse / entropy read the histogram, and format ``auto`` /
``--calibration mse`` compute each format's own range from it. So quantizing the same model to several
formats or with several methods reads the file instead of running the model again.

The cache is tied to

* the **model**: a SHA-256 of the graph that is calibrated (after canonicalization and BatchNorm folding:
  the graph whose tensors the statistics describe): node list (op, inputs, outputs, attributes), graph inputs
  and outputs, initializers (name, type, shape, bytes). A cache of another model (or of the same model with
  different weights) is refused with one line naming the file;
* the **data**: a SHA-256 per model input of the bytes of the arrays the calibration saw (in order, with
  their dtypes and per-sample shapes; independent of the batch size). When ``--load-stats`` is given together
  with calibration data, the data is read (not run) and must hash the same; without data the statistics are
  taken as they are.

Tensors the cache does not hold (e.g. a wider operator selection than when it was saved) are calibrated on
the data and added; the file is only written with ``--save-stats``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import onnx

from onnxfp8.calibrators.data import batch_size
from onnxfp8.errors import DataError

FORMAT_NAME = "onnxfp8-calibration-stats"
FORMAT_VERSION = 1


class StatsCacheError(DataError):
    """A statistics file that cannot be read or does not belong to this model / data (exit code 2)."""


# -- fingerprints ----------------------------------------------------------------------------------------
def _attr_bytes(a: onnx.AttributeProto) -> bytes:
    if a.type == onnx.AttributeProto.GRAPH:
        return a.name.encode() + graph_fingerprint_of(a.g).encode()
    if a.type == onnx.AttributeProto.GRAPHS:
        return a.name.encode() + b"".join(graph_fingerprint_of(g).encode() for g in a.graphs)
    c = onnx.AttributeProto()
    c.CopyFrom(a)
    c.ClearField("doc_string")
    return c.SerializeToString(deterministic=True)


def _tensor_into(h: "hashlib._Hash", t: onnx.TensorProto) -> None:
    h.update(f"init:{t.name}:{t.data_type}:{list(t.dims)}:".encode())
    if t.data_location == onnx.TensorProto.EXTERNAL:
        h.update(repr([(e.key, e.value) for e in t.external_data]).encode())
    elif t.raw_data:
        h.update(t.raw_data)
    else:
        h.update(np.ascontiguousarray(onnx.numpy_helper.to_array(t)).tobytes())


def graph_fingerprint_of(graph: onnx.GraphProto) -> str:
    h = hashlib.sha256()
    for vi in graph.input:
        h.update(f"in:{vi.name}:{vi.type.tensor_type.elem_type}\n".encode())
    for vi in graph.output:
        h.update(f"out:{vi.name}\n".encode())
    for n in graph.node:
        h.update(f"node:{n.domain}:{n.op_type}:{list(n.input)}:{list(n.output)}\n".encode())
        for a in sorted(n.attribute, key=lambda a: a.name):
            h.update(_attr_bytes(a))
    for t in graph.initializer:
        _tensor_into(h, t)
    return h.hexdigest()


def model_fingerprint(model: onnx.ModelProto) -> str:
    """SHA-256 of what determines a model's intermediate values: the graph's nodes, inputs, outputs and
    initializers (not names of the producer, doc strings, shape annotations or metadata)."""
    return graph_fingerprint_of(model.graph)


class DataFingerprint:
    """Streaming SHA-256 of calibration batches, per input, independent of how the samples are batched
    (the bytes of consecutive samples are the bytes of the batch, shapes are recorded when they change)."""

    def __init__(self) -> None:
        self._hashes: Dict[str, Any] = {}
        self._shapes: Dict[str, Tuple] = {}
        self.samples = 0

    def update(self, batch: Mapping[str, np.ndarray]) -> None:
        for k in sorted(batch):
            v = np.ascontiguousarray(batch[k])
            h = self._hashes.get(k)
            if h is None:
                h = self._hashes[k] = hashlib.sha256()
            key = (v.dtype.str, tuple(v.shape[1:]))
            if self._shapes.get(k) != key:
                self._shapes[k] = key
                h.update(f"|{key}|".encode())
            h.update(memoryview(v).cast("B"))
        self.samples += batch_size(batch)

    def hexdigest(self) -> str:
        h = hashlib.sha256(f"samples:{self.samples}".encode())
        for k in sorted(self._hashes):
            h.update(k.encode() + b"=" + self._hashes[k].hexdigest().encode())
        return h.hexdigest()


class FingerprintingData:
    """Wraps a DataSource (calibrators/data.py): the first complete iteration over ``batches()`` is fingerprinted on the fly
    (the collector reads the data anyway), so hashing costs no extra read."""

    def __init__(self, data: Any) -> None:
        self.data = data
        self.fingerprint: Optional[DataFingerprint] = None

    def __getattr__(self, name: str) -> Any:  # batch_size, limit, specs, describe(), ...
        return getattr(self.data, name)

    def batches(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        if self.fingerprint is not None or kwargs.get("with_labels") or args:
            yield from self.data.batches(*args, **kwargs)
            return
        fp = DataFingerprint()
        for batch in self.data.batches():
            fp.update(batch)
            yield batch
        self.fingerprint = fp  # only a complete pass counts

    def __iter__(self) -> Iterator[Any]:
        return self.batches()


def data_fingerprint(data: Any) -> DataFingerprint:
    """Read ``data`` once (no inference) and fingerprint it."""
    fp = DataFingerprint()
    for batch in data.batches():
        fp.update(batch)
    return fp


# -- the cache -------------------------------------------------------------------------------------------
@dataclass
class CalibrationStats:
    """Per-tensor statistics of one model on one data set: ``minmax`` (tensor -> (min, max)) for every
    calibrated tensor, ``histograms`` (tensor -> Histogram.to_dict()) where collected."""

    model_sha256: str
    data_sha256: Optional[str] = None
    samples: int = 0
    minmax: Dict[str, Tuple[float, float]] = field(default_factory=dict)
    histograms: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    num_bins: Optional[int] = None
    source: str = ""  # the model's file name when saved (informational)
    path: str = ""  # the file it was read from

    # -- building
    def add_max(self, max_cal: Any, tensors: Optional[List[str]] = None) -> None:
        for t, (lo, hi) in max_cal.minmax().items():
            if tensors is None or t in tensors:
                self.minmax[t] = (float(lo), float(hi))

    def add_histograms(self, hist_cal: Any, tensors: Optional[List[str]] = None) -> None:
        state = hist_cal.state()
        self.num_bins = int(state["num_bins"])
        for t, d in state["tensors"].items():
            if tensors is None or t in tensors:
                self.histograms[t] = d

    # -- reading
    def max_calibrator(self, tensors: Optional[List[str]] = None):
        """A MaxCalibrator holding the cached min/max (of ``tensors`` only, when given)."""
        from onnxfp8.calibrators.max import MaxCalibrator

        cal = MaxCalibrator()
        for t, (lo, hi) in self.minmax.items():
            if tensors is None or t in tensors:
                cal.observe_reduced(t, hi, lo)
        return cal

    def load_histograms(self, hist_cal: Any, tensors: List[str]) -> None:
        """Merge the cached histograms of ``tensors`` into a histogram calibrator."""
        hist_cal.load_state({"kind": "histogram", "method": hist_cal.method,
                             "tensors": {t: self.histograms[t] for t in tensors if t in self.histograms}})

    # -- checks
    def check_model(self, sha: str, what: str = "model") -> None:
        if sha != self.model_sha256:
            src = f" from {self.source}" if self.source else ""
            raise StatsCacheError(
                f"{self.path or 'statistics'}: these statistics belong to another model (saved{src}, graph "
                f"sha256 {self.model_sha256[:12]}..., this {what} {sha[:12]}...): recalibrate with --save-stats "
                f"instead of --load-stats")

    def check_data(self, sha: str, samples: int) -> None:
        if self.data_sha256 is not None and sha != self.data_sha256:
            raise StatsCacheError(
                f"{self.path or 'statistics'}: these statistics were collected on other calibration data "
                f"({self.samples} sample(s), sha256 {self.data_sha256[:12]}...; the given data: {samples} "
                f"sample(s), sha256 {sha[:12]}...): pass the same data, drop --calib, or recalibrate")

    # -- files
    def to_dict(self) -> Dict[str, Any]:
        from onnxfp8.versions import software

        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "software": software(),
                "model_sha256": self.model_sha256,
                "data_sha256": self.data_sha256, "samples": self.samples, "source": self.source,
                "num_bins": self.num_bins,
                "tensors": {t: {"min": lo, "max": hi, **({"histogram": self.histograms[t]}
                                                         if t in self.histograms else {})}
                            for t, (lo, hi) in self.minmax.items()}}

    def save(self, path: str) -> str:
        """Write the statistics atomically (a temporary file in the same folder, then a rename)."""
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise StatsCacheError(f"{path}: cannot write statistics (no folder {folder})")
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".onnxfp8-stats-", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, separators=(",", ":"))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        except OSError as e:
            raise StatsCacheError(f"{path}: cannot write statistics ({e.strerror or e})") from None
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str) -> "CalibrationStats":
        if not os.path.isfile(path):
            raise StatsCacheError(f"{path}: statistics file not found")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, ValueError) as e:
            raise StatsCacheError(f"{path}: not a statistics file ({str(e).splitlines()[0]})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise StatsCacheError(f"{path}: not an onnxfp8 statistics file (written by --save-stats)")
        if d.get("version") != FORMAT_VERSION:
            raise StatsCacheError(f"{path}: statistics file version {d.get('version')!r}, this onnxfp8 reads "
                                  f"version {FORMAT_VERSION}: recalibrate with --save-stats")
        try:
            out = cls(model_sha256=str(d["model_sha256"]), data_sha256=d.get("data_sha256"),
                      samples=int(d.get("samples", 0)), num_bins=d.get("num_bins"), source=str(d.get("source", "")),
                      path=path)
            for t, v in d["tensors"].items():
                lo, hi = float(v["min"]), float(v["max"])
                if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                    raise ValueError(f"tensor '{t}': min {lo} / max {hi} are not a finite range")
                out.minmax[t] = (lo, hi)
                if "histogram" in v:
                    from onnxfp8.calibrators.histogram import Histogram

                    Histogram.from_dict(v["histogram"])  # validate now, one line naming the file
                    out.histograms[t] = v["histogram"]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StatsCacheError(f"{path}: malformed statistics file ({e})") from None
        return out


# -- the store behind a Calibration ----------------------------------------------------------------------
class StatsStore:
    """The statistics cache as a store behind calibration.Calibration: ``read`` the ``load`` file (checked
    against the model and, when data is given, the data), ``stream`` the data so that it is fingerprinted on
    the fly while the collector reads it anyway, ``write`` the ``save`` file (staged with the run's other files
    when an outputs.Outputs holds its path, else written atomically on its own)."""

    def __init__(self, load: Optional[str] = None, save: Optional[str] = None, outputs: Any = None,
                 source: str = "model"):
        self.load, self.save, self.outputs, self.source = load or None, save or None, outputs, source
        self.loaded: Optional[CalibrationStats] = None
        self._data_fp: Optional[DataFingerprint] = None

    @classmethod
    def from_config(cls, config: Any, outputs: Any = None, source: str = "model") -> Optional["StatsStore"]:
        """The store of ``config.load_stats`` / ``config.save_stats``, or None when neither is set."""
        if not (config.load_stats or config.save_stats):
            return None
        return cls(config.load_stats, config.save_stats, outputs, source)

    def read(self, model: onnx.ModelProto, data: Any = None) -> Optional[CalibrationStats]:
        """The loaded statistics (None without a ``load`` file), refused when they belong to another model or
        (data given) to other data."""
        if not self.load:
            return None
        stats = CalibrationStats.load(self.load)
        stats.check_model(model_fingerprint(model))
        if data is not None:
            self._data_fp = data_fingerprint(data)
            stats.check_data(self._data_fp.hexdigest(), self._data_fp.samples)
        self.loaded = stats
        return stats

    def stream(self, data: Any) -> Any:
        """``data`` as the collector should read it: fingerprinted on the fly when the statistics are saved and
        the data is not fingerprinted yet."""
        if self.save and self._data_fp is None and data is not None:
            return FingerprintingData(data)
        return data

    def write(self, model: onnx.ModelProto, max_cal: Any, hist_cal: Any, tensors: List[str], data: Any = None,
              streamed: Any = None) -> Optional[str]:
        """Save the min/max and histograms of ``tensors`` (added to the loaded statistics, if any) to ``save``;
        the data's fingerprint from the read check, the streamed pass, or (last resort) a read of ``data``."""
        if not self.save:
            return None
        out = self.loaded if self.loaded is not None else CalibrationStats(model_fingerprint(model), source=self.source)
        fp = self._data_fp
        if fp is None and isinstance(streamed, FingerprintingData) and streamed.fingerprint is not None:
            fp = streamed.fingerprint
        if fp is None and data is not None:
            fp = data_fingerprint(data)
        if fp is not None:
            out.data_sha256, out.samples = fp.hexdigest(), fp.samples
        out.add_max(max_cal, tensors)
        out.add_histograms(hist_cal, tensors)
        out.source = self.source
        staged = self.outputs
        if staged is not None and self.save in getattr(staged, "paths", ()):  # renamed with the run's other files
            staged.write_text(self.save, json.dumps(out.to_dict(), separators=(",", ":")))
        else:
            out.save(self.save)
        return self.save
