"""The samples captured during calibration for the output summary: how many the summary runs, and outputs
without a batch axis kept whole."""
import numpy as np
import pytest
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


def _gemm_model():
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (8, 16)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1, name="fc")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)


@pytest.mark.parametrize("samples,summary,expected", [(40, None, 8), (200, None, 12), (1000, None, 62),
                                                      (1100, None, 64),
                                                      (200, 8, 8), (200, 100, 100), (10, 100, 10), (200, 0, 0)])
def test_summary_sample_count(samples, summary, expected):
    """Auto (None): a sixteenth of the calibration samples within [8, 64], so that the exact quantized run
    costs ~0.15x of the calibration pass; an explicit count is taken as it is (up to the data)."""
    rng = np.random.default_rng(2)
    calib = [{"x": rng.normal(0, 1, (min(16, samples - i), 16)).astype(np.float32)} for i in range(0, samples, 16)]
    res = onnxfp8.quantize(_gemm_model(), calib, onnxfp8.QuantConfig(summary_samples=summary))
    assert res.report.summary_samples == expected
    assert bool(res.report.outputs) == (expected > 0)


def test_negative_summary_samples_refused():
    with pytest.raises(onnxfp8.errors.ConfigError, match="summary_samples"):
        onnxfp8.QuantConfig(summary_samples=-1)


def test_summary_of_a_fixed_batch_model_runs_whole_batches():
    """An export with batch 3: the summary cannot cut a batch to reach its count, so it runs whole ones."""
    m = _gemm_model()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 3
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 3
    rng = np.random.default_rng(3)
    calib = [{"x": rng.normal(0, 1, (3, 16)).astype(np.float32)} for _ in range(14)]  # 42 samples: auto 8
    res = onnxfp8.quantize(m, calib, onnxfp8.QuantConfig())
    assert res.report.summary_samples == 9
    assert 15 < res.report.outputs["y"]["sqnr_db"] < 60
