"""FP16 fallback: a layer left out of FP8 runs as an FP16 island when it is FP16-safe on the calibration data.

- the island computes what FP16 computes: its output equals a numpy float16 reference bit for bit (inputs and
  weights rounded to FP16, products summed exactly, the result rounded once to FP16), on values chosen so that
  every summation order is exact in FP32;
- the decision lives in the plan (NodeDecision.fallback), round-trips through JSON and rebuilds the same bytes;
  bad edits fail with one line;
- FP16-safety from calibration statistics: a layer whose output overflows FP16's range (with headroom) falls
  back to FP32 with the reason; --fallback-precision fp32 forces FP32.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxfp8
from onnxfp8.config import QuantConfig
from onnxfp8.errors import ConfigError
from onnxfp8.modelio import make_session
from onnxfp8.plan import QuantPlan
from onnxfp8.tuning.evaluate import Target
from onnxfp8.tuning.fp16 import FP16_HEADROOM, FP16_MAX, fp16_safety
from onnxfp8.tuning.tune import tune


def _designed(rng, shape, lo, hi, step):
    """FP16 values k * step (k != 0): products and their sums stay exact in FP32 whatever the order."""
    k = rng.integers(lo, hi, size=shape)
    k[k == 0] = 1
    return (k * step).astype(np.float16)


def _perturbed(rng, v16, amount):
    """FP32 values that round to ``v16`` in FP16 (offsets below half an FP16 step)."""
    v = v16.astype(np.float32) + (rng.uniform(-1, 1, v16.shape) * amount).astype(np.float32)
    assert (v.astype(np.float16) == v16).all()
    return v


def _two_layer_model(w1, b1, w2):
    """x -> Gemm fc1 (w1, b1) -> h -> Relu -> MatMul fc2 (w2) -> y; outputs h and y."""
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, w1.shape[0]])],
                          [helper.make_tensor_value_info("h", TensorProto.FLOAT, [None, w1.shape[1]]),
                           helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, w2.shape[1]])],
                          initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
                                       numpy_helper.from_array(w2, "w2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])


@pytest.fixture
def designed():
    rng = np.random.default_rng(7)
    w1_16 = _designed(rng, (64, 32), -32, 32, 2.0 ** -5)
    b1_16 = _designed(rng, (32,), -64, 64, 2.0 ** -3)
    x16 = _designed(rng, (24, 64), -64, 64, 2.0 ** -4)
    w1 = _perturbed(rng, w1_16, 2.0 ** -18)
    b1 = _perturbed(rng, b1_16, 2.0 ** -16)
    x = _perturbed(rng, x16, 2.0 ** -17)
    w2 = rng.standard_normal((32, 8)).astype(np.float32) * 0.1
    model = _two_layer_model(w1, b1, w2)
    calib = [{"x": x[i:i + 4]} for i in range(0, 24, 4)]
    return {"model": model, "x": x, "x16": x16, "w1_16": w1_16, "b1_16": b1_16, "w1": w1, "b1": b1, "calib": calib}


def test_fp16_island_output_is_fp16_exact(designed):
    d = designed
    res = onnxfp8.quantize(d["model"], d["calib"], QuantConfig())
    assert {n.node for n in res.plan.quantized_nodes()} == {"fc1", "fc2"}
    plan = res.plan.copy()
    plan.fall_back("fc1", "fp16", "test: FP16 island")
    assert plan.fallbacks() == {"fc1": "fp16"}
    out = onnxfp8.apply_plan(d["model"], plan)
    g = out.model.graph
    inits = {t.name: t for t in g.initializer}
    assert inits["w1.fp16"].data_type == TensorProto.FLOAT16 and inits["b1.fp16"].data_type == TensorProto.FLOAT16
    casts = [n for n in g.node if n.op_type == "Cast"]
    # Cast-based: x and the output rounded through FP16, the FP16 constants read back as FP32
    assert sorted(n.input[0] for n in casts) == ["b1.fp16", "h.acc", "h.fp16", "w1.fp16", "x", "x.fp16"]
    assert any(n.op_type == "DequantizeLinear" for n in g.node)  # fc2 stays quantized
    h, y = make_session(out.model).run(["h", "y"], {"x": d["x"]})
    exact = d["x16"].astype(np.float64) @ d["w1_16"].astype(np.float64) + d["b1_16"].astype(np.float64)
    assert (exact.astype(np.float32) == exact).all()  # the design: FP32 sums are exact in any order
    ref = exact.astype(np.float16)  # the one rounding FP16 makes
    assert np.array_equal(h, ref.astype(np.float32))
    assert (ref.astype(np.float64) != exact).mean() > 0.3  # the output rounding is exercised
    # FP32 fallback of the same layer: FP32 values (not FP16-rounded)
    p32 = res.plan.copy()
    p32.fall_back("fc1", "fp32", "test")
    h32 = make_session(onnxfp8.apply_plan(d["model"], p32).model).run(["h"], {"x": d["x"]})[0]
    want32 = d["x"].astype(np.float64) @ d["w1"].astype(np.float64) + d["b1"]
    assert np.allclose(h32, want32, rtol=1e-5, atol=1e-5) and not np.array_equal(h32, h)


def test_fp16_fallback_plan_round_trips(designed):
    d = designed
    res = onnxfp8.quantize(d["model"], d["calib"], QuantConfig(style="emulate"))
    plan = res.plan.copy()
    plan.fall_back("fc1", "fp16", "test")
    first = onnxfp8.apply_plan(d["model"], plan)
    back = QuantPlan.from_json(first.plan.to_json())
    assert back.nodes["fc1"].fallback == "fp16" and not back.nodes["fc1"].quantized
    again = onnxfp8.apply_plan(d["model"], back)
    assert again.model.SerializeToString() == first.model.SerializeToString()
    assert again.plan.to_json() == first.plan.to_json()


@pytest.mark.parametrize("edit, message", [
    ({"node": "fc1", "fallback": "fp16"}, "on a quantized node"),
    ({"node": "fc1", "quantized": False, "fallback": "bf16"}, "unknown fallback 'bf16'"),
    ({"node": "relu", "quantized": False, "fallback": "fp16"}, "FP16 fallback is made for"),
])
def test_bad_fallback_edits_fail_with_one_line(designed, edit, message):
    d = designed
    res = onnxfp8.quantize(d["model"], d["calib"], QuantConfig())
    data = res.plan.to_dict()
    for n in data["nodes"]:
        if n["node"] == edit["node"]:
            n.update(edit)
            if n.get("quantized") is False:
                n["inputs"] = {}
    plan = QuantPlan.from_dict(data, "edited.json")
    with pytest.raises(ConfigError, match=message):
        onnxfp8.apply_plan(d["model"], plan)
    with pytest.raises(ConfigError, match="made for"):
        res.plan.copy().fall_back("relu", "fp16", "no")


def _overflow_model(seed=3):
    """fc_big's output reaches ~5e4 (beyond FP16's 65504 / 2 headroom); scaled down by 1e-4 (Mul, not quantized),
    fc_small's input and output stay small."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((16, 32)) * 3000).astype(np.float32)
    b1 = np.zeros(32, np.float32)
    w2 = (rng.standard_normal((32, 4)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc_big"),
             helper.make_node("Mul", ["h", "k"], ["r"], name="scale"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc_small")]
    g = helper.make_graph(nodes, "ovf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
                          initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
                                       numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(np.float32(1e-4), "k")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    calib = [{"x": rng.standard_normal((8, 16)).astype(np.float32)} for _ in range(4)]
    val = [{"x": rng.standard_normal((8, 16)).astype(np.float32)} for _ in range(4)]
    return model, calib, val


def test_fp16_safety_from_calibration_ranges():
    from onnxfp8.calibrators.data import as_data

    model, calib, _ = _overflow_model()
    v = fp16_safety(model, ["fc_big", "fc_small", "scale"], as_data(calib, model))
    h_max = max(np.abs(c["x"] @ numpy_helper.to_array(model.graph.initializer[0])).max() for c in calib)
    assert h_max > FP16_MAX / FP16_HEADROOM  # the design
    assert not v["fc_big"].safe and "output h reaches" in v["fc_big"].reason and "headroom" in v["fc_big"].reason
    assert v["fc_small"].safe and "FP16-safe" in v["fc_small"].reason
    assert not v["scale"].safe and "no FP16 island for Mul" in v["scale"].reason


def test_tune_unsafe_layer_falls_back_to_fp32():
    model, calib, val = _overflow_model()
    # unreachable in FP8: every layer falls back
    res = tune(model, calib, val, Target("sqnr", 60.0), QuantConfig(), max_fallback="100%", methods=[])
    rep = res.tuning
    assert rep.fp16["fc_big"].safe is False and rep.fp16["fc_small"].safe is True
    steps = [s for s in rep.steps if s.name == "fallback"]
    both = [s for s in steps if s.fallback == 2 and "FP16" in s.tried]
    assert both and "1 FP16, 1 FP32" in both[0].tried
    # every fallen-back layer of the chosen plan says its precision and why
    assert rep.fallback
    for node, prec in rep.fallback_precision.items():
        d = res.plan.nodes[node]
        assert d.fallback == prec and d.reason.startswith(f"tuning: left in {prec.upper()}")
        if node == "fc_big":
            assert prec == "fp32" and "not FP16-safe: output h reaches" in d.reason
        elif prec == "fp16":
            assert "FP16-safe on the calibration data" in d.reason
    assert res.plan.nodes["fc_big"].fallback in (None, "fp32")  # never FP16


def test_tune_fallback_precision_fp32_forces_fp32():
    model, calib, val = _overflow_model()
    res = tune(model, calib, val, Target("sqnr", 60.0), QuantConfig(), max_fallback="100%", methods=[],
               fallback_precision="fp32")
    assert set(res.tuning.fallback_precision.values()) <= {"fp32"}
    assert all("forced" in v.reason for v in res.tuning.fp16.values())
    with pytest.raises(ConfigError, match="--fallback-precision"):
        tune(model, calib, val, Target("sqnr", 60.0), fallback_precision="bf16")
