"""The one measurement of a quantized model's outputs against FP32 outputs already at hand: quantize's
post-quantization summary (quantize._measure, on the samples captured during calibration) and BatchNorm
recalibration's guard (the quantized model without and with the new statistics, on the evaluation samples)
both call ``measure_outputs``.

Per output an ErrorStats (SQNR, cosine, errors) and, for a float classifier-like output ([N, C], C >= 2) of
the same shape on both sides, a ClassifierStats (top-1 / top-5 agreement with FP32, accuracy with labels).
The quantized model runs at onnxruntime's basic level (exact Q/DQ numerics, modelio.make_session).
``samples`` stops after that many samples, cutting the last batch along each input's and output's batch
axis when they are known; a model with a fixed batch size cannot run a short batch, which is then skipped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

from onnxfp8.calibrators.data import Samples, batch_size, take_outputs, take_samples
from onnxfp8.modelio import make_session
from onnxfp8.verify.compare import ClassifierStats, ErrorStats, is_classifier


@dataclass
class OutputMeasurement:
    """Per output the error statistics and (classifier outputs) agreement and accuracy; the samples run."""

    outputs: Dict[str, ErrorStats] = field(default_factory=dict)
    classifiers: Dict[str, ClassifierStats] = field(default_factory=dict)
    samples: int = 0

    def sqnr(self) -> Dict[str, float]:
        return {n: s.sqnr_db for n, s in self.outputs.items() if s.count}

    def top1_agreement(self) -> Dict[str, float]:
        return {n: c.top1_agreement for n, c in self.classifiers.items()}

    def accuracy(self) -> Dict[str, float]:
        return {n: c.accuracy_quant for n, c in self.classifiers.items() if c.labelled}

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        """Per output the ErrorStats fields, with the ClassifierStats ones for classifier outputs (the report's
        ``outputs`` section)."""
        return {n: {**s.to_dict(), **(self.classifiers[n].to_dict() if n in self.classifiers else {})}
                for n, s in self.outputs.items()}


def measure_outputs(model: Any, inputs: Any, refs: Sequence[Mapping[str, np.ndarray]],
                    *, labels: Optional[np.ndarray] = None, samples: Optional[int] = None,
                    axes: Optional[Mapping[str, Optional[int]]] = None,
                    out_axes: Optional[Mapping[str, Optional[int]]] = None,
                    providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0,
                    progress: Any = None) -> OutputMeasurement:
    """Run ``model`` (an ONNX model or path) on ``inputs`` (a calibrators.data.DataSource, e.g. data.Samples of
    the captured batches, or a list of batches) and compare its outputs with ``refs`` (the FP32 outputs of the
    same batches, in order). Labels: the source's (``batches(with_labels=True)``), or ``labels``, one per
    sample in order. ``samples``: at most
    that many (default all). ``axes`` / ``out_axes``: each input's / output's batch axis (data.Batch.axes,
    data.output_batch_axes; None: the last batch is not cut). ``progress(samples_done)`` after every batch."""
    if not hasattr(inputs, "batches"):
        inputs = Samples(list(inputs), labels)
    elif labels is not None:
        inputs = Samples(list(inputs.batches()), labels)
    sess = make_session(model, level="basic", providers=providers, threads=threads)
    names = [o.name for o in sess.get_outputs()]
    out = OutputMeasurement({n: ErrorStats() for n in names})
    axes = dict(axes or {})
    want = samples if samples is not None else float("inf")
    # each input's batch axis: a fixed batch cannot run a short batch
    static = {i.name: i.shape[axes.get(i.name, 0)] for i in sess.get_inputs()
              if axes.get(i.name, 0) is not None and len(i.shape) > axes.get(i.name, 0)
              and isinstance(i.shape[axes.get(i.name, 0)], int)}
    count = 0
    for (feed, lab), ref in zip(inputs.batches(with_labels=True), refs):
        n = batch_size(feed)
        if count + n > want and not static and out_axes is not None:  # cut the last batch
            take = want - count
            feed = take_samples(feed, take)
            ref = take_outputs(ref, n, take, out_axes)
            lab = lab[:take] if lab is not None else None
            n = take
        elif any(feed[k].shape[axes.get(k, 0)] != b for k, b in static.items() if k in feed):
            continue  # a short last batch a model with a fixed batch size cannot run
        got = sess.run(names, feed)
        for name, v in zip(names, got):
            if name in ref:
                out.outputs[name].update(ref[name], v)
                r = np.asarray(ref[name])
                if r.dtype.kind == "f" and is_classifier(r.shape) and r.shape == np.shape(v):
                    out.classifiers.setdefault(name, ClassifierStats()).update(r, v, lab)
        count += n
        if progress is not None:
            progress(count)
        if count >= want:
            break
    out.samples = count
    return out
