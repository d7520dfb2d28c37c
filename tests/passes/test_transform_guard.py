"""The transform guard (config.transform_guard, quantize.py): each requested transform is kept only when it
raises the worst output's SQNR vs the original FP32 outputs on held-out calibration samples (two folds, each
held out once) by 0.5 dB with a paired bootstrap's 10 % bound >= 0 dB; on
models built in code where a transform hurts it is reverted (the result is the run without it), where it
helps it is kept with its measured gain; every decision is recorded in the plan and the plan rebuilds the
result."""
import json

import numpy as np
import onnx
import pytest

from transform_models import bert, cnn, cnn_files, image_batches

from onnxfp8 import apply_plan, quantize
from onnxfp8.config import QuantConfig
from onnxfp8.modelio import make_session
from onnxfp8.plan import QuantPlan
from onnxfp8.quantize import GUARD_MIN_GAIN_DB, judge_gain
from onnxfp8.verify.compare import sqnr_db


def _tokens(n=64, batch=16, seed=1):
    x = np.random.default_rng(seed).normal(0, 1, (n, 8, 32)).astype(np.float32)
    return [{"x": x[i:i + batch]} for i in range(0, n, batch)]


def _held_out_sqnr(model, quantized, feeds):
    ref = make_session(model, level="disable").run(None, feeds)[0]
    return sqnr_db(ref, make_session(quantized).run(None, feeds)[0])


def _decisions(plan):
    return {r["transform"]: r for r in plan.transforms if r["pass"] == "transform_guard"}


def test_equalization_that_hurts_e4m3_is_reverted_and_bias_correction_kept():
    """ReLU6 CNN in E4M3 (measured): equalization 29.45 -> 26.38 dB on the 64 calibration samples, each held out
    once (per fold -2.99, -3.15 dB; its per-channel ReLU6 bounds no longer land on the format's maximum),
    reverted; bias correction 29.45 -> 31.70 dB (per fold +2.38, +2.13, 10 % bound +1.73 dB), kept."""
    model, calib = cnn(spread=1.0), image_batches()
    feeds = image_batches(seed=9, n=64, batch=64)[0]
    plain = quantize(model, calib, QuantConfig(format="e4m3"))
    raw = quantize(model, calib, QuantConfig(format="e4m3", equalize=True, transform_guard=False))
    guarded = quantize(model, calib, QuantConfig(format="e4m3", equalize=True))
    d = _decisions(guarded.plan)
    assert list(d) == ["equalize", "bias_correction"]
    eq, bc = d["equalize"], d["bias_correction"]
    assert not eq["kept"] and eq["with_db"] < eq["without_db"] and "reverted" not in eq["reason"]
    assert {"conv1", "dw2", "pw3"} <= set(eq["layers"]) and eq["samples"] == 64 and eq["held_out"]
    assert eq["folds"] == 2 and len(eq["fold_gains_db"]) == 2 and eq["lower_db"] < 0
    assert bc["kept"] and bc["on_top_of"] == [] and bc["with_db"] >= bc["without_db"] + GUARD_MIN_GAIN_DB
    assert bc["without_db"] == eq["without_db"]  # measured against the untransformed run
    kinds = {r["pass"] for r in guarded.plan.transforms}
    assert "equalize" not in kinds and "bias_correction" in kinds
    # on held-out samples: better than the defaults and than equalization unguarded
    s_plain, s_raw, s_guard = (_held_out_sqnr(model, r.model, feeds) for r in (plain, raw, guarded))
    assert s_guard > s_plain + 1 and s_guard > s_raw + 1
    assert "equalize reverted" in guarded.report.summary() and "bias_correction kept" in guarded.report.summary()


def test_equalization_that_helps_int8_is_kept_with_its_gain():
    """The same CNN in INT8 (measured, held-out): equalization 35.42 -> 41.29 dB (10 % bound +5.51 dB), bias
    correction on top 41.29 -> 44.16 dB."""
    model, calib = cnn(spread=1.0), image_batches()
    feeds = image_batches(seed=9, n=64, batch=64)[0]
    guarded = quantize(model, calib, QuantConfig(format="int8", equalize=True))
    d = _decisions(guarded.plan)
    assert d["equalize"]["kept"] and d["equalize"]["with_db"] > d["equalize"]["without_db"] + 4
    assert d["bias_correction"]["kept"] and d["bias_correction"]["on_top_of"] == ["equalize"]
    plain = quantize(model, calib, QuantConfig(format="int8"))
    assert _held_out_sqnr(model, guarded.model, feeds) > _held_out_sqnr(model, plain.model, feeds) + 4


def test_a_reverted_transform_gives_the_untransformed_model():
    """The ReLU6 CNN in E4M3, equalization without bias correction: reverted (29.45 -> 26.38 dB held out); the
    result is byte for byte the model without it."""
    model, calib = cnn(spread=1.0), image_batches()
    plain = quantize(model, calib, QuantConfig(format="e4m3"))
    guarded = quantize(model, calib, QuantConfig(format="e4m3", equalize=True, bias_correction=False))
    d = _decisions(guarded.plan)
    assert list(d) == ["equalize"] and not d["equalize"]["kept"]
    assert d["equalize"]["with_db"] < d["equalize"]["without_db"] - 1
    assert guarded.model.SerializeToString() == plain.model.SerializeToString()
    out = model.graph.output[0].name
    assert guarded.report.outputs[out]["sqnr_db"] == pytest.approx(plain.report.outputs[out]["sqnr_db"])


def test_smoothquant_kept_where_it_helps_and_the_summary_compares_with_the_original_function():
    """BERT-style block x2 in INT8 (measured, 64 samples each held out once): smoothquant auto 16.26 -> 20.76 dB,
    kept; bias correction on top +0.19 dB (per fold +0.37, -0.03), reverted."""
    model, calib = bert(layers=2), _tokens()
    feeds = _tokens(n=64, batch=64, seed=3)[0]
    plain = quantize(model, calib, QuantConfig(format="int8"))
    guarded = quantize(model, calib, QuantConfig(format="int8", smoothquant="auto", bias_correction=True))
    d = _decisions(guarded.plan)
    assert d["smoothquant"]["kept"] and d["smoothquant"]["with_db"] > d["smoothquant"]["without_db"] + 4
    assert d["bias_correction"]["on_top_of"] == ["smoothquant"] and not d["bias_correction"]["kept"]
    assert _held_out_sqnr(model, guarded.model, feeds) > _held_out_sqnr(model, plain.model, feeds) + 4
    # the summary's SQNR is against the original model's FP32 outputs on the first calibration samples, even
    # when bias correction (which changes the FP32 function) is kept
    first = {"x": np.concatenate([b["x"] for b in calib])[:guarded.report.summary_samples]}
    want = _held_out_sqnr(model, guarded.model, first)
    assert guarded.report.outputs[model.graph.output[0].name]["sqnr_db"] == pytest.approx(want, abs=1e-3)


def test_too_little_data_is_judged_in_sample_and_says_so():
    model = cnn(spread=1.0)
    calib = image_batches(n=12, batch=4)  # fewer than 16 samples: nothing held out
    r = quantize(model, calib, QuantConfig(format="int8", equalize=True))
    d = _decisions(r.plan)["equalize"]
    assert not d["held_out"] and d["samples"] == 12
    assert "measured on 12 calibration sample(s)" in r.report.summary()


def test_guarded_plan_rebuilds_the_model_and_replays_only_what_was_kept():
    model, calib = cnn(spread=1.0), image_batches()
    r = quantize(model, calib, QuantConfig(format="e4m3", equalize=True, smoothquant=0.5))
    plan = QuantPlan.from_json(r.plan.to_json())
    again = apply_plan(model, plan)
    assert again.model.SerializeToString() == r.model.SerializeToString()
    assert [t["transform"] for t in plan.transforms if t["pass"] == "transform_guard"] == \
        ["equalize", "smoothquant", "bias_correction"]


def test_guard_off_applies_every_transform():
    model, calib = cnn(spread=1.0), image_batches()
    r = quantize(model, calib, QuantConfig(format="e4m3", equalize=True, transform_guard=False))
    kinds = {t["pass"] for t in r.plan.transforms}
    assert kinds == {"equalize", "bias_correction"}
    assert "transforms (unguarded): bias_correction, equalize" in r.report.summary()


def test_cli_guard_flag(tmp_path):
    from click.testing import CliRunner

    from onnxfp8.cli import cli

    path, calib = cnn_files(tmp_path)
    runner = CliRunner()
    res = runner.invoke(cli, ["quantize", str(path), "-c", str(calib), "--no-transform-guard", "-o",
                              str(tmp_path / "q.onnx")])
    assert res.exit_code == 2 and "--transform-guard is only used with --equalize" in res.output
    res = runner.invoke(cli, ["quantize", str(path), "-c", str(calib), "--equalize", "--plan", str(tmp_path / "p.json"),
                              "-o", str(tmp_path / "q.onnx")])
    assert res.exit_code == 0, res.output
    assert "transforms, measured on 32 held-out calibration sample(s): equalize" in res.output
    plan = json.loads((tmp_path / "p.json").read_text())
    assert {t["transform"] for t in plan["transforms"] if t["pass"] == "transform_guard"} == {"equalize", "bias_correction"}


# -- the FP32 function after the transforms, on the zoo's patterns (quantize.transformed) ----------------------
def _max_rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


@pytest.mark.parametrize("build,shape,expect", [
    # the SE's reduce -> Relu -> expand (relu0 feeds the residual too, relu1 the SE and its Mul: no pair)
    ("se_cnn", (3, 16, 16), {"equalize": {"se_reduce"}}),
    ("cnn", (3, 16, 16), {"equalize": {"conv1", "dw2", "gconv4", "conv6"}}),  # depthwise, grouped, residual, head
    ("bert", (8, 32), {"smoothquant": {"l0_ln1", "l0_ln2", "l1_ln1", "l1_ln2"}}),  # LayerNorm -> Q/K/V, FC1
    ("mlp", (12,), {"equalize": {"fc1", "fc2", "fc3"}, "smoothquant": set()}),
])
def test_transforms_keep_the_fp32_function_on_the_zoo_patterns(build, shape, expect):
    import transform_models
    from onnxfp8.quantize import transformed

    model = getattr(transform_models, build)(**({"layers": 2} if build == "bert" else {}))
    calib = image_batches(shape=shape)
    feeds = image_batches(seed=5, shape=shape, n=32, batch=32)[0]
    ref = make_session(model, level="disable").run(None, feeds)[0]
    out, plan = transformed(model, calib, QuantConfig(equalize=True, bias_correction=False, smoothquant=0.5))
    firsts = {r["first"] for r in plan.transforms if r["pass"] == "equalize" and r["kind"] == "scale"}
    smoothed = [r for r in plan.transforms if r["pass"] == "smoothquant"]
    if "equalize" in expect:
        assert expect["equalize"] <= firsts
    if expect.get("smoothquant"):
        folds = {r["fold"].split(":")[1] for r in smoothed}
        assert expect["smoothquant"] <= folds
    assert firsts or smoothed
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in out.graph.node)
    assert _max_rel(ref, make_session(out, level="disable").run(None, feeds)[0]) < 2e-5


def test_bias_correction_changes_the_fp32_function_by_the_expected_error_only():
    from transform_models import se_cnn
    from onnxfp8.quantize import transformed

    model = se_cnn()
    feeds = image_batches(seed=5, n=32, batch=32)[0]
    ref = make_session(model, level="disable").run(None, feeds)[0]
    out, plan = transformed(model, image_batches(), QuantConfig(format="e4m3", bias_correction=True))
    assert any(r["pass"] == "bias_correction" for r in plan.transforms)
    rel = _max_rel(ref, make_session(out, level="disable").run(None, feeds)[0])
    assert 1e-5 < rel < 0.1


def _half(model):
    """``model`` in float16: every float initializer, input and output (as an export with model.half())."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i, t in enumerate(m.graph.initializer):
        if t.data_type == onnx.TensorProto.FLOAT:
            from onnx import numpy_helper

            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in list(m.graph.input) + list(m.graph.output):
        v.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    onnx.checker.check_model(m, full_check=True)
    return m


def test_transforms_on_a_float16_model():
    """The per-channel statistics of FP16 tensors are cast to float in the graph (before: onnxruntime refused
    the float-typed reduction outputs of FP16 tensors, zoo resnet18-fp16 / distilbert-fp16), bias correction's
    error layers take FP16 weights."""
    from onnxfp8.quantize import transformed

    model = _half(cnn(spread=1.0))
    calib = [{"x": b["x"].astype(np.float16)} for b in image_batches()]
    feeds = {"x": image_batches(seed=5, n=32, batch=32)[0]["x"].astype(np.float16)}
    ref = make_session(model, level="disable").run(None, feeds)[0].astype(np.float32)
    out, plan = transformed(model, calib, QuantConfig(equalize=True, bias_correction=False, smoothquant=0.5))
    assert {r["pass"] for r in plan.transforms} == {"equalize", "smoothquant"}
    got = make_session(out, level="disable").run(None, feeds)[0].astype(np.float32)
    assert _max_rel(ref, got) < 5e-3  # float16 rounding of the rescaled weights
    r = quantize(model, calib, QuantConfig(format="int8", equalize=True))
    d = _decisions(r.plan)
    assert d["equalize"]["with_db"] is not None and d["bias_correction"]["with_db"] is not None


def test_judge_gain_pools_the_folds_and_a_gain_one_sample_carries_is_not_confident():
    rng = np.random.default_rng(0)
    sig = rng.uniform(1, 2, 32)
    noise = rng.uniform(0.01, 0.02, 32)
    fold = lambda a, b: [{"y": (sig[:16], a[:16])}, {"y": (sig[16:], a[16:])}]  # noqa: E731
    # everywhere 2x less noise: +3.01 dB on both folds, a tight bound
    m = judge_gain(fold(noise, None), fold(noise / 2, None))
    assert m["units"] == 32 and m["with_db"] - m["without_db"] == pytest.approx(10 * np.log10(2))
    assert m["folds"] == [pytest.approx(3.0103, abs=1e-3)] * 2 and m["lower"] == pytest.approx(3.0103, abs=1e-3)
    # one sample loses all its noise, every other one gets 10 % noisier: the pooled gain is positive (that
    # sample dominated) but the bootstrap's 10 % bound is not, so the guard would not keep it
    worse = noise * 1.1
    worse[3] = 0.0
    noisy = noise.copy()
    noisy[3] = 0.5
    m = judge_gain(fold(noisy, None), fold(worse, None))
    assert m["with_db"] - m["without_db"] > GUARD_MIN_GAIN_DB and m["lower"] < 0
    assert m["folds"][0] > 0 > m["folds"][1]


def test_guard_folds_keep_each_inputs_batch_axis():
    """A state input batched on axis 1 ([2, N, 8], as the zoo's vad-lstm / gru-stream): the folds and the
    summary cut it along its own axis (the guard once cut it along axis 0 and onnxruntime refused the run)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array((rng.normal(0, 1, (8, 16)) * np.linspace(0.1, 3, 16)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 1, (16, 4)).astype(np.float32), "w2")
    idx = numpy_helper.from_array(np.array(0, np.int64), "i0")
    nodes = [helper.make_node("Gather", ["s", "i0"], ["s0"], axis=0), helper.make_node("Add", ["x", "s0"], ["h0"]),
             helper.make_node("MatMul", ["h0", "w1"], ["h1"], name="mm1"), helper.make_node("Relu", ["h1"], ["a"]),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "state", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
                                               helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, "N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w1, w2, idx])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    calib = [{"x": rng.normal(0, 1, (8, 8)).astype(np.float32), "s": rng.normal(0, 1, (2, 8, 8)).astype(np.float32)}
             for _ in range(6)]
    r = quantize(model, calib, QuantConfig(format="e4m3", equalize=True, batch_size=16))
    d = _decisions(r.plan)["equalize"]
    assert d["held_out"] and d["samples"] == 48 and d["folds"] == 2  # folds of 24, the summary cuts 8 of them
