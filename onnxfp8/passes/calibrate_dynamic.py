"""calibrate_dynamic: the calibrate step of dynamic quantization. Activation scales are computed in the graph
at run time (passes/emulate.py ``DynamicScale``), so no activation is calibrated and no data is required.
When calibration data is given anyway, one FP32 pass (calibrators.calibration.Calibration.capture) captures
the inputs and outputs of the first ``summary_samples`` samples, so that the report still measures the
quantized model against FP32. It replaces the ``calibrate`` pass by name
(``Pipeline.replace("calibrate", CalibrateDynamic())``)."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxfp8.calibrators.calibration import Calibration
from onnxfp8.pipeline import Pass, PassContext, PassResult


class CalibrateDynamic(Pass):
    name = "calibrate_dynamic"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        cfg = ctx.config
        if ctx.calib is None:
            return PassResult(False, ["dynamic quantization: no activation calibration (no data given)"])
        result = Calibration(cfg, ctx.calib, progress=ctx.progress, source=ctx.source).capture(graph)
        ctx.captured = result.captured
        ctx.calibration = result.info
        return PassResult(False, [f"dynamic quantization: no activation calibration; "
                                  f"{min(result.info.samples, cfg.capture_samples)} sample(s) captured for the "
                                  f"FP32 comparison"])
