"""The extended scheme's operators (config.EXTENDED_OPS): each on a small graph that contains it.

For every op: the planned activation inputs get QuantizeLinear -> DequantizeLinear (and the standard scheme
leaves the op alone), the quantized model computes exactly ``FP32 op(fake_quant(inputs))`` with the plan's
scales (formats.py as the reference), onnxruntime at level basic agrees with onnx.reference, and the output
SQNR vs FP32 on held-out data is pinned (bounds ~0.3 dB under the measured value; seeds are fixed).
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import onnxfp8
from onnxfp8 import QuantConfig
from onnxfp8.formats import get_format
from onnxfp8.modelio import make_session
from onnxfp8.verify.compare import sqnr_db

F = TensorProto.FLOAT


def _model(nodes, inputs, output_shape, inits=()):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, F, s) for n, s in inputs],
                          [helper.make_tensor_value_info("y", F, output_shape)], list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])


def _init(name, a):
    return onnx.numpy_helper.from_array(np.asarray(a, np.float32), name)


def _data(inputs, n, seed, outlier=False):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        d = {}
        for name, shape in inputs:
            x = rng.standard_normal(shape).astype(np.float32)
            if outlier:
                x[..., 0] *= 12.0  # one outlier channel, as in transformer activations
            d[name] = x
        out.append(d)
    return out


def _case(name):
    rng = np.random.default_rng(7)
    if name == "LayerNormalization":
        ins = [("x", [4, 8, 16])]
        nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-5, name="ln")]
        inits = [_init("g", 1 + 0.1 * rng.standard_normal(16)), _init("b", 0.1 * rng.standard_normal(16))]
        return ins, nodes, [4, 8, 16], inits, True
    if name == "BatchNormalization":  # on a graph input: nothing to fold it into, so it stays a BN
        ins = [("x", [2, 4, 6, 6])]
        nodes = [helper.make_node("BatchNormalization", ["x", "sc", "bi", "mu", "var"], ["y"], name="bn")]
        inits = [_init("sc", rng.uniform(0.5, 2, 4)), _init("bi", rng.standard_normal(4)),
                 _init("mu", 0.1 * rng.standard_normal(4)), _init("var", rng.uniform(0.5, 2, 4))]
        return ins, nodes, [2, 4, 6, 6], inits, False
    if name == "Add":  # a residual add: both inputs are activations
        ins = [("x", [4, 8, 16]), ("r", [4, 8, 16])]
        return ins, [helper.make_node("Add", ["x", "r"], ["y"], name="residual")], [4, 8, 16], [], True
    if name == "Mul":  # a gating Mul between activations (GELU's x * (1 + erf))
        ins = [("x", [4, 8, 16]), ("r", [4, 8, 16])]
        return ins, [helper.make_node("Mul", ["x", "r"], ["y"], name="gate")], [4, 8, 16], [], True
    if name == "MatMul":  # attention scores Q.K^T between two activations
        ins = [("x", [2, 4, 8, 16]), ("r", [2, 4, 16, 8])]
        return ins, [helper.make_node("MatMul", ["x", "r"], ["y"], name="scores")], [2, 4, 8, 8], [], False
    if name == "Softmax":
        ins = [("x", [2, 4, 8, 8])]
        return ins, [helper.make_node("Softmax", ["x"], ["y"], axis=-1, name="softmax")], [2, 4, 8, 8], [], False
    if name == "AveragePool":
        ins = [("x", [2, 4, 8, 8])]
        return ins, [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2],
                                      name="avgpool")], [2, 4, 4, 4], [], False
    if name == "GlobalAveragePool":
        ins = [("x", [2, 4, 8, 8])]
        return ins, [helper.make_node("GlobalAveragePool", ["x"], ["y"], name="gap")], [2, 4, 1, 1], [], False
    if name == "Resize":  # linear Resize interpolates: its input is quantized like any op's
        ins = [("x", [2, 4, 4, 4])]
        nodes = [helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear", name="resize")]
        return ins, nodes, [2, 4, 8, 8], [_init("scales", [1, 1, 2, 2])], False
    raise KeyError(name)


# measured output SQNR (dB) with e4m3 on 8 held-out samples; bounds sit ~0.3 dB below
SQNR_BOUNDS = {"Add": 31.4, "AveragePool": 31.1, "BatchNormalization": 32.4, "GlobalAveragePool": 32.6,
               "LayerNormalization": 35.7, "MatMul": 28.3, "Mul": 28.6, "Resize": 31.2, "Softmax": 31.5}


def _run(model, feeds):
    sess = make_session(model, level="basic")
    return [sess.run(None, f)[0] for f in feeds]


@pytest.mark.parametrize("op", sorted(SQNR_BOUNDS))
def test_extended_op_is_quantized_exactly(op):
    ins, nodes, out_shape, inits, outlier = _case(op)
    model = _model(nodes, ins, out_shape, inits)
    calib = _data(ins, 16, seed=1, outlier=outlier)
    val = _data(ins, 8, seed=2, outlier=outlier)
    fmt = get_format("e4m3")

    std = onnxfp8.quantize(model, calib, config=QuantConfig(allow_empty=True), check_model=False)
    assert op not in std.plan.counts_by_op()  # the standard scheme leaves it FP32

    res = onnxfp8.quantize(model, calib, config=QuantConfig(scheme="extended"))
    target = next(n for n in nodes if n.op_type == op)
    decision = res.plan.nodes[target.name]
    assert decision.quantized, decision.reason
    acts = [target.input[i] for i, r in decision.inputs.items() if r == "activation"]
    assert acts
    # every planned input is read through Q -> DQ in the output model
    produced = {o: n for n in res.model.graph.node for o in n.output}
    q_node = next(n for n in res.model.graph.node if n.name == target.name)
    for i, r in decision.inputs.items():
        src = produced[q_node.input[i]]
        assert src.op_type == "DequantizeLinear"
        assert produced[src.input[0]].op_type == "QuantizeLinear"

    # exact function: FP32 op on fake-quantized inputs (scales from the plan = max |x| / 448)
    for t in acts:
        amax = max(float(np.abs(d[t]).max()) for d in calib)
        assert res.plan.tensors[t].scale == pytest.approx(float(fmt.scale_for(np.float32(amax))), rel=0, abs=0)
    got = _run(res.model, val)
    fq_feeds = [{k: (fmt.fake_quant(v, np.float32(res.plan.tensors[k].scale)) if k in acts else v)
                 for k, v in f.items()} for f in val]
    want = _run(model, fq_feeds)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)

    # onnxruntime (level basic) == onnx.reference
    ref = ReferenceEvaluator(res.model)
    for f, g in zip(val[:2], got[:2]):
        np.testing.assert_allclose(ref.run(None, f)[0], g, rtol=1e-5, atol=1e-6)

    fp32 = _run(model, val)
    measured = sqnr_db(np.concatenate(fp32), np.concatenate(got))
    assert measured >= SQNR_BOUNDS[op], f"{op}: {measured:.2f} dB"
    assert measured < SQNR_BOUNDS[op] + 1.0, f"{op}: {measured:.2f} dB (bound stale?)"


def test_add_with_a_constant_is_left_fp32():
    model = _model([helper.make_node("Add", ["x", "c"], ["y"], name="bias")], [("x", [4, 8])], [4, 8],
                   [_init("c", np.ones(8))])
    res = onnxfp8.quantize(model, _data([("x", [4, 8])], 4, 0), config=QuantConfig(scheme="extended", allow_empty=True))
    d = res.plan.nodes["bias"]
    assert not d.quantized and "constant operand" in d.reason
    assert not any(n.op_type == "QuantizeLinear" for n in res.model.graph.node)


def test_extended_scheme_on_the_transformer_quantizes_attention_and_norms():
    from onnxfp8.examples.build import build_transformer, make_inputs

    model = build_transformer(seq=16, hidden=32, heads=2, ffn=64, vocab=100)
    calib = [make_inputs(model, 8, seed=s) for s in range(2)]
    res = onnxfp8.quantize(model, calib, config=QuantConfig(scheme="extended"))
    counts = res.plan.counts_by_op()
    assert counts["MatMul"] == 8  # 6 with a weight + scores + context
    assert counts["LayerNormalization"] == 3 and counts["Softmax"] == 1
    assert counts["Add"] == 4  # 2 residuals, the mask add, the position add; bias adds and erf + 1 stay FP32
    fp32_adds = [d.node for d in res.plan.skipped_nodes() if d.op_type == "Add"]
    assert all("bias_add" in n or "gelu/add" in n for n in fp32_adds)
    assert res.plan.nodes["layer0/attn/scores"].inputs == {0: "activation", 1: "activation"}
    assert res.plan.nodes["layer0/attn/context"].inputs == {0: "activation", 1: "activation"}
