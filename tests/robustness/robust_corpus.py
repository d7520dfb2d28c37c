"""The bad-input corpus, built in code: small models (good and broken) and their calibration data.

Every builder returns a ModelProto; ``write(tmp, model)`` saves it with a calibration file beside it."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(0)


def _w(*shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.3


def mlp(nan_weight: bool = False, inf_weight: bool = False, opset: int = 17, ir: int = 8) -> onnx.ModelProto:
    """x[N, 8] -> MatMul(8x16) -> Relu -> Gemm(16x4) -> y[N, 4]."""
    w1, w2 = _w(8, 16), _w(16, 4, seed=1)
    if nan_weight:
        w1[3, 5] = np.nan
    if inf_weight:
        w2[0, 0] = np.inf
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2"], ["y"], name="gemm")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir
    return m


def calib(n: int = 16, features: int = 8, name: str = "x", nan: bool = False) -> Dict[str, np.ndarray]:
    x = np.random.default_rng(1).standard_normal((n, features)).astype(np.float32)
    if nan:
        x[2, 3] = np.nan
    return {name: x}


def write(tmp: Path, model: onnx.ModelProto, name: str = "m.onnx", data: Optional[Dict[str, np.ndarray]] = None,
          check: bool = False) -> Tuple[Path, Path]:
    """Save ``model`` (without the checker: broken ones too) and a calibration file; returns both paths."""
    path = Path(tmp) / name
    path.write_bytes(model.SerializeToString())
    c = Path(tmp) / (path.stem + "_calib.npz")
    np.savez(c, **(data if data is not None else calib()))
    return path, c


def log_model(opset: int = 17) -> onnx.ModelProto:
    """x -> MatMul -> Log -> MatMul -> y: Log of negative values is NaN on ordinary data."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Log", ["h"], ["l"], name="log"),
             helper.make_node("MatMul", ["l", "w2"], ["y"], name="mm2")]
    g = helper.make_graph(nodes, "logm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                          [numpy_helper.from_array(_w(8, 16), "w1"), numpy_helper.from_array(_w(16, 4, seed=1), "w2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m
