"""The output capture: the inputs and FP32 outputs of the first calibration samples, kept for the summary's
SQNR (quantize._measure) and the BatchNorm recalibration guard (state.Captured).

A step of its own beside the statistics: ``OutputCapture`` is an observer of the collector's passes (see
collector.collect ``observers``): the pass that fetches the model's outputs anyway hands every batch and its
outputs to it, so capturing costs no extra pass over the data. When no calibration pass runs (every statistic
from the cache), ``capture_outputs`` runs the FP32 model on the first samples only.
"""
from __future__ import annotations

import time
from typing import Any, Dict, Optional, Sequence

import numpy as np
import onnx

from onnxfp8.calibrators.data import Batch, DataSource, batch_size, output_batch_axes, take_outputs, take_samples
from onnxfp8.modelio import make_session
from onnxfp8.state import Captured


class OutputCapture:
    """Keeps copies of the inputs and FP32 outputs of the first ``limit`` samples. A batch is cut along each
    input's and output's batch axis (data.output_batch_axes); when the outputs' axes cannot be told
    (``out_axes`` None), the last batch is kept whole instead of cut wrongly.

    As a collector observer: ``batch(pass_no, done, batch, outputs)`` with ``outputs`` the batch's model outputs
    (None in passes that do not fetch them)."""

    def __init__(self, limit: int, out_axes: Optional[Dict[str, Optional[int]]] = None):
        self.limit, self.count = int(limit), 0
        self.out_axes = out_axes
        self.captured = Captured()

    @classmethod
    def for_model(cls, limit: int, model: onnx.ModelProto, data: Any) -> "OutputCapture":
        return cls(limit, output_batch_axes(model, data))

    def add(self, batch: Dict[str, np.ndarray], outputs: Dict[str, np.ndarray]) -> None:
        if self.count >= self.limit:
            return
        n = batch_size(batch)
        take = min(self.limit - self.count, n)
        if self.out_axes is None:
            take = n
        self.captured.inputs.append(
            Batch({k: np.array(v) for k, v in take_samples(batch, take).items()}, getattr(batch, "axes", {})))
        # outputs without the batch axis (a constant output, say) are kept whole
        self.captured.outputs.append({k: np.array(v) for k, v in
                                      take_outputs(outputs, n, take, self.out_axes).items()})
        self.count += take

    def batch(self, pass_no: int, done: int, batch: Dict[str, np.ndarray],
              outputs: Optional[Dict[str, np.ndarray]]) -> None:
        if outputs is not None:
            self.add(batch, outputs)

    @property
    def wants_outputs(self) -> bool:
        return self.limit > 0

    @property
    def full(self) -> bool:
        return self.count >= self.limit


def capture_outputs(model: onnx.ModelProto, data: DataSource, count: int, *,
                    providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0,
                    level: str = "all", arrays: Optional[Dict[str, Any]] = None):
    """Run the FP32 model on the first ``count`` samples only and keep their inputs and outputs (the summary
    samples when the statistics come from a cache and no calibration pass runs). Returns a
    collector.CollectResult (samples, batches, passes, seconds, nonfinite) and the Captured samples."""
    from onnxfp8.calibrators.collector import CollectResult, note_nonfinite

    start = time.perf_counter()
    result = CollectResult({}, {})
    cap = OutputCapture.for_model(count, model, data)
    if count <= 0:
        return result, cap.captured
    out_names = [o.name for o in model.graph.output]
    sess = make_session(model, level=level, providers=providers, threads=threads, arrays=arrays)
    for batch in data.batches():
        n = batch_size(batch)
        take = min(n, count - cap.count)
        if take < n:
            batch = take_samples(batch, take)
        got = sess.run(out_names, batch)
        note_nonfinite(result, out_names, got)
        cap.add(batch, dict(zip(out_names, got)))
        result.samples += take
        result.batches += 1
        if cap.full:
            break
    result.passes = 1
    result.seconds = time.perf_counter() - start
    return result, cap.captured
