"""select_ops: node selection by op type, name glob / regex, position and --exclude-op, every skip with its
reason; a name pattern that matches nothing is a ConfigError."""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxfp8.config import QuantConfig
from onnxfp8.errors import ConfigError

rng = np.random.default_rng(5)

TEXT = """<ir_version: 8, opset_import: ["" : 19]>
g (float[1,3,8,8] x, float[1,4,8,8] wdyn) => (float[1,10] y, float[1,4,8,8] z) {
    a = Conv <pads = [1,1,1,1]> (x, w1)
    conv_a = Identity (a)
    b = Conv <pads = [1,1,1,1]> (conv_a, w2)
    c = Relu (b)
    p = GlobalAveragePool (c)
    f = Flatten (p)
    h = Gemm <transB = 1> (f, w3, b3)
    q = MatMul (h, h2)
    y = Gemm <transB = 1> (q, w4, b4)
    z = Conv <pads = [1,1,1,1]> (x, wdyn_c)
}"""


def _model():
    m = onnx.parser.parse_model(TEXT)
    names = ["conv_a", "id", "conv_b", "relu", "gap", "flatten", "fc1", "mm_act", "fc_head", "conv_dyn"]
    for n, name in zip(m.graph.node, names):
        n.name = name
    # the last Conv reads a weight that is a graph input (not a constant): rename its input
    m.graph.node[-1].input[1] = "wdyn"
    # MatMul between two activations: its second input is the first Gemm's output again
    m.graph.node[7].input[1] = "h"
    m.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 10
    inits = {"w1": (4, 3, 3, 3), "w2": (4, 4, 3, 3), "w3": (16, 4), "b3": (16,), "w4": (10, 16), "b4": (10,)}
    for name, shape in inits.items():
        m.graph.initializer.append(numpy_helper.from_array(rng.normal(0, 1, shape).astype(np.float32), name))
    m.graph.node[8].input[0] = "q"
    return m


MODEL = _model()


def _select(run_passes, notes=False, **cfg):
    graph, ctx, res = run_passes(MODEL, ["canonicalize", "select_ops"], config=QuantConfig(**cfg))
    return ctx.plan.nodes, (res["select_ops"].notes if notes else ctx.patterns)


def _quantized(nodes):
    return sorted(n for n, d in nodes.items() if d.quantized)


def test_default_selection_and_structural_reasons(run_passes):
    nodes, notes = _select(run_passes, notes=True)
    assert _quantized(nodes) == ["conv_a", "conv_b", "fc1", "fc_head"]
    assert nodes["relu"].reason == "op type Relu is not quantized by this scheme"
    assert nodes["mm_act"].reason == "MatMul between two activations (extended scheme only)"
    assert nodes["conv_dyn"].reason == "Conv weight is not a constant"
    assert notes[0] == "4 of 10 node(s) selected for quantization"
    assert nodes["conv_a"].inputs == {0: "activation", 1: "weight"}
    assert all(d.reason for d in nodes.values())


def test_by_op_type(run_passes):
    nodes, _ = _select(run_passes, op_types=("Gemm",))
    assert _quantized(nodes) == ["fc1", "fc_head"]
    assert nodes["conv_a"].reason == "op type Conv is not quantized by this scheme"


def test_exclude_op(run_passes):
    nodes, _ = _select(run_passes, exclude_ops=("Conv",))
    assert _quantized(nodes) == ["fc1", "fc_head"]
    assert nodes["conv_b"].reason == "op type Conv excluded (--exclude-op)"


@pytest.mark.parametrize("pattern", ["conv_*", "/^conv_[ab]$/", "re:conv_(a|b)"])
def test_exclude_by_name(run_passes, pattern):
    nodes, patterns = _select(run_passes, exclude_nodes=(pattern,))
    assert _quantized(nodes) == ["fc1", "fc_head"]
    assert nodes["conv_a"].reason == f"name matches --exclude-node '{pattern}'"
    [m] = patterns
    assert (m.flag, m.pattern) == ("--exclude-node", pattern) and {"conv_a", "conv_b"} <= set(m.nodes)
    assert m.describe().startswith(f"--exclude-node '{pattern}' matched {len(m.nodes)} node(s): conv_a")


def test_glob_is_whole_name_and_regex_searches(run_passes):
    with pytest.raises(ConfigError, match="'fc' matches no node"):
        _select(run_passes, exclude_nodes=("fc",))  # a glob must match the whole name
    nodes, _ = _select(run_passes, exclude_nodes=("/fc/",))  # a regex is searched
    assert _quantized(nodes) == ["conv_a", "conv_b"]


def test_include_by_name(run_passes):
    nodes, patterns = _select(run_passes, include_nodes=("fc_*",))
    assert _quantized(nodes) == ["fc_head"]
    assert nodes["fc1"].reason == "name does not match any --include-node pattern"
    assert [(m.flag, m.pattern, m.nodes) for m in patterns] == [("--include-node", "fc_*", ["fc_head"])]


def test_keep_first_last(run_passes):
    nodes, _ = _select(run_passes, keep_first_last=True)
    kept = {n: d.reason for n, d in nodes.items() if "compute layer kept FP32" in d.reason}
    assert kept["conv_a"] == "first compute layer kept FP32 (--keep-first-last)"
    (last, reason), = [(n, r) for n, r in kept.items() if n != "conv_a"]
    assert reason == "last compute layer kept FP32 (--keep-first-last)"
    assert _quantized(nodes) == sorted({"conv_b", "fc1", "fc_head"} - {last})


@pytest.mark.parametrize("key", ["exclude_nodes", "include_nodes"])
@pytest.mark.parametrize("pattern", ["nothing_*", "/^nope$/"])
def test_pattern_matching_nothing_is_config_error(run_passes, key, pattern):
    with pytest.raises(ConfigError, match="matches no node") as e:
        _select(run_passes, **{key: (pattern,)})
    assert pattern in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------
# embedding Gathers: FP32 by default (issue 11 item 5: the default never worse than the plain scheme)
# --------------------------------------------------------------------------------------------------
def _embedding_model():
    """ids -> word + position embedding lookups (Gather on constant 2-D tables) -> Add -> MatMul head, plus a
    Gather on a shape (int64, never quantized). Tables with heavy-tailed rows, as trained embeddings have."""
    text = """<ir_version: 8, opset_import: ["" : 19]>
    g (int64[N,6] ids) => (float[N,6,5] y, int64 s) {
        e = Gather (emb, ids)
        p = Gather (pos, pids)
        x = Add (e, p)
        y = MatMul (x, w)
        sh = Shape (ids)
        s = Gather <axis = 0> (sh, one)
    }"""
    m = onnx.parser.parse_model(text)
    for n, name in zip(m.graph.node, ["word_emb", "pos_emb", "add", "head", "shape", "shape_gather"]):
        n.name = name
    r = np.random.default_rng(11)
    emb = r.standard_t(3, (50, 8)).astype(np.float32)
    inits = {"emb": emb, "pos": r.normal(0, 0.1, (6, 8)).astype(np.float32),
             "w": r.normal(0, 1, (8, 5)).astype(np.float32), "pids": np.arange(6, dtype=np.int64),
             "one": np.array(1, dtype=np.int64)}
    m.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in inits.items())
    return m


def _ids(n, seed):
    return [{"ids": np.random.default_rng(seed + i).integers(0, 50, (4, 6)).astype(np.int64)} for i in range(n)]


@pytest.mark.parametrize("scheme", ["standard", "extended"])
def test_embedding_gather_fp32_by_default_with_reason(scheme):
    import onnxfp8

    res = onnxfp8.quantize(_embedding_model(), _ids(4, 0), config=QuantConfig(scheme=scheme))
    d = res.plan.nodes["word_emb"]
    assert not d.quantized and d.reason.startswith("embedding Gather kept FP32 by default")
    assert "--op-types" in d.reason
    assert not res.plan.nodes["pos_emb"].quantized and res.plan.nodes["head"].quantized
    assert "emb" not in res.plan.tensors and "pos" not in res.plan.tensors
    # the tables are stored as they were: FP32 initializers read by the Gathers
    tables = {t.name: t.data_type for t in res.model.graph.initializer}
    assert tables["emb"] == onnx.TensorProto.FLOAT and tables["pos"] == onnx.TensorProto.FLOAT
    assert "shape_gather" in res.plan.nodes and not res.plan.nodes["shape_gather"].quantized


def test_embedding_gather_quantized_when_asked_by_op_types():
    import onnxfp8

    res = onnxfp8.quantize(_embedding_model(), _ids(4, 0),
                           config=QuantConfig(op_types=("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather")))
    assert res.plan.nodes["word_emb"].quantized
    # constant indices (position ids folded by the exporter): a constant, not a lookup
    assert res.plan.nodes["pos_emb"].reason == "Gather is not an embedding lookup on a constant 2-D table"
    assert res.plan.tensors["emb"].role == "weight" and res.plan.tensors["emb"].axis == 0
    assert not res.plan.nodes["shape_gather"].quantized  # an int64 shape: never, whatever the op types


def test_exclude_op_gather_reason_wins_over_the_default():
    import onnxfp8

    res = onnxfp8.quantize(_embedding_model(), _ids(4, 0), config=QuantConfig(exclude_ops=("Gather",)))
    assert "--exclude-op" in res.plan.nodes["word_emb"].reason


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "e3m4", "int8"])
def test_default_is_the_plain_scheme_on_a_model_with_embeddings(fmt):
    """Issue 11 item 5 by construction: on a model whose only quantizable ops are embedding lookups and GEMMs,
    the default's quantized model computes exactly what the plain scheme's does (Conv/ConvTranspose/Gemm/MatMul,
    per-channel weights, max-calibrated per-tensor activations); the tables, asked for by op types, quantize."""
    import onnxfp8
    from onnxfp8.modelio import make_session
    from onnxfp8.verify.compare import sqnr_db

    model = _embedding_model()
    calib, val = _ids(4, 0), _ids(4, 100)
    plain = QuantConfig(format=fmt, op_types=("Conv", "ConvTranspose", "Gemm", "MatMul"), per_channel=True,
                        calibration="max")
    runs = {name: onnxfp8.quantize(model, calib, config=cfg).model
            for name, cfg in (("default", QuantConfig(format=fmt)), ("plain", plain),
                              ("tables", plain.replace(op_types=plain.op_types + ("Gather",))))}
    ref = make_session(model)
    outs = {name: [make_session(m, level="basic").run(["y"], v)[0] for v in val] for name, m in runs.items()}
    for a, b in zip(outs["default"], outs["plain"]):
        np.testing.assert_array_equal(a, b)
    fp32 = np.concatenate([ref.run(["y"], v)[0].ravel() for v in val])
    sq = {name: sqnr_db(fp32, np.concatenate([o.ravel() for o in os_])) for name, os_ in outs.items()}
    assert sq["default"] == sq["plain"] and np.isfinite(sq["tables"]) and sq["tables"] != sq["default"]
