"""The bad-model corpus (issue 13 items 3-6): each case one line, exit 2, before any work, from the CLI and
the Python API; control flow is named in a warning."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxfp8
from onnxfp8.cli import cli
from onnxfp8.errors import DataError, ModelError

import robust_corpus as corpus


def _broken(case):
    m = corpus.mlp()
    if case == "undefined-tensor":
        m.graph.node[1].input[0] = "nope"
    elif case == "wrong-arity":
        m.graph.node[0].input.append("x")
    elif case == "shape-mismatch":
        m.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.zeros((5, 4), np.float32), "w2"))
    elif case == "duplicate-names":
        m.graph.node[1].output[0] = "h"
        m.graph.node[2].input[0] = "h"
    elif case == "custom-domain":
        m.graph.node[1].domain = "my.custom"
        m.opset_import.append(helper.make_opsetid("my.custom", 1))
    elif case == "opset-99":
        m = corpus.mlp(opset=99)
    elif case == "ir-99":
        m.ir_version = 99
    elif case == "unknown-op":
        m.graph.node[1].op_type = "Frobnicate"
    elif case == "nan-weight":
        m = corpus.mlp(nan_weight=True)
    elif case == "inf-weight":
        m = corpus.mlp(inf_weight=True)
    return m


CASES = {
    "undefined-tensor": "'nope'",
    "wrong-arity": "input size 3",
    "shape-mismatch": "Dimension mismatch",
    "duplicate-names": "(h)",
    "custom-domain": "custom domain 'my.custom'",
    "opset-99": "opset 99 is newer than the installed onnx",
    "ir-99": "IR version 99 is newer than the installed onnx",
    "unknown-op": "Frobnicate",
    "nan-weight": "weight 'w1' holds 1 NaN value(s) of 128",
    "inf-weight": "weight 'w2' holds 1 Inf value(s) of 64: it is read as a weight",
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_models_are_one_line_exit_2(runner, tmp_path, case, monkeypatch):
    from onnxfp8.passes.calibrate import Calibrate

    def never(*a, **k):  # found up front: no pass runs
        raise AssertionError("calibration ran")

    monkeypatch.setattr(Calibrate, "run", never)
    path, c = corpus.write(tmp_path, _broken(case))
    r = runner.invoke(cli, ["quantize", str(path), "-c", str(c), "-o", str(tmp_path / "q.onnx")])
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    err = r.stderr.strip()
    assert err.startswith(f"error: {path}: ") and "\n" not in err and len(err) < 300, err
    assert CASES[case] in err and "onnxruntime_src" not in err and "pass '" not in err, err
    assert not (tmp_path / "q.onnx").exists()
    with pytest.raises(ModelError, match="."):
        onnxfp8.quantize(_broken(case), corpus.calib())


def _qdq_model(style, fmt):
    return onnxfp8.quantize(corpus.mlp(), corpus.calib(), config=onnxfp8.QuantConfig(style=style, format=fmt)).model


@pytest.mark.parametrize("style,fmt,needle", [("qdq", "e4m3", "QuantizeLinear node(s)"),
                                              ("qdq", "int8", "DequantizeLinear node(s)"),
                                              ("emulate", "e4m3", "Cast to FP8"),
                                              ("emulate", "int8", "Cast of an 8-bit weight"),
                                              ("qdq", "e3m4", "Gather decoding 8-bit codes")])
def test_already_quantized_models_are_refused(runner, tmp_path, style, fmt, needle):
    q = _qdq_model(style, fmt)
    path, c = corpus.write(tmp_path, q)
    r = runner.invoke(cli, ["quantize", str(path), "-c", str(c), "-o", str(tmp_path / "qq.onnx")])
    assert r.exit_code == 2 and "already quantized:" in r.stderr and needle in r.stderr, r.stderr
    assert "\n" not in r.stderr.strip()
    with pytest.raises(ModelError, match="already quantized"):
        onnxfp8.quantize(q, corpus.calib())


def test_nothing_to_quantize_is_exit_2_with_reasons_unless_allowed(runner, tmp_path):
    path, c = corpus.write(tmp_path, corpus.mlp())
    out = tmp_path / "q.onnx"
    r = runner.invoke(cli, ["quantize", str(path), "-c", str(c), "-o", str(out), "--op-types", "conv"])
    assert r.exit_code == 2 and "nothing to quantize" in r.stderr and "op type MatMul" in r.stderr, r.stderr
    assert "--allow-empty" in r.stderr and not out.exists()
    r = runner.invoke(cli, ["quantize", str(path), "-c", str(c), "-o", str(out), "--exclude-op", "MatMul,Gemm"])
    assert r.exit_code == 2 and "nothing to quantize" in r.stderr
    r = runner.invoke(cli, ["quantize", str(path), "-c", str(c), "-o", str(out), "--exclude-op", "MatMul,Gemm",
                            "--allow-empty"])
    assert r.exit_code == 0 and out.exists() and "quantized 0 node(s)" in r.stdout
    with pytest.raises(ModelError, match="nothing to quantize"):
        onnxfp8.quantize(corpus.mlp(), corpus.calib(), config=onnxfp8.QuantConfig(exclude_ops=("MatMul", "Gemm")))


def test_nan_on_the_calibration_data_names_the_first_tensor(runner, tmp_path):
    path, c = corpus.write(tmp_path, corpus.log_model())
    out = tmp_path / "q.onnx"
    r = runner.invoke(cli, ["quantize", str(path), "-c", str(c), "-o", str(out)])
    assert r.exit_code == 2, r.stderr
    err = r.stderr.strip()
    assert "produces NaN on the calibration data" in err and "first at tensor 'l' (output of Log 'log')" in err
    assert "\n" not in err and not out.exists()
    for dynamic in (False, True):
        cfg = onnxfp8.QuantConfig(dynamic=dynamic, activations_format="e4m3" if dynamic else None)
        with pytest.raises(DataError, match="first at tensor 'l'"):
            onnxfp8.quantize(corpus.log_model(), corpus.calib(), config=cfg)


def _loop_model():
    """x -> MatMul -> Loop (body: MatMul by a weight) -> y: the body's MatMul stays FP32."""
    body = helper.make_graph(
        [helper.make_node("MatMul", ["s_in", "wb"], ["s_out"], name="body_mm"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond")], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_in", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_out", TensorProto.FLOAT, ["N", 16])],
        [numpy_helper.from_array(np.eye(16, dtype=np.float32) * 0.9, "wb")])
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm"),
             helper.make_node("Loop", ["trip", "cond", "h"], ["y"], name="loop", body=body)]
    g = helper.make_graph(nodes, "loopm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
                          [numpy_helper.from_array(corpus._w(8, 16), "w1"),
                           numpy_helper.from_array(np.array(2, np.int64), "trip"),
                           numpy_helper.from_array(np.array(True), "cond")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_control_flow_bodies_are_named_in_a_warning(runner, tmp_path):
    path, c = corpus.write(tmp_path, _loop_model())
    r = runner.invoke(cli, ["quantize", str(path), "-c", str(c), "-o", str(tmp_path / "q.onnx")])
    assert r.exit_code == 0, r.stderr
    assert ("warning: 1 node(s) inside If/Loop/Scan bodies left FP32 (onnxfp8 does not quantize subgraphs): "
            "MatMul 'body_mm' (Loop 'loop' body)") in r.stdout
    res = onnxfp8.quantize(_loop_model(), corpus.calib())
    assert res.report.control_flow == [{"node": "body_mm", "op_type": "MatMul", "parent": "loop", "parent_op": "Loop",
                                        "body": "body"}]
    assert res.plan.nodes["mm"].quantized


def test_check_counts_nonfinite_per_output_and_fails(runner, tmp_path):
    """Only the quantized model is non-finite: the table shows the counts, not inf / 1.00000, and fails."""
    fp32, c = corpus.write(tmp_path, corpus.mlp())
    broken = corpus.mlp()
    broken.graph.node[1].op_type = "Log"  # log of negative values: NaN in the 'quantized' model
    qpath = tmp_path / "q.onnx"
    qpath.write_bytes(broken.SerializeToString())
    r = runner.invoke(cli, ["check", str(fp32), str(qpath), "-d", str(c)])
    assert r.exit_code == 1, r.stderr
    row = next(ln for ln in r.stdout.splitlines() if ln.startswith("y "))
    assert "inf" not in row and "1.00000" not in row and "FAIL" in row
    n = int(row.split()[4].split("/")[1])
    assert n > 0 and row.split()[4] == f"0/{n}"
    assert "NaN/Inf (FP32 model 0, quantized model" in r.stdout
    r = runner.invoke(cli, ["check", str(fp32), str(fp32), "-d", str(c)])
    assert r.exit_code == 0 and "PASS" in r.stdout


@pytest.mark.parametrize("content,needle", [(b"", "the model has no nodes"), (b"not a model \x00\xff", "not a readable ONNX model")])
def test_lint_of_a_file_that_is_not_a_model_is_exit_2(runner, tmp_path, content, needle):
    p = tmp_path / "x.onnx"
    p.write_bytes(content)
    r = runner.invoke(cli, ["lint", str(p)])
    assert r.exit_code == 2 and needle in r.stderr and "\n" not in r.stderr.strip(), r.stderr
    r = runner.invoke(cli, ["lint", str(tmp_path)])
    assert r.exit_code == 2 and "is a directory" in r.stderr


def test_lint_of_an_fp32_model_is_exit_1_nothing_quantized(runner, tmp_path):
    path, _ = corpus.write(tmp_path, corpus.mlp())
    r = runner.invoke(cli, ["lint", str(path)])
    assert r.exit_code == 1 and "[nothing-quantized]" in r.stdout, r.stdout
    from onnxfp8.verify.lint import lint_model

    q = onnxfp8.quantize(corpus.mlp(), corpus.calib()).model
    assert not [f for f in lint_model(q).findings if f.check == "nothing-quantized"]


def test_unknown_op_type_in_exclude_op_is_a_warning(runner, tmp_path):
    path, c = corpus.write(tmp_path, corpus.mlp())
    r = runner.invoke(cli, ["quantize", str(path), "-c", str(c), "-o", str(tmp_path / "q.onnx"), "--exclude-op", "gemm"])
    assert r.exit_code == 0, r.stderr
    assert "warning: --exclude-op 'gemm' is no ONNX operator type (did you mean Gemm?): it matches nothing" in r.stdout
    r = runner.invoke(cli, ["quantize", str(path), "-c", str(c), "-o", str(tmp_path / "q.onnx"), "--op-types", "conv"])
    assert r.exit_code == 2 and "nothing to quantize" in r.stderr
