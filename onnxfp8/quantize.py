"""quantize(): the end-to-end job. Load at the edge, run the pipeline on the graphsurgeon Graph, export,
check, measure, and (optionally) save atomically."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import onnx
import onnx_graphsurgeon as gs

from onnxfp8.bfloat16 import TWIN_NOTE, Bfloat16Model, float32_twin, is_bfloat16
from onnxfp8.calibrators.data import Samples, as_data, batch_size, input_specs, output_batch_axes, take_samples
from onnxfp8.config import QuantConfig
from onnxfp8.errors import ModelError
from onnxfp8 import modelio
from onnxfp8.modelio import ModelLike, load_model, make_session, model_bytes, prepare_model, to_graph, to_model
from onnxfp8.outputs import Outputs
from onnxfp8.validate import control_flow_nodes, validate_model
from onnxfp8.passes import pipeline_for
from onnxfp8.pipeline import PassContext, Pipeline
from onnxfp8.plan import QuantPlan
from onnxfp8.verify.check import OutputResult, Thresholds
from onnxfp8.verify.report import RUN_EXACTLY, QuantReport


@dataclass
class QuantResult:
    model: onnx.ModelProto
    plan: QuantPlan
    report: QuantReport
    output: Optional[str] = None


@dataclass
class Prepared:
    """A model loaded and prepared once (opset, names, shapes; weights held as numpy in a graphsurgeon
    graph) for many runs in memory: ``quantize(prepared, calib, ...)`` and ``apply_plan(prepared, plan)``
    each work on a copy of ``graph`` (weights shared, not copied), so calibrating once and applying many
    candidate plans never reloads or re-serializes the model."""

    graph: gs.Graph
    proto: onnx.ModelProto  # light copy (big weights as placeholders): metadata, opsets, input specs
    source: str = "model"
    size_before: int = 0
    opset: int = 19
    external: List[str] = field(default_factory=list)  # the input's external-data files (protected from -o)
    control_flow: List[dict] = field(default_factory=list)  # nodes inside If/Loop/Scan bodies (left FP32)
    # a bfloat16 model: ``graph`` / ``proto`` are its float32 twin, this writes the result back (bfloat16.py)
    bfloat16: Optional[Bfloat16Model] = None

    def working_graph(self) -> gs.Graph:
        g = self.graph.copy()
        g.producer_name, g.producer_version = self.graph.producer_name, self.graph.producer_version  # copy() drops them
        return g

    @property
    def twin_of(self) -> str:
        """"bfloat16" when ``graph`` is a bfloat16 model's float32 twin, else ""."""
        return "bfloat16" if self.bfloat16 is not None else ""


def prepare(model: Union[ModelLike, Prepared], config: Optional[QuantConfig] = None) -> Prepared:
    """Load and prepare ``model`` (a path or a ModelProto) for ``config.opset`` (default 19)."""
    opset = (config or QuantConfig()).opset
    if isinstance(model, Prepared):
        if model.opset != opset:
            raise ModelError(f"{model.source}: prepared for opset {model.opset}, the config asks for {opset}")
        return model
    source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else "model"
    external: list = []
    proto = load_model(model, external=external)
    return _prepare_loaded(proto, source, external, opset)


def _prepare_loaded(proto: onnx.ModelProto, source: str, external: list, opset: int,
                    providers=("CPUExecutionProvider",)) -> Prepared:
    size_before = model_bytes(proto)
    bf16 = None
    if is_bfloat16(proto):  # calibrated, planned and quantized as its float32 twin, written back in bfloat16
        bf16 = Bfloat16Model.of(proto, source)
        proto = float32_twin(proto)
    validate_model(proto, source, providers=providers)  # one line, exit 2, before any work (validate.py)
    control_flow = control_flow_nodes(proto)
    proto = prepare_model(proto, opset=opset, source=source)
    graph = to_graph(proto)
    # the weights live in the graph now: let protobuf's copy go (a 2.25 GiB model: 7.4 -> 5.2 GiB peak RSS).
    # The light copy is re-parsed because protobuf (upb) ties a copied message's memory to its source's.
    modelio.load_values(graph)
    proto = onnx.ModelProto.FromString(modelio.light_copy(proto)[0].SerializeToString())
    return Prepared(graph, proto, source, size_before, opset, list(external), control_flow, bf16)


def default_output(path: str, config: QuantConfig) -> str:
    stem, _ = os.path.splitext(path)
    tag = config.format
    if config.weights_format or config.activations_format:
        tag = f"w{config.weight_format}-a{config.activation_format}"
    return f"{stem}.{tag}.onnx"


def _declare(outs: Outputs, prep: Prepared, calib: Any, config: QuantConfig, output: Optional[str]) -> None:
    """Protect the inputs and declare this run's outputs; every check before any work."""
    if prep.source != "model":
        outs.protect(prep.source, "the input model")
        for f in prep.external:
            outs.protect(f, f"an external-data file of the input model {prep.source}")
    if isinstance(calib, (str, os.PathLike)):
        outs.protect(calib, "the calibration data")
    if not (config.load_stats and config.save_stats and _same_file(config.load_stats, config.save_stats)):
        outs.protect(config.load_stats, "--load-stats")  # the same file: read, then replaced with additions
    outs.protect(config.bn_calib, "--bn-calib")
    outs.add(output, "the output model (-o)", model=True)
    outs.add(config.save_stats, "--save-stats")
    outs.validate()


def _why_empty(plan: QuantPlan, control_flow) -> str:
    """The reasons no node was quantized, most frequent first (a few nodes named each)."""
    reasons = {}
    for d in plan.skipped_nodes():
        reasons.setdefault(d.reason, []).append(d.node)
    parts = [f"{len(v)} x {r} ({', '.join(v[:3])}{' ...' if len(v) > 3 else ''})"
             for r, v in sorted(reasons.items(), key=lambda kv: -len(kv[1]))[:3]]
    if control_flow:
        parts.append(f"{len(control_flow)} candidate(s) inside If/Loop/Scan bodies, which are not quantized")
    return "; ".join(parts) or "the graph has no node"


def unknown_op_types(config: QuantConfig) -> List[str]:
    """Warnings for --op-types / --exclude-op entries that are no ONNX operator (a typo such as 'conv')."""
    out = []
    for flag, ops in (("--op-types", config.op_types or ()), ("--exclude-op", config.exclude_ops)):
        for op in ops:
            if not (onnx.defs.has(op) or onnx.defs.has(op, "ai.onnx.ml")):
                near = [s.name for s in onnx.defs.get_all_schemas() if s.name.lower() == op.lower()]
                out.append(f"{flag} '{op}' is no ONNX operator type" + (f" (did you mean {near[0]}?)" if near else "")
                           + ": it matches nothing")
    return out


def control_flow_warning(nodes) -> str:
    shown = ", ".join(f"{d['op_type']} '{d['node']}' ({d['parent_op']} '{d['parent']}' {d['body']})" for d in nodes[:4])
    more = f" and {len(nodes) - 4} more" if len(nodes) > 4 else ""
    return (f"{len(nodes)} node(s) inside If/Loop/Scan bodies left FP32 (onnxfp8 does not quantize subgraphs): "
            f"{shown}{more}")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _run(model: Union[ModelLike, Prepared], calib: Any, config: QuantConfig, output: Optional[str],
         outputs: Optional[Outputs], work) -> QuantResult:
    """Load (or take the Prepared model), declare the files, run ``work(prep, graph, outs)``, commit."""
    own = outputs is None
    outs = Outputs() if own else outputs
    try:
        if isinstance(model, Prepared):
            prep = prepare(model, config)
            _declare(outs, prep, calib, config, output)
            graph = prep.working_graph()
        else:
            source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else "model"
            external: list = []
            proto = load_model(model, external=external)
            loaded = Prepared(None, proto, source, 0, config.opset, external)
            _declare(outs, loaded, calib, config, output)  # before any work
            prep = _prepare_loaded(proto, source, external, config.opset, config.providers)
            graph = prep.graph
        result = work(prep, graph, outs)
        if own:
            outs.commit()
        return result
    finally:
        if own:
            outs.discard()


def quantize(model: Union[ModelLike, Prepared], calib: Any = None, config: Optional[QuantConfig] = None,
             output: Optional[str] = None, pipeline: Optional[Pipeline] = None, progress=None,
             check_model: bool = True, outputs: Optional[Outputs] = None) -> QuantResult:
    """Quantize ``model`` (a path, a ModelProto or a ``Prepared``) with calibration data ``calib`` (a folder,
    a file, an iterable of ``{input: array}`` dicts or a CalibrationData). Returns the quantized model, the
    plan (every decision: ``apply_plan`` rebuilds the model from it) and the report; writes ``output``
    atomically when given (never over the input model, its external data or any other input: outputs.py).

    ``outputs``: an outputs.Outputs the caller declared its own artifacts in (the CLI's --plan, --report...):
    this run's files are added to it, all are checked before any work, the model is staged there and the
    caller commits them together. Without it the files of this call are committed before returning."""
    config = config or QuantConfig()
    start = time.perf_counter()

    def work(prep: Prepared, graph: gs.Graph, outs: Outputs) -> QuantResult:
        config.check_inputs(input_specs(prep.proto), prep.source)  # before any work (--augment: image inputs)
        data = None
        if calib is not None:
            data = as_data(calib, prep.proto, batch_size=config.batch_size, limit=config.calib_samples)
        if pipeline is None and guarded(config, data):
            return _guarded_quantize(prep, data, config, output, outs, progress, check_model, start)
        ctx = PassContext(config=config, source=prep.source, progress=progress, outputs=outs)
        ctx.plan.config = config.to_dict()
        ctx.calib = data
        pipe = pipeline or pipeline_for(config)
        return _finish(pipe, graph, ctx, prep, config, output, check_model, start, require_some=True)

    return _run(model, calib, config, output, outputs, work)


# the passes that shape the FP32 graph before quantization: what transformed() runs
FP32_PASSES = ("canonicalize", "fold_batchnorm", "match_layernorm", "equalize", "select_ops", "smoothquant",
               "bias_correction", "cleanup")


def transformed(model: Union[ModelLike, Prepared], calib: Any = None, config: Optional[QuantConfig] = None
                ) -> Tuple[onnx.ModelProto, QuantPlan]:
    """The FP32 model the quantizer would quantize, after the transforms ``config`` asks for (equalize,
    smoothquant, bias_correction: with calibration data ``calib``) and before any Q/DQ: the pipeline of
    ``config`` cut to FP32_PASSES, unguarded. Equalization and smoothing keep the FP32 function (bias
    absorption: on the calibration data's range); bias correction changes it by design. Returns the model and
    the plan (its ``transforms`` records). For a bfloat16 model this is its float32 twin (bfloat16.py), the
    graph that is quantized."""
    config = config or QuantConfig()

    def work(prep: Prepared, graph: gs.Graph, outs: Outputs):
        ctx = PassContext(config=config, source=prep.source, outputs=outs)
        ctx.plan.config = config.to_dict()
        if calib is not None:
            ctx.calib = as_data(calib, prep.proto, batch_size=config.batch_size, limit=config.calib_samples)
        pipe = pipeline_for(config)
        for name in pipe.names():
            if name not in FP32_PASSES:
                pipe.remove(name)
        pipe.run(graph, ctx)
        return to_model(graph, like=prep.proto), ctx.plan

    return _run(model, calib, config, None, None, work)


# -- the transform guard ------------------------------------------------------------------------------------
GUARD_MIN_GAIN_DB = 0.5  # a transform is kept when it lifts the worst output's held-out SQNR by at least this much
GUARD_LOWER_QUANTILE = 0.1  # ... and the paired bootstrap's 10 % quantile of that gain
GUARD_MIN_LOWER_DB = 0.0  # ... is at least this (no loss at 90 % confidence)
GUARD_BOOTSTRAP = 1000  # resamples of the judged samples


def guarded(config: QuantConfig, data: Any) -> bool:
    """True when quantize() guards the transforms ``config`` asks for by measurement (config.transform_guard,
    calibration data, captured samples to measure on)."""
    from onnxfp8.passes import requested_transforms

    return bool(config.transform_guard and requested_transforms(config) and data is not None
                and config.capture_samples > 0)


def _folds(prep: Prepared, data: Any, config: QuantConfig):
    """The calibration samples the guard judges on, in GUARD_FOLDS (2) folds, each with the original model's
    FP32 outputs (a state.Captured) and the data to calibrate on without it: the first min(2 x
    capture_samples, all) samples, halved; fold 1 (the first half) is calibrated on the rest of the data,
    fold 2 on the first half. At least 16 samples (8 per fold), else None."""
    import copy

    from onnxfp8.state import Captured

    cap = config.capture_samples
    if not hasattr(data, "batches") or not hasattr(data, "without_first") or getattr(data, "skip", 0):
        return None
    available, head = 0, []
    for b in data.batches():
        head.append(b)
        available += batch_size(b)
        if available >= 2 * cap:
            break
    judged = min(2 * cap, available)
    half = judged // 2
    if half < 8:
        return None
    fp32 = make_session(to_model(prep.working_graph(), like=prep.proto), level="disable",
                        providers=config.providers, threads=config.threads)
    names = [o.name for o in fp32.get_outputs()]
    parts: List[Tuple[List[Any], List[Any]]] = [([], []), ([], [])]
    count = 0
    for b in head:
        k = batch_size(b)
        while k and count < 2 * half:
            f = 0 if count < half else 1
            take = min(k, (f + 1) * half - count)
            feed = take_samples(b, take) if take < k else b  # a Batch: keeps each input's batch axis
            parts[f][0].append(feed)
            parts[f][1].append(dict(zip(names, fp32.run(names, feed))))
            count += take
            if take < k:
                b, k = take_samples(b, k, take), k - take
            else:
                k = 0
    first = copy.copy(data)
    first.limit = half if data.limit is None else min(half, data.limit)
    return [(Captured(*parts[0]), data.without_first(half)), (Captured(*parts[1]), first)], 2 * half


def _unit_errors(model: onnx.ModelProto, reference, config: QuantConfig, data: Any) -> Dict[str, Tuple[Any, Any]]:
    """Per float output of ``model`` vs ``reference`` (a state.Captured), the signal and noise energy of each
    sample (``sum ref^2``, ``sum (q - ref)^2``; of each batch when the output has no batch axis to cut)."""
    import numpy as np

    sess = make_session(model, level="basic", providers=config.providers, threads=config.threads)
    names = [o.name for o in sess.get_outputs()]
    axes = output_batch_axes(model, data) or {}
    sig: Dict[str, List[Any]] = {}
    noise: Dict[str, List[Any]] = {}
    for feed, ref in zip(reference.inputs, reference.outputs):
        n = batch_size(feed)
        for name, q in zip(names, sess.run(names, feed)):
            r = ref.get(name)
            if r is None or np.asarray(r).dtype.kind != "f":
                continue
            r64, q64 = np.asarray(r, np.float64), np.asarray(q, np.float64)
            d = np.where(np.isfinite(r64), q64 - r64, 0.0)
            d = np.where(np.isfinite(d), d, 1e300)  # an output the quantized model lost: all noise
            r64 = np.where(np.isfinite(r64), r64, 0.0)
            ax = axes.get(name)
            if ax is not None and r64.ndim > ax and r64.shape[ax] == n and r64.shape == d.shape:
                r_, d_ = np.moveaxis(r64, ax, 0).reshape(n, -1), np.moveaxis(d, ax, 0).reshape(n, -1)
                sig.setdefault(name, []).extend((r_ ** 2).sum(axis=1))
                noise.setdefault(name, []).extend((d_ ** 2).sum(axis=1))
            else:
                sig.setdefault(name, []).append(float((r64 ** 2).sum()))
                noise.setdefault(name, []).append(float((d ** 2).sum()))
    return {k: (np.asarray(sig[k]), np.asarray(noise[k])) for k in sig}


def _worst_db(sig: Dict[str, Any], noise: Dict[str, Any], idx=None) -> Any:
    """The worst output's SQNR (dB) of the pooled units (``idx``: rows of resampled unit indices -> one value
    per row)."""
    import numpy as np

    worst = None
    for k in sig:
        s, n = (sig[k], noise[k]) if idx is None else (sig[k][idx].sum(axis=-1), noise[k][idx].sum(axis=-1))
        if idx is None:
            s, n = s.sum(), n.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            db = np.where(n > 0, 10 * np.log10(np.maximum(s, 1e-300) / np.where(n > 0, n, 1)), np.inf)
        worst = db if worst is None else np.minimum(worst, db)
    return worst if worst is not None else np.inf


def judge_gain(without: Sequence[Dict[str, Tuple[Any, Any]]], with_: Sequence[Dict[str, Tuple[Any, Any]]],
               resamples: int = GUARD_BOOTSTRAP, seed: int = 0) -> Dict[str, Any]:
    """The guard's measurement of one transform: per fold, the units' (samples') signal and noise energies
    without and with it (``_unit_errors``), pooled over the folds. Returns the worst output's SQNR without
    and with (dB), the gain per fold, and the paired bootstrap's GUARD_LOWER_QUANTILE quantile of the gain
    (the same resampled samples without and with)."""
    import numpy as np

    keys = sorted(set.intersection(*[set(f) for f in list(without) + list(with_)])) if without else []
    sig = {k: np.concatenate([f[k][0] for f in without]) for k in keys}
    n0 = {k: np.concatenate([f[k][1] for f in without]) for k in keys}
    n1 = {k: np.concatenate([f[k][1] for f in with_]) for k in keys}
    db0, db1 = float(_worst_db(sig, n0)), float(_worst_db(sig, n1))
    folds = []
    for a, b in zip(without, with_):
        s = {k: a[k][0] for k in keys}
        folds.append(float(_worst_db(s, {k: b[k][1] for k in keys}) - _worst_db(s, {k: a[k][1] for k in keys})))
    units = len(next(iter(sig.values()))) if sig else 0
    lower = None
    if units >= 2:
        idx = np.random.default_rng(seed).integers(0, units, (resamples, units))
        g = _worst_db(sig, n1, idx) - _worst_db(sig, n0, idx)
        g = np.where(np.isnan(g), 0.0, g)
        lower = float(np.quantile(g, GUARD_LOWER_QUANTILE))
    return {"without_db": db0, "with_db": db1, "folds": folds, "lower": lower, "units": units}


def _guarded_quantize(prep: Prepared, data: Any, config: QuantConfig, output: Optional[str], outs: Outputs,
                      progress, check_model: bool, start: float) -> QuantResult:
    """quantize() with a measured guard on the transforms (config.transform_guard).

    Two-fold cross-validation on the first calibration samples (min(2 x capture_samples, all), halved): each
    half is held out in turn with the original model's FP32 outputs as the reference, the model calibrated on
    the data without it. Per fold the model is quantized without any transform, then with the requested
    transforms added one at a time in pipeline order (equalize, smoothquant, bias_correction), each on top of
    those kept so far. A transform is kept only when, pooled over both folds (every judged sample held out
    once), the worst output's SQNR vs the reference rises by at least GUARD_MIN_GAIN_DB **and** the paired
    bootstrap's lower GUARD_LOWER_QUANTILE quantile of that gain (resampling the judged samples, the same ones
    without and with) is at least GUARD_MIN_LOWER_DB: a gain that a few samples carry is not kept. The kept
    set is then quantized on all the data: the result (with nothing kept, byte for byte what quantize gives
    without the transforms).

    Why (measured on the zoo, E4M3, 32 calibration samples, 2026-12-03): the first version held out a quarter
    of the samples (8) and judged the aggregate SQNR alone; 4 of 40 models ended worse on validation data by
    more than 0.2 dB (distilbert-fp16 -2.60, breast-cancer-mlp -0.69, efficientnet-b0 -0.59, resnet50-folded
    -0.39 dB). Held out at all matters: max calibration covers the calibration samples exactly, so on them a
    rescaled channel never clips (zoo wine-mlp in E4M3: +0.6 dB on the calibration samples, -4.3 dB on
    held-out data). With fewer than 16 samples the captured calibration samples judge, in-sample (the records
    say so). Cost: two quantizations per requested transform more (one per fold), two for the baseline, plus
    one on all the data when something is kept. Every decision is a ``transform_guard`` record in
    ``plan.transforms`` (the SQNR without and with, the gain per fold and its lower bound, the samples and
    whether held out, the layers the transform changed, kept or reverted and why)."""
    from onnxfp8.passes import config_with_transforms, requested_transforms

    wanted = requested_transforms(config)

    def trial(names, calib_data, reference=None) -> Tuple[QuantResult, PassContext]:
        cfg = config_with_transforms(config, names)
        ctx = PassContext(config=cfg, source=prep.source, progress=progress, outputs=outs)
        ctx.plan.config = cfg.to_dict()
        ctx.calib = calib_data
        res = _finish(pipeline_for(cfg), prep.working_graph(), ctx, prep, cfg, None, check_model, start,
                      require_some=True, reference=reference)
        return res, ctx

    split = _folds(prep, data, config)
    if split is not None:
        folds, samples = split
        base = [trial([], calib)[0] for _, calib in folds]
        best = base[0]
    else:
        best, base_ctx = trial([], data)
        reference = base_ctx.captured
        if not reference:
            best.report.warnings.append("transform guard: no FP32 outputs captured to measure on; transforms not tried")
            return _deliver(best, output, outs, start)
        folds, base = [(reference, data)], [best]
        samples = sum(batch_size(b) for b in reference.inputs)
    errors = [_unit_errors(r.model, ref, config, data) for r, (ref, _) in zip(base, folds)]
    held = split is not None
    where = (f"held-out calibration samples ({len(folds)} folds, each held out once)" if held
             else "calibration samples (in-sample: too few to hold out)")
    kept: List[str] = []
    decisions: List[Dict[str, Any]] = []
    notes: List[str] = []
    for t in wanted:
        runs = [trial(kept + [t], calib, ref)[0] for ref, calib in folds]
        changed = [r for res in runs for r in res.plan.transforms if r.get("pass") == t and r.get("kind") != "left_alone"]
        layers = sorted({name for r in changed for name in _record_layers(r)})
        rec: Dict[str, Any] = {"pass": "transform_guard", "kind": "decision", "transform": t,
                               "on_top_of": list(kept), "samples": samples, "held_out": held,
                               "folds": len(folds), "layers": layers}
        if not changed:
            m = judge_gain(errors, errors)
            rec.update(without_db=_db(m["without_db"]), kept=False, with_db=None, reason="changed nothing")
            notes.append(f"{t}: changed nothing")
        else:
            errs = [_unit_errors(r.model, ref, config, data) for r, (ref, _) in zip(runs, folds)]
            m = judge_gain(errors, errs)
            db0, db = m["without_db"], m["with_db"]
            gain = db - db0 if math.isfinite(db) and math.isfinite(db0) else (math.inf if db > db0 else 0.0)
            low = m["lower"] if m["lower"] is not None else gain
            rec.update(without_db=_db(db0), with_db=_db(db), fold_gains_db=[_db(g) for g in m["folds"]],
                       lower_db=_db(low))
            text = (f"worst output SQNR {db0:.2f} -> {db:.2f} dB (per fold " +
                    ", ".join(f"{g:+.2f}" for g in m["folds"]) + f"; {100 * GUARD_LOWER_QUANTILE:.0f} % bound "
                    f"{low:+.2f} dB)")
            if gain >= GUARD_MIN_GAIN_DB and low >= GUARD_MIN_LOWER_DB:
                rec.update(kept=True, reason=text)
                kept.append(t)
                base, errors = runs, errs
            else:
                need = (f"needs +{GUARD_MIN_GAIN_DB} dB" if gain < GUARD_MIN_GAIN_DB else
                        f"needs the bound >= {GUARD_MIN_LOWER_DB:+.1f} dB")
                rec.update(kept=False, reason=f"{text} ({need})")
            notes.append(f"{t}: {'kept' if rec['kept'] else 'reverted'}, {rec['reason']} ({len(layers)} layer(s))")
        decisions.append(rec)
    if held:  # the kept set, calibrated on all the data
        best, _ = trial(kept, data, folds[0][0] if kept else None)
    else:
        best = base[0]
    best.plan.transforms.extend(decisions)
    from onnxfp8.pipeline import PassRecord

    best.report.passes.append(PassRecord("transform_guard", time.perf_counter() - start, bool(kept),
                                         [f"transforms measured on {samples} {where} vs the original "
                                          f"model's FP32 outputs: kept {', '.join(kept) or 'none'}"] + notes))
    return _deliver(best, output, outs, start)


def _record_layers(rec: Dict[str, Any]) -> List[str]:
    """The layers (node names) a transform record changed."""
    out = []
    for key in ("first", "node"):
        if isinstance(rec.get(key), str):
            out.append(rec[key])
    for key in ("second", "readers"):
        out.extend(rec.get(key) or [])
    return out


def _db(v: float) -> Optional[float]:
    return round(float(v), 3) if math.isfinite(v) else (None if math.isnan(v) else float(v))


def _deliver(result: QuantResult, output: Optional[str], outs: Outputs, start: float) -> QuantResult:
    if output:
        outs.write_model(output, result.model)
        result.output = result.report.output = output
    result.report.seconds = time.perf_counter() - start
    return result


def apply_plan(model: Union[ModelLike, Prepared], plan: Union[QuantPlan, str, os.PathLike],
               config: Optional[QuantConfig] = None, output: Optional[str] = None,
               check_model: bool = True, outputs: Optional[Outputs] = None) -> QuantResult:
    """Rebuild the quantized model from a plan, without calibration data: the model ``quantize`` made the
    plan with, byte for byte, when the plan is unedited.

    ``plan``: a QuantPlan (used as is, not modified: the pipeline works on a copy) or the path of a plan
    JSON (``quantize --plan``). ``config``: the settings; default the ones the plan was made with
    (``plan.config``); only the graph-shaping ones matter (scheme, style, BatchNorm folding and
    recalibration, opset): the decisions come from the plan. ``model``: a path, a ModelProto, or a
    ``Prepared`` (``prepare(model)``) to apply many plans to one loaded model cheaply (the tuner's loop:
    calibrate once, evaluate many plans, all in memory).

    Editing a plan before applying it (see plan.py): ``plan.set_format(tensor, "e5m2")`` (scale recomputed
    from the tensor's amax), ``plan.set_scale(tensor, 0.02)``, ``plan.keep_fp32(node, "why")`` (the node reads
    FP32 values; tensors no quantized node reads are dropped). In JSON: change a tensor's ``format`` and
    ``scale``, or set a node's ``"quantized": false`` with a ``"reason"``. An edit that cannot work (an unknown
    tensor, a scale <= 0, a consumer that is not quantized) raises ConfigError naming the plan and the entry."""
    start = time.perf_counter()
    plan_source = "plan"
    if isinstance(plan, (str, os.PathLike)):
        plan_source = os.fspath(plan)
        plan = QuantPlan.load(plan_source)
    if config is None:
        config = QuantConfig.from_dict(plan.config, source=f"{plan_source} (config)") if plan.config else QuantConfig()
    # applying a plan calibrates nothing: a statistics file the plan was made with (a tuned plan names the
    # tuner's temporary one) is neither read nor written
    config = config.replace(load_stats=None, save_stats=None)
    from onnxfp8.passes import plan_pipeline
    from onnxfp8.passes.use_plan import UsePlan

    def work(prep: Prepared, graph: gs.Graph, outs: Outputs) -> QuantResult:
        ctx = PassContext(config=config, source=prep.source, plan=plan.copy(), outputs=outs)
        ctx.plan.config = config.to_dict()
        pipe = plan_pipeline(config).replace("use_plan", UsePlan(plan_source))
        return _finish(pipe, graph, ctx, prep, config, output, check_model, start)

    return _run(model, None, config, output, outputs, work)


def _finish(pipe: Pipeline, graph: gs.Graph, ctx: PassContext, prep: Prepared, config: QuantConfig,
            output: Optional[str], check_model: bool, start: float, require_some: bool = False,
            reference=None) -> QuantResult:
    """Run the pipeline, export, check, measure, save: the common end of quantize and apply_plan.
    ``require_some``: a run that quantizes no node is an error unless ``config.allow_empty``. ``reference``:
    the captured FP32 outputs the summary compares with (the transform guard's: the untransformed model's,
    since bias correction changes the FP32 function); default those this run captured."""
    source = ctx.source
    ctx.twin_of = prep.twin_of
    pipe.run(graph, ctx)
    wanted = set(config.selected_op_types) - set(config.exclude_ops)
    control_flow = [d for d in prep.control_flow if d["op_type"] in wanted]
    if require_some and not ctx.plan.quantized_nodes() and not config.allow_empty:
        raise ModelError(f"{source}: nothing to quantize: {_why_empty(ctx.plan, control_flow)}; "
                         f"--allow-empty (allow_empty=True) writes the model unchanged")
    _phase(ctx, "exporting the quantized model")
    out_model = to_model(graph, like=prep.proto)
    if prep.bfloat16 is not None:  # the quantized twin in bfloat16 again (one line, exit 2, where ONNX cannot)
        out_model = prep.bfloat16.back(out_model, check=check_model)
    if check_model:
        _phase(ctx, "checking the quantized model (onnx.checker)")
        try:
            modelio.check_model(out_model)
        except onnx.checker.ValidationError as e:
            raise ModelError(f"{source}: the quantized model fails the ONNX checker ({str(e).splitlines()[0]})") from e
    report = QuantReport(source=source, output=output, config=config.to_dict(), passes=ctx.records, plan=ctx.plan,
                         size_before=prep.size_before, size_after=model_bytes(out_model),
                         calibration=ctx.calibration, batchnorm=ctx.bn_recalibration, patterns=ctx.patterns)
    report.how_to_run = RUN_EXACTLY if config.style == "qdq" else ""
    if prep.bfloat16 is not None:
        report.measured_on = TWIN_NOTE
    if control_flow:
        report.control_flow = control_flow
        report.warnings.append(control_flow_warning(control_flow))
    report.warnings.extend(unknown_op_types(config))
    if reference is not None:
        ctx.captured = reference
    _measure(out_model, ctx, report, config)
    if report.outputs:
        report.check_defaults["try"] = what_to_try(config, has_batchnorm=any(
            n.op_type == "BatchNormalization" for n in prep.proto.graph.node))
    if output:
        _phase(ctx, f"writing {output}")
        ctx.outputs.write_model(output, out_model)
    if ctx.progress is not None and hasattr(ctx.progress, "close"):
        ctx.progress.close()  # clears the last phase line: the summary is printed next
    report.seconds = time.perf_counter() - start
    return QuantResult(out_model, ctx.plan, report, output)


def _phase(ctx: PassContext, text: str) -> None:
    """Tell the progress bar what runs now (a step without a sample count); see progress.ProgressBar.phase."""
    if ctx.progress is not None and hasattr(ctx.progress, "phase"):
        ctx.progress.phase(text)


def _measure(model: onnx.ModelProto, ctx: PassContext, report: QuantReport, config: QuantConfig) -> None:
    """Output SQNR of the quantized model vs the FP32 outputs captured during calibration, on the first
    ``config.summary_count(calibration samples)`` captured samples."""
    inputs, refs = ctx.captured.inputs, ctx.captured.outputs
    captured = sum(batch_size(f) for f in inputs)
    want = min(captured, config.summary_count((ctx.calibration.samples if ctx.calibration else 0) or captured))
    if not inputs or want <= 0:
        return
    from onnxfp8.progress import stage
    from onnxfp8.verify.measure import measure_outputs

    _phase(ctx, "measuring output error: creating the onnxruntime session")  # until the first batch is drawn
    with stage(ctx.progress, "measuring output error", want) as bar:
        m = measure_outputs(model, Samples(inputs, what="captured calibration samples"), refs, samples=want, axes=getattr(ctx.calib, "axes", {}),
                            out_axes=output_batch_axes(model, ctx.calib), providers=config.providers,
                            threads=config.threads, progress=bar)
    stats, classifiers, count = m.outputs, m.classifiers, m.samples
    report.outputs = m.to_dict()
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
