"""passes/match_layernorm.py: the exporter's ReduceMean/Sub/Pow/Sqrt/Div LayerNorm becomes LayerNormalization."""
import numpy as np
import onnx
from onnx import TensorProto, helper

import onnxfp8
from onnxfp8 import QuantConfig
from onnxfp8.modelio import make_session, prepare_model, to_graph
from onnxfp8.passes.match_layernorm import MatchLayerNorm
from onnxfp8.pipeline import PassContext

F = TensorProto.FLOAT


def decomposed(square="Pow", axes=(-1,), graph_output=None, affine=True):
    c = lambda n, v: onnx.numpy_helper.from_array(np.asarray(v, np.float32), n)  # noqa: E731
    ax = onnx.numpy_helper.from_array(np.asarray(axes, np.int64), "axes")
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["mean"], name="ln/ReduceMean"),
             helper.make_node("Sub", ["x", "mean"], ["d"], name="ln/Sub"),
             (helper.make_node("Pow", ["d", "two"], ["sq"], name="ln/Pow") if square == "Pow"
              else helper.make_node("Mul", ["d", "d"], ["sq"], name="ln/Sq")),
             helper.make_node("ReduceMean", ["sq", "axes"], ["var"], name="ln/ReduceMean_1"),
             helper.make_node("Add", ["var", "eps"], ["ve"], name="ln/Add"),
             helper.make_node("Sqrt", ["ve"], ["sd"], name="ln/Sqrt"),
             helper.make_node("Div", ["d", "sd"], ["n" if affine else "y"], name="ln/Div")]
    rng = np.random.default_rng(0)
    inits = [ax, c("two", 2.0), c("eps", 1e-5)]
    if affine:
        nodes += [helper.make_node("Mul", ["n", "gamma"], ["s"], name="ln/Mul"),
                  helper.make_node("Add", ["s", "beta"], ["y"], name="ln/Add_1")]
        inits += [c("gamma", 1 + 0.2 * rng.standard_normal(16)), c("beta", 0.1 * rng.standard_normal(16))]
    outs = [helper.make_tensor_value_info("y", F, [2, 5, 16])]
    if graph_output:
        outs.append(helper.make_tensor_value_info(graph_output, F, None))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [2, 5, 16])], outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])


def _fuse(model, **cfg):
    graph = to_graph(prepare_model(model))
    res = MatchLayerNorm().run(graph, PassContext(config=QuantConfig(scheme="extended", **cfg)))
    return graph, res


def _x(seed=1):
    return {"x": (np.random.default_rng(seed).standard_normal([2, 5, 16]) * 3 + 1).astype(np.float32)}


def test_pattern_fused_and_function_kept():
    for square in ("Pow", "Mul"):
        for affine in (True, False):
            model = decomposed(square=square, affine=affine)
            graph, res = _fuse(model)
            ops = [n.op for n in graph.nodes]
            assert ops == ["LayerNormalization"], ops
            ln = graph.nodes[0]
            assert ln.name == "ln" and ln.attrs["axis"] == -1 and ln.attrs["epsilon"] == np.float32(1e-5)
            assert ln.outputs[0].name == "y" and res.modified
            from onnxfp8.modelio import to_model
            fused = to_model(graph)
            want = make_session(model, level="basic").run(None, _x())[0]
            got = make_session(fused, level="basic").run(None, _x())[0]
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_not_fused_when_it_is_not_the_pattern():
    graph, _ = _fuse(decomposed(axes=(1,)))  # normalises over the sequence: not a LayerNorm
    assert "LayerNormalization" not in [n.op for n in graph.nodes]
    graph, _ = _fuse(decomposed(graph_output="d"))  # an intermediate is read outside the pattern
    assert "LayerNormalization" not in [n.op for n in graph.nodes]
    graph, _ = _fuse(decomposed(), exclude_ops=("LayerNormalization",))
    assert "LayerNormalization" not in [n.op for n in graph.nodes]


def test_decomposed_transformer_quantizes_like_the_fused_one():
    from onnxfp8.examples.build import build_transformer, make_inputs

    kw = dict(seq=16, hidden=32, heads=2, ffn=64, vocab=100)
    fused = build_transformer(**kw)
    dec = build_transformer(decomposed_layernorm=True, **kw)
    calib = [make_inputs(fused, 16, seed=0)]
    val = make_inputs(fused, 16, seed=1)
    r_f = onnxfp8.quantize(fused, calib, config=QuantConfig(scheme="extended"))
    r_d = onnxfp8.quantize(dec, calib, config=QuantConfig(scheme="extended"))
    assert r_d.plan.counts_by_op() == r_f.plan.counts_by_op()
    assert r_d.plan.counts_by_op()["LayerNormalization"] == 3
    notes = next(p.notes for p in r_d.report.passes if p.name == "match_layernorm")
    assert notes and notes[0].startswith("3 decomposed LayerNorm(s) fused")
    ref = make_session(fused, level="basic").run(None, val)[0]
    a = make_session(r_f.model, level="basic").run(None, val)[0]
    b = make_session(r_d.model, level="basic").run(None, val)[0]
    sq = lambda q: 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - q).astype(np.float64) ** 2))  # noqa: E731
    assert abs(sq(a) - sq(b)) < 0.05, (sq(a), sq(b))  # measured: 20.875 dB for both
    assert sq(b) > 20.6
