"""calibrate: the ranges (and, where needed, histograms) of every activation the plan quantizes, from the FP32
graph run over the calibration data. The default, max calibration, takes amax = max |x| over all batches (the
FP8 paper's max scaling) with the reduction done inside onnxruntime.

The pass picks the tensors (``activation_tensors``: what quantized nodes read, minus tensors with a given
scale) and hands them to one calibrators.calibration.Calibration, which plans the methods
(``config.calibration``, per tensor ``overrides."tensor".calibration`` / ``.percentile``), reads and writes
the statistics cache (``config.load_stats`` / ``config.save_stats``, calibrators/cache.py StatsStore),
streams the data (one max pass, then shared histogram passes), captures the first samples' outputs for the
summary and drives the progress display. The pass writes its result into the context: ``ctx.stats``,
``ctx.histograms``, ``ctx.captured``, ``ctx.calibration``."""
from __future__ import annotations

from typing import List

import onnx_graphsurgeon as gs

from onnxfp8.calibrators.cache import StatsStore
from onnxfp8.calibrators.calibration import Calibration
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


def calibration_for(ctx: PassContext) -> Calibration:
    """The Calibration of this run: the config, the calibration data, the statistics store, the display."""
    return Calibration(ctx.config, ctx.calib, store=StatsStore.from_config(ctx.config, ctx.outputs, ctx.source),
                       progress=ctx.progress, source=ctx.source)


class Calibrate(Pass):
    name = "calibrate"

    def ensures(self, graph: gs.Graph, ctx: PassContext) -> None:
        """Every activation the plan quantizes (without a given scale) has statistics."""
        missing = [t for t in activation_tensors(graph, ctx) if t not in ctx.stats]
        if missing:
            raise ValueError(f"no statistics for {len(missing)} activation(s), e.g. '{missing[0]}'")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        tensors = activation_tensors(graph, ctx)
        if not tensors:
            return PassResult(False, ["no activation to calibrate"])
        result = calibration_for(ctx).ranges(graph, tensors)
        ctx.stats.update(result.stats)
        if result.histograms is not None:
            ctx.histograms = result.histograms
        if result.captured:
            ctx.captured = result.captured
        ctx.calibration = result.info
        return PassResult(False, result.notes)
