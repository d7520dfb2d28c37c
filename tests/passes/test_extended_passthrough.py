"""passes/passthrough.py: pooling, Concat and layout ops carry a quantized tensor (no DQ -> Q round trip),
and the function is exactly the one the standard scheme computes with Q/DQ after them."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import onnxfp8
from onnxfp8 import QuantConfig
from onnxfp8.modelio import make_session
from onnxfp8.verify.compare import sqnr_db

F = TensorProto.FLOAT


def _w(name, shape, seed):
    return onnx.numpy_helper.from_array(
        (np.random.default_rng(seed).standard_normal(shape) * 0.3).astype(np.float32), name)


def conv_relu_pool_conv(extra_output=False):
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
             helper.make_node("Conv", ["p1", "w2"], ["y"], name="conv2")]
    outs = [helper.make_tensor_value_info("y", F, None)]
    if extra_output:
        outs.append(helper.make_tensor_value_info("r1", F, None))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [2, 3, 8, 8])], outs,
                          [_w("w1", [8, 3, 3, 3], 1), _w("w2", [4, 8, 1, 1], 2)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])


def concat_model():
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a"),
             helper.make_node("Conv", ["x", "wb"], ["b"], name="conv_b"),
             helper.make_node("Concat", ["a", "b"], ["cat"], axis=1, name="concat"),
             helper.make_node("Conv", ["cat", "wc"], ["y"], name="conv_c")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [2, 3, 6, 6])],
                          [helper.make_tensor_value_info("y", F, None)],
                          [_w("wa", [4, 3, 1, 1], 3), onnx.numpy_helper.from_array(
                              (np.random.default_rng(4).standard_normal([4, 3, 1, 1]) * 3).astype(np.float32), "wb"),
                           _w("wc", [5, 8, 1, 1], 5)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])


def conv_resize_conv():
    """conv1 -> Resize (nearest, x2) -> conv2: upsampling in a decoder / FPN."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Resize", ["c1", "", "scales"], ["u"], mode="nearest", name="upsample"),
             helper.make_node("Conv", ["u", "w2"], ["y"], name="conv2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [2, 3, 6, 6])],
                          [helper.make_tensor_value_info("y", F, None)],
                          [_w("w1", [8, 3, 3, 3], 6), _w("w2", [4, 8, 1, 1], 7),
                           onnx.numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])


def conv_bn_relu_conv():
    """conv1 -> BatchNormalization -> Relu -> conv2, with BN left unfolded (fold_batchnorm=False, as in the cv
    recipe): the extended scheme quantizes the BN's input."""
    rng = np.random.default_rng(8)
    f = lambda n, v: onnx.numpy_helper.from_array(np.asarray(v, np.float32), n)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("BatchNormalization", ["c1", "sc", "bi", "mu", "var"], ["b1"], name="bn1"),
             helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [2, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", F, None)],
                          [_w("w1", [8, 3, 3, 3], 1), _w("w2", [4, 8, 1, 1], 2), f("sc", rng.uniform(0.5, 2, 8)),
                           f("bi", 0.5 * rng.standard_normal(8)), f("mu", 0.2 * rng.standard_normal(8)),
                           f("var", rng.uniform(0.5, 2, 8))])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])


def _data(n, shape, seed):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def _run(model, feeds, out=0):
    s = make_session(model, level="basic")
    return np.concatenate([s.run(None, f)[out] for f in feeds])


def _producer(model, tensor):
    return next(n for n in model.graph.node if tensor in n.output)


@pytest.mark.parametrize("dynamic", [False, True])
def test_maxpool_and_relu_carry_the_quantized_tensor(dynamic):
    model = conv_relu_pool_conv()
    calib, val = _data(8, [2, 3, 8, 8], 0), _data(4, [2, 3, 8, 8], 1)
    std = onnxfp8.quantize(model, calib, config=QuantConfig(dynamic=dynamic))
    ext = onnxfp8.quantize(model, calib, config=QuantConfig(scheme="extended", dynamic=dynamic))
    # the quantization moved from the pool output to the Conv output, before Relu -> MaxPool
    assert "p1" not in ext.plan.tensors and ext.plan.tensors["c1"].consumers == ["relu1"]
    assert ext.plan.nodes["pool1"].quantized and ext.plan.nodes["relu1"].quantized
    conv2 = next(n for n in ext.model.graph.node if n.name == "conv2")
    assert _producer(ext.model, conv2.input[0]).op_type == "MaxPool"  # no DQ -> Q round trip
    relu = next(n for n in ext.model.graph.node if n.name == "relu1")
    assert _producer(ext.model, relu.input[0]).op_type == "DequantizeLinear"
    # same function as Q/DQ after the pool (static: the pool output's scale; dynamic: signed max == max relu)
    np.testing.assert_array_equal(_run(ext.model, val), _run(std.model, val))
    ref = ReferenceEvaluator(ext.model).run(None, val[0])[0]
    np.testing.assert_allclose(ref, _run(ext.model, val[:1]), rtol=1e-5, atol=1e-6)
    if not dynamic:  # measured output SQNR vs FP32: 24.63 dB
        assert 24.4 < sqnr_db(_run(model, val), _run(ext.model, val)) < 24.9


def test_a_tensor_read_in_fp32_elsewhere_stops_the_climb():
    model = conv_relu_pool_conv(extra_output=True)
    ext = onnxfp8.quantize(model, _data(4, [2, 3, 8, 8], 0), config=QuantConfig(scheme="extended"))
    spec = ext.plan.tensors["r1"]  # Relu output is a graph output: quantize after it, for the pool only
    assert spec.consumers == ["pool1"] and "c1" not in ext.plan.tensors
    val = _data(2, [2, 3, 8, 8], 1)
    std = onnxfp8.quantize(model, _data(4, [2, 3, 8, 8], 0), config=QuantConfig())
    np.testing.assert_array_equal(_run(ext.model, val, 1), _run(std.model, val, 1))  # r1 stays FP32
    np.testing.assert_array_equal(_run(ext.model, val, 0), _run(std.model, val, 0))


def test_excluded_pool_is_not_passed_through():
    model = conv_relu_pool_conv()
    for cfg in (QuantConfig(scheme="extended", exclude_ops=("MaxPool",)),
                QuantConfig(scheme="extended", exclude_nodes=("pool*",))):
        ext = onnxfp8.quantize(model, _data(4, [2, 3, 8, 8], 0), config=cfg)
        assert "p1" in ext.plan.tensors and not ext.plan.nodes["pool1"].quantized


def test_concat_inputs_share_one_scale():
    model = concat_model()
    calib, val = _data(8, [2, 3, 6, 6], 0), _data(4, [2, 3, 6, 6], 1)
    std = onnxfp8.quantize(model, calib, config=QuantConfig())
    ext = onnxfp8.quantize(model, calib, config=QuantConfig(scheme="extended"))
    a, b = ext.plan.tensors["a"], ext.plan.tensors["b"]
    assert a.scale == b.scale == std.plan.tensors["cat"].scale
    assert a.consumers == ["concat"] and "cat" not in ext.plan.tensors
    conv_c = next(n for n in ext.model.graph.node if n.name == "conv_c")
    assert _producer(ext.model, conv_c.input[0]).op_type == "Concat"
    np.testing.assert_array_equal(_run(ext.model, val), _run(std.model, val))
    assert 27.1 < sqnr_db(_run(model, val), _run(ext.model, val)) < 27.6  # measured: 27.37 dB


def test_nearest_resize_carries_the_quantized_tensor():
    model = conv_resize_conv()
    calib, val = _data(8, [2, 3, 6, 6], 0), _data(4, [2, 3, 6, 6], 1)
    std = onnxfp8.quantize(model, calib, config=QuantConfig())
    ext = onnxfp8.quantize(model, calib, config=QuantConfig(scheme="extended"))
    assert "u" not in ext.plan.tensors and ext.plan.tensors["c1"].consumers == ["upsample"]
    assert ext.plan.nodes["upsample"].quantized and "no DQ->Q round trip" in ext.plan.nodes["upsample"].reason
    conv2 = next(n for n in ext.model.graph.node if n.name == "conv2")
    assert _producer(ext.model, conv2.input[0]).op_type == "Resize"
    resize = next(n for n in ext.model.graph.node if n.name == "upsample")
    assert _producer(ext.model, resize.input[0]).op_type == "DequantizeLinear"
    # nearest upsampling copies values: the scale of its output is the scale of its input, same function
    assert ext.plan.tensors["c1"].scale == std.plan.tensors["u"].scale
    np.testing.assert_array_equal(_run(ext.model, val), _run(std.model, val))
    assert 25.1 < sqnr_db(_run(model, val), _run(ext.model, val)) < 25.6  # measured: 25.36 dB


def test_unfolded_batchnorm_input_is_quantized():
    model = conv_bn_relu_conv()
    calib, val = _data(8, [2, 3, 8, 8], 0), _data(4, [2, 3, 8, 8], 1)
    folded = onnxfp8.quantize(model, calib, config=QuantConfig(scheme="extended"))
    assert "BatchNormalization" not in [n.op_type for n in folded.model.graph.node]
    res = onnxfp8.quantize(model, calib, config=QuantConfig(scheme="extended", fold_batchnorm=False))
    assert res.plan.nodes["bn1"].quantized and res.plan.nodes["bn1"].inputs == {0: "activation"}
    bn = next(n for n in res.model.graph.node if n.op_type == "BatchNormalization")
    assert _producer(res.model, bn.input[0]).op_type == "DequantizeLinear"
    assert all(i in {t.name for t in res.model.graph.initializer} for i in bn.input[1:])  # parameters FP32
    # BN's output is quantized again before Relu (for conv2): measured SQNR 24.18 dB, vs 25.29 folded
    ref = _run(model, val)
    assert 23.9 < sqnr_db(ref, _run(res.model, val)) < 24.4
    assert 25.0 < sqnr_db(ref, _run(folded.model, val)) < 25.5


def test_attention_reshape_transpose_carry_q_and_k():
    from onnxfp8.examples.build import build_transformer, make_inputs

    model = build_transformer(seq=16, hidden=32, heads=2, ffn=64, vocab=100)
    res = onnxfp8.quantize(model, [make_inputs(model, 8, seed=0)], config=QuantConfig(scheme="extended"))
    scores = next(n for n in res.model.graph.node if n.name == "layer0/attn/scores")
    assert [_producer(res.model, t).op_type for t in scores.input] == ["Transpose", "Transpose"]
    for head in ("q", "k", "v"):
        spec = res.plan.tensors[f"layer0/attn/{head}_proj/bias_add/output"]
        assert spec.consumers == [f"layer0/attn/{head}_reshape"]
        reshape = next(n for n in res.model.graph.node if n.name == f"layer0/attn/{head}_reshape")
        assert _producer(res.model, reshape.input[0]).op_type == "DequantizeLinear"
