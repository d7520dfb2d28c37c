"""The graph passes, one per file, and the named pipelines built from them."""
from __future__ import annotations

from onnxfp8.config import QuantConfig
from onnxfp8.pipeline import Pipeline


def standard_pipeline(config: QuantConfig = None) -> Pipeline:
    """canonicalize -> fold_batchnorm -> select_ops -> calibrate -> assign_formats -> insert_qdq -> cleanup"""
    from onnxfp8.passes.assign_formats import AssignFormats
    from onnxfp8.passes.calibrate import Calibrate
    from onnxfp8.passes.canonicalize import Canonicalize
    from onnxfp8.passes.cleanup import Cleanup
    from onnxfp8.passes.fold_batchnorm import FoldBatchNorm
    from onnxfp8.passes.insert_qdq import InsertQDQ
    from onnxfp8.passes.select_ops import SelectOps

    return Pipeline("standard", [Canonicalize(), FoldBatchNorm(), SelectOps(), Calibrate(), AssignFormats(),
                                 InsertQDQ(), Cleanup()])


def extended_pipeline(config: QuantConfig = None) -> Pipeline:
    """canonicalize -> fold_batchnorm -> match_layernorm -> select_ops -> calibrate -> assign_formats ->
    passthrough -> insert_qdq -> cleanup (the FP8 paper's extended scheme: see config.EXTENDED_OPS)"""
    from onnxfp8.passes.match_layernorm import MatchLayerNorm
    from onnxfp8.passes.passthrough import PassThrough

    pipe = Pipeline("extended", standard_pipeline(config).passes)
    return pipe.insert_after("fold_batchnorm", MatchLayerNorm()).insert_after("assign_formats", PassThrough())


PIPELINES = {"standard": standard_pipeline, "extended": extended_pipeline}


def pipeline_for(config: QuantConfig) -> Pipeline:
    builder = PIPELINES.get(config.scheme, standard_pipeline)
    pipe = builder(config)
    if config.dynamic and "calibrate" in pipe.names():  # run-time activation scales: no calibration, no data
        from onnxfp8.passes.calibrate_dynamic import CalibrateDynamic

        pipe.replace("calibrate", CalibrateDynamic())
    if config.bn_recalibrate:  # BN left unfolded -> quantize -> recalibrate -> fold + re-quantize weights
        from onnxfp8.passes.recalibrate_batchnorm import with_bn_recalibration

        pipe = with_bn_recalibration(pipe, config)
    pipe = with_transforms(with_target(pipe, config), config)
    if "insert_qdq" in pipe.names() and "fp16_fallback" not in pipe.names():  # the plan's FP16 islands
        from onnxfp8.passes.fp16_fallback import FP16Fallback

        pipe.insert_after("insert_qdq", FP16Fallback())
    return pipe


def with_transforms(pipe: Pipeline, config: QuantConfig) -> Pipeline:
    """The function-preserving FP32 rewrites the config asks for: ``equalize`` after BatchNorm folding (and
    LayerNorm matching), ``smoothquant`` after ``select_ops`` (it smooths quantized MatMul/Gemm inputs only),
    ``bias_correction`` after both (it corrects the final weights of quantized layers)."""
    names = pipe.names()
    if config.equalize and "equalize" not in names:
        from onnxfp8.passes.equalize import Equalize

        after = next(n for n in ("match_layernorm", "fold_batchnorm", "canonicalize") if n in names)
        pipe.insert_after(after, Equalize())
    if config.smoothquant is not None and "smoothquant" not in names and "select_ops" in names:
        from onnxfp8.passes.smoothquant import SmoothQuant

        pipe.insert_after("select_ops", SmoothQuant())
    want_bc = config.bias_correction if config.bias_correction is not None else config.equalize
    if want_bc and "bias_correction" not in names and "select_ops" in names:
        from onnxfp8.passes.equalize import BiasCorrection

        pipe.insert_after("smoothquant" if "smoothquant" in pipe.names() else "select_ops", BiasCorrection())
    return pipe


# the function-preserving rewrites, in pipeline order (the transform guard adds them one at a time in this order)
TRANSFORMS = ("equalize", "smoothquant", "bias_correction")


def requested_transforms(config: QuantConfig) -> list:
    """The transforms ``config`` asks for, in pipeline order (bias correction comes with equalize unless set)."""
    bc = config.bias_correction if config.bias_correction is not None else config.equalize
    on = {"equalize": bool(config.equalize), "smoothquant": config.smoothquant is not None, "bias_correction": bool(bc)}
    return [t for t in TRANSFORMS if on[t]]


def config_with_transforms(config: QuantConfig, names) -> QuantConfig:
    """``config`` with exactly the transforms ``names`` (a subset of requested_transforms(config)) on."""
    return config.replace(equalize="equalize" in names,
                          smoothquant=config.smoothquant if "smoothquant" in names else None,
                          bias_correction="bias_correction" in names)


def with_target(pipe: Pipeline, config: QuantConfig) -> Pipeline:
    """``target = "tensorrt"``: select_ops runs rules.TensorRTRule first (placements TensorRT fuses into FP8
    kernels; it also decides which inputs of a residual Add get Q/DQ). The select_ops pass is replaced by a
    new one: a SelectOps shared with another pipeline keeps its rules."""
    if config.target == "tensorrt":
        from onnxfp8.passes.select_ops import SelectOps
        from onnxfp8.rules import TensorRTRule

        old = pipe.get("select_ops")
        if old is not None:
            pipe.replace("select_ops", SelectOps([TensorRTRule(config.selected_op_types)] + list(old.extra_rules)))
    return pipe


# the passes that decide from data (or make the plan); applying a saved plan replaces them
DECIDING_PASSES = ("select_ops", "calibrate", "calibrate_dynamic", "assign_formats", "passthrough",
                   "recalibrate_batchnorm", "remeasure_ranges")


def plan_pipeline(config: QuantConfig) -> Pipeline:
    """The pipeline that rebuilds a quantized model from a saved plan without data: the pipeline of
    ``config`` with the deciding passes replaced by ``use_plan`` (the plan, checked against the graph) and
    BatchNorm recalibration by ``apply_batchnorm_stats`` (the plan's statistics). Passes that only shape the
    graph (canonicalize, fold_batchnorm, match_layernorm, insert_qdq, fold_quantized_batchnorm, cleanup) run
    as they do when quantizing, so the model comes out byte for byte the same."""
    from onnxfp8.passes.use_plan import UsePlan

    pipe = pipeline_for(config)
    pipe.name = f"{pipe.name}+plan"
    pipe.replace("select_ops", UsePlan())
    if "recalibrate_batchnorm" in pipe.names():
        from onnxfp8.passes.recalibrate_batchnorm import ApplyBatchNormStats

        pipe.replace("recalibrate_batchnorm", ApplyBatchNormStats())
    for name in DECIDING_PASSES:
        pipe.remove(name)
    transforms = [n for n in ("equalize", "smoothquant", "bias_correction") if n in pipe.names()]
    if transforms:  # their records in the plan are redone without data, before use_plan checks the graph
        from onnxfp8.passes.equalize import ReplayTransforms

        for name in transforms:
            pipe.remove(name)
        pipe.insert_before("use_plan", ReplayTransforms())
    return pipe
