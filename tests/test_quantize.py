"""End to end through the Python API on every example model, format and output style: the output is valid
ONNX, runs in onnxruntime, agrees with onnx.reference, is as accurate as measured, and shrinks the file."""
import json
import os

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

import onnxfp8
from onnxfp8.errors import PassError
from onnxfp8.modelio import make_session
from onnxfp8.passes import standard_pipeline
from onnxfp8.pipeline import Pass, PassResult
from onnxfp8.plan import QuantPlan
from onnxfp8.verify.compare import sqnr_db

# Output SQNR (dB) vs FP32 on the 32 validation samples (seed 2) of onnxfp8.examples.build's examples, calibrated on
# their 32 calibration samples (seed 1), measured with onnxruntime 1.32 at ENABLE_BASIC. Both styles compute
# the same function, so they share the figure.
MEASURED_SQNR = {
    ("cnn", "e4m3"): 14.235, ("cnn", "e5m2"): 9.642, ("cnn", "e3m4"): 20.677, ("cnn", "int8"): 27.012,
    ("mlp", "e4m3"): 23.264, ("mlp", "e5m2"): 17.262, ("mlp", "e3m4"): 28.509, ("mlp", "int8"): 33.050,
    # transformer: embedding table FP32 by default (with it quantized: 25.915, 18.906, 31.510, 31.234)
    ("transformer", "e4m3"): 27.464, ("transformer", "e5m2"): 20.533, ("transformer", "e3m4"): 32.567,
    ("transformer", "int8"): 31.729,
}
TOLERANCE_DB = 0.5
# quantized / FP32 serialized size for E4M3 (measured: cnn 0.258, mlp 0.278, transformer 0.709: its embedding
# table, most of its weights, stays FP32 by default - rules.DefaultEmbeddingRule; 0.315 with it quantized)
MAX_SIZE_RATIO = {"cnn": 0.27, "mlp": 0.29, "transformer": 0.72}

MODELS = ("cnn", "mlp", "transformer")
FORMATS = ("e4m3", "e5m2", "e3m4", "int8")
STYLES = ("qdq", "emulate")


@pytest.fixture(scope="module")
def quantized(example_models):
    cache = {}

    def get(name, fmt, style):
        key = (name, fmt, style)
        if key not in cache:
            ex = example_models[name]
            cache[key] = onnxfp8.quantize(str(ex["model"]), str(ex["calib"]),
                                          config=onnxfp8.QuantConfig(format=fmt, style=style))
        return cache[key]

    return get


@pytest.fixture(scope="module")
def val_data(example_models, load_feeds):
    return {name: load_feeds(example_models[name]["val"]) for name in MODELS}


@pytest.fixture(scope="module")
def fp32_outputs(example_models, val_data):
    return {name: make_session(str(example_models[name]["model"]), level="disable").run(None, val_data[name])[0]
            for name in MODELS}


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", MODELS)
def test_end_to_end(name, fmt, style, quantized, val_data, fp32_outputs):
    res = quantized(name, fmt, style)
    onnx.checker.check_model(res.model, full_check=True)
    feeds = val_data[name]
    got = make_session(res.model, level="basic").run(None, feeds)[0]
    assert np.isfinite(got).all()
    sqnr = sqnr_db(fp32_outputs[name], got)
    want = MEASURED_SQNR[(name, fmt)]
    # a regression fails the lower bound; an SQNR far above the measured one means something was not quantized
    assert want - TOLERANCE_DB <= sqnr <= want + 3.0, f"{name} {fmt} {style}: SQNR {sqnr:.3f} dB, measured {want}"
    # the report's own summary SQNR (on the calibration data) is a finite number below the FP32 identity
    out_stats = next(iter(res.report.outputs.values()))
    assert 0 < out_stats["sqnr_db"] < 60
    # a second runtime: onnx.reference on 8 samples. FP8 rounding turns float accumulation-order noise of Conv
    # (ORT vs numpy, ~3e-6) into an occasional one-step flip, so allow one sample of 8 to differ by a step.
    small = {k: v[:8] for k, v in feeds.items()}
    ref = ReferenceEvaluator(res.model).run(None, small)[0]
    diff = np.abs(ref - got[:8]).reshape(8, -1).max(axis=1)
    assert (diff > 1e-4).sum() <= 1, diff
    assert diff.max() < 0.2, diff


@pytest.mark.parametrize("style", STYLES)
def test_styles_compute_the_same_function(style, quantized, val_data):
    """qdq (at ENABLE_BASIC) and emulate (at every level) give the same outputs on the MLP."""
    feeds = val_data["mlp"]
    qdq = make_session(quantized("mlp", "e4m3", "qdq").model, level="basic").run(None, feeds)[0]
    other = quantized("mlp", "e4m3", style).model
    for level in ("basic", "all") if style == "emulate" else ("basic",):
        np.testing.assert_array_equal(make_session(other, level=level).run(None, feeds)[0], qdq)


@pytest.mark.parametrize("name", MODELS)
def test_e4m3_file_shrinks(name, quantized, example_models, tmp_path):
    res = quantized(name, "e4m3", "qdq")
    out = tmp_path / "q.onnx"
    onnx.save(res.model, out)
    ratio = os.path.getsize(out) / os.path.getsize(example_models[name]["model"])
    assert ratio <= MAX_SIZE_RATIO[name], ratio
    assert res.report.size_after / res.report.size_before <= MAX_SIZE_RATIO[name]


def test_quantized_ops_and_skips_reported(quantized):
    res = quantized("transformer", "e4m3", "qdq")
    counts = res.plan.counts_by_op()
    assert "Gather" not in counts and counts.get("MatMul", 0) >= 4
    skipped = res.plan.skipped_nodes()
    assert any(d.reason.startswith("embedding Gather kept FP32 by default") for d in skipped if d.op_type == "Gather")
    assert skipped and all(d.reason for d in skipped)
    assert any("two activations" in d.reason for d in skipped if d.op_type == "MatMul")
    summary = res.report.summary()
    assert "SQNR" in summary or "sqnr" in summary.lower()


def test_plan_json_round_trip(quantized, tmp_path):
    plan = quantized("cnn", "e4m3", "qdq").plan
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    back = QuantPlan.from_json(path.read_text())
    assert back.to_dict() == plan.to_dict()
    assert json.loads(back.to_json()) == json.loads(plan.to_json())
    assert set(back.tensors) == set(plan.tensors) and back.tensors["conv1.weight"].axis == 0


def test_in_memory_model_and_iterable_calibration(example_models, load_feeds):
    ex = example_models["mlp"]
    model = onnx.load(ex["model"])
    calib = load_feeds(ex["calib"])
    batches = [{k: v[i:i + 4] for k, v in calib.items()} for i in range(0, 32, 4)]
    a = onnxfp8.quantize(model, batches)
    b = onnxfp8.quantize(str(ex["model"]), str(ex["calib"]))
    assert a.plan.to_dict() == b.plan.to_dict()


class Marker(Pass):
    name = "marker"

    def __init__(self):
        self.seen = None

    def run(self, graph, ctx):
        self.seen = sorted(ctx.plan.tensors)
        return PassResult(False, ["marker ran"])


class Boom(Pass):
    name = "boom"

    def run(self, graph, ctx):
        raise RuntimeError("kaboom\nsecond line")


def test_user_pass_runs_in_pipeline(example_models):
    ex = example_models["mlp"]
    marker = Marker()
    pipe = standard_pipeline().insert_after("assign_formats", marker)
    assert pipe.names().index("marker") == pipe.names().index("assign_formats") + 1
    res = onnxfp8.quantize(str(ex["model"]), str(ex["calib"]), pipeline=pipe)
    assert marker.seen == sorted(res.plan.tensors) and marker.seen
    rec = next(r for r in res.report.passes if r.name == "marker")
    assert rec.notes == ["marker ran"]
    assert [r.name for r in res.report.passes] == pipe.names()


def test_failing_pass_raises_pass_error_naming_it(example_models):
    ex = example_models["mlp"]
    pipe = standard_pipeline().insert_before("calibrate", Boom())
    with pytest.raises(PassError) as e:
        onnxfp8.quantize(str(ex["model"]), str(ex["calib"]), pipeline=pipe)
    msg = str(e.value)
    assert "'boom'" in msg and "kaboom" in msg and "second line" not in msg
    assert "canonicalize, fold_batchnorm, select_ops" in msg and "\n" not in msg


def test_output_written_atomically_and_input_protected(example_models, tmp_path):
    ex = example_models["mlp"]
    out = tmp_path / "mlp.e4m3.onnx"
    res = onnxfp8.quantize(str(ex["model"]), str(ex["calib"]), output=str(out))
    assert res.output == str(out) and out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnxfp8-")]
    onnx.checker.check_model(onnx.load(out), full_check=True)
    before = ex["model"].read_bytes()
    with pytest.raises(onnxfp8.ModelError, match="refusing to overwrite the input"):
        onnxfp8.quantize(str(ex["model"]), str(ex["calib"]), output=str(ex["model"]))
    assert ex["model"].read_bytes() == before
