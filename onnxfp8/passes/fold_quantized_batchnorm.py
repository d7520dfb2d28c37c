"""fold_quantized_batchnorm: fold (recalibrated) BatchNormalization into an already quantized Conv / Gemm.

With ``--bn-recalibrate`` the model is quantized with BatchNormalization left unfolded, so the graph that
reaches this pass holds quantized weights (an FP8/INT8/E3M4-code initializer -> DequantizeLinear or its
emulated decode). Folding into the *dequantized* weights would round twice, so the FP32 weights are kept
before ``insert_qdq`` by ``StashFP32Weights`` (in ``ctx.fp32_weights``), and for every
``producer -> BN`` pair this pass:

1. folds the BN into the FP32 weight and bias (the math of passes/fold_batchnorm.py, ``fold_into``);
2. recomputes the folded weight's scales, per output channel (or per tensor when the plan says so), from
   the folded weight's range, and updates its QuantSpec in the plan (``folded`` names the BN; a spec that
   already names it, from a plan being applied, keeps its scale: the plan's decision);
3. re-quantizes it and replaces the old weight fragment with a new one from the same emitter
   (``qdq`` or ``emulate`` style, E3M4 codes) - the weight keeps its name.

With per-channel scales, BN folding commutes with weight quantization up to float rounding:
``Q(s_c W_c; |s_c| scale_c) = s_c Q(W_c; scale_c)``, so the folded model computes what the unfolded
quantized model with the recalibrated BN computes (the tests check both numerically). Producers that are
not quantized (a Conv excluded by a rule) are folded as in the FP32 pipeline; a BN that cannot be folded
stays in the graph with its recalibrated statistics, with a note.

Optionally (``bn_ranges`` in the config, ``--bn-ranges``) the pass ``remeasure_ranges`` (its own file)
re-measures the activation ranges afterwards.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import onnx_graphsurgeon as gs

from onnxfp8 import names
from onnxfp8.formats import get_format
from onnxfp8.passes.assign_formats import channel_amax
from onnxfp8.passes.emulate import emitter_for
from onnxfp8.passes.fold_batchnorm import FOLDABLE, bn_producer, ensure_finite_biases, fold_candidates, fold_into
from onnxfp8.pipeline import Pass, PassContext, PassResult
from onnxfp8.plan import tolist


class StashFP32Weights(Pass):
    """Keep the FP32 weights of the nodes that feed a BatchNormalization (before insert_qdq replaces them)."""

    name = "stash_fp32_weights"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stash: Dict[str, np.ndarray] = ctx.fp32_weights
        for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
            producer = bn_producer(bn)
            if producer is not None and producer.op in FOLDABLE and len(producer.inputs) > 1:
                w = producer.inputs[1]
                if isinstance(w, gs.Constant):
                    stash[w.name] = np.array(w.values, copy=True)
        notes = [f"kept {len(stash)} FP32 weight(s) that feed a BatchNormalization"]
        if ctx.config.bn_mode == "shift":  # the FP32 reference for recalibrate_batchnorm (constants are shared)
            ctx.fp32_graph = graph.copy()
            notes.append("kept the FP32 graph as the reference of bn_mode shift")
        return PassResult(False, notes)


class FoldQuantizedBatchNorm(Pass):
    name = "fold_quantized_batchnorm"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        cfg = ctx.config
        if not cfg.fold_batchnorm:
            return PassResult(False, ["BatchNorm folding disabled: recalibrated BatchNormalization kept"])
        stash = ctx.fp32_weights
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
            producer.inputs[1] = gs.Constant(names.fp32(spec.tensor), stash[spec.tensor])
            reason = fold_into(producer, bn)
            if reason:
                producer.inputs[1] = w
                notes.append(f"{bn.name}: not folded into {producer.name}: {reason}")
                continue
            folded = producer.inputs[1].values
            w.name = spec.tensor + names.UNFOLDED  # the old fragment: now unused, removed by cleanup
            pending.append((producer, spec, folded, bn.name))
        graph.cleanup(remove_unused_graph_inputs=False)
        for producer, spec, folded, bn_name in pending:
            fmt = get_format(spec.format)
            if spec.folded != bn_name:  # a plan being applied already holds the folded weight's scale
                amax = channel_amax(folded, spec.axis)
                scale = fmt.scale_for(amax)
                if "scale" in cfg.overrides.get(spec.tensor, {}):
                    notes.append(f"{spec.tensor}: the scale override applied to the unfolded weight; folding "
                                 f"{bn_name} replaced it by scales from the folded weight")
                spec.scale, spec.amax, spec.folded = tolist(scale), tolist(amax), bn_name
                spec.notes.append(f"{bn_name} folded in after recalibration; scales recomputed from the folded weight")
            em = emitter_for(cfg.style, fmt, graph, ctx.twin_of)
            producer.inputs[1] = em.weight(gs.Constant(spec.tensor, folded), spec, fmt, spec.tensor)
            requant += 1
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        notes.insert(0, f"folded {requant} recalibrated BatchNormalization node(s) into quantized ops (weights "
                        f"re-quantized with new scales)" + (f", {plain} into FP32 ops" if plain else ""))
        ctx.fp32_weights = {}
        return PassResult(bool(requant or plain), notes)

    def ensures(self, graph: gs.Graph, ctx: PassContext) -> None:
        ensure_finite_biases(graph)
