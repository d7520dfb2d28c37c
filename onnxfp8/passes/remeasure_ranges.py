"""remeasure_ranges: after BatchNorm recalibration and folding (``bn_ranges``, ``--bn-ranges``), re-measure the
max range of every planned activation on the quantized (folded) graph itself, over the recalibration data,
and update the scale of every activation whose range moved by more than RANGE_TOLERANCE (in the graph and in
the plan, so that the plan still holds the model's scales). The data is the BatchNorm recalibration stream
(calibrators/data.recalibration_stream). Max calibration of the folded model only: the config refuses
``bn_ranges`` with another calibration method or without BatchNorm folding, so this pass checks no option."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxfp8 import names
from onnxfp8.calibrators.calibration import Calibration
from onnxfp8.calibrators.data import recalibration_stream
from onnxfp8.formats import get_format
from onnxfp8.modelio import to_model
from onnxfp8.pipeline import Pass, PassContext, PassResult

RANGE_TOLERANCE = 0.01


class RemeasureRanges(Pass):
    name = "remeasure_ranges"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        note, moved = remeasure(graph, ctx)
        return PassResult(moved > 0, [note])


def remeasure(graph: gs.Graph, ctx: PassContext):
    """Re-measure and update; returns (a note, how many scales moved)."""
    cfg = ctx.config
    tensors = graph.tensors()
    probes = {}
    for spec in ctx.plan.activations():
        scale_t = tensors.get(names.scale(spec.tensor))
        if not isinstance(scale_t, gs.Constant):
            continue
        # the Q/Div node reading the scale takes the FP32 tensor that is quantized as its first input
        quant = next((n for n in scale_t.outputs if n.op in ("QuantizeLinear", "Div")), None)
        if quant is None:
            continue
        probes[spec.tensor] = (quant.inputs[0].name, spec.placement.startswith("before:"), scale_t)
    if not probes:
        return "no activation range to re-measure", 0
    model = to_model(graph.copy())
    stream = recalibration_stream(model, cfg, ctx.calib, ctx.source)
    minmax = Calibration(cfg, stream, source=ctx.source).max_ranges(model, [src for src, _, _ in probes.values()])
    moved = []
    for k, (src, relu, scale_t) in probes.items():
        spec = ctx.plan.tensors[k]
        lo, hi = minmax.get(src, (0.0, 0.0))  # never finite on the data: nothing to update
        amax = max(hi, 0.0) if relu else max(abs(hi), abs(lo))
        if not np.isfinite(amax) or amax <= 0:
            continue
        old = float(spec.amax or 0.0)
        if old > 0 and abs(amax / old - 1.0) <= RANGE_TOLERANCE:
            continue
        fmt = get_format(spec.format)
        scale = fmt.scale_for(np.float32(amax))
        scale_t.values = np.asarray(scale, dtype=scale_t.values.dtype).reshape(scale_t.values.shape)
        spec.notes.append(f"range re-measured after BN recalibration: {old:.6g} -> {amax:.6g}")
        spec.amax, spec.scale = float(amax), float(scale)
        moved.append(f"{k} {old:.4g}->{amax:.4g}")
    return (f"re-measured {len(probes)} activation range(s) after recalibration; {len(moved)} moved by more than "
            f"{RANGE_TOLERANCE:.0%}" + (": " + ", ".join(moved[:6]) + (" ..." if len(moved) > 6 else "") if moved else "")), len(moved)
