"""The samples captured during calibration for the output summary keep outputs without a batch axis whole."""
import numpy as np
from onnx import TensorProto, helper, numpy_helper

import onnxfp8


def test_summary_with_a_constant_graph_output():
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (8, 16)).astype(np.float32), "w")
    c = numpy_helper.from_array(np.arange(4, dtype=np.float32), "c_value")
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1, name="fc"),
             helper.make_node("Identity", ["c_value"], ["c"], name="const_out")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8]),
                           helper.make_tensor_value_info("c", TensorProto.FLOAT, [4])], [w, c])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    calib = [{"x": rng.normal(0, 1, (6, 16)).astype(np.float32)}]
    res = onnxfp8.quantize(m, calib, onnxfp8.QuantConfig(summary_samples=2))  # fewer than the batch holds
    assert res.report.summary_samples == 2
    assert res.report.outputs["c"]["sqnr_db"] == "inf"  # the constant is the same in both models
    assert 15 < res.report.outputs["y"]["sqnr_db"] < 60
