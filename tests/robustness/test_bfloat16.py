"""bfloat16 models: onnxruntime's CPU provider has no bfloat16 kernel for MatMul / Gemm / Conv / Add / Relu /
Softmax and its Python API cannot feed a bfloat16 array (measured with onnxruntime 1.32), so onnxfp8 cannot
calibrate or check such a model there: one line naming the file and a bfloat16 tensor, exit 2, nothing written
(it used to end in an internal error, exit 3, where onnxruntime loaded the model)."""
import hashlib

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxfp8
from onnxfp8.cli import cli
from onnxfp8.errors import ModelError

BF = TensorProto.BFLOAT16


def _bf16(name, a):
    a = np.asarray(a, np.float32)
    return helper.make_tensor(name, BF, a.shape, vals=a.astype(ml_dtypes.bfloat16).view(np.uint16).tobytes(), raw=True)


def _mlp(cast_inside=False):
    """x[N,16] -> MatMul -> Add -> Relu -> MatMul -> y[N,4] in bfloat16 (``cast_inside``: float32 in and out,
    Cast to bfloat16 in the graph, as mixed-precision exports write it)."""
    rng = np.random.default_rng(0)
    inits = [_bf16("w1", rng.standard_normal((16, 32)) * 0.3), _bf16("b1", rng.standard_normal(32) * 0.1),
             _bf16("w2", rng.standard_normal((32, 4)) * 0.3)]
    x = "x"
    nodes = []
    if cast_inside:
        nodes.append(helper.make_node("Cast", ["x"], ["xb"], name="to_bf16", to=BF))
        x = "xb"
    nodes += [helper.make_node("MatMul", [x, "w1"], ["h"], name="mm1"),
              helper.make_node("Add", ["h", "b1"], ["hb"], name="bias"),
              helper.make_node("Relu", ["hb"], ["r"], name="relu"),
              helper.make_node("MatMul", ["r", "w2"], ["yb" if cast_inside else "y"], name="mm2")]
    if cast_inside:
        nodes.append(helper.make_node("Cast", ["yb"], ["y"], name="to_f32", to=TensorProto.FLOAT))
    io = TensorProto.FLOAT if cast_inside else BF
    g = helper.make_graph(nodes, "bf16", [helper.make_tensor_value_info("x", io, ["N", 16])],
                          [helper.make_tensor_value_info("y", io, ["N", 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)


@pytest.mark.parametrize("cast_inside", [False, True], ids=["bf16-io", "cast-inside"])
def test_bfloat16_model_is_one_line_exit_2(runner, tmp_path, cast_inside):
    path = tmp_path / "bf16.onnx"
    onnx.save(_mlp(cast_inside), path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    calib = tmp_path / "calib"
    calib.mkdir()
    np.savez(calib / "a.npz", x=np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32))
    out = tmp_path / "q.onnx"
    r = runner.invoke(cli, ["quantize", str(path), "-c", str(calib), "-o", str(out)])
    err = r.stderr.strip()
    assert r.exit_code == 2, r.output
    assert err.startswith(f"error: {path}: a bfloat16 model (") and "export the model in float32 or float16" in err
    assert "\n" not in err and not out.exists()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    with pytest.raises(ModelError, match="a bfloat16 model"):
        onnxfp8.quantize(_mlp(cast_inside), [{"x": np.ones((4, 16), np.float32)}])


def test_float32_model_is_not_refused():
    m = _mlp(cast_inside=True)
    for t in m.graph.initializer:  # the same model in float32
        a = np.frombuffer(t.raw_data, np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)
        t.data_type, t.raw_data = TensorProto.FLOAT, a.tobytes()
    m.graph.node[0].attribute[0].i = TensorProto.FLOAT
    res = onnxfp8.quantize(m, [{"x": np.random.default_rng(i).standard_normal((4, 16)).astype(np.float32)}
                               for i in range(4)])
    assert res.plan.nodes["mm1"].quantized and res.plan.nodes["mm2"].quantized
