"""onnxfp8: quantize FP32 ONNX models to FP8 (E4M3, E5M2, E3M4) or INT8 and prove how close they stay."""
from __future__ import annotations

from onnxfp8 import formats
from onnxfp8.config import QuantConfig
from onnxfp8.errors import ConfigError, DataError, ModelError, OnnxFp8Error, PassError
from onnxfp8.formats import FORMATS, Format, get_format
from onnxfp8.pipeline import Pass, PassContext, PassResult, Pipeline
from onnxfp8.plan import QuantPlan, QuantSpec
from onnxfp8.quantize import Prepared, QuantResult, apply_plan, prepare, quantize
from onnxfp8.verify.check import CheckReport, Thresholds, check

__version__ = "0.1.0"

__all__ = ["quantize", "apply_plan", "prepare", "Prepared", "QuantResult", "QuantConfig", "Pipeline", "Pass", "PassContext", "PassResult", "QuantPlan",
           "QuantSpec", "Format", "FORMATS", "get_format", "formats", "OnnxFp8Error", "ModelError", "DataError",
           "ConfigError", "PassError", "check", "CheckReport", "Thresholds"]
