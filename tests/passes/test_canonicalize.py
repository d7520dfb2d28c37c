"""canonicalize: Constant nodes become initializers, the graph is sorted, every node has a name, and the opset
precondition is checked."""
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper, numpy_helper

from onnxfp8.config import QuantConfig
from onnxfp8.errors import ModelError
from onnxfp8.modelio import make_session, to_graph
from onnxfp8.passes.canonicalize import Canonicalize
from onnxfp8.pipeline import PassContext


def _model_with_constant_weight():
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.float32(2.0))),
        helper.make_node("Gemm", ["x", "w"], ["h"], transB=1),
        helper.make_node("Mul", ["h", "k"], ["y"]),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4]),
                           helper.make_tensor_value_info("k", onnx.TensorProto.FLOAT, [])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)], ir_version=8), w


def test_constants_become_initializers_and_nodes_named(run_passes):
    model, w = _model_with_constant_weight()
    graph, ctx, res = run_passes(model, ["canonicalize"])
    gemm = next(n for n in graph.nodes if n.op == "Gemm")
    assert isinstance(gemm.inputs[1], gs.Constant)
    np.testing.assert_array_equal(gemm.inputs[1].values, w)
    # "k" is a graph output: its Constant node stays (a graph output cannot be an initializer here)
    assert [n.op for n in graph.nodes].count("Constant") == 1
    assert res["canonicalize"].notes == ["1 Constant node(s) turned into initializers"]
    assert all(n.name for n in graph.nodes)
    assert len({n.name for n in graph.nodes}) == len(graph.nodes)


def test_select_sees_constant_node_weights(run_passes):
    model, _ = _model_with_constant_weight()
    _, ctx, _ = run_passes(model, ["canonicalize", "select_ops"])
    gemm = next(d for d in ctx.plan.nodes.values() if d.op_type == "Gemm")
    assert gemm.quantized and gemm.inputs == {0: "activation", 1: "weight"}


def test_unnamed_nodes_named_and_graph_sorted():
    nodes = [helper.make_node("Relu", ["a"], ["y"]), helper.make_node("Neg", ["x"], ["a"])]  # out of order
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)], ir_version=8)
    graph = to_graph(model)
    res = Canonicalize().run(graph, PassContext(config=QuantConfig()))
    assert [n.op for n in graph.nodes] == ["Neg", "Relu"]
    assert all(n.name for n in graph.nodes) and res.modified


def test_requires_opset_19():
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(ModelError, match="opset 17 < 19"):
        Canonicalize().requires(to_graph(model), PassContext(source="m.onnx"))


def test_constant_graph_output_read_by_a_quantized_layer():
    """A Constant node whose output is a graph output keeps its node; its readers got an initializer of the
    output's very name, two tensors of one name, and the pipeline failed in the first pass that changed the
    graph (insert_qdq). They now read an initializer of their own name and the model quantizes."""
    import onnxfp8

    model = onnx.parser.parse_model("""<ir_version: 9, opset_import: ["" : 19]>
    g (float[2,4] x) => (float[2,3] y, float[4] c) {
        c = Constant <value = float[4] {1.0, 2.0, 3.0, 4.0}> ()
        a = Add (x, c)
        y = MatMul (a, w)
    }""")
    w = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(w, "w"))
    x = np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)
    res = onnxfp8.quantize(model, [{"x": x}], config=QuantConfig(summary_samples=0))
    assert res.plan.tensors["w"].role == "weight"
    y, c = make_session(res.model).run(None, {"x": x})
    np.testing.assert_array_equal(c, [1.0, 2.0, 3.0, 4.0])
    assert y.shape == (2, 3) and np.isfinite(y).all()
