"""Each input's batch axis comes from the model's symbolic dimensions (calibrators/data.py: batch_axes).

A stateful model as speech exporters write it: ``x [batch, T, 4]``, a state ``[2, batch, 8]`` (batch on axis 1)
and a scalar ``sr``. Files of one and of three samples are re-batched along each input's own axis, the scalar is
passed through, calibration sees exactly the data, and quantize's summary and check run on it. Before, the
reader took axis 0 for every input: ``inputs disagree on the number of samples (1 vs 2 ...)``."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxfp8
from onnxfp8 import QuantConfig
from onnxfp8.calibrators.data import as_data, batch_axes, batch_size, input_specs
from onnxfp8.errors import DataError
from onnxfp8.modelio import make_session
from onnxfp8.verify.check import check

F = TensorProto.FLOAT


def _model(state_batch="batch", sr_type=TensorProto.INT64):
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "w")
    u = onnx.numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "u")
    axes = onnx.numpy_helper.from_array(np.asarray([1], np.int64), "axes")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="in_proj"),              # [batch, T, 8]
        helper.make_node("ReduceMean", ["h", "axes"], ["m"], name="pool", keepdims=0),  # [batch, 8]
        helper.make_node("Add", ["state", "m"], ["s1"], name="mix"),                # [2, batch, 8]
        helper.make_node("MatMul", ["s1", "u"], ["new_state"], name="state_proj"),
        helper.make_node("Cast", ["sr"], ["srf"], name="cast_sr", to=F),
        helper.make_node("Mul", ["h", "srf"], ["y"], name="scale_sr"),
    ]
    g = helper.make_graph(
        nodes, "stateful",
        [helper.make_tensor_value_info("x", F, ["batch", "T", 4]),
         helper.make_tensor_value_info("state", F, [2, state_batch, 8]),
         helper.make_tensor_value_info("sr", sr_type, [])],
        [helper.make_tensor_value_info("y", F, ["batch", "T", 8]),
         helper.make_tensor_value_info("new_state", F, [2, state_batch, 8])], [w, u, axes])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])


def _files(tmp_path, sizes=(1, 3, 1, 2, 1), seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i, b in enumerate(sizes):
        d = {"x": rng.standard_normal((b, 5, 4)).astype(np.float32),
             "state": rng.standard_normal((2, b, 8)).astype(np.float32) * (i + 1),
             "sr": np.asarray(16000, np.int64)}
        np.savez(tmp_path / f"{i:03d}.npz", **d)
        out.append(d)
    return out


def test_axes_from_symbolic_dims():
    axes, sym = batch_axes(input_specs(_model()))
    assert (axes, sym) == ({"x": 0, "state": 1, "sr": None}, "batch")
    # no shared symbol and first dimensions that differ: every file is fed whole
    axes, sym = batch_axes(input_specs(_model(state_batch="b2")))
    assert axes == {"x": None, "state": None, "sr": None}


def test_rebatching_along_each_axis(tmp_path):
    files = _files(tmp_path)
    data = as_data(str(tmp_path), _model(), batch_size=4)
    batches = list(data.batches())
    assert [batch_size(b) for b in batches] == [4, 4]
    assert batches[0]["state"].shape == (2, 4, 8) and batches[0]["sr"].shape == ()
    np.testing.assert_array_equal(np.concatenate([b["state"] for b in batches], axis=1),
                                  np.concatenate([f["state"] for f in files], axis=1))
    assert data.count() == 8
    limited = as_data(str(tmp_path), _model(), batch_size=4, limit=3)
    assert [b["state"].shape for b in limited.batches()] == [(2, 3, 8)]


def test_scalar_must_stay_a_scalar(tmp_path):
    np.savez(tmp_path / "0.npz", x=np.zeros((1, 5, 4), np.float32), state=np.zeros((2, 1, 8), np.float32),
             sr=np.asarray([16000], np.int64))
    with pytest.raises(DataError, match="input 'sr' has shape \\(1,\\), the model expects rank 0"):
        list(as_data(str(tmp_path), _model()).batches())


def test_disagreeing_batch_is_an_error(tmp_path):
    np.savez(tmp_path / "0.npz", x=np.zeros((1, 5, 4), np.float32), state=np.zeros((2, 3, 8), np.float32),
             sr=np.asarray(16000, np.int64))
    with pytest.raises(DataError, match="disagree on the number of samples \\(1 vs 3 in 'state', batch axis 1\\)"):
        list(as_data(str(tmp_path), _model()).batches())


@pytest.mark.parametrize("state_batch", ["batch", "b2"])
def test_quantize_and_check_stateful_model(tmp_path, state_batch):
    model = _model(state_batch)
    files = _files(tmp_path)
    res = onnxfp8.quantize(model, str(tmp_path), QuantConfig(batch_size=4, summary_samples=3))
    # calibration saw every sample: the state projection's input range is the max over all files
    sess = make_session(model)
    want = 0.0
    for f in files:
        rows = sess.run(None, f)  # the FP32 model on each file
        s1 = f["state"] + f["x"].mean(axis=1) @ np.asarray(onnx.numpy_helper.to_array(model.graph.initializer[0]))
        want = max(want, float(np.abs(s1).max()))
        assert rows[1].shape == f["state"].shape
    assert res.plan.tensors["s1"].amax == pytest.approx(want, rel=1e-5)
    assert res.report.summary_samples == 3  # fed whole (b2): a file is one sample
    for o in res.report.outputs.values():
        assert o["sqnr_db"] > 20
    rep = check(model, res.model, str(tmp_path))
    assert rep.samples == (8 if state_batch == "batch" else 5)
    assert all(r.error.sqnr_db > 20 for r in rep.outputs.values())
