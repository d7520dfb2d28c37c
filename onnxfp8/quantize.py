"""quantize(): the end-to-end job. Load at the edge, run the pipeline on the graphsurgeon Graph, export,
check, measure, and (optionally) save atomically."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

import numpy as np

import onnx

from onnxfp8.calibrators.data import as_data
from onnxfp8.config import QuantConfig
from onnxfp8.errors import ModelError
from onnxfp8 import modelio
from onnxfp8.modelio import ModelLike, load_model, make_session, model_bytes, prepare_model, save_model, to_graph, to_model
from onnxfp8.passes import pipeline_for
from onnxfp8.pipeline import PassContext, Pipeline
from onnxfp8.plan import QuantPlan
from onnxfp8.verify.check import OutputResult, Thresholds
from onnxfp8.verify.compare import ClassifierStats, ErrorStats, is_classifier
from onnxfp8.verify.report import RUN_EXACTLY, QuantReport


@dataclass
class QuantResult:
    model: onnx.ModelProto
    plan: QuantPlan
    report: QuantReport
    output: Optional[str] = None


def default_output(path: str, config: QuantConfig) -> str:
    stem, _ = os.path.splitext(path)
    tag = config.format
    if config.weights_format or config.activations_format:
        tag = f"w{config.weight_format}-a{config.activation_format}"
    return f"{stem}.{tag}.onnx"


def quantize(model: Union[ModelLike], calib: Any = None, config: Optional[QuantConfig] = None,
             output: Optional[str] = None, pipeline: Optional[Pipeline] = None, progress=None,
             check_model: bool = True) -> QuantResult:
    """Quantize ``model`` (a path or a ModelProto) with calibration data ``calib`` (a folder, a file, an
    iterable of ``{input: array}`` dicts or a CalibrationData). Returns the quantized model, the plan and
    the report; writes ``output`` atomically when given (never over the input model)."""
    config = config or QuantConfig()
    start = time.perf_counter()
    source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else "model"
    if output and source != "model" and os.path.abspath(os.fspath(output)) == os.path.abspath(source):
        raise ModelError(f"{output}: refusing to overwrite the input model; choose another output with -o")
    proto = load_model(model)
    size_before = model_bytes(proto)
    proto = prepare_model(proto, opset=config.opset, source=source)
    graph = to_graph(proto)
    # the weights live in the graph now: let protobuf's copy go (a 2.25 GiB model: 7.4 -> 5.2 GiB peak RSS).
    # The light copy is re-parsed because protobuf (upb) ties a copied message's memory to its source's.
    modelio.load_values(graph)
    proto = onnx.ModelProto.FromString(modelio.light_copy(proto)[0].SerializeToString())
    ctx = PassContext(config=config, source=source)
    if progress is not None:
        ctx.extras["progress"] = progress
    if calib is not None:
        ctx.calib = as_data(calib, proto, batch_size=config.batch_size, limit=config.calib_samples)
    pipe = pipeline or pipeline_for(config)
    pipe.run(graph, ctx)
    out_model = to_model(graph, like=proto)
    if check_model:
        try:
            modelio.check_model(out_model)
        except onnx.checker.ValidationError as e:
            raise ModelError(f"{source}: the quantized model fails the ONNX checker ({str(e).splitlines()[0]})") from e
    report = QuantReport(source=source, output=output, config=config.to_dict(), passes=ctx.records, plan=ctx.plan,
                         size_before=size_before, size_after=model_bytes(out_model),
                         calibration=ctx.extras.get("calibration", {}),
                         batchnorm=ctx.extras.get("bn_recalibration", {}))
    report.how_to_run = RUN_EXACTLY if config.style == "qdq" else ""
    _measure(out_model, ctx, report, config)
    if report.outputs:
        report.check_defaults["try"] = what_to_try(config, has_batchnorm=any(
            n.op_type == "BatchNormalization" for n in proto.graph.node))
    if output:
        save_model(out_model, output, protect=[source] if source != "model" else [])
    report.seconds = time.perf_counter() - start
    return QuantResult(out_model, ctx.plan, report, output)


def _measure(model: onnx.ModelProto, ctx: PassContext, report: QuantReport, config: QuantConfig) -> None:
    """Output SQNR of the quantized model vs the FP32 outputs captured during calibration, on the first
    ``config.summary_count(calibration samples)`` captured samples."""
    inputs = ctx.extras.get("captured_inputs") or []
    refs = ctx.extras.get("captured_outputs") or []
    captured = sum(next(iter(f.values())).shape[0] for f in inputs)
    want = min(captured, config.summary_count(ctx.extras.get("calibration", {}).get("samples") or captured))
    if not inputs or want <= 0:
        return
    sess = make_session(model, level="basic", providers=config.providers, threads=config.threads)
    names = [o.name for o in sess.get_outputs()]
    stats = {n: ErrorStats() for n in names}
    classifiers: Dict[str, ClassifierStats] = {}
    bar = ctx.extras.get("progress")
    if bar is not None and hasattr(bar, "begin"):
        bar.begin("measuring the quantized model", want)
    static = {i.name: i.shape[0] for i in sess.get_inputs() if i.shape and isinstance(i.shape[0], int)}
    count = 0
    for feed, ref in zip(inputs, refs):
        n = next(iter(feed.values())).shape[0]
        if count + n > want and not static:  # cut the last batch (outputs without the batch axis stay whole)
            take = want - count
            feed = {k: v[:take] for k, v in feed.items()}
            ref = {k: v[:take] if v.ndim and v.shape[0] == n else v for k, v in ref.items()}
            n = take
        elif any(feed[k].shape[0] != b for k, b in static.items() if k in feed):
            continue  # a short last batch a model with a fixed batch size cannot run
        got = sess.run(names, feed)
        for name, v in zip(names, got):
            if name in ref:
                stats[name].update(ref[name], v)
                r = np.asarray(ref[name])
                if r.dtype.kind == "f" and is_classifier(r.shape) and r.shape == np.shape(v):
                    classifiers.setdefault(name, ClassifierStats()).update(r, v)
        count += n
        if bar is not None:
            bar(count)
        if count >= want:
            break
    if bar is not None and hasattr(bar, "close"):
        bar.close()
    report.outputs = {n: {**s.to_dict(), **(classifiers[n].to_dict() if n in classifiers else {})}
                      for n, s in stats.items()}
    report.summary_samples = count
    # would `onnxfp8 check` pass with its defaults? (on these calibration samples: a hint, not the held-out gate)
    defaults = Thresholds()
    failures = []
    for n, s in stats.items():
        res = OutputResult(n, [], s, classifiers.get(n))
        res.judge(defaults.for_output(n))
        failures += res.failures
    report.check_defaults = {"passed": not failures, "failures": failures, "samples": count,
                             "thresholds": {k: v for k, v in defaults.to_dict().items()
                                            if k in ("min_sqnr", "min_cosine", "max_rel_error", "min_top1_agreement")}}


def what_to_try(config: QuantConfig, has_batchnorm: bool) -> List[str]:
    """Options that commonly lift a result that misses the check's defaults, for this configuration."""
    out = []
    if config.format != "auto" and not (config.weights_format or config.activations_format):
        out.append("-f auto (per tensor the candidate with the least error: " + ",".join(config.formats) + ")")
        if config.format != "int8":
            out.append("-f int8")
    if config.calibration == "max":
        out.append("--calibration mse or percentile (one outlier stretches a max scale)")
    if has_batchnorm and not config.bn_recalibrate:
        out.append("--bn-recalibrate")
    if config.scheme == "extended":
        out.append("--scheme standard")
    out.append("`onnxfp8 check MODEL QUANT --data VAL --layers` ranks the layers by the error they add: keep the "
               "worst FP32 with --exclude-node NAME (or --keep-first-last)")
    return out
