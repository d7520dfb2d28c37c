"""fold_quantized_batchnorm: fold (recalibrated) BatchNormalization into an already quantized Conv / Gemm.

With ``--bn-recalibrate`` the model is quantized with BatchNormalization left unfolded, so the graph that
reaches this pass holds quantized weights (an FP8/INT8/E3M4-code initializer -> DequantizeLinear or its
emulated decode). Folding into the *dequantized* weights would round twice, so the FP32 weights are kept
before ``insert_qdq`` by ``StashFP32Weights`` (in ``ctx.extras["fp32_weights"]``), and for every
``producer -> BN`` pair this pass:

1. folds the BN into the FP32 weight and bias (the math of passes/fold_batchnorm.py, ``fold_into``);
2. recomputes the folded weight's scales, per output channel (or per tensor when the plan says so), from
   the folded weight's range, and updates its QuantSpec in the plan;
3. re-quantizes it and replaces the old weight fragment with a new one from the same emitter
   (``qdq`` or ``emulate`` style, E3M4 codes) - the weight keeps its name.

With per-channel scales, BN folding commutes with weight quantization up to float rounding:
``Q(s_c W_c; |s_c| scale_c) = s_c Q(W_c; scale_c)``, so the folded model computes what the unfolded
quantized model with the recalibrated BN computes (the tests check both numerically). Producers that are
not quantized (a Conv excluded by a rule) are folded as in the FP32 pipeline; a BN that cannot be folded
stays in the graph with its recalibrated statistics, with a note.

Optionally (``bn_ranges`` in the config, ``--bn-ranges``) the activation ranges are re-measured afterwards
on the recalibration data, on the quantized model itself (max calibration), and the scale of every
activation whose range moved by more than 1 % is updated in place.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import onnx_graphsurgeon as gs

from onnxfp8.calibrators.collector import collect
from onnxfp8.calibrators.max import MaxCalibrator
from onnxfp8.formats import get_format
from onnxfp8.modelio import to_model
from onnxfp8.passes.assign_formats import _tolist, channel_amax
from onnxfp8.passes.emulate import emitter_for
from onnxfp8.passes.fold_batchnorm import FOLDABLE, bn_producer, ensure_finite_biases, fold_candidates, fold_into
from onnxfp8.pipeline import Pass, PassContext, PassResult

RANGE_TOLERANCE = 0.01


class StashFP32Weights(Pass):
    """Keep the FP32 weights of the nodes that feed a BatchNormalization (before insert_qdq replaces them)."""

    name = "stash_fp32_weights"

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        if ctx.config.augment:  # refuse --augment on non-image inputs before quantizing
            from onnxfp8.calibrators.augment import check_image_inputs
            from onnxfp8.calibrators.data import InputSpec

            specs = {t.name: InputSpec(t.name, np.dtype(t.dtype or np.float32), tuple(t.shape or ()))
                     for t in graph.inputs}
            check_image_inputs(specs, ctx.config.augment, ctx.source)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stash: Dict[str, np.ndarray] = ctx.extras.setdefault("fp32_weights", {})
        for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
            producer = bn_producer(bn)
            if producer is not None and producer.op in FOLDABLE and len(producer.inputs) > 1:
                w = producer.inputs[1]
                if isinstance(w, gs.Constant):
                    stash[w.name] = np.array(w.values, copy=True)
        notes = [f"kept {len(stash)} FP32 weight(s) that feed a BatchNormalization"]
        if ctx.config.bn_mode == "shift":  # the FP32 reference for recalibrate_batchnorm (constants are shared)
            ctx.extras["fp32_graph"] = graph.copy()
            notes.append("kept the FP32 graph as the reference of bn_mode shift")
        return PassResult(False, notes)


class FoldQuantizedBatchNorm(Pass):
    name = "fold_quantized_batchnorm"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        cfg = ctx.config
        if not cfg.fold_batchnorm:
            return PassResult(False, ["BatchNorm folding disabled: recalibrated BatchNormalization kept"])
        stash = ctx.extras.get("fp32_weights", {})
        notes: List[str] = []
        plain = requant = 0
        pending = []  # (producer, spec, folded weight values)
        for bn, producer in fold_candidates(graph, notes, kept="kept (recalibrated)"):
            w = producer.inputs[1] if len(producer.inputs) > 1 else None
            if isinstance(w, gs.Constant):  # producer not quantized: the FP32 fold
                reason = fold_into(producer, bn)
                if reason:
                    notes.append(f"{bn.name}: not folded into {producer.name}: {reason}")
                else:
                    plain += 1
                continue
            spec = ctx.plan.tensors.get(w.name) if w is not None else None
            if spec is None or spec.role != "weight" or spec.tensor not in stash:
                notes.append(f"{bn.name}: {producer.name} weight is neither FP32 nor a planned weight with its FP32 "
                             f"values kept, BN kept")
                continue
            if set(spec.consumers) != {producer.name} or len(w.outputs) != 1:
                notes.append(f"{bn.name}: {producer.name} weight {spec.tensor} is shared, BN kept")
                continue
            producer.inputs[1] = gs.Constant(f"{spec.tensor}.fp32", stash[spec.tensor])
            reason = fold_into(producer, bn)
            if reason:
                producer.inputs[1] = w
                notes.append(f"{bn.name}: not folded into {producer.name}: {reason}")
                continue
            folded = producer.inputs[1].values
            w.name = f"{spec.tensor}.unfolded"  # the old fragment: now unused, removed by cleanup
            pending.append((producer, spec, folded, bn.name))
        graph.cleanup(remove_unused_graph_inputs=False)
        for producer, spec, folded, bn_name in pending:
            fmt = get_format(spec.format)
            amax = channel_amax(folded, spec.axis)
            scale = fmt.scale_for(amax)
            if "scale" in cfg.overrides.get(spec.tensor, {}):
                notes.append(f"{spec.tensor}: the scale override applied to the unfolded weight; folding "
                             f"{bn_name} replaced it by scales from the folded weight")
            spec.scale, spec.amax = _tolist(scale), _tolist(amax)
            spec.notes.append(f"{bn_name} folded in after recalibration; scales recomputed from the folded weight")
            em = emitter_for(cfg.style, fmt, graph)
            producer.inputs[1] = em.weight(gs.Constant(spec.tensor, folded), spec, fmt, spec.tensor)
            requant += 1
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        notes.insert(0, f"folded {requant} recalibrated BatchNormalization node(s) into quantized ops (weights "
                        f"re-quantized with new scales)" + (f", {plain} into FP32 ops" if plain else ""))
        if cfg.bn_ranges:
            notes.append(recalibrate_ranges(graph, ctx))
        ctx.extras.pop("fp32_weights", None)
        return PassResult(bool(requant or plain), notes)

    def ensures(self, graph: gs.Graph, ctx: PassContext) -> None:
        ensure_finite_biases(graph)


def recalibrate_ranges(graph: gs.Graph, ctx: PassContext) -> str:
    """Re-measure the max range of every planned activation on the quantized (folded) graph over the
    recalibration data and update the scales whose range moved by more than RANGE_TOLERANCE."""
    from onnxfp8.passes.recalibrate_batchnorm import recalibration_data

    cfg = ctx.config
    if cfg.calibration != "max":
        return f"activation ranges kept: re-measuring after recalibration supports max calibration, not {cfg.calibration}"
    tensors = graph.tensors()
    probes = {}
    for spec in ctx.plan.activations():
        scale_t = tensors.get(f"{spec.tensor}.scale")
        if not isinstance(scale_t, gs.Constant):
            continue
        # the Q/Div node reading the scale takes the FP32 tensor that is quantized as its first input
        quant = next((n for n in scale_t.outputs if n.op in ("QuantizeLinear", "Div")), None)
        if quant is None:
            continue
        probes[spec.tensor] = (quant.inputs[0].name, spec.placement.startswith("before:"), scale_t)
    if not probes:
        return "no activation range to re-measure"
    model = to_model(graph.copy())
    res = collect(model, [src for src, _, _ in probes.values()], recalibration_data(model, ctx), MaxCalibrator(),
                  providers=cfg.providers, threads=cfg.threads, max_memory_mb=cfg.max_memory_mb, level="basic")
    minmax = res.max_calibrator.minmax()
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
            f"{RANGE_TOLERANCE:.0%}" + (": " + ", ".join(moved[:6]) + (" ..." if len(moved) > 6 else "") if moved else ""))
