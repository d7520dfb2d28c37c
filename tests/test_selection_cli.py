"""Selection rules from the command line: --exclude-node / --include-node with globs, /regex/ and re:regex
(what each matched in the summary and the report; a pattern matching nothing exits 2 with one line),
--exclude-op, --keep-first-last, --target tensorrt."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from onnxfp8.cli import cli


@pytest.fixture(scope="module")
def tr(example_models):
    return example_models["transformer"]


def _quantize(ex, tmp_path, *args):
    out = tmp_path / "q.onnx"
    report = tmp_path / "report.json"
    res = CliRunner().invoke(cli, ["quantize", str(ex["model"]), "--calib", str(ex["calib"]), "-o", str(out),
                                   "--calib-samples", "8", "--report", str(report), *args])
    rep = json.loads(report.read_text()) if res.exit_code == 0 else None
    return res, rep


def _decisions(rep):
    return {d["node"]: d for d in rep["plan"]["nodes"]}


def test_exclude_patterns_report_what_they_matched(tr, tmp_path):
    # Gather listed by name: embedding tables are quantized only when asked for (rules.DefaultEmbeddingRule)
    res, rep = _quantize(tr, tmp_path, "--exclude-node", "layer0/attn/*_proj", "--exclude-node", "/ffn/fc[12]$/",
                         "--exclude-node", "re:^classifier$", "--op-types", "Conv,ConvTranspose,Gemm,MatMul,Gather")
    assert res.exit_code == 0, res.output
    line = next(l for l in res.output.splitlines() if l.startswith("node patterns: "))
    assert ("--exclude-node 'layer0/attn/*_proj' matched 4 node(s): layer0/attn/q_proj, layer0/attn/k_proj, "
            "layer0/attn/v_proj, layer0/attn/out_proj") in line
    assert "--exclude-node '/ffn/fc[12]$/' matched 2 node(s): layer0/ffn/fc1, layer0/ffn/fc2" in line
    assert "--exclude-node 're:^classifier$' matched 1 node(s): classifier" in line
    d = _decisions(rep)
    assert not d["layer0/attn/q_proj"]["quantized"]
    assert d["layer0/attn/q_proj"]["reason"] == "name matches --exclude-node 'layer0/attn/*_proj'"
    assert d["layer0/ffn/fc2"]["reason"] == "name matches --exclude-node '/ffn/fc[12]$/'"
    quantized = {n for n, x in d.items() if x["quantized"]}
    assert quantized == {"embeddings/word_embeddings"}
    assert {"flag": "--exclude-node", "pattern": "re:^classifier$", "nodes": ["classifier"]} in rep["patterns"]


def test_include_node_restricts(tr, tmp_path):
    res, rep = _quantize(tr, tmp_path, "--include-node", "*/ffn/*")
    assert res.exit_code == 0, res.output
    d = _decisions(rep)
    assert {n for n, x in d.items() if x["quantized"]} == {"layer0/ffn/fc1", "layer0/ffn/fc2"}
    assert d["layer0/attn/q_proj"]["reason"] == "name does not match any --include-node pattern"
    assert "--include-node '*/ffn/*' matched" in res.output


@pytest.mark.parametrize("flag, pattern", [("--exclude-node", "layer9/*"), ("--include-node", "/^attn/"),
                                           ("--exclude-node", "re:q_porj")])
def test_pattern_matching_nothing_exits_2(tr, tmp_path, flag, pattern):
    res, _ = _quantize(tr, tmp_path, flag, pattern)
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert lines == [f"error: {tr['model']}: {flag} pattern '{pattern}' matches no node"]
    assert not (tmp_path / "q.onnx").exists()


def test_bad_regex_exits_2(tr, tmp_path):
    res, _ = _quantize(tr, tmp_path, "--exclude-node", "/fc[/")
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines() == [
        "error: exclude_nodes: '/fc[/' is not a valid regular expression (unterminated character set at position 2)"]


def test_regex_with_comma_is_not_split(tr, tmp_path):
    res, rep = _quantize(tr, tmp_path, "--exclude-node", "/^layer0/ffn/fc[0-9]{1,2}$/")
    assert res.exit_code == 0, res.output
    assert "matched 2 node(s): layer0/ffn/fc1, layer0/ffn/fc2" in res.output


def test_exclude_op_and_keep_first_last(example_models, tmp_path):
    ex = example_models["mlp"]
    res, rep = _quantize(ex, tmp_path, "--keep-first-last")
    assert res.exit_code == 0, res.output
    d = _decisions(rep)
    assert d["fc1"]["reason"] == "first compute layer kept FP32 (--keep-first-last)"
    assert d["fc3"]["reason"] == "last compute layer kept FP32 (--keep-first-last)"
    assert d["fc2"]["quantized"]
    res, rep = _quantize(ex, tmp_path, "--exclude-op", "Gemm")
    d = _decisions(rep)
    assert d["fc1"]["reason"] == "op type Gemm excluded (--exclude-op)" and d["fc2"]["quantized"]


def test_target_tensorrt_flag(example_models, tmp_path):
    ex = example_models["cnn"]
    res, rep = _quantize(ex, tmp_path, "--target", "tensorrt")
    assert res.exit_code == 0, res.output
    d = _decisions(rep)
    assert d["conv1"]["reason"].startswith("Conv with 3 input / 32 output channels")
    assert d["conv2"]["quantized"]
    assert rep["config"]["target"] == "tensorrt"
    res = CliRunner().invoke(cli, ["lint", str(tmp_path / "q.onnx")])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("args, msg", [
    (["-f", "e5m2"], "target tensorrt: weights format e5m2 is not a TensorRT quantized type (FLOAT8E4M3FN or INT8)"),
    (["-f", "auto"], "target tensorrt: weights format e5m2 is not a TensorRT quantized type (FLOAT8E4M3FN or INT8); "
                     "with format auto give --formats e4m3,int8"),
    (["--scheme", "extended"], "target tensorrt: scheme extended quantizes LayerNorm, Softmax, attention MatMuls... "
                               "whose Q/DQ TensorRT does not fuse; use scheme standard (the target picks the inputs "
                               "of Conv/Gemm/MatMul and residual Adds)"),
    (["--activations-format", "e3m4"], "target tensorrt: activations format e3m4 is not a TensorRT quantized type "
                                       "(FLOAT8E4M3FN or INT8)"),
    (["--style", "emulate"], "target tensorrt: style emulate is not Q/DQ; TensorRT needs style qdq"),
    (["-f", "auto", "--formats", "e4m3,int8"], "target tensorrt: a layer's input and weight must share one type, but "
                                               "this configuration can give it e4m3 and int8; choose one format"),
    (["--weights-format", "int8"], "target tensorrt: a layer's input and weight must share one type, but this "
                                   "configuration can give it e4m3 and int8; choose one format"),
    (["--dynamic"], "target tensorrt: dynamic scales are computed in the graph; TensorRT fuses Q/DQ only with "
                    "constant scales"),
])
def test_target_tensorrt_refuses_what_tensorrt_cannot_run(example_models, tmp_path, args, msg):
    res, _ = _quantize(example_models["mlp"], tmp_path, "--target", "tensorrt", *args)
    assert res.exit_code == 2 and res.stderr.strip().splitlines() == [f"error: {msg}"]



def test_target_tensorrt_leaves_a_left_weight_matmul_fp32(tmp_path):
    """W @ x (the weight on the left) has its channels on W's rows: TensorRT's per-channel weights are the right
    operand's columns, so the layer stays FP32 with the reason, and the output lints clean."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    import onnxfp8
    from onnxfp8 import QuantConfig
    from onnxfp8.verify.lint import lint_model

    rng = np.random.default_rng(0)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["w", "x"], ["h"], name="left"),
         helper.make_node("MatMul", ["h", "w2"], ["y"], name="right")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(rng.standard_normal([32, 32]).astype(np.float32), "w"),
         onnx.numpy_helper.from_array(rng.standard_normal([16, 32]).astype(np.float32), "w2")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    calib = [{"x": rng.standard_normal([2, 32, 16]).astype(np.float32)}]
    plain = onnxfp8.quantize(model, calib, config=QuantConfig())
    assert plain.plan.nodes["left"].quantized and plain.plan.tensors["w"].axis == 0
    assert any(f.check == "axis" for f in lint_model(plain.model).errors)
    res = onnxfp8.quantize(model, calib, config=QuantConfig(target="tensorrt"))
    assert not res.plan.nodes["left"].quantized and "weight on the left" in res.plan.nodes["left"].reason
    assert res.plan.nodes["right"].quantized
    assert lint_model(res.model).errors == []


def test_pattern_matching_a_node_another_rule_excludes_still_matched(example_models, tmp_path):
    """A pattern 'matches nothing' only when no node name matches it: conv1 is left FP32 by --target tensorrt
    (3 input channels) before the name rule is asked, and still counts as matched."""
    res, rep = _quantize(example_models["cnn"], tmp_path, "--target", "tensorrt", "--exclude-node", "conv1")
    assert res.exit_code == 0, res.output
    assert "node patterns: --exclude-node 'conv1' matched 1 node(s): conv1" in res.output
    assert _decisions(rep)["conv1"]["reason"].startswith("Conv with 3 input / 32 output channels")
    res, rep = _quantize(example_models["cnn"], tmp_path, "--exclude-node", "conv*", "--include-node", "conv1",
                         "--allow-empty")
    assert res.exit_code == 0, res.output
    assert "--include-node 'conv1' matched 1 node(s): conv1" in res.output
    assert _decisions(rep)["conv1"]["reason"] == "name matches --exclude-node 'conv*'"
