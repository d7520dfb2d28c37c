"""fold_batchnorm: BatchNormalization folded into Conv / ConvTranspose / Gemm computes the same function in
onnxruntime; the cases it must not fold are left alone with a note."""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxfp8.modelio import to_model

rng = np.random.default_rng(0)


def _model(text: str, inits: dict) -> onnx.ModelProto:
    m = onnx.parser.parse_model(text)
    for name, arr in inits.items():
        m.graph.initializer.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))
    onnx.checker.check_model(m, full_check=True)
    return m


def _bn_params(c):
    return {"gamma": rng.uniform(0.5, 2.0, c), "beta": rng.normal(0, 1, c), "mean": rng.normal(0, 1, c),
            "var": rng.uniform(0.1, 3.0, c)}


HEAD = '<ir_version: 8, opset_import: ["" : 19]>\n'
BN = "y = BatchNormalization <epsilon = 0.001> (t, gamma, beta, mean, var)"


def conv_case(bias: bool):
    text = HEAD + f"""g (float[2,3,8,8] x) => (float[2,4,8,8] y) {{
        t = Conv <pads = [1,1,1,1]> (x, w{", b" if bias else ""})
        {BN}
    }}"""
    inits = {"w": rng.normal(0, 1, (4, 3, 3, 3)), **_bn_params(4)}
    if bias:
        inits["b"] = rng.normal(0, 1, 4)
    return text, inits, {"x": rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)}


def convtranspose_case(bias: bool, group: int):
    cin, cout = 4, 6  # weight (C_in, C_out / group, kH, kW)
    text = HEAD + f"""g (float[2,{cin},5,5] x) => (float[2,{cout},7,7] y) {{
        t = ConvTranspose <group = {group}> (x, w{", b" if bias else ""})
        {BN}
    }}"""
    inits = {"w": rng.normal(0, 1, (cin, cout // group, 3, 3)), **_bn_params(cout)}
    if bias:
        inits["b"] = rng.normal(0, 1, cout)
    return text, inits, {"x": rng.normal(0, 1, (2, cin, 5, 5)).astype(np.float32)}


def gemm_case(trans_b: int, bias_shape, alpha=1.0, beta=1.0):
    n_in, n_out = 5, 7
    bias = bias_shape is not None
    text = HEAD + f"""g (float[3,{n_in}] x) => (float[3,{n_out}] y) {{
        t = Gemm <transB = {trans_b}, alpha = {alpha}, beta = {beta}> (x, w{", b" if bias else ""})
        {BN}
    }}"""
    w_shape = (n_out, n_in) if trans_b else (n_in, n_out)
    inits = {"w": rng.normal(0, 1, w_shape), **_bn_params(n_out)}
    if bias:
        inits["b"] = rng.normal(0, 1, bias_shape)
    return text, inits, {"x": rng.normal(0, 1, (3, n_in)).astype(np.float32)}


CASES = {
    "conv": lambda: conv_case(True),
    "conv-no-bias": lambda: conv_case(False),
    "convtranspose": lambda: convtranspose_case(True, 1),
    "convtranspose-group2": lambda: convtranspose_case(True, 2),
    "convtranspose-group2-no-bias": lambda: convtranspose_case(False, 2),
    "gemm-transB0": lambda: gemm_case(0, (7,)),
    "gemm-transB1": lambda: gemm_case(1, (7,)),
    "gemm-transB1-alpha-beta": lambda: gemm_case(1, (7,), alpha=0.5, beta=2.0),
    "gemm-transB0-alpha-beta-bias-1xN": lambda: gemm_case(0, (1, 7), alpha=1.5, beta=-0.75),
    "gemm-no-bias": lambda: gemm_case(1, None, alpha=2.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fold_is_numerically_equivalent(case, run_passes, ort_run):
    text, inits, feeds = CASES[case]()
    model = _model(text, inits)
    want = ort_run(model, feeds, level="disable")[0]  # no ORT-side folding of the original
    graph, ctx, res = run_passes(model, ["canonicalize", "fold_batchnorm"])
    assert res["fold_batchnorm"].modified
    assert res["fold_batchnorm"].notes[0] == "folded 1 BatchNormalization node(s)"
    assert not [n for n in graph.nodes if n.op == "BatchNormalization"]
    folded = to_model(graph)
    onnx.checker.check_model(folded, full_check=True)
    assert [o.name for o in folded.graph.output] == ["y"]  # the BN's output name is kept
    got = ort_run(folded, feeds, level="disable")[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if case.startswith("gemm"):
        gemm = next(n for n in graph.nodes if n.op == "Gemm")
        assert gemm.attrs["beta"] == 1.0 and len(gemm.inputs) == 3


def _kept(model, run_passes, expect_note):
    graph, ctx, res = run_passes(model, ["canonicalize", "fold_batchnorm"])
    notes = res["fold_batchnorm"].notes
    assert notes[0] == "folded 0 BatchNormalization node(s)"
    assert any(expect_note in n for n in notes[1:]), notes
    assert [n for n in graph.nodes if n.op == "BatchNormalization"]
    return graph


def test_shared_weight_left_alone(run_passes, ort_run):
    text = HEAD + f"""g (float[1,3,6,6] x) => (float[1,3,6,6] y, float[1,3,6,6] z) {{
        t = Conv <pads = [1,1,1,1]> (x, w)
        {BN}
        z = Conv <pads = [1,1,1,1]> (x, w)
    }}"""
    model = _model(text, {"w": rng.normal(0, 1, (3, 3, 3, 3)), **_bn_params(3)})
    _kept(model, run_passes, "is shared with other nodes")


def test_non_constant_bn_parameter_left_alone(run_passes):
    text = HEAD + f"""g (float[1,3,6,6] x, float[4] gamma) => (float[1,4,6,6] y) {{
        t = Conv <pads = [1,1,1,1]> (x, w)
        {BN}
    }}"""
    p = _bn_params(4)
    del p["gamma"]
    model = _model(text, {"w": rng.normal(0, 1, (4, 3, 3, 3)), **p})
    _kept(model, run_passes, "parameters are not constants")


def test_training_mode_left_alone(run_passes):
    text = HEAD + """g (float[2,3,6,6] x) => (float[2,4,6,6] y, float[4] rm, float[4] rv) {
        t = Conv <pads = [1,1,1,1]> (x, w)
        y, rm, rv = BatchNormalization <training_mode = 1> (t, gamma, beta, mean, var)
    }"""
    model = _model(text, {"w": rng.normal(0, 1, (4, 3, 3, 3)), **_bn_params(4)})
    _kept(model, run_passes, "training mode")


def test_producer_output_consumed_twice_left_alone(run_passes):
    text = HEAD + f"""g (float[1,3,6,6] x) => (float[1,4,6,6] y, float[1,4,6,6] z) {{
        t = Conv <pads = [1,1,1,1]> (x, w)
        {BN}
        z = Relu (t)
    }}"""
    model = _model(text, {"w": rng.normal(0, 1, (4, 3, 3, 3)), **_bn_params(4)})
    _kept(model, run_passes, "output has other consumers")


def test_producer_output_is_graph_output_left_alone(run_passes):
    text = HEAD + f"""g (float[1,3,6,6] x) => (float[1,4,6,6] y, float[1,4,6,6] t) {{
        t = Conv <pads = [1,1,1,1]> (x, w)
        {BN}
    }}"""
    model = _model(text, {"w": rng.normal(0, 1, (4, 3, 3, 3)), **_bn_params(4)})
    _kept(model, run_passes, "is a graph output")


def test_bn_after_other_op_left_alone(run_passes):
    text = HEAD + f"""g (float[1,4,6,6] x) => (float[1,4,6,6] y) {{
        t = Relu (x)
        {BN}
    }}"""
    model = _model(text, _bn_params(4))
    _kept(model, run_passes, "not after Conv/ConvTranspose/Gemm")


def test_disabled_by_config(run_passes):
    from onnxfp8.config import QuantConfig

    text, inits, _ = conv_case(True)
    graph, ctx, res = run_passes(_model(text, inits), ["fold_batchnorm"], config=QuantConfig(fold_batchnorm=False))
    assert res["fold_batchnorm"].notes == ["BatchNorm folding disabled"]
    assert [n for n in graph.nodes if n.op == "BatchNormalization"]
