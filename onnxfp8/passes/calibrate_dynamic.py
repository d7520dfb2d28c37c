"""calibrate_dynamic: the calibrate step of dynamic quantization. Activation scales are computed in the graph
at run time (passes/emulate.py ``DynamicScale``), so no activation is calibrated and no data is required.
When calibration data is given anyway, one FP32 pass captures the inputs and outputs of the first
``summary_samples`` samples, so that the report still measures the quantized model against FP32.
It replaces the ``calibrate`` pass by name (``Pipeline.replace("calibrate", CalibrateDynamic())``)."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxfp8.calibrators.collector import collect
from onnxfp8.calibrators.max import MaxCalibrator
from onnxfp8.modelio import to_model
from onnxfp8.pipeline import Pass, PassContext, PassResult
from onnxfp8.validate import refuse_nonfinite
from onnxfp8.state import CalibrationInfo, Captured


class CalibrateDynamic(Pass):
    name = "calibrate_dynamic"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        cfg = ctx.config
        if ctx.calib is None:
            return PassResult(False, ["dynamic quantization: no activation calibration (no data given)"])
        model = to_model(graph.copy())
        res = collect(model, [], ctx.calib, MaxCalibrator(), providers=cfg.providers,
                      threads=cfg.threads, max_memory_mb=cfg.max_memory_mb, capture=cfg.capture_samples,
                      level="all", progress=ctx.progress)
        refuse_nonfinite(res.nonfinite, model, ctx.calib, ctx.source, None, cfg.providers, cfg.threads)
        ctx.captured = Captured(res.captured_inputs or [], res.captured_outputs or [])
        ctx.calibration = CalibrationInfo(samples=res.samples, batches=res.batches, passes=res.passes,
                                          seconds=res.seconds, dynamic=True)
        return PassResult(False, [f"dynamic quantization: no activation calibration; {min(res.samples, cfg.capture_samples)}"
                                  f" sample(s) captured for the FP32 comparison"])
