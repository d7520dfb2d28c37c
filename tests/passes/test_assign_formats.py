"""assign_formats: node decisions + calibrated ranges -> QuantSpecs: per-output-channel weight scales on the
op's channel axis, per-tensor activation scales amax / format max, safe scales for empty ranges, per-role
formats and per-tensor overrides."""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxfp8.config import QuantConfig
from onnxfp8.errors import ConfigError
from onnxfp8.formats import get_format
from onnxfp8.passes.assign_formats import channel_amax

rng = np.random.default_rng(7)
PASSES = ["canonicalize", "fold_batchnorm", "select_ops", "calibrate", "assign_formats"]
TEXT = """<ir_version: 8, opset_import: ["" : 19]>
g (float[2,3,6,6] x) => (float[2,5] y) {
    c = Conv <pads = [1,1,1,1]> (x, wc, bc)
    t = ConvTranspose (c, wt)
    p = GlobalAveragePool (t)
    f = Flatten (p)
    h = Gemm (f, wg0, bg0)
    r = Relu (h)
    y = Gemm <transB = 1> (r, wg1, bg1)
}"""
WEIGHTS = {"wc": ((4, 3, 3, 3), 0), "wt": ((4, 2, 3, 3), 1), "wg0": ((2, 6), 1), "wg1": ((5, 6), 0)}


def _model():
    m = onnx.parser.parse_model(TEXT)
    inits = {k: rng.normal(0, 1, s).astype(np.float32) for k, (s, _) in WEIGHTS.items()}
    inits.update(bc=np.zeros(4, np.float32), bg0=np.zeros(6, np.float32), bg1=np.zeros(5, np.float32))
    inits["wc"][1] = 0.0  # a dead channel
    m.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in inits.items())
    return m, inits


MODEL, INITS = _model()
CALIB = [{"x": rng.normal(0, 1, (2, 3, 6, 6)).astype(np.float32)} for _ in range(3)]


def _plan(run_passes, **cfg):
    _, ctx, res = run_passes(MODEL, PASSES, config=QuantConfig(**cfg), calib=CALIB)
    return ctx, res["assign_formats"].notes


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "e3m4", "int8"])
def test_weight_scales_per_output_channel(run_passes, fmt):
    ctx, notes = _plan(run_passes, format=fmt)
    f = get_format(fmt)
    for name, (shape, axis) in WEIGHTS.items():
        spec = ctx.plan.tensors[name]
        assert (spec.role, spec.format, spec.axis) == ("weight", fmt, axis), name
        amax = channel_amax(INITS[name], axis)
        np.testing.assert_array_equal(np.asarray(spec.amax, np.float32), amax)
        np.testing.assert_array_equal(spec.scale_array(), f.scale_for(amax))
    wc = ctx.plan.tensors["wc"].scale_array()
    assert wc[1] == 1.0 and np.isfinite(wc).all() and (wc > 0).all()
    assert notes[0] == "4 weight(s), 4 activation(s) planned"


def test_activation_scales_and_relu_placement(run_passes):
    ctx, _ = _plan(run_passes, format="e4m3")
    acts = {s.tensor: s for s in ctx.plan.activations()}
    assert set(acts) == {"x", "c", "f", "r"}
    for name, spec in acts.items():
        assert spec.axis is None and spec.amax == ctx.stats[name]["amax"] > 0
        assert spec.scale == float(np.float32(spec.amax) / np.float32(448.0))
    assert acts["x"].amax == max(float(np.abs(c["x"]).max()) for c in CALIB)
    assert acts["r"].placement.startswith("before:") and acts["c"].placement == "output"


def test_per_tensor_and_split_formats(run_passes):
    ctx, _ = _plan(run_passes, weights_format="e4m3", activations_format="e5m2", per_channel=False)
    for name in WEIGHTS:
        spec = ctx.plan.tensors[name]
        assert spec.axis is None and spec.format == "e4m3"
        assert spec.scale == float(get_format("e4m3").scale_for(np.abs(INITS[name]).max()))
    assert {s.format for s in ctx.plan.activations()} == {"e5m2"}


def test_overrides(run_passes):
    ctx, _ = _plan(run_passes, overrides={"c": {"scale": 0.5, "format": "int8"}, "wg1": {"axis": 1},
                                          "f": {"amax": 3.0}})
    assert ctx.plan.tensors["c"].scale == 0.5 and ctx.plan.tensors["c"].format == "int8"
    assert ctx.plan.tensors["wg1"].axis == 1 and len(ctx.plan.tensors["wg1"].scale) == 6
    assert ctx.plan.tensors["f"].scale == float(np.float32(3.0) / np.float32(448.0))
    with pytest.raises(ConfigError, match="not a quantized tensor"):
        _plan(run_passes, overrides={"nope": {"scale": 1.0}})
    with pytest.raises(ConfigError, match="axis 4 out of range"):
        _plan(run_passes, overrides={"wg1": {"axis": 4}})


def test_zero_range_activation_gets_safe_scale(run_passes):
    _, ctx, _ = run_passes(MODEL, PASSES, calib=[{"x": np.zeros((2, 3, 6, 6), np.float32)}])
    x = ctx.plan.tensors["x"]
    assert x.amax == 0.0 and x.scale == 1.0 and any("safe scale" in n for n in x.notes)


def test_auto_weight_format_judged_on_negative_override_axis(run_passes):
    """A negative override axis is the same channel axis as its positive spelling: format auto must judge the
    candidates per channel on it (it judged them per tensor, so the SQNRs and possibly the winner differed)."""
    ctx_neg, _ = _plan(run_passes, weights_format="auto", activations_format="e4m3", overrides={"wg1": {"axis": -1}})
    ctx_pos, _ = _plan(run_passes, weights_format="auto", activations_format="e4m3", overrides={"wg1": {"axis": 1}})
    neg, pos = ctx_neg.plan.tensors["wg1"], ctx_pos.plan.tensors["wg1"]
    assert neg.axis == pos.axis == 1
    assert neg.candidates == pos.candidates and neg.format == pos.format
