"""Float16 models quantize with scales (and emulation constants) in float16: every format, both styles,
dynamic scales, BN folding and recalibration, check --layers. Before: ``QuantizeLinear ... y_scale has
inconsistent type``. emulate.typed_scale rounds a scale up to the next float16 (amax / scale stays within the
format) and never below float16's smallest normal."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxfp8
from onnxfp8 import QuantConfig
from onnxfp8.modelio import make_session
from onnxfp8.passes.emulate import typed_scale
from onnxfp8.verify.check import check
from onnxfp8.verify.compare import sqnr_db

H = TensorProto.FLOAT16


def _model():
    rng = np.random.default_rng(0)
    f = lambda n, a: numpy_helper.from_array(np.asarray(a, np.float16), n)  # noqa: E731
    inits = [f("cw", rng.standard_normal((8, 3, 3, 3)) * 0.3), f("cb", rng.standard_normal(8) * 0.1),
             f("g", rng.random(8) + 0.5), f("b", rng.standard_normal(8) * 0.1), f("mu", rng.standard_normal(8) * 0.1),
             f("var", rng.random(8) + 0.5), f("fw", rng.standard_normal((128, 10)) * 0.1),
             f("fb", rng.standard_normal(10) * 0.1), numpy_helper.from_array(np.asarray([0, -1], np.int64), "shp")]
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "mu", "var"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Reshape", ["p", "shp"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fw", "fb"], ["y"], name="fc")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", H, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", H, ["N", 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])


def _data(n, seed):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((8, 3, 8, 8)).astype(np.float16)} for _ in range(n)]


CASES = [dict(format=f, style=s) for f in ("e4m3", "e5m2", "e3m4", "int8") for s in ("qdq", "emulate")] + [
    dict(format="auto"), dict(scheme="extended"), dict(scheme="extended", style="emulate"),
    dict(dynamic=True), dict(dynamic=True, dynamic_granularity="token"), dict(dynamic=True, style="emulate"),
    dict(fold_batchnorm=False, scheme="extended"), dict(bn_recalibrate=True), dict(calibration="mse")]
FLOOR = {"e5m2": 17.0, "e4m3": 22.0}  # measured 19.2 / 26.2 dB; the others (E3M4, INT8) 30+ dB


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_float16_model_quantizes_in_float16(cfg):
    model = _model()
    res = onnxfp8.quantize(model, _data(4, 0), QuantConfig(**cfg))
    q = onnx.shape_inference.infer_shapes(res.model, strict_mode=True)
    inits = {t.name: t for t in q.graph.initializer}
    qdq = [n for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    for n in qdq:
        if n.input[1] in inits:  # static scales are float16 (dynamic ones are computed in float16 too)
            assert inits[n.input[1]].data_type == H, n.name
    assert q.graph.output[0].type.tensor_type.elem_type == H
    feed = _data(1, 1)[0]
    ref = make_session(model).run(None, feed)[0].astype(np.float32)
    got = make_session(res.model).run(None, feed)[0]
    assert got.dtype == np.float16
    assert sqnr_db(ref, got.astype(np.float32)) > FLOOR.get(cfg.get("format", "e4m3"), 22.0)
    rep = check(model, res.model, _data(2, 2), layers=True)
    assert rep.layers and all(np.isfinite(l.own.sqnr_db) for l in rep.layers)


def test_typed_scale_rounds_up_and_stays_normal():
    s = np.asarray([0.01, 1e-9, 2.0 ** -3], np.float32)
    t = typed_scale(s, np.float16)
    assert t.dtype == np.float16
    assert (t.astype(np.float32) >= np.maximum(s, np.finfo(np.float16).tiny)).all()
    assert t[2] == np.float16(0.125) and t[1] == np.finfo(np.float16).tiny
    for v in (0.01, 0.0101, 3.3e-3):  # the smallest float16 >= the scale
        t = typed_scale(np.float32(v), np.float16)
        assert np.float32(t) >= np.float32(v) > np.float32(np.nextafter(t, np.float16(0)))
