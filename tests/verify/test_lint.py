"""TensorRT lint: hand-made Q/DQ graphs, each with one placement TensorRT cannot fuse, give the expected
finding (check id, node names); a correct graph is clean; the CLI exits 1 on errors, 0 when clean, 2 on bad input."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxfp8.cli import cli
from onnxfp8.errors import ConfigError, ModelError
from onnxfp8.verify.lint import lint_model

F8 = TensorProto.FLOAT8E4M3FN


def _zp(name, dtype=F8, shape=()):
    return helper.make_tensor(name, dtype, list(shape), [0] * int(np.prod(shape)))


def _f(name, arr):
    return numpy_helper.from_array(np.asarray(arr, np.float32), name)


def conv_model(cin=16, cout=32, k=3, *, wtype=F8, act_zp=0, axis=0, per_channel=True, out_dq=False,
               quant_input=True, quant_weight=True, bias_q=False, dyn_scale=False, atype=None, group=1):
    """x -> Q -> DQ -> Conv(W: FP8 init -> DQ, B) -> Relu -> y, with one thing changed per argument."""
    nodes, inits = [], []
    x_in = "x"
    if quant_input:
        inits += [_f("xs", 0.05), helper.make_tensor("xzp", atype or wtype, [], [act_zp])]
        scale = "xs"
        if dyn_scale:
            nodes += [helper.make_node("ReduceMax", ["x"], ["xmax"], name="dyn/max", keepdims=0)]
            scale = "xmax"
        nodes += [helper.make_node("QuantizeLinear", ["x", scale, "xzp"], ["xq"], name="x/Q"),
                  helper.make_node("DequantizeLinear", ["xq", scale, "xzp"], ["xdq"], name="x/DQ")]
        x_in = "xdq"
    w = np.random.default_rng(0).standard_normal((cout, cin // group, k, k)).astype(np.float32)
    if quant_weight:
        n_s = w.shape[axis] if per_channel else 1
        inits += [helper.make_tensor("wq", wtype, list(w.shape), np.zeros(w.size, np.int64).tolist()),
                  _f("ws", np.full(n_s, 0.01) if per_channel else 0.01), _zp("wzp", wtype, (n_s,) if per_channel else ())]
        attrs = {"axis": axis} if per_channel else {}
        nodes.append(helper.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["w"], name="w/DQ", **attrs))
    else:
        inits.append(_f("w", w))
    b = "b"
    inits.append(_f("b", np.zeros(cout)))
    if bias_q:
        inits += [helper.make_tensor("bq", F8, [cout], [0] * cout), _f("bs", 0.01), _zp("bzp")]
        nodes.append(helper.make_node("DequantizeLinear", ["bq", "bs", "bzp"], ["bdq"], name="b/DQ"))
        b = "bdq"
    nodes.append(helper.make_node("Conv", [x_in, "w", b], ["c"], name="conv", pads=[1, 1, 1, 1],
                                  **({"group": group} if group > 1 else {})))
    y = "c"
    if out_dq:
        inits += [_f("cs", 0.1), _zp("czp")]
        nodes += [helper.make_node("QuantizeLinear", ["c", "cs", "czp"], ["cq"], name="c/Q"),
                  helper.make_node("DequantizeLinear", ["cq", "cs", "czp"], ["y"], name="c/DQ")]
    else:
        nodes.append(helper.make_node("Relu", ["c"], ["y"], name="relu"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, 8, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def checks(model):
    rep = lint_model(model)
    return {(f.check, f.severity) for f in rep.findings}, rep


def test_good_conv_is_clean():
    found, rep = checks(conv_model())
    assert found == set(), rep.summary()
    assert rep.qdq_nodes == 3 and rep.exit_code() == 0
    onnx.checker.check_model(conv_model(), full_check=True)  # the fixtures are valid ONNX


@pytest.mark.parametrize("kwargs, check, names", [
    (dict(wtype=TensorProto.FLOAT8E5M2), "dtype", {"x/Q", "x/DQ", "w/DQ"}),
    (dict(wtype=TensorProto.UINT8), "dtype", {"x/Q", "x/DQ", "w/DQ"}),
    (dict(wtype=TensorProto.INT8, act_zp=3), "zero-point", {"x/Q", "x/DQ"}),
    (dict(axis=1), "axis", {"w/DQ", "conv"}),
    (dict(out_dq=True), "output", {"c/DQ"}),
    (dict(bias_q=True), "bias", {"b/DQ", "conv"}),
    (dict(cin=3), "channels", {"conv"}),
    (dict(cout=24), "channels", {"conv"}),
    (dict(k=7), "channels", {"conv"}),
    (dict(cin=32, group=4), "channels", {"conv"}),  # 8 channels per group (the check selection makes too)
    (dict(quant_input=False), "half-quantized", {"conv"}),
    (dict(atype=TensorProto.INT8), "mixed-types", {"conv"}),
    (dict(dyn_scale=True), "scale", {"x/Q", "x/DQ"}),
])
def test_bad_placement_is_found(kwargs, check, names, tmp_path):
    model = conv_model(**kwargs)
    found, rep = checks(model)
    assert (check, "error") in found, rep.summary()
    hit = {n for f in rep.findings if f.check == check for n in f.nodes}
    assert hit == names, rep.summary()
    assert rep.exit_code() == 1
    # the command line: exit code 1 and a line naming the check and the nodes
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    res = CliRunner().invoke(cli, ["lint", str(path), "--target", "tensorrt"])
    assert res.exit_code == 1, res.output
    lines = [line[len(f"error: [{check}] "):] for line in res.output.splitlines()
             if line.startswith(f"error: [{check}] ")]
    assert {n for line in lines for n in line.split(": ", 1)[0].split(", ")} == names, res.output
    assert res.output.splitlines()[-1].endswith("error(s), 0 warning(s)")


def test_int8_is_accepted():
    found, rep = checks(conv_model(wtype=TensorProto.INT8))
    assert found == set(), rep.summary()


def _chain(op, extra_inputs=(), attrs=None, out_shape=(2, 16)):
    """x -> Q -> DQ -> op -> y"""
    inits = [_f("s", 0.1), _zp("zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="Q"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"], name="DQ"),
             helper.make_node(op, ["dq", *extra_inputs], ["y"], name="op", **(attrs or {}))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def test_dq_feeding_softmax_is_unfused():
    found, rep = checks(_chain("Softmax", attrs={"axis": -1}))
    assert ("unfused-dq", "error") in found
    f = next(f for f in rep.findings if f.check == "unfused-dq")
    assert f.nodes == ["DQ", "op"] and "Softmax" in f.message


def test_dq_through_reshape_to_matmul_is_fused_and_gemv_found():
    inits = [_f("s", 0.1), _zp("zp"), numpy_helper.from_array(np.array([1, 16], np.int64), "shape"),
             helper.make_tensor("wq", F8, [16, 32], [0] * 512), _f("ws", np.full(32, 0.01)), _zp("wzp", F8, (32,))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="Q"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"], name="DQ"),
             helper.make_node("Reshape", ["dq", "shape"], ["r"], name="reshape"),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["w"], name="w/DQ", axis=1),
             helper.make_node("MatMul", ["r", "w"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])], inits)
    found, rep = checks(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]))
    assert found == {("channels", "error")}, rep.summary()  # one row: a GEMV
    assert "GEMV" in rep.findings[0].message and rep.findings[0].nodes == ["mm"]


def test_orphan_q_and_emulated_casts():
    inits = [_f("s", 0.1), _zp("zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="Q"),
             helper.make_node("Cast", ["q"], ["y8"], name="cast_back", to=TensorProto.FLOAT),
             helper.make_node("Cast", ["x"], ["x8"], name="fake", to=F8, saturate=1),
             helper.make_node("Cast", ["x8"], ["xf"], name="fake_back", to=TensorProto.FLOAT),
             helper.make_node("Add", ["y8", "xf"], ["y"], name="add")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])], inits)
    found, rep = checks(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]))
    assert {"orphan", "emulated"} <= {c for c, _ in found}, rep.summary()
    assert next(f for f in rep.findings if f.check == "emulated").nodes == ["fake"]


def test_dq_relu_is_a_warning():
    """conv -> Q -> DQ -> Relu -> conv2: what onnxfp8 emits by default (the Relu's input is quantized)."""
    m = conv_model(out_dq=True)
    g = m.graph
    w2 = numpy_helper.from_array(np.zeros((32, 32, 1, 1), np.float32), "w2")
    g.initializer.extend([helper.make_tensor("w2q", F8, [32, 32, 1, 1], [0] * 1024), _f("w2s", np.full(32, 0.01)),
                          _zp("w2zp", F8, (32,))])
    del w2
    g.output[0].name = "z"
    g.node.extend([helper.make_node("Relu", ["y"], ["r"], name="relu2"),
                   helper.make_node("DequantizeLinear", ["w2q", "w2s", "w2zp"], ["w2dq"], name="w2/DQ", axis=0),
                   helper.make_node("Conv", ["r", "w2dq"], ["z"], name="conv2")])
    found, rep = checks(m)
    assert found == {("dq-relu", "warning")}, rep.summary()
    assert rep.exit_code() == 0 and rep.exit_code(strict=True) == 1


def test_cli_exit_codes(tmp_path):
    runner = CliRunner()
    bad, good = tmp_path / "bad.onnx", tmp_path / "good.onnx"
    onnx.save(conv_model(cin=3), bad)
    onnx.save(conv_model(), good)
    res = runner.invoke(cli, ["lint", str(bad), "--target", "tensorrt", "--json", str(tmp_path / "l.json")])
    assert res.exit_code == 1
    assert "error: [channels] conv: Conv with 3 input / 32 output channels" in res.output
    assert '"errors": 1' in (tmp_path / "l.json").read_text()
    res = runner.invoke(cli, ["lint", str(good)])
    assert res.exit_code == 0 and res.output.strip().endswith("clean")
    res = runner.invoke(cli, ["lint", str(tmp_path / "missing.onnx")])
    assert res.exit_code == 2 and "missing.onnx: no such file" in res.stderr
    with pytest.raises(ConfigError):
        lint_model(conv_model(), target="openvino")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="junk.onnx: not a readable ONNX model"):
        lint_model(str(tmp_path / "junk.onnx"))


def test_path_like_model(tmp_path):
    """A pathlib.Path is read like a str path (it was taken for a ModelProto: AttributeError)."""
    path = tmp_path / "bad.onnx"
    onnx.save(conv_model(cin=3), path)
    rep = lint_model(path)
    assert rep.source == str(path) and [f.check for f in rep.errors] == ["channels"]
    with pytest.raises(ModelError, match="missing.onnx: no such file"):
        lint_model(tmp_path / "missing.onnx")


def test_selection_and_lint_share_one_tensorrt_rule():
    """--target tensorrt selection and lint ask the same function (onnxfp8/tensorrt.py): a grouped Conv with 8
    channels per group is left FP32 by the rule with the very reason lint reports for it."""
    import onnx_graphsurgeon as gs

    from onnxfp8.rules import GraphInfo, TensorRTRule
    from onnxfp8.tensorrt import weighted_problem

    why = weighted_problem("Conv", {"group": 4}, (32, 8, 3, 3), [1, 32, 8, 8])
    assert why.startswith("grouped Conv with 8 channels per group")
    x = gs.Variable("x", np.float32, [1, 32, 8, 8])
    y = gs.Variable("y", np.float32, [1, 32, 8, 8])
    w = gs.Constant("w", np.ones((32, 8, 3, 3), np.float32))
    node = gs.Node("Conv", "conv", attrs={"group": 4}, inputs=[x, w], outputs=[y])
    d = TensorRTRule(("Conv",)).decide(node, GraphInfo(compute_order=["conv"]))
    assert d is not None and not d.include and d.reason == f"{why} (--target tensorrt)"
    rep = lint_model(conv_model(cin=32, group=4))
    assert [f.message for f in rep.findings if f.check == "channels"] == [why]
