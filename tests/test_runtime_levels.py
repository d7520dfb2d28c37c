"""What onnxfp8 promises about onnxruntime's optimization levels, checked against onnx.reference.

Every example model, in both output styles and every format, is run by onnxruntime and compared with
onnx.reference.ReferenceEvaluator, a second runtime. onnxfp8 promises two things: its own session
(onnxfp8.modelio.make_session, ENABLE_BASIC without WeightBiasQuantization, and DISABLE_ALL) computes the
quantized model exactly, and the emulate style (and E3M4, always emulated) computes the same function at every
level, ENABLE_ALL included. What onnxruntime does to qdq-style models at its other levels (Q/DQ fusions at
ENABLE_ALL, WeightBiasQuantization at plain ENABLE_BASIC, a Relu dropped before an FP8 QuantizeLinear) depends
on its version and the machine's kernels, so it is measured, not pinned: ``python benchmarks/bench_levels.py
--examples`` prints it.
"""
from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from onnxfp8.examples.build import build_cnn, build_mlp, build_transformer, make_inputs
from onnxfp8 import QuantConfig, quantize
from onnxfp8.modelio import make_session

BUILDERS = {"cnn": build_cnn, "mlp": build_mlp, "transformer": build_transformer}
FORMATS = ["e4m3", "e5m2", "e3m4", "int8"]
TOL = 1e-5


@pytest.fixture(scope="module")
def examples():
    out = {}
    for name, build in BUILDERS.items():
        model = build()
        out[name] = (model, make_inputs(model, 16, seed=1), make_inputs(model, 4, seed=2))
    return out


def _reference(model, feed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # log(0) in the E3M4 subgraph is -inf by design
        return ReferenceEvaluator(model).run(None, feed)[0]


def _plain_session(model, level):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _scale(ref):
    return max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("style", ["qdq", "emulate"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list(BUILDERS))
def test_levels_against_reference(examples, name, fmt, style):
    model, calib, val = examples[name]
    q = quantize(model, [calib], QuantConfig(format=fmt, style=style, summary_samples=0)).model
    ref = _reference(q, val)
    tol = TOL * _scale(ref)
    for level in ("disable", "basic"):  # onnxfp8's own sessions: exact in every style
        got = make_session(q, level=level).run(None, val)[0]
        assert np.abs(got - ref).max() <= tol, (level, np.abs(got - ref).max())
    if style == "emulate" or fmt == "e3m4":  # the emulate style: the same function at every level
        for level in (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
            got = _plain_session(q, level).run(None, val)[0]
            assert np.abs(got - ref).max() <= tol, (str(level), float(np.abs(got - ref).max()))


def _two_gemm_relu_into_q():
    """Gemm -> Relu -> Q -> DQ -> Gemm: the placement onnxfp8 avoids (it quantizes the Relu input instead)."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 1, (16, 16)).astype(np.float32)
    w2 = rng.normal(0, 1, (16, 16)).astype(np.float32)
    inits = [helper.make_tensor("w1", TensorProto.FLOAT, w1.shape, w1.ravel()),
             helper.make_tensor("w2", TensorProto.FLOAT, w2.shape, w2.ravel()),
             helper.make_tensor("s", TensorProto.FLOAT, [], [0.05]),
             helper.make_tensor("z", TensorProto.FLOAT8E4M3FN, [], [0])]
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], name="g1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"], name="dq"),
             helper.make_node("Gemm", ["dq", "w2"], ["y"], name="g2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 16])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)


def test_make_session_keeps_relu_before_fp8_quantizelinear():
    """onnxfp8's session computes Relu -> FP8 Q/DQ exactly (some onnxruntime versions drop that Relu at
    ENABLE_ALL: bench_levels.py --examples measures it)."""
    m = _two_gemm_relu_into_q()
    x = {"x": np.random.default_rng(1).normal(0, 1, (8, 16)).astype(np.float32)}
    ref = _reference(m, x)
    basic = make_session(m, level="basic").run(None, x)[0]
    assert np.abs(basic - ref).max() <= TOL * _scale(ref)


def test_relu_outputs_are_quantized_on_the_relu_input(examples):
    """onnxfp8's default placement (for onnxruntime): the Q/DQ of a Relu's output sits on the Relu's input, with
    the Relu output's scale, and the function is the same (relu(dq(q(x))) == dq(q(relu(x))))."""
    model, calib, val = examples["mlp"]
    q = quantize(model, [calib], QuantConfig(format="e4m3", summary_samples=0)).model
    relus = [n for n in q.graph.node if n.op_type == "Relu"]
    assert relus and all(n.input[0].endswith(".dq") for n in relus)
    assert np.abs(make_session(q).run(None, val)[0] - _reference(q, val)).max() <= TOL * _scale(_reference(q, val))
