"""quantize(): the end-to-end job. Load at the edge, run the pipeline on the graphsurgeon Graph, export,
check, measure, and (optionally) save atomically."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

import onnx

from onnxfp8.calibrators.data import as_data, batch_size, output_batch_axes, take_outputs, take_samples
from onnxfp8.config import QuantConfig
from onnxfp8.errors import ModelError
from onnxfp8 import modelio
from onnxfp8.modelio import ModelLike, load_model, make_session, model_bytes, prepare_model, to_graph, to_model
from onnxfp8.outputs import Outputs
from onnxfp8.passes import pipeline_for
from onnxfp8.pipeline import PassContext, Pipeline
from onnxfp8.plan import QuantPlan
from onnxfp8.verify.compare import ErrorStats
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
             check_model: bool = True, outputs: Optional[Outputs] = None) -> QuantResult:
    """Quantize ``model`` (a path or a ModelProto) with calibration data ``calib`` (a folder, a file, an
    iterable of ``{input: array}`` dicts or a CalibrationData). Returns the quantized model, the plan and
    the report; writes ``output`` atomically when given (never over the input model, its external data or
    any other input: outputs.py).

    ``outputs``: an outputs.Outputs the caller declared its own artifacts in (the CLI's --plan, --report...):
    this run's files are added to it, all are checked before any work, the model is staged there and the
    caller commits them together. Without it the files of this call are committed before returning."""
    config = config or QuantConfig()
    start = time.perf_counter()
    source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else "model"
    own = outputs is None
    outs = Outputs() if own else outputs
    try:
        external: list = []
        proto = load_model(model, external=external)
        if source != "model":
            outs.protect(source, "the input model")
            for f in external:
                outs.protect(f, f"an external-data file of the input model {source}")
        if isinstance(calib, (str, os.PathLike)):
            outs.protect(calib, "the calibration data")
        if not (config.load_stats and config.save_stats and _same_file(config.load_stats, config.save_stats)):
            outs.protect(config.load_stats, "--load-stats")  # the same file: read, then replaced with additions
        outs.protect(config.bn_calib, "--bn-calib")
        outs.add(output, "the output model (-o)", model=True)
        outs.add(config.save_stats, "--save-stats")
        outs.validate()  # every output check before any work
        result = _quantize(proto, source, calib, config, output, pipeline, progress, check_model, outs, start)
        if own:
            outs.commit()
        return result
    finally:
        if own:
            outs.discard()


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _quantize(proto, source, calib, config, output, pipeline, progress, check_model, outs, start) -> QuantResult:
    size_before = model_bytes(proto)
    proto = prepare_model(proto, opset=config.opset, source=source)
    graph = to_graph(proto)
    # the weights live in the graph now: let protobuf's copy go (a 2.25 GiB model: 7.4 -> 5.2 GiB peak RSS).
    # The light copy is re-parsed because protobuf (upb) ties a copied message's memory to its source's.
    modelio.load_values(graph)
    proto = onnx.ModelProto.FromString(modelio.light_copy(proto)[0].SerializeToString())
    ctx = PassContext(config=config, source=source)
    ctx.extras["outputs"] = outs  # passes that write files (calibrate --save-stats) stage them there
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
    if output:
        outs.write_model(output, out_model)
    report.seconds = time.perf_counter() - start
    return QuantResult(out_model, ctx.plan, report, output)


def _measure(model: onnx.ModelProto, ctx: PassContext, report: QuantReport, config: QuantConfig) -> None:
    """Output SQNR of the quantized model vs the FP32 outputs captured during calibration, on the first
    ``config.summary_count(calibration samples)`` captured samples."""
    inputs = ctx.extras.get("captured_inputs") or []
    refs = ctx.extras.get("captured_outputs") or []
    captured = sum(batch_size(f) for f in inputs)
    want = min(captured, config.summary_count(ctx.extras.get("calibration", {}).get("samples") or captured))
    if not inputs or want <= 0:
        return
    sess = make_session(model, level="basic", providers=config.providers, threads=config.threads)
    names = [o.name for o in sess.get_outputs()]
    stats = {n: ErrorStats() for n in names}
    axes = getattr(ctx.calib, "axes", {})  # each input's batch axis: a fixed batch cannot run a short batch
    static = {i.name: i.shape[axes.get(i.name, 0)] for i in sess.get_inputs()
              if axes.get(i.name, 0) is not None and len(i.shape) > axes.get(i.name, 0)
              and isinstance(i.shape[axes.get(i.name, 0)], int)}
    out_axes = output_batch_axes(model, ctx.calib)
    count = 0
    for feed, ref in zip(inputs, refs):
        n = batch_size(feed)
        if count + n > want and not static and out_axes is not None:  # cut the last batch
            take = want - count
            feed = take_samples(feed, take)
            ref = take_outputs(ref, n, take, out_axes)
            n = take
        elif any(feed[k].shape[axes.get(k, 0)] != b for k, b in static.items() if k in feed):
            continue  # a short last batch a model with a fixed batch size cannot run
        got = sess.run(names, feed)
        for name, v in zip(names, got):
            if name in ref:
                stats[name].update(ref[name], v)
        count += n
        if count >= want:
            break
    report.outputs = {n: s.to_dict() for n, s in stats.items()}
    report.summary_samples = count
