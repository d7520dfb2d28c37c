"""Calibration as one object: plan the tensors and methods, stream the data once or twice, return statistics.

``Calibration(config, data, store=..., progress=..., source=...)`` is what the calibrate pass (and
calibrate_dynamic, remeasure_ranges, BatchNorm recalibration) call; the passes only hand its result on.

* ``plan(tensors)`` -> CalibrationPlan: each tensor's method (``config.calibration``, or its override's
  ``calibration`` / ``percentile``), the formats mse measures in (overrides), and which tensors get
  histograms: the histogram methods', and every tensor's when format auto chooses activation formats from
  them or when the statistics are saved (a saved file serves any method later);
* ``ranges(graph, tensors)`` -> CalibrationResult: the statistics (``stats``: tensor -> amax, min, max,
  method; ``histograms``: the HistogramCalibrator format auto reads), the captured samples and a
  CalibrationInfo. Steps, each its own object: the **store** (cache.StatsStore: read what a statistics file
  holds, fingerprint the data, write the file), the **collector** (collector.collect: one max pass with
  in-graph reductions, then the histogram passes, streaming), the **output capture** (capture.OutputCapture,
  an observer of the collector's first pass; capture.capture_outputs when no pass runs) and the
  **progress display** (progress.stage / ProgressObserver). Then each tensor's range is read with its own
  method from the histograms.
* ``max_ranges(model, tensors, level)`` -> {tensor: (min, max)}: a plain max pass (remeasure_ranges
  re-measures the quantized model's ranges with it);
* ``moments(...)`` (calibrators/moments.py): BatchNorm moment statistics, pooled exactly.

Memory does not grow with the number of samples: one batch is held at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from onnxfp8.calibrators.base import make_calibrator
from onnxfp8.calibrators.cache import StatsCacheError, StatsStore
from onnxfp8.calibrators.capture import OutputCapture, capture_outputs
from onnxfp8.calibrators.collector import collect
from onnxfp8.calibrators.max import MaxCalibrator
from onnxfp8.errors import DataError
from onnxfp8.state import CalibrationInfo, Captured


def tensor_method(cfg: Any, name: str) -> Tuple[str, float]:
    """(method, percentile) of one tensor: the config's, or its override's."""
    over = cfg.overrides.get(name, {})
    return str(over.get("calibration", cfg.calibration)).lower(), float(over.get("percentile", cfg.percentile))


def method_calibrator(cfg: Any, method: str, percentile: float, tensor_formats: Dict[str, str]):
    """A histogram calibrator of ``method`` in the activations' format (mse: each tensor in its override's)."""
    opts: Dict[str, Any] = {"format": cfg.activation_format}
    if method == "percentile":
        opts["percentile"] = percentile
    if method == "mse":
        opts["tensor_formats"] = tensor_formats
    return make_calibrator(method, **opts)


@dataclass
class CalibrationPlan:
    """What one calibration measures: the tensors (graph order), each one's (method, percentile), the mse
    formats of overridden tensors and the tensors whose histograms are collected."""

    tensors: List[str]
    methods: Dict[str, Tuple[str, float]]
    formats: Dict[str, str]
    histograms: List[str]

    @property
    def by_histogram(self) -> List[str]:
        """Tensors whose range a histogram method reads (all but max)."""
        return [t for t in self.tensors if self.methods[t][0] != "max"]

    def counts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for t in self.tensors:
            out[self.methods[t][0]] = out.get(self.methods[t][0], 0) + 1
        return out


@dataclass
class CalibrationResult:
    """Statistics per tensor (``stats``: amax, min, max, method), the histograms (a HistogramCalibrator, or
    None), the captured samples, what was done (``info``) and prose notes for the pass record."""

    stats: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    histograms: Any = None
    captured: Captured = field(default_factory=Captured)
    info: CalibrationInfo = field(default_factory=CalibrationInfo)
    notes: List[str] = field(default_factory=list)


class Calibration:
    """One calibration of one model on one DataSource (see the module docstring)."""

    def __init__(self, config: Any, data: Any = None, *, store: Optional[StatsStore] = None, progress: Any = None,
                 source: str = "model"):
        self.config, self.data, self.store, self.progress, self.source = config, data, store, progress, source

    # -- planning
    def plan(self, tensors: Sequence[str]) -> CalibrationPlan:
        cfg = self.config
        tensors = list(dict.fromkeys(tensors))
        methods = {t: tensor_method(cfg, t) for t in tensors}
        formats = {t: str(cfg.overrides[t]["format"]) for t in tensors if "format" in cfg.overrides.get(t, {})}
        want_all = (self.store is not None and self.store.save) or cfg.activations_auto
        hist = tensors if want_all else [t for t in tensors if methods[t][0] != "max"]
        return CalibrationPlan(tensors, methods, formats, list(hist))

    def _histogram_calibrator(self, plan: CalibrationPlan):
        """The calibrator that collects the histograms: the config's method when it is a histogram method (so
        that format auto reuses it), else mse (its histograms serve every method)."""
        cfg = self.config
        method = cfg.calibration if cfg.calibration != "max" else "mse"
        return method_calibrator(cfg, method, cfg.percentile, plan.formats)

    # -- the ranges of activations (the calibrate pass)
    def ranges(self, graph: Any, tensors: Sequence[str]) -> CalibrationResult:
        """Statistics of ``tensors`` of the FP32 ``graph`` (a graphsurgeon Graph, not modified)."""
        from onnxfp8.modelio import to_light_model, to_model
        from onnxfp8.validate import refuse_nonfinite

        cfg, data, store = self.config, self.data, self.store
        plan = self.plan(tensors)
        tensors = plan.tensors
        arrays = None
        if store is not None:
            model = to_model(graph.copy())  # the statistics cache fingerprints the weights too
        else:
            model, arrays = to_light_model(graph.copy())
        loaded = store.read(model, data) if store is not None else None
        todo_max = [t for t in tensors if loaded is None or t not in loaded.minmax]
        todo_hist = [t for t in plan.histograms if loaded is None or t not in loaded.histograms]
        hist_cal = self._histogram_calibrator(plan)
        capture = OutputCapture.for_model(cfg.capture_samples, model, data) if data is not None else None
        res = None
        streamed = data
        collected = bool(todo_max or todo_hist)
        if collected:
            if data is None:
                if loaded is not None:
                    raise StatsCacheError(f"{cfg.load_stats}: the statistics lack {len(set(todo_max) | set(todo_hist))} "
                                          f"of the {len(tensors)} tensor(s) to calibrate (e.g. "
                                          f"'{(todo_max or todo_hist)[0]}'): pass --calib DIR to calibrate them")
                raise DataError(f"{self.source}: calibration data is needed for {len(tensors)} activation(s): "
                                f"pass --calib DIR")
            streamed = store.stream(data) if store is not None else data
            from onnxfp8.progress import count_samples, stage

            with stage(self.progress, "calibrating", lambda: count_samples(data)) as bar:
                res = collect(model, list(dict.fromkeys(todo_max + todo_hist)), streamed,
                              hist_cal if todo_hist else MaxCalibrator(), providers=cfg.providers,
                              threads=cfg.threads, max_memory_mb=cfg.max_memory_mb, level="all", progress=bar,
                              observers=[capture], known_ranges=loaded.max_calibrator() if loaded else None,
                              hist_tensors=todo_hist, arrays=arrays)
            if res.samples == 0:
                raise DataError(f"{self.source}: the calibration data holds no samples")
            refuse_nonfinite(res.nonfinite, model, data, self.source, arrays, cfg.providers, cfg.threads)
            max_cal = res.max_calibrator
            captured = capture.captured
        else:
            max_cal = loaded.max_calibrator(tensors)
            captured = Captured()
            if data is not None and cfg.capture_samples > 0:
                res, captured = capture_outputs(model, data, cfg.capture_samples, providers=cfg.providers,
                                                threads=cfg.threads, level="all", arrays=arrays)
                refuse_nonfinite(res.nonfinite, model, data, self.source, arrays, cfg.providers, cfg.threads)
        if loaded is not None:
            loaded.load_histograms(hist_cal, [t for t in plan.histograms if t not in todo_hist])

        out = CalibrationResult(captured=captured)
        hists = hist_cal.histograms()
        out.stats = self._statistics(plan, max_cal, hists)
        if hists or plan.histograms:
            out.histograms = hist_cal  # format auto reads these histograms instead of collecting again
        samples = res.samples if collected else (loaded.samples if loaded else 0)
        info = CalibrationInfo(samples=samples, batches=res.batches if res is not None else 0,
                               passes=res.passes if collected else 0,
                               seconds=res.seconds if res is not None else 0.0)
        if loaded is not None:
            info.loaded_stats = cfg.load_stats
            info.cached_tensors = len([t for t in tensors if t not in todo_max])
        if store is not None and store.save:
            info.saved_stats = store.write(model, max_cal, hist_cal, tensors, data, streamed)
        out.info = info
        out.notes = self._notes(plan, res, loaded, todo_max, collected)
        return out

    def _statistics(self, plan: CalibrationPlan, max_cal: MaxCalibrator, hists: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
        """Each tensor's range with its own method: max from the max statistics, the others from the histograms
        (one calibrator per (method, percentile))."""
        ranges = max_cal.result()
        minmax = max_cal.minmax()
        by_method: Dict[Tuple[str, float], Any] = {}
        for t in plan.by_histogram:
            if t not in hists:  # never finite on the data: range 0 (the scale code makes that safe)
                ranges[t] = 0.0
                continue
            method, pct = plan.methods[t]
            key = (method, pct if method == "percentile" else 0.0)
            cal = by_method.get(key)
            if cal is None:
                cal = by_method[key] = method_calibrator(self.config, method, pct, plan.formats)
            cal.load_state({"kind": "histogram", "method": method, "tensors": {t: hists[t].to_dict()}})
            ranges[t] = cal.result()[t]
        out = {}
        for t in plan.tensors:
            lo, hi = minmax.get(t, (0.0, 0.0))
            out[t] = {"amax": float(ranges.get(t, 0.0)), "min": float(lo), "max": float(hi),
                      "method": plan.methods[t][0]}
        return out

    def _notes(self, plan: CalibrationPlan, res: Any, loaded: Any, todo_max: List[str], collected: bool) -> List[str]:
        cfg = self.config
        counts = plan.counts()
        what = " + ".join(f"{m} ({k})" for m, k in counts.items()) if len(counts) > 1 else next(iter(counts))
        n = len(plan.tensors)
        notes = []
        if collected:
            notes.append(f"{what} calibration of {n} tensor(s) on {res.samples} sample(s) in "
                         f"{res.batches} batch(es), {res.passes} pass(es), {res.seconds:.2f} s")
        else:
            notes.append(f"{what} calibration of {n} tensor(s) from {cfg.load_stats} "
                         f"({loaded.samples} sample(s)), no calibration pass")
        if loaded is not None and collected:
            notes.append(f"statistics of {n - len(todo_max)} tensor(s) from {cfg.load_stats}, "
                         f"{len(todo_max)} calibrated now")
        if self.store is not None and self.store.save:
            notes.append(f"statistics (min/max and histograms of {n} tensor(s)) saved to {cfg.save_stats}")
        return notes

    # -- no statistics, only the captured samples (dynamic quantization)
    def capture(self, graph: Any) -> CalibrationResult:
        """One FP32 pass over the data that captures the first samples' inputs and outputs and counts the
        samples (dynamic quantization: no activation is calibrated)."""
        from onnxfp8.modelio import to_model
        from onnxfp8.validate import refuse_nonfinite

        cfg = self.config
        model = to_model(graph.copy())
        capture = OutputCapture.for_model(cfg.capture_samples, model, self.data)
        res = collect(model, [], self.data, MaxCalibrator(), providers=cfg.providers, threads=cfg.threads,
                      max_memory_mb=cfg.max_memory_mb, level="all", progress=self.progress, observers=[capture])
        refuse_nonfinite(res.nonfinite, model, self.data, self.source, None, cfg.providers, cfg.threads)
        info = CalibrationInfo(samples=res.samples, batches=res.batches, passes=res.passes, seconds=res.seconds,
                               dynamic=True)
        return CalibrationResult(captured=capture.captured, info=info)

    # -- BatchNorm moments (recalibrate_batchnorm)
    def moments(self, models: Sequence[Any], channels: Dict[str, int], freed: bool = False):
        """The pooled per-channel moments of the BNs named in ``channels`` (name -> channel count) in each of
        the training-mode working copies ``models`` (moments.training_mode_model), over the data, one run per
        model and batch: a moments.MomentsResult."""
        from onnxfp8.calibrators.moments import pooled_moments

        cfg = self.config
        return pooled_moments(models, channels, self.data, providers=cfg.providers, threads=cfg.threads,
                              source=self.source, freed=freed)

    # -- a plain max pass (remeasure_ranges: the quantized model's ranges)
    def max_ranges(self, model: Any, tensors: Sequence[str], level: str = "basic") -> Dict[str, Tuple[float, float]]:
        """(min, max) of ``tensors`` of ``model`` (an ONNX model) over the data, one max pass."""
        cfg = self.config
        res = collect(model, list(tensors), self.data, MaxCalibrator(), providers=cfg.providers, threads=cfg.threads,
                      max_memory_mb=cfg.max_memory_mb, level=level)
        return res.max_calibrator.minmax()

    # -- per-channel statistics (equalize, bias correction, smoothquant)
    def channel_stats(self, model: Any, requests: Dict[str, Any], *, arrays: Optional[Dict[str, Any]] = None,
                      rank: Optional[Dict[str, int]] = None, level: str = "all") -> Dict[str, Dict[str, Any]]:
        """Per-channel statistics of ``model``'s tensors named in ``requests`` (tensor -> collector.ChannelRequest)
        over the data in one pass, reduced inside onnxruntime (collector.channel_stats)."""
        from onnxfp8.calibrators.collector import channel_stats

        cfg = self.config
        return channel_stats(model, requests, self.data, providers=cfg.providers, threads=cfg.threads, level=level,
                             arrays=arrays, rank=rank)

