"""Loading and saving at the edges: opset upgrade, IR version, node naming, external data (the >2 GB path,
exercised by lowering the threshold), atomic writes and never overwriting the input."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import onnxfp8
from onnxfp8 import modelio, outputs
from onnxfp8.cli import cli
from onnxfp8.errors import ModelError
from onnxfp8.modelio import load_model, make_session, prepare_model, save_model


def _mlp(opset=13, ir_version=7, named=True):
    """x[4,16] -> MatMul -> Relu -> Gemm: unnamed nodes when ``named`` is False."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (16, 128)).astype(np.float32)  # 2 KB as FP8: external data when the limit is low
    w2 = rng.normal(0, 0.1, (8, 128)).astype(np.float32)
    inits = [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm" if named else ""),
             helper.make_node("Relu", ["h"], ["r"], name="relu" if named else ""),
             helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1, name="gemm" if named else "")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def _calib(n=8, seed=1):
    return [{"x": np.random.default_rng(seed).normal(0, 1, (n, 16)).astype(np.float32)}]


def test_opset13_model_is_upgraded_and_quantizes():
    res = onnxfp8.quantize(_mlp(opset=13), _calib(), onnxfp8.QuantConfig(summary_samples=0))
    assert modelio.ai_onnx_opset(res.model) >= 19
    assert modelio.MIN_IR_VERSION <= res.model.ir_version <= modelio.MAX_IR_VERSION
    onnx.checker.check_model(res.model, full_check=True)
    x = _calib(seed=2)[0]
    ref = make_session(_mlp(opset=13)).run(None, x)[0]
    got = make_session(res.model).run(None, x)[0]
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def test_old_opset_is_refused_in_one_line():
    with pytest.raises(ModelError, match=r"^m\.onnx: opset 11 is not supported; export with opset 13 or newer$"):
        prepare_model(_mlp(opset=11), source="m.onnx")


def test_unnamed_nodes_get_unique_stable_names():
    m = prepare_model(_mlp(named=False))
    names = [n.name for n in m.graph.node]
    assert names == ["MatMul_0", "Relu_1", "Gemm_2"]


def test_newer_ir_version_clamped_to_what_onnxruntime_loads():
    m = _mlp(opset=19, ir_version=11)
    assert prepare_model(m).ir_version == modelio.MAX_IR_VERSION


def test_bad_model_files_one_line(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a model at all\xff" * 10)
    with pytest.raises(ModelError, match=r"junk\.onnx: not a readable ONNX model"):
        load_model(str(junk))
    with pytest.raises(ModelError, match=r"nope\.onnx: no such file"):
        load_model(str(tmp_path / "nope.onnx"))
    with pytest.raises(ModelError, match="is a directory"):
        load_model(str(tmp_path))


def test_refuses_to_overwrite_input_before_any_work(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(_mlp(), str(path))
    before = path.read_bytes()
    with pytest.raises(ModelError, match="refusing to overwrite the input model"):
        onnxfp8.quantize(str(path), _calib(), output=str(path))
    assert path.read_bytes() == before
    np.savez(tmp_path / "c.npz", x=_calib()[0]["x"])
    r = CliRunner().invoke(cli, ["quantize", str(path), "--calib", str(tmp_path / "c.npz"), "-o", str(path)])
    assert r.exit_code == 2 and "refusing to overwrite the input model" in r.output
    assert r.output.count("\n") == 1 and "Traceback" not in r.output
    assert path.read_bytes() == before


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"

    def broken_write(f, data):
        with open(f, "wb") as fh:
            fh.write(data[:10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs, "_write", broken_write)
    with pytest.raises(ModelError, match=r"out\.onnx: cannot write the output model \(No space left on device\)"):
        save_model(_mlp(), str(out))
    assert os.listdir(tmp_path) == []  # neither the output nor the temporary folder


def test_existing_output_replaced_atomically(tmp_path):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old")
    save_model(_mlp(), str(out))
    assert onnx.load(str(out)).graph.name == "mlp"
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]


def test_external_data_paths(tmp_path, monkeypatch):
    """The >2 GB code paths, with the threshold lowered to a few KB: an input with external data loads, the
    session runs it through a temporary file, and the output is written with its data beside it."""
    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    onnx.save_model(_mlp(), str(src), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    assert (src.parent / "model.onnx.data").exists()
    monkeypatch.setattr(modelio, "TWO_GB", 4096)
    out = tmp_path / "out" / "model.e4m3.onnx"
    out.parent.mkdir()
    res = onnxfp8.quantize(str(src), _calib(), onnxfp8.QuantConfig(summary_samples=8), output=str(out))
    assert sorted(os.listdir(out.parent)) == ["model.e4m3.onnx", "model.e4m3.onnx.data"]
    assert os.path.getsize(out) < 4096  # the weights are in the data file
    reloaded = load_model(str(out))
    x = _calib(seed=2)[0]
    want = make_session(res.model).run(None, x)[0]
    np.testing.assert_array_equal(make_session(str(out)).run(None, x)[0], want)
    np.testing.assert_array_equal(make_session(reloaded).run(None, x)[0], want)  # FP8 weights as arrays
    assert np.isfinite(res.report.outputs["y"]["sqnr_db"])


def test_opset_raised_in_place_when_no_op_changed():
    """MatMul/Relu/Gemm are the same at opset 13 and 19: the import is raised without the version converter."""
    m = prepare_model(_mlp(opset=13))
    assert modelio.ai_onnx_opset(m) == 19
    assert [n.op_type for n in m.graph.node] == ["MatMul", "Relu", "Gemm"]


def test_opset_converted_when_an_op_changed():
    """ReduceMean took its axes as an attribute until opset 18: the converter moves them to an input."""
    g = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["y"], axes=[1], keepdims=1, name="rm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1])])
    m = prepare_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=7))
    assert modelio.ai_onnx_opset(m) == 19
    rm = m.graph.node[-1]
    assert rm.op_type == "ReduceMean" and len(rm.input) == 2 and not rm.attribute[0].name == "axes"
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(make_session(m).run(None, {"x": x})[0], x.mean(axis=1, keepdims=True))


def _heavy_model():
    """ReduceMean (axes an attribute until opset 18: the converter must rewrite it) -> MatMul with a 4 KB
    FP32 weight, plus an FP8 weight (a DequantizeLinear) and a small bias."""
    rng = np.random.default_rng(3)
    w = rng.normal(0, 1, (32, 32)).astype(np.float32)
    w8 = rng.normal(0, 1, (32, 40)).astype(np.float32)
    q8 = onnx.helper.make_tensor("w8q", TensorProto.FLOAT8E4M3FN, w8.shape,
                                 w8.astype(onnx.helper.tensor_dtype_to_np_dtype(TensorProto.FLOAT8E4M3FN)).tobytes(),
                                 raw=True)
    inits = [onnx.numpy_helper.from_array(w, "w"), q8, onnx.numpy_helper.from_array(np.float32(0.5), "s"),
             onnx.numpy_helper.from_array(rng.normal(0, 1, 40).astype(np.float32), "b")]
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=0, name="rm"),
             helper.make_node("MatMul", ["m", "w"], ["h"], name="mm"),
             helper.make_node("DequantizeLinear", ["w8q", "s"], ["w8"], name="dq"),
             helper.make_node("MatMul", ["h", "w8"], ["h8"], name="mm8"),
             helper.make_node("Add", ["h8", "b"], ["y"], name="add")]
    g = helper.make_graph(nodes, "heavy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 40])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=9), w, w8


def test_light_copy_holds_no_weight_bytes_and_heals_to_the_same_model():
    m, _, _ = _heavy_model()
    before = m.SerializeToString(deterministic=True)
    light, heavy = modelio.light_copy(m)
    assert sorted(heavy) == ["w", "w8q"]  # 4096 and 1280 bytes; the 4-byte scale and 160-byte bias stay
    assert len(light.SerializeToString()) < 1500 < len(before)
    assert m.SerializeToString(deterministic=True) == before  # the source is untouched
    assert modelio.heal(light, heavy).SerializeToString(deterministic=True) == before


def test_prepare_convert_and_infer_keep_the_weights():
    """The version converter and shape inference see a light copy; the prepared model holds the weights and
    computes what numpy does (converter's ReduceMean rewrite included)."""
    m, w, w8 = _heavy_model()
    p = prepare_model(m)
    rm = next(n for n in p.graph.node if n.op_type == "ReduceMean")
    assert modelio.ai_onnx_opset(p) == 19 and len(rm.input) == 2  # axes moved to an input
    assert any(v.name == "h" for v in p.graph.value_info)  # shapes inferred
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(next(t for t in p.graph.initializer if t.name == "w")), w)
    x = np.random.default_rng(4).normal(0, 1, (2, 3, 32)).astype(np.float32)
    w8q = w8.astype(onnx.helper.tensor_dtype_to_np_dtype(TensorProto.FLOAT8E4M3FN)).astype(np.float32) * 0.5
    want = (x.mean(axis=1) @ w) @ w8q + onnx.numpy_helper.to_array(p.graph.initializer[-1])
    got = make_session(p).run(None, {"x": x})[0]  # FP32 and FP8 weights handed to onnxruntime as arrays
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_check_model_on_a_light_copy(tmp_path):
    m, _, _ = _heavy_model()
    p = prepare_model(m)
    modelio.check_model(p)
    next(n for n in p.graph.node if n.op_type == "MatMul").op_type = "NoSuchOp"
    with pytest.raises(onnx.checker.ValidationError, match="NoSuchOp"):
        modelio.check_model(p)


def test_model_bytes_from_the_payload():
    m, _, _ = _heavy_model()
    exact = m.ByteSize()
    assert abs(modelio.model_bytes(m) - exact) <= 2 * 48  # each placeholder stands for a big tensor's header


def test_light_export_of_a_graph_runs_like_the_whole_export():
    """to_light_model leaves the big constants' bytes in the graph (loaded or not, float32 or float8) and
    make_session takes them as arrays: same outputs as the whole export, and the graph is unchanged."""
    m, _, _ = _heavy_model()
    graph = modelio.to_graph(prepare_model(m))
    w8q = next(t for t in graph.tensors().values() if t.name == "w8q")
    w8q.values = w8q.values.copy()  # one constant loaded into numpy (float8), the other left lazy
    whole = modelio.to_model(graph.copy())
    light, arrays = modelio.to_light_model(graph.copy())
    assert sorted(arrays) == ["w", "w8q"] and len(light.SerializeToString()) < 1500
    x = np.random.default_rng(5).normal(0, 1, (3, 3, 32)).astype(np.float32)
    np.testing.assert_array_equal(make_session(light, arrays=arrays).run(None, {"x": x})[0],
                                  make_session(whole).run(None, {"x": x})[0])
    assert modelio.to_model(graph.copy()).SerializeToString(deterministic=True) == whole.SerializeToString(deterministic=True)
    with pytest.raises(ModelError, match="no data for the tensor 'w8?q?'"):
        make_session(light)


def test_graph_holds_no_reference_into_the_source_model():
    """After to_graph + load_values nothing refers into the source ModelProto (graphsurgeon's lazy constants
    and its import_domains did), so quantize() can let the source's protobuf memory go."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    m, w, _ = _heavy_model()
    graph = modelio.to_graph(prepare_model(m))
    assert isinstance(graph.import_domains, list)
    assert modelio.load_values(graph) >= 2
    lazy = [t.name for t in graph.tensors().values() if isinstance(getattr(t, "_values", None), LazyValues)]
    assert lazy == ["w8q"]  # float8 stays lazy: numpy has no float8 of its own
    np.testing.assert_array_equal(next(t for t in graph.tensors().values() if t.name == "w").values, w)
