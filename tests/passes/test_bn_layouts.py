"""BatchNorm recalibration on the initializer layouts real exports have.

A torch-exported ResNet-18 with its BatchNormalization kept failed with ``ReplaceInitializedTensorImpl Failed to
find existing initializer with name layers.6.b1.running_var``: the training-mode working copy no longer reads the
running statistics, onnxruntime drops unused initializers, and then cannot replace the ones held out of the light
model (those over modelio.LIGHT_THRESHOLD bytes: 256+ channels). Also: running statistics shared by two BNs,
given as Constant nodes, and initializers also listed as graph inputs (IR < 4 exports)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxfp8
from onnxfp8 import QuantConfig
from onnxfp8.modelio import LIGHT_THRESHOLD, make_session
from onnxfp8.verify.compare import sqnr_db

C = 300  # 300 float32 statistics = 1200 bytes > LIGHT_THRESHOLD


def _model(layout):
    rng = np.random.default_rng(0)
    p = {"w1": rng.normal(0, 0.5, (C, 3, 3, 3)), "g1": rng.uniform(0.5, 1.5, C), "be1": rng.normal(0, 0.5, C),
         "m1": rng.normal(0, 0.3, C), "v1": rng.uniform(4, 8, C), "w2": rng.normal(0, 0.05, (C, C, 1, 1)),
         "w3": rng.normal(0, 0.05, (8, C, 1, 1))}
    p = {k: v.astype(np.float32) for k, v in p.items()}
    assert p["v1"].nbytes > LIGHT_THRESHOLD
    stats2 = ["g1", "be1", "m1", "v1"] if layout == "shared" else ["g1", "be1", "m2", "v2"]
    if layout != "shared":
        p["m2"], p["v2"] = p["m1"] * 0.5, p["v1"] * 0.01
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "g1", "be1", "m1", "v1"], ["b1"], name="bn1"),
             helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
             helper.make_node("BatchNormalization", ["c2"] + stats2, ["b2"], name="bn2"),
             helper.make_node("Relu", ["b2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["y"], name="conv3")]
    inits = [numpy_helper.from_array(v, k) for k, v in p.items()]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])]
    if layout == "constant_nodes":  # running statistics from Constant nodes, as some exporters write them
        for name in ("m1", "v1"):
            t = next(i for i in inits if i.name == name)
            nodes.insert(0, helper.make_node("Constant", [], [name], name=f"const_{name}", value=t))
            inits.remove(t)
    if layout == "inputs":  # every initializer also a graph input (IR < 4 exports)
        inputs += [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in inits]
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 8, 8])],
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])


def _data(n, seed):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((16, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("layout", ["wide", "shared", "constant_nodes", "inputs"])
def test_bn_recalibration_on_export_layouts(layout):
    model = _model(layout)
    res = onnxfp8.quantize(model, _data(8, 0), QuantConfig(bn_recalibrate=True, bn_guard=False))
    q = res.model
    assert not [n for n in q.graph.node if n.op_type == "BatchNormalization"]  # folded after recalibration
    layers = res.report.batchnorm.layers
    assert set(layers) == {"bn1", "bn2"}
    feed = _data(1, 1)[0]
    ref = make_session(model).run(None, feed)[0]
    assert sqnr_db(ref, make_session(q).run(None, feed)[0]) > 15.0


def test_session_leaves_out_unused_large_initializers():
    """make_session on a light model whose big initializer nothing reads (onnxruntime drops it)."""
    big = numpy_helper.from_array(np.ones(LIGHT_THRESHOLD, np.float32), "unused")
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [big])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    out = make_session(m).run(None, {"x": np.asarray([-1.0, 2.0], np.float32)})[0]
    np.testing.assert_array_equal(out, [0.0, 2.0])
