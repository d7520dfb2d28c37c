"""calibrate: run the FP32 graph in onnxruntime over the calibration data (streaming) and record the range of
every activation the plan quantizes. The default, max calibration, takes amax = max |x| over all batches (the
FP8 paper's max scaling) with the reduction done inside onnxruntime."""
from __future__ import annotations

from typing import List

import onnx_graphsurgeon as gs

from onnxfp8.calibrators.base import make_calibrator
from onnxfp8.calibrators.collector import collect
from onnxfp8.errors import DataError
from onnxfp8.modelio import to_model
from onnxfp8.pipeline import Pass, PassContext, PassResult


def activation_tensors(graph: gs.Graph, ctx: PassContext) -> List[str]:
    """Activation tensors that quantized nodes read, in graph order, minus those whose scale is overridden."""
    by_name = {n.name: n for n in graph.nodes}
    out: List[str] = []
    for d in ctx.plan.quantized_nodes():
        node = by_name.get(d.node)
        if node is None:
            continue
        for idx, role in d.inputs.items():
            if role == "activation":
                name = node.inputs[idx].name
                if name and name not in out and "scale" not in ctx.config.overrides.get(name, {}):
                    out.append(name)
    return out


class Calibrate(Pass):
    name = "calibrate"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        tensors = activation_tensors(graph, ctx)
        cfg = ctx.config
        if not tensors:
            return PassResult(False, ["no activation to calibrate"])
        if ctx.calib is None:
            raise DataError(f"{ctx.source}: calibration data is needed for {len(tensors)} activation(s): pass --calib DIR")
        opts = {"format": cfg.activation_format}
        if cfg.calibration == "percentile":
            opts["percentile"] = cfg.percentile
        calibrator = make_calibrator(cfg.calibration, **opts)
        model = to_model(graph.copy())
        res = collect(model, tensors, ctx.calib, calibrator, providers=cfg.providers, threads=cfg.threads,
                      max_memory_mb=cfg.max_memory_mb, capture=cfg.summary_samples, level="all",
                      progress=ctx.extras.get("progress"))
        if res.samples == 0:
            raise DataError(f"{ctx.source}: the calibration data holds no samples")
        for t in tensors:
            lo, hi = res.minmax.get(t, (0.0, 0.0))
            ctx.stats[t] = {"amax": float(res.ranges.get(t, 0.0)), "min": float(lo), "max": float(hi),
                            "method": cfg.calibration}
        ctx.extras["captured_inputs"] = res.captured_inputs
        ctx.extras["captured_outputs"] = res.captured_outputs
        ctx.extras["calibration"] = {"samples": res.samples, "batches": res.batches, "passes": res.passes,
                                     "seconds": res.seconds}
        return PassResult(False, [f"{cfg.calibration} calibration of {len(tensors)} tensor(s) on {res.samples} "
                                  f"sample(s) in {res.batches} batch(es), {res.passes} pass(es), {res.seconds:.2f} s"])
