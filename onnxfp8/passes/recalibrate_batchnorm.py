"""recalibrate_batchnorm: re-estimate BatchNormalization statistics from quantized upstream values.

Quantization shifts the mean and variance of the tensors BatchNormalization normalizes, so the running
statistics stored at training time no longer match (the FP8 paper, arXiv 2309.14592, section on BN
recalibration). This pass runs after ``insert_qdq`` on a graph whose BatchNormalization nodes were left
unfolded. The pass holds the judgement; the other jobs live where their kind lives:

- the **moment statistics** (training-mode working copies, exact pooling): calibrators/moments.py, produced
  by calibrators.calibration.Calibration.moments;
- the **data stream** (``--bn-calib`` or the calibration data, ``--bn-samples``, the held-out evaluation
  samples, ``--augment``): calibrators/data.recalibration_stream, a DataSource;
- the **measurement** of the quantized model on the evaluation samples: verify/measure.measure_outputs, the
  one quantize's summary uses;
- the **option checks** (--augment on image inputs, bn_ranges with max calibration): config.py, once;
- the **range re-measurement** after folding (``--bn-ranges``): its own pass, remeasure_ranges.

The steps:

1. On a working copy (never the pipeline's graph), every inference-mode BatchNormalization is replaced by its
   training-mode computation (calibrators/moments.training_mode_model), so every downstream layer sees
   values normalized with statistics of the quantized upstream values, as a framework's train-mode forward
   does.
2. One onnxruntime pass per batch (``ORT_ENABLE_BASIC``, as for every quantized model) over the
   recalibration stream. In ``shift`` mode the FP32 working copy runs on the same batch too (two runs per
   batch, never one per layer). When the recalibration data is the calibration data and holds at least
   twice as many samples, the first ``capture_samples`` (64, or ``summary_samples`` when set: those whose
   FP32 outputs were captured during calibration) are held out of it to judge the result (step 5).
   A static batch dimension (an export with batch 1) is freed on the working copy so that batch statistics
   come from real batches; when the model cannot run so (a Reshape to [1, -1]...), the static batch is kept
   and the report says what that means.
3. Per channel, the batch statistics are **pooled exactly** (moments.PooledMoments): the mean and the
   (population) variance of all the values the BN saw, whatever the batching. (Training-mode normalization
   of *upstream* BNs still uses each batch's own statistics, as in any train-mode recalibration; the batch
   is therefore at least 64 samples unless the model fixes it.)
4. New statistics, written into the original BN's ``input_mean`` / ``input_var`` initializers (new ones
   when they are shared); the working copies are dropped:

   - ``replace`` (the FP8 paper's recalibration): the pooled statistics of the quantized model;
   - ``shift`` (default): the stored statistics moved by what quantization changes on the same data,
     ``mean + (mean_q - mean_fp32)``, ``var * (var_q + eps) / (var_fp32 + eps)``, where ``*_fp32`` are
     pooled from the FP32 working copy on the same batches. The stored (running) statistics are what the
     network was trained with; the statistics of a few thousand calibration samples differ from them
     even without quantization (running averages over changing weights, another sample), and on a
     model whose quantization error is small that difference is larger than the correction (measured on
     the digits CNN in INT8: replacing lowers the output SQNR vs FP32 from 43 to 38 dB). ``shift`` keeps
     only the part that comes from quantization.
5. Guard (``bn_guard``, on by default): the quantized model with the stored and with the new statistics
   is run on the evaluation samples (held out as above, else the captured calibration samples, and the
   report says so). When the new statistics are worse - lower accuracy when the calibration data has
   labels, else lower top-1 agreement with FP32 for classifier outputs, else lower mean output SQNR - the
   stored statistics are put back and the report says why.

What changed is recorded in ``ctx.bn_recalibration`` (a state.BatchNormReport): per BN layer the mean shift (in units of
the old standard deviation), the variance ratio and the per-channel values; the output SQNR, top-1
agreement and accuracy (with labels) without and with recalibration on the evaluation samples; whether
the new statistics were applied. The report (verify/report.py) prints them. The statistics applied are
decisions of the plan (``plan.batchnorm``), so ``apply_plan`` writes them back without data
(``ApplyBatchNormStats``).
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

import numpy as np
import onnx_graphsurgeon as gs

from onnxfp8.calibrators.calibration import Calibration
from onnxfp8.calibrators.data import Samples, first_labels, holds_at_least, recalibration_stream
from onnxfp8.calibrators.moments import FreedBatchFailed, free_batch, training_mode_model
from onnxfp8.errors import DataError
from onnxfp8.modelio import to_model
from onnxfp8.pipeline import Pass, PassContext, PassResult, Pipeline
from onnxfp8.plan import BatchNormStats
from onnxfp8.state import BatchNormReport

def batchnorms(graph: gs.Graph) -> List[gs.Node]:
    """Inference-mode BatchNormalization nodes with constant parameters (the ones we can recalibrate)."""
    out = []
    for n in graph.nodes:
        if n.op != "BatchNormalization" or n.attrs.get("training_mode", 0):
            continue
        if all(isinstance(t, gs.Constant) for t in n.inputs[1:5]):
            out.append(n)
    return out


def evaluation_set(ctx: PassContext):
    """The samples that judge recalibration: the inputs and FP32 outputs captured during calibration (the
    first ``config.capture_samples`` calibration samples) and, when the calibration data has a ``label`` key, their
    labels. Returns (inputs, fp32 outputs, labels or None, count)."""
    inputs, refs = ctx.captured.inputs, ctx.captured.outputs
    count = ctx.captured.samples
    labels = first_labels(ctx.calib, count)
    return inputs, refs, labels, count


def evaluate(graph: gs.Graph, ctx: PassContext, inputs, refs, labels) -> Dict[str, Any]:
    """Output SQNR (dB) per output against FP32 and, for classifier outputs ([N, C]), top-1 agreement with
    FP32 and (with labels) accuracy, of ``graph`` on the evaluation samples (verify/measure.measure_outputs,
    the measurement quantize's summary makes too)."""
    from onnxfp8.verify.measure import measure_outputs

    m = measure_outputs(to_model(graph.copy()), Samples(inputs, labels, what="evaluation samples"), refs,
                        axes=getattr(ctx.calib, "axes", {}),
                        providers=ctx.config.providers, threads=ctx.config.threads)
    return {"sqnr": m.sqnr(), "top1_agreement": m.top1_agreement(), "accuracy": m.accuracy()}


def worse(with_: Dict[str, Any], without: Dict[str, Any]) -> Optional[str]:
    """Why the recalibrated model is worse on the evaluation samples, or None: lower accuracy (with labels),
    else lower top-1 agreement with FP32 of a classifier, else a lower mean output SQNR."""
    for key, what in (("accuracy", "accuracy"), ("top1_agreement", "top-1 agreement with FP32")):
        a, b = without.get(key) or {}, with_.get(key) or {}
        common = [n for n in a if n in b]
        if common:
            ma, mb = np.mean([a[n] for n in common]), np.mean([b[n] for n in common])
            if mb < ma:
                return f"{what} {ma:.4f} -> {mb:.4f}"
            if mb > ma:
                return None
    a, b = without.get("sqnr") or {}, with_.get("sqnr") or {}
    common = [n for n in a if n in b and np.isfinite(a[n]) and np.isfinite(b[n])]
    if common:
        ma, mb = float(np.mean([a[n] for n in common])), float(np.mean([b[n] for n in common]))
        if mb < ma:
            return f"output SQNR vs FP32 {ma:.2f} dB -> {mb:.2f} dB"
    return None


def _set_param(bn: gs.Node, index: int, values: np.ndarray, suffix: str) -> None:
    old = bn.inputs[index]
    dtype = old.values.dtype
    name = old.name if len(old.outputs) <= 1 else f"{bn.name}.{suffix}"
    bn.inputs[index] = gs.Constant(name, np.asarray(values, dtype=dtype).reshape(old.values.shape))


def layer_shift(mean0, var0, mean1, var1, eps: float) -> Dict[str, Any]:
    """How far the statistics moved: |mean shift| in units of the old standard deviation, variance ratio."""
    std0 = np.sqrt(np.asarray(var0, np.float64) + eps)
    shift = np.abs(np.asarray(mean1, np.float64) - mean0) / std0
    ratio = (np.asarray(var1, np.float64) + eps) / (np.asarray(var0, np.float64) + eps)
    return {"channels": int(np.size(mean0)), "mean_shift": float(shift.mean()), "max_mean_shift": float(shift.max()),
            "var_ratio": float(ratio.mean()), "min_var_ratio": float(ratio.min()), "max_var_ratio": float(ratio.max())}


class RecalibrateBatchNorm(Pass):
    name = "recalibrate_batchnorm"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        start = time.perf_counter()
        bns = batchnorms(graph)
        skipped = [n.name for n in graph.nodes if n.op == "BatchNormalization" and n not in bns]
        notes = [f"{name}: training mode or non-constant parameters, not recalibrated" for name in skipped]
        if not bns:
            return PassResult(False, ["no BatchNormalization to recalibrate"] + notes)
        cfg = ctx.config
        mode = cfg.bn_mode
        names = [n.name for n in bns]
        inputs, refs, labels, n_eval = evaluation_set(ctx)
        # hold the evaluation samples out of recalibration when it reads the calibration data and the data
        # holds at least as many other samples (else the judgement is in-sample, and the report says so)
        hold_out = 0
        if n_eval and not cfg.bn_calib and ctx.calib is not None and hasattr(ctx.calib, "batches"):
            hold_out = n_eval if holds_at_least(ctx.calib, 2 * n_eval) else 0
        fp32 = ctx.fp32_graph
        if mode == "shift":
            if fp32 is None:
                notes.append("bn_mode shift: no FP32 graph kept (the pass ran outside the bn_recalibrate pipeline); "
                             "the graph itself is the reference, so the statistics stay as they are")
            else:
                fp32_names = {n.name for n in batchnorms(fp32)}
                missing = [nm for nm in names if nm not in fp32_names]
                if missing:
                    raise ValueError(f"bn_mode shift: {missing[0]} is not in the kept FP32 graph")
        graphs = [graph] + ([fp32] if mode == "shift" and fp32 is not None else [])
        try:  # a static batch dimension is freed on the working copies (batch statistics need batches)
            pooled, samples, batches, data, freed = self._collect(graphs, bns, ctx, hold_out, free=True)
            if freed:
                notes.append(f"the model's static batch dimension was freed on the working copy: batches of "
                             f"{data.batch_size} sample(s)")
        except FreedBatchFailed as e:
            pooled, samples, batches, data, _ = self._collect(graphs, bns, ctx, hold_out, free=False)
            notes.append(f"the working copy does not run with a free batch dimension ({str(e).splitlines()[0][:120]}); "
                         f"recalibrated with the model's static batch of {data.batch_size}: upstream BatchNorms "
                         f"normalize with statistics of that few samples")
        if samples == 0:
            raise DataError(f"{ctx.source}: the BatchNorm recalibration data holds no samples")
        before = evaluate(graph, ctx, inputs, refs, labels) if n_eval else None
        layers: Dict[str, Any] = {}
        old_params = {}
        for n in bns:
            acc = pooled[0][n.name]
            eps = float(n.attrs.get("epsilon", 1e-5))
            mean0 = n.inputs[3].values.astype(np.float64).reshape(-1)
            var0 = n.inputs[4].values.astype(np.float64).reshape(-1)
            if len(pooled) == 2:  # shift: old statistics moved by what quantization changed on the same data
                ref = pooled[1][n.name]
                new_mean = mean0 + (acc.mean - ref.mean)
                new_var = var0 * ((acc.var + eps) / (ref.var + eps))
            elif mode == "shift":
                new_mean, new_var = mean0, var0
            else:
                new_mean, new_var = acc.mean, acc.var
            if not (np.isfinite(new_mean).all() and np.isfinite(new_var).all()):
                notes.append(f"{n.name}: non-finite statistics from the data, kept the old ones")
                continue
            old_params[n.name] = (n, n.inputs[3], n.inputs[4])
            _set_param(n, 3, new_mean, "running_mean")
            _set_param(n, 4, new_var, "running_var")
            layers[n.name] = layer_shift(mean0, var0, new_mean, new_var, eps)
            layers[n.name].update(mean_before=mean0.tolist(), var_before=var0.tolist(),
                                  mean_after=new_mean.tolist(), var_after=new_var.tolist(),
                                  mean_data=acc.mean.tolist(), var_data=acc.var.tolist())
            if len(pooled) == 2:
                layers[n.name].update(mean_data_fp32=pooled[1][n.name].mean.tolist(),
                                      var_data_fp32=pooled[1][n.name].var.tolist())
        after = evaluate(graph, ctx, inputs, refs, labels) if n_eval and layers else None
        kept = "recalibrated" if layers else "stored"
        reason = worse(after, before) if (before and after) else None
        if reason and cfg.bn_guard:  # keep the better statistics, judged on the evaluation samples
            for node, m, v in old_params.values():
                node.inputs[3], node.inputs[4] = m, v
            kept = "stored"
            notes.append(f"kept the stored BatchNorm statistics: recalibration lowered {reason} on {n_eval} "
                         f"{'held-out' if hold_out else 'calibration'} sample(s)")
        elif reason:
            notes.append(f"recalibration lowered {reason} on {n_eval} sample(s); kept anyway (bn_guard off)")
        ctx.fp32_graph = None
        if kept == "recalibrated":  # the statistics written are a decision of the plan (apply_plan replays it)
            for name in old_params:
                d = layers[name]
                ctx.plan.batchnorm[name] = BatchNormStats(d["mean_after"], d["var_after"])
        ctx.bn_recalibration = BatchNormReport(
            samples=samples, batches=batches, source=getattr(data, "describe", lambda: "")(),
            augment=list(cfg.augment), statistics="pooled", mode=mode, layers=layers,
            applied=kept == "recalibrated", guard=cfg.bn_guard, worse=reason,
            eval_samples=n_eval, eval_held_out=bool(hold_out), eval_labelled=labels is not None,
            sqnr_without=before["sqnr"] if before else None, sqnr_with=after["sqnr"] if after else None,
            top1_without=before["top1_agreement"] if before else None,
            top1_with=after["top1_agreement"] if after else None,
            accuracy_without=before["accuracy"] if before and labels is not None else None,
            accuracy_with=after["accuracy"] if after and labels is not None else None,
            seconds=time.perf_counter() - start)
        worst = max(layers.values(), key=lambda d: d["max_mean_shift"], default=None)
        notes.insert(0, f"recalibrated {len(layers)} BatchNormalization node(s) on {samples} sample(s) in {batches} "
                        f"batch(es)" + (f"; largest mean shift {worst['max_mean_shift']:.3f} sigma" if worst else ""))
        return PassResult(kept == "recalibrated", notes)

    @staticmethod
    def _collect(graphs: List[gs.Graph], bns: List[gs.Node], ctx: PassContext, hold_out: int, free: bool):
        """The pooled moments of the BNs of ``graphs`` (the quantized graph, and in shift mode the FP32 one)
        on the recalibration stream: training-mode working copies (calibrators/moments.py), a static batch
        dimension freed when ``free``. Returns (pooled per graph, samples, batches, data, whether freed)."""
        cfg = ctx.config
        names = [n.name for n in bns]
        models = [training_mode_model(g, names) for g in graphs]
        freed = [free_batch(m) for m in models][0] if free else False
        data = recalibration_stream(models[0], cfg, ctx.calib, ctx.source, hold_out=hold_out)
        channels = {n.name: int(np.size(n.inputs[3].values)) for n in bns}
        res = Calibration(cfg, data, source=ctx.source).moments(models, channels, freed=freed)
        return res.pooled, res.samples, res.batches, data, freed


class ApplyBatchNormStats(Pass):
    """Write the plan's recalibrated statistics (``plan.batchnorm``) into their BatchNormalization nodes: the
    data-free stand-in of ``recalibrate_batchnorm`` when a saved plan is applied (``apply_plan``)."""

    name = "apply_batchnorm_stats"

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        known = {n.name for n in batchnorms(graph)}
        missing = [name for name in ctx.plan.batchnorm if name not in known]
        if missing:
            raise ValueError(f"the plan holds statistics of BatchNormalization '{missing[0]}', which is not an "
                             f"inference-mode BatchNormalization with constant parameters of this graph")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        by_name = {n.name: n for n in batchnorms(graph)}
        for name, st in ctx.plan.batchnorm.items():
            bn = by_name[name]
            channels = int(np.size(bn.inputs[3].values))
            if len(st.mean) != channels or len(st.var) != channels:
                raise ValueError(f"the plan's statistics of {name} have {len(st.mean)} / {len(st.var)} values, "
                                 f"the BatchNormalization has {channels} channel(s)")
            _set_param(bn, 3, np.asarray(st.mean, np.float64), "running_mean")
            _set_param(bn, 4, np.asarray(st.var, np.float64), "running_var")
        return PassResult(bool(ctx.plan.batchnorm),
                          [f"wrote the plan's statistics into {len(ctx.plan.batchnorm)} BatchNormalization node(s)"])


def with_bn_recalibration(pipe: Pipeline, config=None) -> Pipeline:
    """Turn a pipeline into its BN-recalibrating form: BatchNormalization is left unfolded while quantizing,
    the FP32 weights feeding a BN are kept before ``insert_qdq``, and after it come recalibration and the
    fold (which recomputes the folded weights' scales and re-quantizes them); with ``config.bn_ranges`` then
    the re-measurement of the activation ranges (passes/remeasure_ranges.py)."""
    from onnxfp8.passes.fold_quantized_batchnorm import FoldQuantizedBatchNorm, StashFP32Weights

    names = pipe.names()
    if "recalibrate_batchnorm" in names:
        return pipe
    if "fold_batchnorm" in names:
        pipe.remove("fold_batchnorm")
    pipe.insert_before("insert_qdq", StashFP32Weights())
    pipe.insert_after("insert_qdq", RecalibrateBatchNorm())
    pipe.insert_after("recalibrate_batchnorm", FoldQuantizedBatchNorm())
    if config is not None and config.bn_ranges:
        from onnxfp8.passes.remeasure_ranges import RemeasureRanges

        pipe.insert_after("fold_quantized_batchnorm", RemeasureRanges())
    return pipe
