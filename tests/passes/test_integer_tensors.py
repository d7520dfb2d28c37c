"""Integer and bool tensors never get Q/DQ: selection reads each input's inferred type, not its op type.

The graph mimics a transformers export: the shape subgraph of a BERT (Shape -> Gather -> Mul of two int64
scalars -> Unsqueeze -> Concat -> Reshape), an int64 Add, a bool mask through Where, and the float path the
extended scheme does quantize. Before the fix the extended scheme put a QuantizeLinear on the int64 Mul's
inputs and onnx shape inference rejected the model (``x ... has unsupported type: tensor(int64)``)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxfp8
from onnxfp8 import QuantConfig
from onnxfp8.formats import is_float_dtype
from onnxfp8.modelio import make_session
from onnxfp8.verify.compare import sqnr_db

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def _model():
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32) * 0.3, "w")
    c0 = onnx.numpy_helper.from_array(np.asarray(0, np.int64), "c0")
    c1 = onnx.numpy_helper.from_array(np.asarray(1, np.int64), "c1")
    axes = onnx.numpy_helper.from_array(np.asarray([0], np.int64), "axes")
    tail = onnx.numpy_helper.from_array(np.asarray([-1], np.int64), "tail")
    zero = onnx.numpy_helper.from_array(np.asarray(0.0, np.float32), "zero")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
        helper.make_node("Shape", ["h"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "c0"], ["b"], name="gather_b", axis=0),
        helper.make_node("Gather", ["shape", "c1"], ["s"], name="gather_s", axis=0),
        helper.make_node("Mul", ["b", "s"], ["bs"], name="mul_int"),  # int64 * int64
        helper.make_node("Add", ["bs", "c0"], ["bs0"], name="add_int"),
        helper.make_node("Identity", ["bs0"], ["bs1"], name="ident_int"),
        helper.make_node("Unsqueeze", ["bs1", "axes"], ["bs_1d"], name="unsq"),
        helper.make_node("Concat", ["bs_1d", "tail"], ["newshape"], name="concat_int", axis=0),
        helper.make_node("Reshape", ["h", "newshape"], ["flat"], name="reshape"),
        helper.make_node("Greater", ["flat", "zero"], ["mask"], name="greater"),  # bool
        helper.make_node("Identity", ["mask"], ["mask1"], name="ident_bool"),
        helper.make_node("Where", ["mask1", "flat", "zero"], ["relu_like"], name="where"),
        helper.make_node("Mul", ["relu_like", "flat"], ["sq"], name="mul_float"),
        helper.make_node("Add", ["sq", "flat"], ["y"], name="add_float"),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, ["batch", 4, 8])],
                          [helper.make_tensor_value_info("y", F, None)], [w, c0, c1, axes, tail, zero])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])


def _data(n, seed):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 4, 8)).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("style", ["qdq", "emulate"])
@pytest.mark.parametrize("scheme", ["standard", "extended"])
def test_no_qdq_on_integer_or_bool_tensors(scheme, style):
    model = _model()
    res = onnxfp8.quantize(model, _data(4, 0), QuantConfig(scheme=scheme, style=style))
    q = res.model
    inferred = onnx.shape_inference.infer_shapes(q, strict_mode=True)  # raised on the int64 Q/DQ before
    types = {vi.name: vi.type.tensor_type.elem_type for vi in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    for node in q.graph.node:
        if node.op_type in ("QuantizeLinear", "Div") and "/" in node.name:
            assert is_float_dtype(types[node.input[0]]), (node.name, node.input[0])
    quantized = {t.tensor for t in res.plan.tensors.values()}
    assert not quantized & {"b", "s", "bs", "bs0", "bs1", "bs_1d", "newshape", "mask", "mask1"}
    assert {"x", "w"} <= quantized  # the float path is still quantized
    if scheme == "extended":
        assert {"flat", "relu_like", "sq"} <= quantized  # float Mul / Add of activations
        for name in ("mul_int",):
            d = res.plan.nodes[name]
            assert not d.quantized and "only floating-point tensors are quantized" in d.reason
    feed = _data(1, 1)[0]
    ref = make_session(model).run(None, feed)[0]
    got = make_session(q).run(None, feed)[0]
    assert sqnr_db(ref, got) > 20.0
