"""smoothquant: smoothing keeps the FP32 function (onnxruntime, float tolerance) on a BERT-style block built in
code, folds 1/s into LayerNorm / Mul+Add / MatMul producers or inserts a Mul, follows the formula, and lowers the
INT8 error on outlier channels; records replay without data."""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from transform_models import bert

from onnxfp8 import quantize
from onnxfp8.calibrators.data import as_data
from onnxfp8.config import QuantConfig
from onnxfp8.errors import DataError
from onnxfp8.modelio import make_session, prepare_model, to_graph, to_model
from onnxfp8.passes.canonicalize import Canonicalize
from onnxfp8.passes.select_ops import SelectOps
from onnxfp8.passes.smoothquant import SmoothQuant, replay, smoothing_scale
from onnxfp8.pipeline import PassContext
from onnxfp8.plan import QuantPlan
from onnxfp8.verify.compare import sqnr_db


def _batches(shape, n=64, batch=16, seed=1):
    x = np.random.default_rng(seed).normal(0, 1, (n,) + tuple(shape)).astype(np.float32)
    return [{"x": x[i:i + batch]} for i in range(0, n, batch)]


def _smoothed(model, calib, alpha=0.5, **cfg):
    proto = prepare_model(model)
    graph = to_graph(proto)
    ctx = PassContext(config=QuantConfig(smoothquant=alpha, **cfg), source="test.onnx")
    ctx.calib = as_data(calib, proto, batch_size=16)
    Canonicalize().run(graph, ctx)
    SelectOps().run(graph, ctx)
    result = SmoothQuant().run(graph, ctx)
    return graph, ctx, result


def _rel_diff(model, graph, feeds):
    a = make_session(model, level="disable").run(None, feeds)[0]
    b = make_session(to_model(graph), level="disable").run(None, feeds)[0]
    return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


@pytest.mark.parametrize("alpha", [0.5, 0.8, "auto"])
def test_smoothing_keeps_the_fp32_function(alpha):
    model = bert(layers=2)
    graph, ctx, result = _smoothed(model, _batches((8, 32)), alpha)
    assert result.modified
    assert _rel_diff(model, graph, _batches((8, 32), n=16, batch=16, seed=5)[0]) < 2e-5


def test_folds_into_layernorm_and_inserts_a_mul_elsewhere():
    model = bert(layers=1)
    graph, ctx, result = _smoothed(model, _batches((8, 32)))
    folds = {r["tensor"]: (r["fold"], r["readers"]) for r in ctx.plan.transforms}
    assert folds["l0_ln1"] == ("layernorm:l0_ln1", ["l0_q", "l0_k", "l0_v"])  # one s for the three readers
    assert folds["l0_ln2"] == ("layernorm:l0_ln2", ["l0_fc1"])
    assert folds["l0_f2"][0] == "insert:l0_f2/smoothquant_mul"  # after GELU: nothing linear to fold into
    muls = [n for n in graph.nodes if n.name.endswith("/smoothquant_mul")]
    assert len(muls) == 2 and "Mul l0_f2/smoothquant_mul inserted" in " ".join(result.notes)


def test_scale_formula_and_balance():
    a = np.array([8.0, 1.0, 0.0, 2.0])
    w = np.array([0.5, 2.0, 1.0, 0.0])
    s = smoothing_scale(a, w, 0.5)
    np.testing.assert_allclose(s, [np.sqrt(8 / 0.5), np.sqrt(1 / 2.0), 1.0, 1.0])
    np.testing.assert_allclose(smoothing_scale(a, w, 0.75)[:2], [8 ** 0.75 / 0.5 ** 0.25, 1 / 2 ** 0.25])
    # after smoothing with alpha 0.5 the activation's and the weight's channel ranges are both sqrt(a w)
    model = bert(layers=1)
    calib = _batches((8, 32))
    graph, ctx, _ = _smoothed(model, calib)
    from onnxfp8.calibrators.collector import _augment_expose

    feeds = {"x": np.concatenate([b["x"] for b in calib])}
    x = make_session(_augment_expose(to_model(graph), ["l0_ln2"])).run(["l0_ln2"], feeds)[0]
    w = next(n for n in graph.nodes if n.name == "l0_fc1").inputs[1].values
    np.testing.assert_allclose(np.abs(x).max(axis=(0, 1)), np.abs(w).max(axis=1), rtol=1e-4)


PRODUCERS = {
    "affine": ("t = Mul (x, g)\n y0 = Add (t, b)", {"g": (16,), "b": (16,)}, "affine:mul0,add0"),
    "mul": ("y0 = Mul (x, g)", {"g": (1, 16)}, "mul:mul0"),
    "layer": ("t = MatMul (x, w0)\n y0 = Add (t, b)", {"w0": (16, 16), "b": (16,)}, "layer:matmul0"),
}


@pytest.mark.parametrize("kind", sorted(PRODUCERS))
def test_fold_targets(kind):
    body, params, fold = PRODUCERS[kind]
    names = {"Mul": "mul0", "Add": "add0", "MatMul": "matmul0"}
    text = '<ir_version: 8, opset_import: ["" : 19]>\ng (float[N,16] x) => (float[N,8] y) {\n' + body + \
        "\n y = MatMul (y0, w1)\n}"
    m = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    for name, shape in {**params, "w1": (16, 8)}.items():
        m.graph.initializer.append(numpy_helper.from_array(rng.normal(0, 1, shape).astype(np.float32), name))
    for i, n in enumerate(m.graph.node):
        n.name = names[n.op_type] if n.output[0] != "y" else "last"
    x = rng.normal(0, 1, (64, 16)).astype(np.float32)
    x[:, 3] *= 30  # an outlier channel
    calib = [{"x": x}]
    graph, ctx, result = _smoothed(m, calib, 0.5, include_nodes=("last",))  # the producer stays FP32
    rec = next(r for r in ctx.plan.transforms if r["readers"] == ["last"])
    assert rec["fold"] == fold
    assert not any(n.op == "Mul" and n.name.endswith("smoothquant_mul") for n in graph.nodes)
    assert _rel_diff(m, graph, {"x": x}) < 2e-5


def test_smoothquant_lowers_int8_error_and_does_not_hurt_e4m3():
    """Measured on this block (outlier LayerNorm channels x20): INT8 13.9 -> 21.5 dB at alpha 0.5, 20.5 dB
    with auto; E4M3 13.9 -> 15.6 / 15.0 dB."""
    model = bert(layers=2)
    calib = _batches((8, 32))
    feeds = _batches((8, 32), n=64, batch=64, seed=3)[0]
    ref = make_session(model).run(None, feeds)[0]

    def sqnr(**cfg):
        r = quantize(model, calib, QuantConfig(**cfg))
        return sqnr_db(ref, make_session(r.model).run(None, feeds)[0])

    base = sqnr(format="int8")
    assert sqnr(format="int8", smoothquant=0.5) > base + 5
    assert sqnr(format="int8", smoothquant="auto") > base + 4
    assert sqnr(format="e4m3", smoothquant="auto") > sqnr(format="e4m3") - 0.2


def test_records_replay_without_data():
    model = bert(layers=1)
    graph, ctx, _ = _smoothed(model, _batches((8, 32)), "auto")
    plan = QuantPlan.from_json(ctx.plan.to_json())
    smoothed = [r for r in plan.transforms if r["kind"] == "smooth"]
    assert smoothed and all("alpha" in r and "error_db" in r and "reason" in r for r in smoothed)
    left = [r for r in plan.transforms if r["kind"] == "left_alone"]  # recorded with the errors tried, not replayed
    assert all(r["reason"].startswith("no alpha lowered") and "none" in r["error_db"] for r in left)
    fresh = to_graph(prepare_model(model))
    Canonicalize().run(fresh, PassContext())
    assert replay(fresh, plan.transforms) == len(smoothed)
    a = {t.name: numpy_helper.to_array(t) for t in to_model(graph).graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in to_model(fresh).graph.initializer}
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_needs_calibration_data():
    with pytest.raises(DataError, match="smoothquant measures"):
        quantize(bert(), None, QuantConfig(smoothquant=0.5, dynamic=True, activations_format="e4m3"))
