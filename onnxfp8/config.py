"""QuantConfig: every decision a user can make, as a frozen dataclass loadable from TOML/JSON recipes.

Unknown keys are rejected by name. Per-tensor overrides live in ``overrides`` (tensor name -> dict of
format/scale/axis/calibration), applied when the plan is built.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional, Tuple

from onnxfp8.errors import ConfigError

STYLES = ("qdq", "emulate")
SCHEMES = ("standard", "extended")
STANDARD_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather")
# The extended scheme (FP8 paper, sec. 4): also normalisations, residual Add / Mul, MatMul between activations,
# Softmax inputs, pooling and Resize; Concat / MaxPool / Reshape / Transpose... carry quantized tensors through
# (passes/passthrough.py).
EXTENDED_OPS = STANDARD_OPS + ("LayerNormalization", "BatchNormalization", "InstanceNormalization", "Add", "Mul",
                               "Softmax", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "Resize",
                               "Relu", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Identity")
AUTO = "auto"
# format auto's default candidates: formats a runtime executes (onnxruntime runs E4M3, E5M2 and INT8 Q/DQ; TensorRT
# E4M3 and INT8). E3M4 has no ONNX type (always emulated): opt-in with --formats e4m3,e3m4,...
AUTO_CANDIDATES = ("e4m3", "e5m2", "int8")
# every format onnxfp8 quantizes to (formats.FORMATS): what sweep and sensitivity measure by default (they measure,
# they do not ship, so E3M4 is in); -f auto and the tuner pick from AUTO_CANDIDATES (what they choose is deployed)
ALL_FORMATS = ("e4m3", "e5m2", "e3m4", "int8")
SUMMARY_MIN, SUMMARY_MAX = 8, 64  # the summary's sample count when summary_samples is None (auto)
GRANULARITIES = ("tensor", "token")
LEVELS = ("disable", "basic", "extended", "all")
BN_MODES = ("replace", "shift")
CALIBRATION_METHODS = ("max", "percentile", "mse", "entropy")
TARGETS = ("tensorrt",)
# what a per-tensor override (``[overrides."tensor"]`` in a recipe) may set; anything else is rejected by name
OVERRIDE_KEYS = ("format", "scale", "amax", "axis", "calibration", "percentile")


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize, to which format, and how.

    format: the format of weights and activations (e4m3, e5m2, e3m4, int8); ``weights_format`` /
    ``activations_format`` override it by role.
    style: ``qdq`` (QuantizeLinear/DequantizeLinear, the form FP8 runtimes consume) or ``emulate``
    (Cast-based fake quantization that computes the same function at every onnxruntime optimization level).
    E3M4 has no ONNX type and is always emulated.
    """

    format: str = "e4m3"
    weights_format: Optional[str] = None
    activations_format: Optional[str] = None
    style: str = "qdq"
    scheme: str = "standard"
    op_types: Optional[Tuple[str, ...]] = None  # None: the scheme's operators
    exclude_ops: Tuple[str, ...] = ()
    include_nodes: Tuple[str, ...] = ()  # globs or /regex/; when given, only matching nodes are quantized
    exclude_nodes: Tuple[str, ...] = ()
    keep_first_last: bool = False
    per_channel: bool = True
    fold_batchnorm: bool = True
    calibration: str = "max"
    percentile: float = 99.99
    calib_samples: Optional[int] = None
    batch_size: int = 16
    # post-quantization output SQNR vs FP32 on the first calibration samples; None (auto): a sixteenth of the
    # calibration samples, at least 8 and at most 64 (the exact quantized run costs ~2.5 FP32 samples each)
    summary_samples: Optional[int] = None
    providers: Tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int = 0
    max_memory_mb: int = 2048
    # statistics cache (calibrators/cache.py): write min/max + histograms of every calibrated tensor here /
    # read them instead of calibrating (refused when the file belongs to another graph or data)
    save_stats: Optional[str] = None
    load_stats: Optional[str] = None
    opset: int = 19
    target: Optional[str] = None  # "tensorrt": only placements TensorRT fuses into FP8 kernels (rules.TensorRTRule)
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # format "auto" (for a role: weights_format / activations_format "auto"): per tensor, the candidate in
    # ``formats`` with the least quantization error on the calibration statistics (passes/assign_formats.py)
    formats: Tuple[str, ...] = AUTO_CANDIDATES
    # dynamic quantization: activation scales computed in the graph at run time (ReduceMax(Abs(x)) / max),
    # per tensor or, with granularity "token", per row of MatMul/Gemm inputs; no activation calibration
    dynamic: bool = False
    dynamic_granularity: str = "tensor"
    # BatchNorm recalibration (passes/recalibrate_batchnorm.py): quantize with BN unfolded, re-estimate its
    # statistics from quantized upstream values, then fold it and re-quantize the folded weights.
    bn_recalibrate: bool = False
    bn_calib: Optional[str] = None  # data for it (folder/file); None: the calibration data
    bn_samples: Optional[int] = 4096  # at most this many samples (None: all); augmentation may repeat the data
    augment: Tuple[str, ...] = ()  # flip, crop, jitter (NCHW image inputs, BN recalibration data)
    augment_seed: int = 0
    bn_ranges: bool = False  # after folding, re-measure activation ranges on the quantized model (max)
    bn_mode: str = "shift"  # shift: old statistics + the shift quantization causes; replace: the quantized statistics
    bn_guard: bool = True  # keep the stored statistics when recalibration is worse on held-out samples
    allow_empty: bool = False  # a run that quantizes no node is an error (exit 2) unless this is set
    # function-preserving FP32 rewrites before quantization (passes/equalize.py, passes/smoothquant.py)
    equalize: bool = False  # cross-layer equalization (+ bias absorption with data) of Conv/Gemm/MatMul pairs
    bias_correction: Optional[bool] = None  # correct biases for the weights' expected quantization error (None: with equalize)
    # SmoothQuant of MatMul/Gemm inputs: None off, "auto" alpha per layer from the data, or alpha in [0, 1]
    smoothquant: Optional[Any] = None
    # keep each transform only where it measurably lowers the output error: the model is quantized without the
    # transforms, then with them added one at a time (pipeline order), each kept when the worst output's SQNR
    # vs FP32 on held-out calibration samples (two folds) rises by at least GUARD_MIN_GAIN_DB with a paired
    # bootstrap bound >= GUARD_MIN_LOWER_DB (quantize.py)
    transform_guard: bool = True

    def __post_init__(self) -> None:
        from onnxfp8.formats import get_format

        if isinstance(self.formats, str):
            object.__setattr__(self, "formats", tuple(f.strip() for f in self.formats.split(",") if f.strip()))
        try:
            object.__setattr__(self, "formats", tuple(dict.fromkeys(get_format(f).name for f in self.formats)))
        except (ValueError, TypeError, AttributeError) as e:
            raise ConfigError(f"formats: {e}") from None
        if not self.formats:
            raise ConfigError("formats: the candidate list for format auto is empty")
        if self.dynamic_granularity not in GRANULARITIES:
            raise ConfigError(f"dynamic_granularity: unknown granularity '{self.dynamic_granularity}'; "
                              f"choose one of {', '.join(GRANULARITIES)}")
        for name in ("format", "weights_format", "activations_format"):
            value = getattr(self, name)
            if isinstance(value, str) and value.strip().lower() == AUTO:
                object.__setattr__(self, name, AUTO)
            elif value is not None:
                try:
                    object.__setattr__(self, name, get_format(value).name)
                except ValueError as e:
                    raise ConfigError(f"{name}: {e}") from None
        if self.dynamic and (self.activations_format or self.format) == AUTO:
            raise ConfigError("format auto for activations needs calibration statistics, which dynamic quantization "
                              "does not collect: give activations_format (--activations-format) with dynamic")
        if self.dynamic and (self.save_stats or self.load_stats):
            raise ConfigError(f"{'save_stats' if self.save_stats else 'load_stats'}: dynamic quantization calibrates no "
                              f"activation, so there are no statistics to save or load")
        if self.style not in STYLES:
            raise ConfigError(f"style: unknown style '{self.style}'; choose one of {', '.join(STYLES)}")
        if self.scheme not in SCHEMES:
            raise ConfigError(f"scheme: unknown scheme '{self.scheme}'; choose one of {', '.join(SCHEMES)}")
        _check_types(self)
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0 (0: all cores), got {self.threads}")
        if self.max_memory_mb < 1:
            raise ConfigError(f"max_memory_mb must be >= 1, got {self.max_memory_mb}")
        if self.dynamic and self.calibration != "max":
            raise ConfigError(f"calibration {self.calibration}: dynamic quantization calibrates no activation "
                              f"(scales are computed at run time); drop calibration or dynamic")
        if self.dynamic_granularity != "tensor" and not self.dynamic:
            raise ConfigError(f"dynamic_granularity {self.dynamic_granularity} applies to dynamic quantization only; "
                              f"it needs dynamic (--dynamic)")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.calib_samples is not None and self.calib_samples < 1:
            raise ConfigError(f"calib_samples must be >= 1, got {self.calib_samples}")
        if not 0 < self.percentile <= 100:
            raise ConfigError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.calibration not in CALIBRATION_METHODS:
            raise ConfigError(f"calibration: unknown method '{self.calibration}'; choose one of "
                              f"{', '.join(CALIBRATION_METHODS)}")
        check_overrides(self.overrides)
        if self.bn_mode not in BN_MODES:
            raise ConfigError(f"bn_mode: unknown mode '{self.bn_mode}'; choose one of {', '.join(BN_MODES)}")
        if self.summary_samples is not None and self.summary_samples < 0:
            raise ConfigError(f"summary_samples must be >= 0, got {self.summary_samples}")
        if self.bn_samples is not None and self.bn_samples < 1:
            raise ConfigError(f"bn_samples must be >= 1, got {self.bn_samples}")
        if isinstance(self.augment, str):
            object.__setattr__(self, "augment", tuple(a.strip() for a in self.augment.split(",") if a.strip()))
        else:
            object.__setattr__(self, "augment", tuple(self.augment))
        from onnxfp8.calibrators.augment import AUGMENTATIONS
        bad = [a for a in self.augment if a not in AUGMENTATIONS]
        if bad:
            raise ConfigError(f"augment: unknown augmentation '{bad[0]}'; choose from {', '.join(AUGMENTATIONS)}")
        if self.augment and not self.bn_recalibrate:
            raise ConfigError("augment: augmentation applies to the BatchNorm recalibration data; "
                              "it needs bn_recalibrate (--bn-recalibrate)")
        if self.bn_ranges and self.bn_recalibrate:  # remeasure_ranges: max ranges of the folded model
            if not self.fold_batchnorm:
                raise ConfigError("bn_ranges: re-measuring activation ranges after BatchNorm recalibration runs on "
                                  "the folded model; it needs fold_batchnorm (drop --no-fold-bn or --bn-ranges)")
            if self.calibration != "max":
                raise ConfigError(f"bn_ranges: re-measuring activation ranges after BatchNorm recalibration supports "
                                  f"max calibration, not {self.calibration}; drop --bn-ranges or --calibration")
        if self.target is not None and self.target not in TARGETS:
            raise ConfigError(f"target: unknown target '{self.target}'; choose one of {', '.join(TARGETS)}")
        if self.target == "tensorrt":  # what TensorRT builds FP8/INT8 kernels from (see onnxfp8 lint)
            for role in ("weights_format", "activations_format"):
                f = getattr(self, role) or self.format
                bad = [c for c in (self.formats if f == AUTO else (f,)) if c not in ("e4m3", "int8")]
                if bad:
                    raise ConfigError(f"target tensorrt: {role.split('_')[0]} format {bad[0]} is not a TensorRT "
                                      f"quantized type (FLOAT8E4M3FN or INT8)"
                                      + ("; with format auto give --formats e4m3,int8" if f == AUTO else ""))
            used = {c for f in (self.weights_format or self.format, self.activations_format or self.format)
                    for c in (self.formats if f == AUTO else (f,))}
            if len(used) > 1:
                raise ConfigError("target tensorrt: a layer's input and weight must share one type, but this "
                                  f"configuration can give it {' and '.join(sorted(used))}; choose one format")
            for tensor, over in self.overrides.items():
                f = over.get("format") if isinstance(over, Mapping) else None
                if f is not None and str(f).lower() not in ("e4m3", "int8"):
                    raise ConfigError(f"target tensorrt: overrides.{tensor}.format {f} is not a TensorRT quantized "
                                      f"type (FLOAT8E4M3FN or INT8)")
            if self.style != "qdq":
                raise ConfigError("target tensorrt: style emulate is not Q/DQ; TensorRT needs style qdq")
            if self.dynamic:
                raise ConfigError("target tensorrt: dynamic scales are computed in the graph; TensorRT fuses Q/DQ "
                                  "only with constant scales")
            if self.scheme == "extended":  # lint --target tensorrt would report [half-quantized] / [unfused-dq]
                raise ConfigError("target tensorrt: scheme extended quantizes LayerNorm, Softmax, attention "
                                  "MatMuls... whose Q/DQ TensorRT does not fuse; use scheme standard (the "
                                  "target picks the inputs of Conv/Gemm/MatMul and residual Adds)")
        if isinstance(self.smoothquant, bool) and self.smoothquant:
            object.__setattr__(self, "smoothquant", AUTO)
        elif self.smoothquant is False:
            object.__setattr__(self, "smoothquant", None)
        elif isinstance(self.smoothquant, str):
            v = self.smoothquant.strip().lower()
            if v == AUTO:
                object.__setattr__(self, "smoothquant", AUTO)
            elif v in ("off", "none", "false"):
                object.__setattr__(self, "smoothquant", None)
            else:
                try:
                    object.__setattr__(self, "smoothquant", float(v))
                except ValueError:
                    raise ConfigError(f"smoothquant: expected alpha in [0, 1] or 'auto', got '{self.smoothquant}'") from None
        if self.smoothquant is not None and self.smoothquant != AUTO:
            a = self.smoothquant
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= float(a) <= 1.0:
                raise ConfigError(f"smoothquant: alpha must be in [0, 1] (or 'auto'), got {a!r}")
            object.__setattr__(self, "smoothquant", float(a))
        if self.bias_correction and self.bn_recalibrate:
            raise ConfigError("bias_correction: BatchNorm recalibration re-quantizes the folded weights after "
                              "quantization, so their error is not known before; drop one of them")
        if self.opset < 19:
            raise ConfigError(f"opset must be >= 19 (FP8 QuantizeLinear needs it), got {self.opset}")
        for name in ("op_types", "exclude_ops", "include_nodes", "exclude_nodes", "providers"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif value is not None:
                object.__setattr__(self, name, tuple(value))
        import re

        from onnxfp8.rules import compile_pattern

        for name in ("include_nodes", "exclude_nodes"):
            for pattern in getattr(self, name):
                try:
                    compile_pattern(pattern)
                except re.error as e:
                    raise ConfigError(f"{name}: '{pattern}' is not a valid regular expression ({e})") from None

    def check_inputs(self, specs: Any, source: str = "model") -> None:
        """The option checks that need the model's inputs (``specs``: input name -> calibrators.data.InputSpec),
        run once by quantize() before any work: --augment needs NCHW float image inputs."""
        if self.bn_recalibrate and self.augment:
            from onnxfp8.calibrators.augment import check_image_inputs

            check_image_inputs(specs, self.augment, source)

    # -- derived ------------------------------------------------------------------------------------
    @property
    def weights_auto(self) -> bool:
        """True when weight formats are chosen per tensor from the data (format auto)."""
        return (self.weights_format or self.format) == AUTO

    @property
    def activations_auto(self) -> bool:
        return (self.activations_format or self.format) == AUTO

    @property
    def weight_format(self) -> str:
        """The weights' format; with format auto the first candidate (the fallback and calibration format)."""
        f = self.weights_format or self.format
        return self.formats[0] if f == AUTO else f

    @property
    def activation_format(self) -> str:
        f = self.activations_format or self.format
        return self.formats[0] if f == AUTO else f

    @property
    def capture_samples(self) -> int:
        """Calibration samples whose inputs and FP32 outputs are kept: the summary's (auto: up to 64) and the
        BatchNorm recalibration guard's evaluation samples."""
        return SUMMARY_MAX if self.summary_samples is None else self.summary_samples

    def summary_count(self, calibration_samples: int) -> int:
        """Samples the summary runs through the quantized model: ``summary_samples``, or (auto) a sixteenth
        of the calibration samples within [SUMMARY_MIN, SUMMARY_MAX]. The quantized model runs at
        onnxruntime's exact level, where FP8 QuantizeLinear + DequantizeLinear cost ~8 ns per element (INT8:
        ~0.8 ns), so each sample costs ~2.5 FP32 samples (ResNet-50, BERT-base): a sixteenth keeps the summary
        at ~0.15x of the calibration pass."""
        if self.summary_samples is not None:
            return self.summary_samples
        return max(SUMMARY_MIN, min(SUMMARY_MAX, int(calibration_samples) // 16))

    @property
    def selected_op_types(self) -> Tuple[str, ...]:
        if self.op_types is not None:
            return self.op_types
        return EXTENDED_OPS if self.scheme == "extended" else STANDARD_OPS

    def replace(self, **changes: Any) -> "QuantConfig":
        return dataclasses.replace(self, **changes)

    # -- (de)serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        d["overrides"] = {k: dict(v) for k, v in self.overrides.items()}
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "QuantConfig":
        known = {f.name for f in fields(cls)}
        data = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        try:
            return cls(**data)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None
        except ConfigError as e:  # name the recipe file a wrong value came from
            if source in ("config", "options") or str(e).startswith(f"{source}:"):
                raise
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str, **overrides: Any) -> "QuantConfig":
        """A recipe file (or built-in recipe name) with ``overrides`` on top: recipes.recipe_config."""
        from onnxfp8.recipes import recipe_config

        return recipe_config(path, **overrides)


def _check_types(cfg: "QuantConfig") -> None:
    """Each setting of the type its field declares (a recipe's ``batch_size = "16"`` is refused by name)."""
    import typing

    hints = typing.get_type_hints(QuantConfig)
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        t = hints[f.name]
        opt = type(None) in typing.get_args(t)
        if v is None:
            if opt:
                continue
            raise ConfigError(f"{f.name}: a value is required, got none")
        base = next((a for a in typing.get_args(t) if a is not type(None)), t) if opt else t
        origin = typing.get_origin(base) or base
        ok = True
        if base is bool:
            ok = isinstance(v, bool)
        elif base is int:
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif base is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        elif base is str:
            ok = isinstance(v, str)
        elif origin is tuple:
            ok = isinstance(v, (str, list, tuple)) and all(isinstance(x, str) for x in ([v] if isinstance(v, str) else v))
        if not ok:
            want = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
                base, "a list of strings" if origin is tuple else str(base))
            raise ConfigError(f"{f.name} must be {want}, got {v!r} ({type(v).__name__})")


def check_overrides(overrides: Any, source: str = "") -> None:
    """Per-tensor overrides: a table per tensor holding only OVERRIDE_KEYS, a known format (not auto), a
    positive scale/amax, an integer axis, a known calibration method (passes/calibrate.py) and a percentile in
    (0, 100]. ``source`` (a recipe file) prefixes the one-line error."""
    pre = f"{source}: " if source else ""
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"{pre}overrides: expected a table of tensor names, got {type(overrides).__name__}")
    from onnxfp8.formats import get_format

    for tensor, over in overrides.items():
        if not isinstance(over, Mapping):
            raise ConfigError(f"{pre}overrides.{tensor}: expected a table of {', '.join(OVERRIDE_KEYS)}, got {over!r}")
        bad = sorted(set(over) - set(OVERRIDE_KEYS))
        if bad:
            raise ConfigError(f"{pre}overrides.{tensor}: unknown key(s) {', '.join(bad)}; known keys: "
                              f"{', '.join(OVERRIDE_KEYS)}")
        if "format" in over:
            try:
                get_format(over["format"])
            except (ValueError, TypeError, AttributeError) as e:
                raise ConfigError(f"{pre}overrides.{tensor}.format: {e}") from None
        for key in ("scale", "amax"):
            if key in over:
                v = over[key]
                vals = v if isinstance(v, (list, tuple)) else [v]
                if not vals or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0 or x == float("inf")
                                   for x in vals):
                    raise ConfigError(f"{pre}overrides.{tensor}.{key} must be a finite number > 0 (or a list of "
                                      f"them per channel), got {v!r}")
        if "axis" in over and (isinstance(over["axis"], bool) or not isinstance(over["axis"], int)):
            raise ConfigError(f"{pre}overrides.{tensor}.axis must be an integer, got {over['axis']!r}")
        method = over.get("calibration")
        if method is not None and method not in CALIBRATION_METHODS:
            raise ConfigError(f"{pre}overrides.{tensor}.calibration: unknown method '{method}'; choose one of "
                              f"{', '.join(CALIBRATION_METHODS)}")
        pct = over.get("percentile")
        if pct is not None and (isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 0 < pct <= 100):
            raise ConfigError(f"{pre}overrides.{tensor}.percentile must be in (0, 100], got {pct!r}")


def load_recipe_file(path: str) -> Dict[str, Any]:
    """Read a TOML or JSON recipe into a dict (one line errors naming the file)."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: recipe file not found")
    try:
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        else:
            try:
                import tomllib  # type: ignore[import-not-found]
            except ImportError:  # Python < 3.11
                import tomli as tomllib  # type: ignore[no-redef]
            with open(path, "rb") as f:
                data = tomllib.load(f)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{path}: cannot parse recipe ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a table/object of settings")
    return data
