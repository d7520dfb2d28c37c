"""calibrate: run the FP32 graph in onnxruntime over the calibration data (streaming) and record the range of
every activation the plan quantizes. The default, max calibration, takes amax = max |x| over all batches (the
FP8 paper's max scaling) with the reduction done inside onnxruntime.

The method is ``config.calibration`` (max, percentile, mse, entropy), per tensor overridable with
``overrides."tensor".calibration`` (and ``.percentile``). One max pass serves every tensor; the tensors of the
histogram methods share one set of histogram passes, and each tensor's range is then read from its histogram
with its own method (mse in the tensor's own format).

Statistics cache (``config.load_stats`` / ``config.save_stats``, see calibrators/cache.py): a loaded file must
belong to this graph (and to the calibration data when data is given); tensors it lacks are calibrated.
Saving stores min/max *and* histograms of every calibrated tensor, so that the file serves any method later
(with max calibration that costs the histogram passes once)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import onnx_graphsurgeon as gs

from onnxfp8.calibrators.base import make_calibrator
from onnxfp8.calibrators.cache import (CalibrationStats, FingerprintingData, StatsCacheError, data_fingerprint,
                                      model_fingerprint)
from onnxfp8.calibrators.collector import capture_outputs, collect
from onnxfp8.calibrators.max import MaxCalibrator
from onnxfp8.errors import DataError
from onnxfp8.modelio import to_light_model, to_model
from onnxfp8.pipeline import Pass, PassContext, PassResult
from onnxfp8.validate import refuse_nonfinite
from onnxfp8.state import CalibrationInfo, Captured

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


def tensor_method(cfg, name: str) -> Tuple[str, float]:
    """(method, percentile) of one tensor: the config's, or its override's."""
    over = cfg.overrides.get(name, {})
    return str(over.get("calibration", cfg.calibration)).lower(), float(over.get("percentile", cfg.percentile))


def _calibrator(cfg, method: str, percentile: float, tensor_formats: Dict[str, str]):
    """A histogram calibrator of ``method`` in the activations' format (mse: each tensor in its override's)."""
    opts: Dict[str, Any] = {"format": cfg.activation_format}
    if method == "percentile":
        opts["percentile"] = percentile
    if method == "mse":
        opts["tensor_formats"] = tensor_formats
    return make_calibrator(method, **opts)


def _hist_calibrator(cfg, tensor_formats: Dict[str, str]):
    """The calibrator that collects the histograms: the config's method when it is a histogram method (so that
    format auto reuses it), else mse (its histograms serve every method)."""
    method = cfg.calibration if cfg.calibration != "max" else "mse"
    return _calibrator(cfg, method, cfg.percentile, tensor_formats)


class Calibrate(Pass):
    name = "calibrate"

    def ensures(self, graph: gs.Graph, ctx: PassContext) -> None:
        """Every activation the plan quantizes (without a given scale) has statistics."""
        missing = [t for t in activation_tensors(graph, ctx) if t not in ctx.stats]
        if missing:
            raise ValueError(f"no statistics for {len(missing)} activation(s), e.g. '{missing[0]}'")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        tensors = activation_tensors(graph, ctx)
        cfg = ctx.config
        if not tensors:
            return PassResult(False, ["no activation to calibrate"])
        methods = {t: tensor_method(cfg, t) for t in tensors}
        formats = {t: str(cfg.overrides[t]["format"]) for t in tensors
                   if "format" in cfg.overrides.get(t, {})}
        hist_needed = [t for t in tensors if methods[t][0] != "max"]
        arrays = None
        if cfg.load_stats or cfg.save_stats:
            model = to_model(graph.copy())  # the statistics cache fingerprints the weights too
        else:
            model, arrays = to_light_model(graph.copy())
        progress = ctx.progress
        notes: List[str] = []

        stats: Optional[CalibrationStats] = None
        data_fp = None
        if cfg.load_stats:
            stats = CalibrationStats.load(cfg.load_stats)
            stats.check_model(model_fingerprint(model))
            if ctx.calib is not None:
                data_fp = data_fingerprint(ctx.calib)
                stats.check_data(data_fp.hexdigest(), data_fp.samples)
        # format auto chooses activation formats from histograms: collect them here, with the ranges
        hist_want = tensors if (cfg.save_stats or cfg.activations_auto) else hist_needed
        todo_max = [t for t in tensors if stats is None or t not in stats.minmax]
        todo_hist = [t for t in hist_want if stats is None or t not in stats.histograms]
        hist_cal = _hist_calibrator(cfg, formats)

        res = None
        data = ctx.calib
        if todo_max or todo_hist:
            if data is None:
                if stats is not None:
                    raise StatsCacheError(f"{cfg.load_stats}: the statistics lack {len(set(todo_max) | set(todo_hist))} "
                                    f"of the {len(tensors)} tensor(s) to calibrate (e.g. '{(todo_max or todo_hist)[0]}'): "
                                    f"pass --calib DIR to calibrate them")
                raise DataError(f"{ctx.source}: calibration data is needed for {len(tensors)} activation(s): "
                                f"pass --calib DIR")
            if cfg.save_stats and data_fp is None:
                data = FingerprintingData(data)
            if progress is not None and hasattr(progress, "begin"):
                from onnxfp8.progress import count_samples

                progress.begin("calibrating", count_samples(ctx.calib))
            cal = hist_cal if todo_hist else MaxCalibrator()
            try:
                res = collect(model, list(dict.fromkeys(todo_max + todo_hist)), data, cal,
                              providers=cfg.providers, threads=cfg.threads, max_memory_mb=cfg.max_memory_mb,
                              capture=cfg.capture_samples, level="all", progress=progress,
                              known_ranges=stats.max_calibrator() if stats is not None else None,
                              hist_tensors=todo_hist, arrays=arrays)
            finally:
                if progress is not None and hasattr(progress, "close"):
                    progress.close()
            if res.samples == 0:
                raise DataError(f"{ctx.source}: the calibration data holds no samples")
            refuse_nonfinite(res.nonfinite, model, ctx.calib, ctx.source, arrays, cfg.providers, cfg.threads)
            max_cal = res.max_calibrator
        else:
            max_cal = stats.max_calibrator(tensors)
            if data is not None and cfg.capture_samples > 0:
                res = capture_outputs(model, data, cfg.capture_samples, providers=cfg.providers,
                                      threads=cfg.threads, level="all", arrays=arrays)
                refuse_nonfinite(res.nonfinite, model, data, ctx.source, arrays, cfg.providers, cfg.threads)
        if stats is not None:
            stats.load_histograms(hist_cal, [t for t in hist_want if t not in todo_hist])

        # each tensor's range with its own method
        ranges = max_cal.result()
        minmax = max_cal.minmax()
        hists = hist_cal.histograms()
        by_method: Dict[Tuple[str, float], Any] = {}
        for t in hist_needed:
            if t not in hists:  # never finite on the data: range 0 (the scale code makes that safe)
                ranges[t] = 0.0
                continue
            method, pct = methods[t]
            key = (method, pct if method == "percentile" else 0.0)
            cal = by_method.get(key)
            if cal is None:
                cal = by_method[key] = _calibrator(cfg, method, pct, formats)
            cal.load_state({"kind": "histogram", "method": method, "tensors": {t: hists[t].to_dict()}})
            ranges[t] = cal.result()[t]
        for t in tensors:
            lo, hi = minmax.get(t, (0.0, 0.0))
            ctx.stats[t] = {"amax": float(ranges.get(t, 0.0)), "min": float(lo), "max": float(hi),
                            "method": methods[t][0]}
        if hists or hist_want:
            ctx.histograms = hist_cal  # format auto reads these histograms instead of collecting again

        samples = res.samples if res is not None and (todo_max or todo_hist) else (stats.samples if stats else 0)
        if res is not None:
            ctx.captured = Captured(res.captured_inputs or [], res.captured_outputs or [])
        info = CalibrationInfo(samples=samples, batches=res.batches if res is not None else 0,
                               passes=res.passes if res is not None and (todo_max or todo_hist) else 0,
                               seconds=res.seconds if res is not None else 0.0)
        if stats is not None:
            info.loaded_stats = cfg.load_stats
            info.cached_tensors = len([t for t in tensors if t not in todo_max])
        if cfg.save_stats:
            out = stats if stats is not None else CalibrationStats(model_fingerprint(model), source=ctx.source)
            if data_fp is None and isinstance(data, FingerprintingData) and data.fingerprint is not None:
                data_fp = data.fingerprint
            if data_fp is None and ctx.calib is not None:
                data_fp = data_fingerprint(ctx.calib)
            if data_fp is not None:
                out.data_sha256, out.samples = data_fp.hexdigest(), data_fp.samples
            out.add_max(max_cal, tensors)
            out.add_histograms(hist_cal, tensors)
            out.source = ctx.source
            staged = ctx.outputs
            if staged is not None and cfg.save_stats in staged.paths:  # renamed with the run's other files
                import json

                staged.write_text(cfg.save_stats, json.dumps(out.to_dict(), separators=(",", ":")))
            else:
                out.save(cfg.save_stats)
            info.saved_stats = cfg.save_stats
        ctx.calibration = info

        counts: Dict[str, int] = {}
        for t in tensors:
            counts[methods[t][0]] = counts.get(methods[t][0], 0) + 1
        what = " + ".join(f"{m} ({k})" for m, k in counts.items()) if len(counts) > 1 else next(iter(counts))
        if todo_max or todo_hist:
            notes.append(f"{what} calibration of {len(tensors)} tensor(s) on {res.samples} sample(s) in "
                         f"{res.batches} batch(es), {res.passes} pass(es), {res.seconds:.2f} s")
        else:
            notes.append(f"{what} calibration of {len(tensors)} tensor(s) from {cfg.load_stats} "
                         f"({stats.samples} sample(s)), no calibration pass")
        if stats is not None and (todo_max or todo_hist):
            notes.append(f"statistics of {len(tensors) - len(todo_max)} tensor(s) from {cfg.load_stats}, "
                         f"{len(todo_max)} calibrated now")
        if cfg.save_stats:
            notes.append(f"statistics (min/max and histograms of {len(tensors)} tensor(s)) saved to {cfg.save_stats}")
        return PassResult(False, notes)
