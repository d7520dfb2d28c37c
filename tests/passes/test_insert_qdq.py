"""insert_qdq: the plan realised in the graph. Weights stored in the format (FP8 initializers really typed
FLOAT8E4M3FN / FLOAT8E5M2, E3M4 as uint8 codes decoded by a table), dequantized exactly to
``fake_quant(w, scale, axis)``; activations Q/DQ shared by all consumers; zero points 0 of the format's type;
biases FP32; Relu placement exact."""
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxfp8
from onnxfp8.formats import E3M4, get_format
from onnxfp8.passes.assign_formats import channel_amax
from onnxfp8.pipeline import Pass, PassResult

rng = np.random.default_rng(1)
HEAD = '<ir_version: 8, opset_import: ["" : 19]>\n'


def _model(text, inits):
    m = onnx.parser.parse_model(HEAD + text)
    for name, arr in inits.items():
        arr = np.asarray(arr)
        m.graph.initializer.append(numpy_helper.from_array(arr.astype(np.float32) if arr.dtype.kind == "f" else arr, name))
    onnx.checker.check_model(m, full_check=True)
    return m


def _calib(shape, n=3, dtype=np.float32, high=None):
    if dtype == np.int64:
        return [{"x": rng.integers(0, high, shape).astype(np.int64)} for _ in range(n)]
    return [{"x": rng.normal(0, 1, shape).astype(np.float32)} for _ in range(n)]


# name -> (graph text, initializers, input shape, weight name, expected axis)
WEIGHT_CASES = {
    "Conv": ("g (float[2,3,6,6] x) => (float[2,4,6,6] y) { y = Conv <pads = [1,1,1,1]> (x, w, b) }",
             {"w": rng.normal(0, 1, (4, 3, 3, 3)), "b": rng.normal(0, 1, 4)}, (2, 3, 6, 6), "w", 0),
    "ConvTranspose": ("g (float[2,4,5,5] x) => (float[2,6,7,7] y) { y = ConvTranspose <group = 2> (x, w, b) }",
                      {"w": rng.normal(0, 1, (4, 3, 3, 3)), "b": rng.normal(0, 1, 6)}, (2, 4, 5, 5), "w", 1),
    "Gemm-transB1": ("g (float[3,5] x) => (float[3,7] y) { y = Gemm <transB = 1> (x, w, b) }",
                     {"w": rng.normal(0, 1, (7, 5)), "b": rng.normal(0, 1, 7)}, (3, 5), "w", 0),
    "Gemm-transB0": ("g (float[3,5] x) => (float[3,7] y) { y = Gemm (x, w, b) }",
                     {"w": rng.normal(0, 1, (5, 7)), "b": rng.normal(0, 1, 7)}, (3, 5), "w", 1),
    "MatMul-right": ("g (float[2,3,5] x) => (float[2,3,7] y) { y = MatMul (x, w) }",
                     {"w": rng.normal(0, 1, (5, 7))}, (2, 3, 5), "w", 1),
    "MatMul-left": ("g (float[2,5,3] x) => (float[2,7,3] y) { y = MatMul (w, x) }",
                    {"w": rng.normal(0, 1, (7, 5))}, (2, 5, 3), "w", 0),
    "Gather": ("g (int64[2,4] x) => (float[2,4,6] y) { y = Gather (w, x) }",
               {"w": rng.normal(0, 1, (11, 6))}, (2, 4), "w", 0),
}


def _quantize(model, calib, **cfg):
    return onnxfp8.quantize(model, calib, config=onnxfp8.QuantConfig(**cfg))


def _calib_for(case):
    text, inits, shape, wname, axis = WEIGHT_CASES[case]
    return _calib(shape, dtype=np.int64, high=11) if case == "Gather" else _calib(shape)


def _intermediates(model, names, feeds, level="disable"):
    """Values of (intermediate) tensors ``names``, computed by onnxruntime."""
    from onnxfp8.modelio import make_session

    m = onnx.ModelProto()
    m.CopyFrom(model)
    outs = {o.name for o in m.graph.output}
    for n in names:
        if n not in outs:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
    return make_session(m, level=level).run(list(names), feeds)


def _init(model, name):
    return next(t for t in model.graph.initializer if t.name == name)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "int8"])
@pytest.mark.parametrize("case", sorted(WEIGHT_CASES))
def test_weight_per_channel_exact(case, fmt):
    text, inits, shape, wname, axis = WEIGHT_CASES[case]
    model = _model(text, inits)
    calib = _calib_for(case)
    # embedding tables are quantized only when Gather is asked for by name (rules.DefaultEmbeddingRule)
    extra = {"op_types": ("Gather",)} if case == "Gather" else {}
    res = _quantize(model, calib, format=fmt, **extra)
    spec = res.plan.tensors[wname]
    assert spec.role == "weight" and spec.axis == axis and spec.format == fmt
    f = get_format(fmt)
    w = inits[wname].astype(np.float32)
    scale = f.scale_for(channel_amax(w, axis))
    np.testing.assert_array_equal(spec.scale_array(), scale)
    assert spec.scale_array().shape == (w.shape[axis],)
    stored = _init(res.model, f"{wname}.quantized")
    assert stored.data_type == f.onnx_dtype
    # the dequantized weight (which keeps the weight's name) is exactly round(w / s) * s per channel
    feeds = {"x": calib[0]["x"]}
    deq = _intermediates(res.model, [wname], feeds)[0]
    np.testing.assert_array_equal(deq, f.fake_quant(w, scale, axis))
    dq = next(n for n in res.model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == wname)
    assert onnx.helper.get_attribute_value(next(a for a in dq.attribute if a.name == "axis")) == axis
    zp = numpy_helper.to_array(_init(res.model, dq.input[2]))
    assert _init(res.model, dq.input[2]).data_type == f.onnx_dtype and not zp.astype(np.float32).any()


@pytest.mark.parametrize("fmt,dtype", [("e4m3", TensorProto.FLOAT8E4M3FN), ("e5m2", TensorProto.FLOAT8E5M2)])
def test_fp8_initializers_survive_save_load_and_shrink_file(tmp_path, fmt, dtype):
    w = rng.normal(0, 1, (256, 128)).astype(np.float32)
    model = _model("g (float[4,128] x) => (float[4,256] y) { y = Gemm <transB = 1> (x, w, b) }",
                   {"w": w, "b": np.zeros(256)})
    src = tmp_path / "fp32.onnx"
    onnx.save(model, src)
    out = tmp_path / f"q.{fmt}.onnx"
    res = onnxfp8.quantize(str(src), _calib((4, 128)), config=onnxfp8.QuantConfig(format=fmt), output=str(out))
    ratio = os.path.getsize(out) / os.path.getsize(src)
    assert ratio < 0.27, ratio  # 1 byte per weight instead of 4, plus scales and the FP32 bias
    loaded = onnx.load(out)
    t = _init(loaded, "w.quantized")
    assert t.data_type == dtype
    np.testing.assert_array_equal(numpy_helper.to_array(t).view(np.uint8),
                                  numpy_helper.to_array(_init(res.model, "w.quantized")).view(np.uint8))
    f = get_format(fmt)
    scale = f.scale_for(channel_amax(w, 0))
    np.testing.assert_array_equal(numpy_helper.to_array(t).view(np.uint8), f.quantize(w, scale, 0).view(np.uint8))
    onnx.checker.check_model(loaded, full_check=True)


def test_activation_qdq_shared_by_all_consumers_zero_point_and_bias():
    text = """g (float[2,8] x) => (float[2,4] y, float[2,4] z, float[2,4] r) {
        y = Gemm <transB = 1> (x, w1, b1)
        z = Gemm <transB = 1> (x, w2, b2)
        r = MatMul (x, w3)
    }"""
    b1 = rng.normal(0, 1, 4).astype(np.float32)
    model = _model(text, {"w1": rng.normal(0, 1, (4, 8)), "b1": b1, "w2": rng.normal(0, 1, (4, 8)),
                          "b2": rng.normal(0, 1, 4), "w3": rng.normal(0, 1, (8, 4))})
    calib = _calib((2, 8), n=4)
    res = _quantize(model, calib, format="e4m3")
    g = res.model.graph
    q_nodes = [n for n in g.node if n.op_type == "QuantizeLinear"]
    assert len(q_nodes) == 1 and q_nodes[0].input[0] == "x"
    dq_out = next(n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] == q_nodes[0].output[0]).output[0]
    readers = sorted(n.name for n in g.node if dq_out in n.input)
    assert len(readers) == 3
    spec = res.plan.tensors["x"]
    assert sorted(spec.consumers) == readers
    amax = max(float(np.abs(c["x"]).max()) for c in calib)
    assert spec.amax == pytest.approx(amax, rel=0, abs=0)
    assert spec.scale == float(np.float32(amax) / np.float32(448.0))
    for n in g.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = _init(res.model, n.input[2])
            assert zp.data_type == TensorProto.FLOAT8E4M3FN
            assert not numpy_helper.to_array(zp).astype(np.float32).any()
    bias = _init(res.model, "b1")
    assert bias.data_type == TensorProto.FLOAT
    np.testing.assert_array_equal(numpy_helper.to_array(bias), b1)


@pytest.mark.parametrize("style", ["qdq", "emulate"])
def test_zero_range_gets_safe_scale(style):
    text = "g (float[2,8] x) => (float[2,4] y) { y = Gemm <transB = 1> (x, w, b) }"
    w = rng.normal(0, 1, (4, 8)).astype(np.float32)
    w[2] = 0.0  # a dead output channel
    model = _model(text, {"w": w, "b": np.zeros(4)})
    calib = [{"x": np.zeros((2, 8), np.float32)}]
    res = _quantize(model, calib, format="e4m3", style=style)
    spec = res.plan.tensors["x"]
    assert spec.amax == 0.0 and spec.scale == 1.0
    assert any("safe scale" in n for n in spec.notes)
    ws = res.plan.tensors["w"].scale_array()
    assert np.isfinite(ws).all() and (ws > 0).all() and ws[2] == 1.0
    x = rng.normal(0, 1, (2, 8)).astype(np.float32)
    out = ReferenceEvaluator(res.model).run(None, {"x": x})[0]
    assert np.isfinite(out).all()


class ForceOutputPlacement(Pass):
    """Quantize the Relu's output itself (the placement insert_qdq avoids), for the equivalence test."""

    name = "force_output_placement"

    def run(self, graph, ctx):
        for spec in ctx.plan.activations():
            spec.placement = "output"
        return PassResult(False, [])


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "int8"])
def test_relu_producer_quantized_on_its_input_with_relu_scale(fmt):
    text = """g (float[4,8] x) => (float[4,3] y) {
        h = Gemm <transB = 1> (x, w1, b1)
        a = Relu (h)
        y = Gemm <transB = 1> (a, w2, b2)
    }"""
    inits = {"w1": rng.normal(0, 1, (6, 8)), "b1": rng.normal(0, 1, 6), "w2": rng.normal(0, 1, (3, 6)),
             "b2": rng.normal(0, 1, 3)}
    model = _model(text, inits)
    calib = _calib((4, 8), n=4)
    res = _quantize(model, calib, format=fmt)
    spec = res.plan.tensors["a"]
    assert spec.placement.startswith("before:")
    # the range is the Relu output's: max over batches of relu(h)
    amax = max(float(np.maximum(c["x"] @ inits["w1"].astype(np.float32).T + inits["b1"].astype(np.float32), 0).max())
               for c in calib)
    assert spec.amax == pytest.approx(amax, rel=1e-6)
    q = next(n for n in res.model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] != "x")
    assert q.input[0] == "h"  # placed on the Relu's input
    assert numpy_helper.to_array(_init(res.model, q.input[1])) == np.float32(spec.scale)
    relu = next(n for n in res.model.graph.node if n.op_type == "Relu")
    assert relu.output[0] == "a" and relu.input[0] != "h"
    # same function as quantizing after the Relu
    pipe = onnxfp8.passes.standard_pipeline().insert_after("assign_formats", ForceOutputPlacement())
    after = onnxfp8.quantize(model, calib, config=onnxfp8.QuantConfig(format=fmt), pipeline=pipe)
    q2 = next(n for n in after.model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] != "x")
    assert q2.input[0] == "a"
    x = rng.normal(0, 1.5, (64, 8)).astype(np.float32)
    a1 = ReferenceEvaluator(res.model).run(None, {"x": x})[0]
    a2 = ReferenceEvaluator(after.model).run(None, {"x": x})[0]
    np.testing.assert_array_equal(a1, a2)


def test_relu_with_fp32_reader_keeps_fp32_relu():
    """A Relu whose output is also read by a node that stays FP32: that reader keeps the unquantized value."""
    text = """g (float[4,8] x) => (float[4,3] y, float[4,6] s) {
        h = Gemm <transB = 1> (x, w1, b1)
        a = Relu (h)
        y = Gemm <transB = 1> (a, w2, b2)
        s = Sigmoid (a)
    }"""
    inits = {"w1": rng.normal(0, 1, (6, 8)), "b1": rng.normal(0, 1, 6), "w2": rng.normal(0, 1, (3, 6)),
             "b2": rng.normal(0, 1, 3)}
    model = _model(text, inits)
    res = _quantize(model, _calib((4, 8)), format="e4m3")
    x = rng.normal(0, 1, (4, 8)).astype(np.float32)
    h, a, s_out = ReferenceEvaluator(res.model).run(["h", "a", "s"], {"x": x})
    np.testing.assert_array_equal(a, np.maximum(h, 0))  # the FP32 Relu is kept for Sigmoid
    np.testing.assert_allclose(s_out, 1 / (1 + np.exp(-np.maximum(h, 0))), rtol=1e-6)
    q = next(n for n in res.model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] != "x")
    assert q.input[0] == "h"
    relus = [n for n in res.model.graph.node if n.op_type == "Relu"]
    assert len(relus) == 2  # the original for the FP32 reader, a clone on the Q/DQ for the quantized Gemm
    gemm2 = next(n for n in res.model.graph.node if n.op_type == "Gemm" and "y" in n.output)
    clone = next(n for n in relus if n.output[0] == gemm2.input[0])
    assert clone.input[0] != "h"


def test_e3m4_weights_codes_and_table_activations_emulated():
    text = """g (float[4,8] x) => (float[4,5] y) {
        y = Gemm <transB = 1> (x, w, b)
    }"""
    w = rng.normal(0, 1, (5, 8)).astype(np.float32)
    model = _model(text, {"w": w, "b": rng.normal(0, 1, 5)})
    calib = _calib((4, 8), n=3)
    for style in ("qdq", "emulate"):
        res = _quantize(model, calib, format="e3m4", style=style)
        ops = {n.op_type for n in res.model.graph.node}
        assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
        codes = _init(res.model, "w.quantized")
        assert codes.data_type == TensorProto.UINT8
        scale = E3M4.scale_for(channel_amax(w, 0))
        np.testing.assert_array_equal(numpy_helper.to_array(codes), E3M4.quantize(w, scale, 0))
        table = numpy_helper.to_array(_init(res.model, "e3m4.code_table"))
        np.testing.assert_array_equal(table, E3M4.code_table())
        assert any(n.op_type == "Gather" and n.input[0] == "e3m4.code_table" for n in res.model.graph.node)
        x = rng.normal(0, 2, (4, 8)).astype(np.float32)
        x[0, :4] = [0.0, 1e-9, -100.0, 3.0]  # zero, underflow, saturation
        sess = ReferenceEvaluator(res.model)
        deq_w, deq_x = sess.run(["w", "x.dq"], {"x": x})
        np.testing.assert_array_equal(deq_w, E3M4.fake_quant(w, scale, 0))
        xs = np.float32(res.plan.tensors["x"].scale)
        np.testing.assert_array_equal(deq_x, E3M4.fake_quant(x, xs))
        # onnxruntime computes the same decomposition
        from onnxfp8.modelio import make_session

        m2 = onnx.ModelProto()
        m2.CopyFrom(res.model)
        m2.graph.output.append(onnx.ValueInfoProto(name="x.dq"))
        for level in ("basic", "all"):
            got = make_session(m2, level=level).run(["x.dq"], {"x": x})[0]
            np.testing.assert_array_equal(got, E3M4.fake_quant(x, xs))


def test_e3m4_activation_exact_on_every_grid_value_and_tie():
    """The decomposed E3M4 rounding of activations equals formats.E3M4 on every grid value, every midpoint
    (ties to even) and values around each power of two."""
    text = "g (float[1,8] x) => (float[1,2] y) { y = Gemm <transB = 1> (x, w, b) }"
    model = _model(text, {"w": rng.normal(0, 1, (2, 8)), "b": np.zeros(2)})
    calib = [{"x": np.full((1, 8), 30.0, np.float32)}]  # amax 30 -> scale 1: the input is the format's value
    res = _quantize(model, calib, format="e3m4")
    assert res.plan.tensors["x"].scale == 1.0
    grid = E3M4.finite_values()
    mids = (grid[:-1] + grid[1:]) / 2
    pows = np.float32(2.0) ** np.arange(-8, 6, dtype=np.float32)
    near = np.concatenate([np.nextafter(pows, 0), pows, np.nextafter(pows, 100)])
    vals = np.concatenate([grid, mids, near, -near, [0.0, -0.0, 31.0, -45.0]]).astype(np.float32)
    vals = np.pad(vals, (0, -len(vals) % 8)).reshape(-1, 8)
    sess = ReferenceEvaluator(res.model)
    for row in vals:
        got = sess.run(["x.dq"], {"x": row[None]})[0]
        np.testing.assert_array_equal(got, E3M4.fake_quant(row[None], np.float32(1.0)))
