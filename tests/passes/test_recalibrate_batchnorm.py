"""recalibrate_batchnorm / fold_quantized_batchnorm on a Conv -> BN -> Relu -> Conv -> BN graph:

- recalibrated statistics equal numpy statistics computed from the quantized upstream values (train-mode
  normalization of the upstream BN per batch, exact pooling across uneven batches);
- without quantization, recalibrating on the data the BN was fitted to leaves the statistics unchanged;
- the folded model passes the checker (full_check) and matches its unfolded twin numerically, in every
  format and style;
- the guard keeps the stored statistics when recalibration is worse on held-out samples;
- the CLI flags (--bn-recalibrate, --bn-calib, --bn-samples, --bn-mode, --bn-guard, --augment) and their errors.
"""
import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxfp8
from onnxfp8.calibrators.data import as_data
from onnxfp8.cli import cli
from onnxfp8.config import QuantConfig
from onnxfp8.errors import ConfigError, DataError
from onnxfp8.formats import get_format
from onnxfp8.modelio import make_session, prepare_model, to_graph, to_model
from onnxfp8.passes import pipeline_for
from onnxfp8.passes.assign_formats import AssignFormats, channel_amax
from onnxfp8.passes.calibrate import Calibrate
from onnxfp8.passes.canonicalize import Canonicalize
from onnxfp8.passes.cleanup import Cleanup
from onnxfp8.passes.fold_quantized_batchnorm import FoldQuantizedBatchNorm, StashFP32Weights
from onnxfp8.passes.insert_qdq import InsertQDQ
from onnxfp8.calibrators.data import DataSource, HeldOut
from onnxfp8.calibrators.moments import PooledMoments
from onnxfp8.passes.recalibrate_batchnorm import RecalibrateBatchNorm
from onnxfp8.passes.select_ops import SelectOps
from onnxfp8.pipeline import PassContext, Pipeline

EPS = 1e-5
N, CIN, C1, C2, HW = 96, 2, 4, 3, 6


def conv(x, w, b):
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # n c h w i j
    return np.einsum("nchwij,ocij->nohw", win, w.astype(np.float64)) + b[None, :, None, None]


def stats(y):
    return y.mean(axis=(0, 2, 3)), y.var(axis=(0, 2, 3))


def bn(y, gamma, beta, mean, var):
    r = lambda a: np.asarray(a)[None, :, None, None]  # noqa: E731
    return (y - r(mean)) / np.sqrt(r(var) + EPS) * r(gamma) + r(beta)


@pytest.fixture(scope="module")
def case():
    """The model with BN statistics fitted (inference mode, population statistics) to its data."""
    rng = np.random.default_rng(0)
    x = (rng.normal(0.3, 1.0, (N, CIN, HW, HW))).astype(np.float32)
    p = {"w1": rng.normal(0, 0.5, (C1, CIN, 3, 3)), "b1": rng.normal(0, 0.3, C1),
         "g1": rng.uniform(0.5, 1.5, C1), "be1": rng.normal(0, 0.5, C1),
         "w2": rng.normal(0, 0.3, (C2, C1, 3, 3)), "b2": rng.normal(0, 0.3, C2),
         "g2": rng.uniform(0.5, 1.5, C2), "be2": rng.normal(0, 0.5, C2)}
    p = {k: v.astype(np.float32) for k, v in p.items()}
    y1 = conv(x, p["w1"], p["b1"])
    p["m1"], p["v1"] = (a.astype(np.float32) for a in stats(y1))
    h = np.maximum(bn(y1, p["g1"], p["be1"], p["m1"], p["v1"]), 0)
    y2 = conv(h, p["w2"], p["b2"])
    p["m2"], p["v2"] = (a.astype(np.float32) for a in stats(y2))
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g1", "be1", "m1", "v1"], ["bn1_out"], name="bn1", epsilon=EPS),
        helper.make_node("Relu", ["bn1_out"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c2", "g2", "be2", "m2", "v2"], ["y"], name="bn2", epsilon=EPS),
    ]
    graph = helper.make_graph(nodes, "cbrcb", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", CIN, HW, HW])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", C2, HW, HW])],
                              [numpy_helper.from_array(v, k) for k, v in p.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model, x, p


def _run_passes(model, x, passes, **cfg):
    proto = prepare_model(model)
    graph = to_graph(proto)
    ctx = PassContext(config=QuantConfig(**cfg))
    ctx.calib = as_data([{"x": x[i:i + 16]} for i in range(0, len(x), 16)], proto)
    Pipeline("test", passes).run(graph, ctx)
    return graph, ctx


def _quantize_unfolded(model, x, **cfg):
    cfg.setdefault("bn_guard", False)  # these tests check the recalibrated statistics themselves
    return _run_passes(model, x, [Canonicalize(), SelectOps(), Calibrate(), AssignFormats(), StashFP32Weights(),
                                  InsertQDQ(), RecalibrateBatchNorm()], bn_recalibrate=True, **cfg)


def _bn_stats(graph, name):
    node = next(n for n in graph.nodes if n.name == name)
    return node.inputs[3].values.astype(np.float64), node.inputs[4].values.astype(np.float64)


def _numpy_train_mode_stats(x, p, fq):
    """Pooled (mean, var) of the inputs of bn1 and bn2 over the pass's batches (64 + 32), the upstream BN
    normalizing with each batch's own statistics; ``fq(values, tensor)`` quantizes (or not)."""
    w1, w2 = fq(p["w1"], "w1"), fq(p["w2"], "w2")
    y1s, y2s = [], []
    for start in (0, 64):
        xb = fq(x[start:start + 64], "x")
        y1 = conv(xb, w1, p["b1"]).astype(np.float32)
        m, v = stats(y1.astype(np.float64))
        h = bn(y1, p["g1"], p["be1"], m, v).astype(np.float32)
        h = np.maximum(fq(h, "r1"), 0)  # r1 is quantized on the Relu input
        y2s.append(conv(h, w2, p["b2"]))
        y1s.append(y1.astype(np.float64))
    return {"bn1": stats(np.concatenate(y1s)), "bn2": stats(np.concatenate(y2s))}  # exact pooling


@pytest.mark.parametrize("fmt", ["e4m3", "int8", "e3m4"])
def test_recalibrated_stats_equal_numpy_stats_of_quantized_upstream(case, fmt):
    model, x, p = case
    graph, ctx = _quantize_unfolded(model, x, format=fmt, bn_mode="replace")
    f = get_format(fmt)
    plan = ctx.plan.tensors
    assert ctx.bn_recalibration.batches == 2  # 96 samples in batches of 64 and 32
    fq = lambda v, name: f.fake_quant(v.astype(np.float32), plan[name].scale_array(), plan[name].axis)  # noqa: E731
    assert not np.array_equal(fq(p["w1"], "w1"), p["w1"])  # quantization really happened
    for name, (want_m, want_v) in _numpy_train_mode_stats(x, p, fq).items():
        got_m, got_v = _bn_stats(graph, name)
        np.testing.assert_allclose(got_m, want_m, rtol=1e-4, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(got_v, want_v, rtol=1e-4, atol=1e-5, err_msg=name)
    # and they differ from the FP32 statistics the model came with
    assert np.max(np.abs(_bn_stats(graph, "bn2")[0] - p["m2"])) > 1e-4


@pytest.mark.parametrize("fmt", ["e4m3", "int8"])
def test_shift_mode_moves_stored_stats_by_the_numpy_quantization_shift(case, fmt):
    model, x, p = case
    graph, ctx = _quantize_unfolded(model, x, format=fmt, bn_mode="shift")
    f = get_format(fmt)
    plan = ctx.plan.tensors
    fq = lambda v, name: f.fake_quant(v.astype(np.float32), plan[name].scale_array(), plan[name].axis)  # noqa: E731
    quant = _numpy_train_mode_stats(x, p, fq)
    fp32 = _numpy_train_mode_stats(x, p, lambda v, name: v.astype(np.float32))
    for name, k in (("bn1", "1"), ("bn2", "2")):
        (mq, vq), (mf, vf) = quant[name], fp32[name]
        got_m, got_v = _bn_stats(graph, name)
        np.testing.assert_allclose(got_m, p["m" + k] + (mq - mf), rtol=1e-4, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(got_v, p["v" + k] * (vq + EPS) / (vf + EPS), rtol=1e-4, err_msg=name)
    assert np.max(np.abs(_bn_stats(graph, "bn2")[0] - p["m2"])) > 1e-4


def test_fp32_recalibration_on_fitting_data_leaves_stats_unchanged(case):
    model, x, p = case
    graph, ctx = _run_passes(model, x, [Canonicalize(), RecalibrateBatchNorm()], bn_recalibrate=True,
                             bn_mode="replace", batch_size=128)
    for name, m, v in (("bn1", p["m1"], p["v1"]), ("bn2", p["m2"], p["v2"])):  # one batch: exact
        got_m, got_v = _bn_stats(graph, name)
        np.testing.assert_allclose(got_m, m, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_v, v, rtol=1e-5, atol=1e-6)
    graph, ctx = _run_passes(model, x, [Canonicalize(), RecalibrateBatchNorm()], bn_recalibrate=True,
                             bn_mode="replace")  # batches 64 + 32: BN1 still exact, BN2 within tolerance
    np.testing.assert_allclose(_bn_stats(graph, "bn1")[0], p["m1"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_bn_stats(graph, "bn1")[1], p["v1"], rtol=1e-5)
    got_m, got_v = _bn_stats(graph, "bn2")
    assert np.max(np.abs(got_m - p["m2"]) / np.sqrt(p["v2"])) < 0.05
    np.testing.assert_allclose(got_v, p["v2"], rtol=0.05)


def test_shift_mode_without_quantization_is_exactly_a_no_op(case):
    model, x, p = case
    res = onnxfp8.quantize(model, [{"x": x}], config=QuantConfig(op_types=("NoSuchOp",), allow_empty=True, bn_recalibrate=True,
                                                                  fold_batchnorm=False))
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    for k in ("m1", "v1", "m2", "v2"):
        np.testing.assert_allclose(inits[k], p[k], rtol=1e-6, atol=1e-7)
    assert res.report.batchnorm.to_dict()["mode"] == "shift"


@pytest.mark.parametrize("fmt,style", [("e4m3", "qdq"), ("e4m3", "emulate"), ("int8", "qdq"), ("e3m4", "qdq"),
                                       ("e5m2", "emulate")])
def test_folded_model_checks_and_matches_unfolded_twin(case, fmt, style):
    model, x, p = case
    graph, ctx = _quantize_unfolded(model, x, format=fmt, style=style)
    twin = to_model(graph.copy())
    assert sum(n.op_type == "BatchNormalization" for n in twin.graph.node) == 2
    Pipeline("fold", [FoldQuantizedBatchNorm(), Cleanup()]).run(graph, ctx)
    folded = to_model(graph)
    onnx.checker.check_model(folded, full_check=True)
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    # the folded weights are stored quantized with scales recomputed from the folded FP32 weight
    inits = {t.name: t for t in folded.graph.initializer}
    spec = ctx.plan.tensors["w2"]
    assert inits["w2.quantized"].data_type != onnx.TensorProto.FLOAT
    g, v = p["g2"].astype(np.float64), ctx.bn_recalibration.layers["bn2"]["var_after"]
    folded_w = p["w2"] * (g / np.sqrt(np.asarray(v) + EPS))[:, None, None, None]
    np.testing.assert_allclose(spec.scale, get_format(fmt).scale_for(channel_amax(folded_w.astype(np.float32), 0)),
                               rtol=1e-6)
    a = make_session(twin).run(["y"], {"x": x})[0]
    b = make_session(folded).run(["y"], {"x": x})[0]
    err = np.abs(a - b)
    # identical up to float rounding; an activation landing on the other side of a rounding boundary moves
    # by one quantization step at most, in very few places
    assert np.mean(err < 1e-4) > 0.995
    assert 10 * np.log10(np.sum(a.astype(np.float64) ** 2) / max(np.sum(err.astype(np.float64) ** 2), 1e-30)) > 45


def test_pipeline_order_and_report(case):
    model, x, _ = case
    cfg = QuantConfig(format="e4m3", bn_recalibrate=True)
    names = pipeline_for(cfg).names()
    assert "fold_batchnorm" not in names
    assert names.index("stash_fp32_weights") < names.index("insert_qdq") < names.index("recalibrate_batchnorm") \
        < names.index("fold_quantized_batchnorm")
    res = onnxfp8.quantize(model, [{"x": x}], config=cfg)
    bn = res.report.batchnorm.to_dict()
    assert set(bn["layers"]) == {"bn1", "bn2"} and bn["samples"] == N
    assert set(bn["sqnr_without"]) == {"y"} and set(bn["sqnr_with"]) == {"y"}
    text = res.report.summary()
    assert "BatchNorm recalibration (shift mode, pooled statistics)" in text and "bn2: mean shift" in text
    assert "SQNR vs FP32 without recalibration" in text
    assert '"batchnorm"' in res.report.to_json()


def test_pooled_moments_are_exact_and_differ_from_batch_averaging():
    rng = np.random.default_rng(1)
    parts = [rng.normal(m, s, (n, 3)) for m, s, n in ((0.0, 1.0, 50), (2.0, 0.5, 7), (-1.0, 2.0, 200))]
    acc = PooledMoments(3)
    for part in parts:
        acc.update(len(part), part.mean(0), part.var(0))
    allv = np.concatenate(parts)
    np.testing.assert_allclose(acc.mean, allv.mean(0), rtol=1e-12)
    np.testing.assert_allclose(acc.var, allv.var(0), rtol=1e-12)
    averaged = np.mean([part.var(0) for part in parts], axis=0)  # PyTorch's cumulative average of batch stats
    assert np.all(averaged < acc.var * 0.8)  # leaves out the spread of the batch means


def test_errors(case):
    model, x, _ = case
    with pytest.raises(ConfigError, match="bn_mode"):
        QuantConfig(bn_recalibrate=True, bn_mode="average")
    with pytest.raises(ConfigError, match="needs bn_recalibrate"):
        QuantConfig(augment=("flip",))
    with pytest.raises(ConfigError, match="unknown augmentation 'rotate'"):
        QuantConfig(bn_recalibrate=True, augment=("rotate",))
    with pytest.raises(DataError, match="nowhere: no such file"):
        onnxfp8.quantize(model, [{"x": x}], config=QuantConfig(bn_recalibrate=True, bn_calib="nowhere"))


def test_held_out_stream_drops_the_first_samples_and_rebatches(case):
    model, x, _ = case
    data = as_data([{"x": x[i:i + 16]} for i in range(0, len(x), 16)], model, batch_size=40)
    held = HeldOut(data, 20)
    assert [len(b["x"]) for b in held.batches()] == [40, 36]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in held.batches()]), x[20:])
    assert [len(b["x"]) for b in HeldOut(data, 80).batches()] == [16]


def _shifted_calibration(x, n=256):
    """Data the BN statistics were not fitted to: replacing them moves the outputs away from FP32."""
    rng = np.random.default_rng(5)
    shifted = (x[rng.integers(0, len(x), n)] * 1.5 + 0.5).astype(np.float32)
    return [{"x": shifted[i:i + 64]} for i in range(0, n, 64)]


def test_guard_keeps_stored_statistics_when_recalibration_is_worse_on_held_out_samples(case):
    model, x, p = case
    calib = _shifted_calibration(x)
    cfg = dict(format="int8", bn_recalibrate=True, bn_mode="replace")
    kept = onnxfp8.quantize(model, calib, config=QuantConfig(**cfg))
    bn = kept.report.batchnorm.to_dict()
    # the 64 samples captured for the FP32 comparison are held out of the 256: 192 recalibrate
    assert bn["eval_held_out"] is True and bn["eval_samples"] == 64 and bn["samples"] == 192
    assert bn["applied"] is False and bn["worse"].startswith("output SQNR vs FP32")
    assert bn["sqnr_with"]["y"] < bn["sqnr_without"]["y"] - 3
    folded = p["w2"] * (p["g2"] / np.sqrt(p["v2"] + EPS))[:, None, None, None]  # folded with the stored statistics
    spec = kept.plan.tensors["w2"]
    np.testing.assert_allclose(spec.scale, get_format("int8").scale_for(channel_amax(folded, 0)), rtol=1e-6)
    assert "kept the stored statistics: recalibration lowered output SQNR" in kept.report.summary()
    applied = onnxfp8.quantize(model, calib, config=QuantConfig(bn_guard=False, **cfg))
    assert applied.report.batchnorm.to_dict()["applied"] is True
    assert "applied anyway (--no-bn-guard)" in applied.report.summary()
    # judged right: on the held-out samples the final models compare as the guard measured
    assert kept.report.outputs["y"]["sqnr_db"] > applied.report.outputs["y"]["sqnr_db"] + 3
    np.testing.assert_allclose(kept.report.outputs["y"]["sqnr_db"], bn["sqnr_without"]["y"], atol=0.5)


def _write_case(tmp_path, model, x, name="m"):
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    calib = tmp_path / f"{name}_calib"
    calib.mkdir()
    for i in range(0, len(x), 48):
        np.savez(calib / f"{i:03d}.npz", x=x[i:i + 48])
    return str(path), str(calib)


def _one_line_error(result, *needles):
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in result.stderr + result.stdout, err
    for n in needles:
        assert n in err, err


def test_cli_bn_flags(case, tmp_path, runner):
    model, x, _ = case
    path, calib = _write_case(tmp_path, model, x)
    bn_calib = tmp_path / "bn"
    bn_calib.mkdir()
    np.savez(bn_calib / "all.npz", x=_shifted_calibration(x, 64)[0]["x"])
    out, rep = str(tmp_path / "q.onnx"), str(tmp_path / "r.json")
    res = runner.invoke(cli, ["quantize", path, "--calib", calib, "-f", "int8", "--bn-recalibrate", "--bn-calib",
                              str(bn_calib), "--bn-samples", "80", "--bn-mode", "replace", "--no-bn-guard",
                              "--augment", "flip,crop", "--augment", "jitter", "--augment-seed", "3",
                              "--report", rep, "-o", out])
    assert res.exit_code == 0, res.stderr
    assert ("BatchNorm recalibration (replace mode, pooled statistics) on 80 sample(s) in 2 batch(es), augmented "
            "flip,crop,jitter:") in res.stdout
    assert "  bn2: mean shift " in res.stdout and "output y: SQNR vs FP32 without recalibration" in res.stdout
    bn = json.load(open(rep))["batchnorm"]
    assert (bn["samples"], bn["batches"], bn["augment"], bn["mode"], bn["guard"]) == \
        (80, 2, ["flip", "crop", "jitter"], "replace", False)
    assert "64 x" not in bn["source"] and "augmented (flip,crop,jitter, seed 3)" in bn["source"]
    assert set(bn["layers"]) == {"bn1", "bn2"} and len(bn["layers"]["bn2"]["mean_after"]) == C2
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(out).graph.node)
    # the default: shift mode, the guard on, the calibration data (96 samples: too few to hold 64 out)
    res = runner.invoke(cli, ["quantize", path, "--calib", calib, "--bn-recalibrate", "--bn-samples", "50",
                              "--report", rep, "-o", out])
    assert res.exit_code == 0, res.stderr
    bn = json.load(open(rep))["batchnorm"]
    assert (bn["samples"], bn["mode"], bn["guard"], bn["eval_held_out"]) == (50, "shift", True, False)
    assert "(on 64 calibration sample(s), also used for recalibration)" in res.stdout


def test_cli_bn_errors(case, tmp_path, runner):
    model, x, _ = case
    path, calib = _write_case(tmp_path, model, x)
    res = runner.invoke(cli, ["quantize", path, "--calib", calib, "--augment", "flip"])
    _one_line_error(res, "augment", "needs bn_recalibrate (--bn-recalibrate)")
    res = runner.invoke(cli, ["quantize", path, "--calib", calib, "--bn-recalibrate", "--augment", "rotate"])
    _one_line_error(res, "unknown augmentation 'rotate'; choose from flip, crop, jitter")
    res = runner.invoke(cli, ["quantize", path, "--calib", calib, "--bn-recalibrate", "--bn-samples", "0"])
    _one_line_error(res, "bn_samples must be >= 1, got 0")
    res = runner.invoke(cli, ["quantize", path, "--calib", calib, "--bn-recalibrate", "--bn-calib",
                              str(tmp_path / "nowhere")])
    _one_line_error(res, "nowhere")
    # a non-image model: Gemm -> BatchNormalization on [N, 8]
    rng = np.random.default_rng(2)
    feats = rng.normal(0, 1, (64, 8)).astype(np.float32)
    w = rng.normal(0, 0.5, (8, 4)).astype(np.float32)
    h = feats @ w
    inits = [numpy_helper.from_array(a.astype(np.float32), k) for k, a in
             (("w", w), ("g", np.ones(4)), ("b", np.zeros(4)), ("m", h.mean(0)), ("v", h.var(0)))]
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], name="fc"),
             helper.make_node("BatchNormalization", ["h", "g", "b", "m", "v"], ["y"], name="bn")]
    g = helper.make_graph(nodes, "fcbn", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 8])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])], inits)
    flat = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    flat.ir_version = 9
    fpath, fcalib = _write_case(tmp_path, flat, feats, name="flat")
    out = tmp_path / "flat.q.onnx"
    res = runner.invoke(cli, ["quantize", fpath, "--calib", fcalib, "--bn-recalibrate", "--augment", "flip,crop",
                              "-o", str(out)])
    _one_line_error(res, f"{fpath}: --augment flip,crop needs NCHW image inputs (float, rank 4), but input 'x' is "
                         f"float32 [n, 8]; drop --augment for this model")
    assert not out.exists()
    # without --augment the same model recalibrates (any rank): on its fitting data nothing moves
    res = runner.invoke(cli, ["quantize", fpath, "--calib", fcalib, "--bn-recalibrate", "--bn-mode", "replace",
                              "--op-types", "NoSuchOp", "--no-fold-bn", "--allow-empty", "-o", str(out)])
    assert res.exit_code == 0, res.stderr
    q = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    np.testing.assert_allclose(q["m"], h.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(q["v"], h.var(0), rtol=1e-5)


def test_bn_ranges_re_measures_the_activation_ranges_that_moved(case):
    model, x, _ = case
    calib = _shifted_calibration(x)
    cfg = QuantConfig(format="int8", bn_recalibrate=True, bn_mode="replace", bn_guard=False, bn_ranges=True)
    res = onnxfp8.quantize(model, calib, config=cfg)
    notes = [n for r in res.report.passes if r.name == "remeasure_ranges" for n in r.notes]
    assert any(n.startswith("re-measured 2 activation range(s) after recalibration; 1 moved") for n in notes), notes
    spec = res.plan.tensors["r1"]
    assert any("range re-measured after BN recalibration" in n for n in spec.notes)
    # the new range is the max of the (quantized, folded) model's Relu input over all the recalibration data
    m = onnx.ModelProto()
    m.CopyFrom(res.model)
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[1] == "r1.scale")
    m.graph.output.append(helper.make_tensor_value_info(q.input[0], onnx.TensorProto.FLOAT, None))
    sess = make_session(m)
    amax = max(float(sess.run([q.input[0]], b)[0].max()) for b in calib)
    np.testing.assert_allclose(spec.amax, amax, rtol=1e-6)
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    np.testing.assert_allclose(inits["r1.scale"], get_format("int8").scale_for(np.float32(amax)), rtol=1e-6)
    before = onnxfp8.quantize(model, calib, config=cfg.replace(bn_ranges=False)).plan.tensors["r1"].amax
    assert abs(amax / before - 1) > 0.01


def test_accuracy_without_and_with_when_the_calibration_data_has_labels(case):
    model, x, _ = case
    m = onnx.ModelProto()
    m.CopyFrom(model)  # a classifier: ... -> bn2 -> GlobalAveragePool -> Flatten -> logits [N, 3]
    g = m.graph
    g.node.extend([helper.make_node("GlobalAveragePool", ["y"], ["gap"], name="gap"),
                   helper.make_node("Flatten", ["gap"], ["logits"], name="flatten")])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["n", C2]))
    xs = np.concatenate([b["x"] for b in _shifted_calibration(x)])
    labels = make_session(m).run(["logits"], {"x": xs})[0].argmax(1)
    labels[::5] = (labels[::5] + 1) % C2  # a fifth of them wrong, so accuracy is not agreement
    calib = [{"x": xs[i:i + 64], "label": labels[i:i + 64]} for i in range(0, len(xs), 64)]
    res = onnxfp8.quantize(m, calib, config=QuantConfig(format="e4m3", bn_recalibrate=True, bn_mode="replace",
                                                          bn_guard=False))
    bn = res.report.batchnorm.to_dict()
    assert bn["eval_labelled"] is True and bn["eval_held_out"] is True and bn["applied"] is True
    out = make_session(res.model).run(["logits"], {"x": xs[:64]})[0]
    np.testing.assert_allclose(bn["accuracy_with"]["logits"], np.mean(out.argmax(1) == labels[:64]), atol=1 / 64)
    assert bn["accuracy_with"]["logits"] <= 0.85 + 1e-9  # the wrong labels count
    text = res.report.summary()
    acc = f"accuracy {100 * bn['accuracy_without']['logits']:.2f}% -> {100 * bn['accuracy_with']['logits']:.2f}%"
    assert acc in text and "on 64 held-out calibration sample(s)" in text


def _static_batch_one(model, tail=False):
    """The case model exported with batch 1 (optionally with a Reshape to [1, -1] -> MatMul head, which only
    runs with batch 1)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in list(m.graph.input) + list(m.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    if tail:
        n = C2 * HW * HW
        w = np.random.default_rng(3).normal(0, 0.1, (n, 5)).astype(np.float32)
        m.graph.initializer.extend([numpy_helper.from_array(np.array([1, -1], np.int64), "flat_shape"),
                                    numpy_helper.from_array(w, "head_w")])
        m.graph.node.extend([helper.make_node("Reshape", ["y", "flat_shape"], ["flat"], name="flatten"),
                             helper.make_node("MatMul", ["flat", "head_w"], ["scores"], name="head")])
        del m.graph.output[:]
        m.graph.output.append(helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, [1, 5]))
    onnx.checker.check_model(m, full_check=True)
    return m


def test_static_batch_is_freed_on_the_working_copy(case):
    model, x, _ = case
    calib = [{"x": x[i:i + 1]} for i in range(len(x))]
    cfg = QuantConfig(format="int8", bn_recalibrate=True, bn_mode="replace", bn_guard=False, op_types=("NoSuchOp",), allow_empty=True)
    dynamic = onnxfp8.quantize(model, calib, config=cfg, check_model=False).report.batchnorm.to_dict()
    static = onnxfp8.quantize(_static_batch_one(model), calib, config=cfg)
    bn = static.report.batchnorm.to_dict()
    assert (bn["samples"], bn["batches"]) == (96, 2)  # batches of 64 + 32, not 96 of one sample
    notes = [n for r in static.report.passes if r.name == "recalibrate_batchnorm" for n in r.notes]
    assert "the model's static batch dimension was freed on the working copy: batches of 64 sample(s)" in notes
    for name in ("bn1", "bn2"):
        for key in ("mean_after", "var_after"):
            np.testing.assert_allclose(bn["layers"][name][key], dynamic["layers"][name][key], rtol=1e-5, atol=1e-6)
    assert [d.dim_value for d in static.model.graph.input[0].type.tensor_type.shape.dim] == [1, CIN, HW, HW]


def test_static_batch_falls_back_when_the_model_needs_it(case):
    model, x, _ = case
    calib = [{"x": x[i:i + 1]} for i in range(len(x))]
    cfg = QuantConfig(format="int8", bn_recalibrate=True, bn_mode="replace", bn_guard=False, op_types=("NoSuchOp",), allow_empty=True)
    res = onnxfp8.quantize(_static_batch_one(model, tail=True), calib, config=cfg)
    bn = res.report.batchnorm.to_dict()
    assert (bn["samples"], bn["batches"]) == (96, 96)
    notes = [n for r in res.report.passes if r.name == "recalibrate_batchnorm" for n in r.notes]
    assert any(n.startswith("the working copy does not run with a free batch dimension") and
               "recalibrated with the model's static batch of 1" in n for n in notes), notes
    # bn1 has no BN upstream: its pooled statistics do not depend on the batching
    dynamic = onnxfp8.quantize(model, calib, config=cfg, check_model=False).report.batchnorm.to_dict()
    np.testing.assert_allclose(bn["layers"]["bn1"]["var_after"], dynamic["layers"]["bn1"]["var_after"], rtol=1e-5)


# -- inputs batched on another axis than 0 (a streaming model's state [2, batch, C]) and a scalar -----------
def _stateful_bn_model():
    """state [2, batch, C1] (batch on axis 1), x [batch, CIN, HW, HW], a scalar gain: Conv -> BN -> + mean of the
    state over its first axis -> Relu -> y, and the next state = 0.5 * state * gain. The state input comes first,
    so a reader that took axis 0 of the first input as the batch would count 2 samples per batch."""
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.5, (C1, CIN, 3, 3)).astype(np.float32)
    inits = {"w": w, "b": rng.normal(0, 0.3, C1), "g": rng.uniform(0.5, 1.5, C1), "be": rng.normal(0, 0.2, C1),
             "m": rng.normal(0, 0.5, C1), "v": rng.uniform(0.5, 2.0, C1), "half": np.array(0.5),
             "ax0": np.array([0], np.int64), "ax23": np.array([2, 3], np.int64)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "be", "m", "v"], ["n"], name="bn", epsilon=EPS),
             helper.make_node("ReduceMean", ["state", "ax0"], ["sm"], name="state_mean", keepdims=0),
             helper.make_node("Unsqueeze", ["sm", "ax23"], ["s4"], name="state_4d"),
             helper.make_node("Add", ["n", "s4"], ["a"], name="add_state"),
             helper.make_node("Relu", ["a"], ["y"], name="relu"),
             helper.make_node("Mul", ["state", "half"], ["sh"], name="decay"),
             helper.make_node("Mul", ["sh", "gain"], ["new_state"], name="gain_mul")]
    f = onnx.TensorProto.FLOAT
    g = helper.make_graph(nodes, "stateful_bn",
                          [helper.make_tensor_value_info("state", f, [2, "batch", C1]),
                           helper.make_tensor_value_info("x", f, ["batch", CIN, HW, HW]),
                           helper.make_tensor_value_info("gain", f, [])],
                          [helper.make_tensor_value_info("y", f, ["batch", C1, HW, HW]),
                           helper.make_tensor_value_info("new_state", f, [2, "batch", C1])],
                          [numpy_helper.from_array(np.asarray(v, np.float32 if k not in ("ax0", "ax23") else np.int64), k)
                           for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)


def test_held_out_and_recalibration_follow_the_batch_axis_of_each_input():
    model = _stateful_bn_model()
    rng = np.random.default_rng(4)
    n = 96
    x = rng.normal(0.3, 1.0, (n, CIN, HW, HW)).astype(np.float32)
    state = rng.normal(0, 0.5, (2, n, C1)).astype(np.float32)
    files = [{"state": state[:, i:i + 16], "x": x[i:i + 16], "gain": np.array(0.9, np.float32)}
             for i in range(0, n, 16)]
    data = as_data(files, model, batch_size=40)
    held = HeldOut(data, 20)
    got = list(held.batches())
    assert [b["x"].shape[0] for b in got] == [40, 36] and [b["state"].shape[1] for b in got] == [40, 36]
    np.testing.assert_array_equal(np.concatenate([b["state"] for b in got], axis=1), state[:, 20:])
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in got]), x[20:])
    assert all(b["gain"].shape == () for b in got)
    # end to end: recalibration runs, counts samples along each input's batch axis and holds out the
    # evaluation samples (the first captured ones), judged on both outputs
    res = onnxfp8.quantize(model, files, config=QuantConfig(format="int8", bn_recalibrate=True, bn_mode="replace",
                                                             bn_guard=False, summary_samples=16))
    bn = res.report.batchnorm.to_dict()
    assert bn["eval_samples"] == 16 and bn["eval_held_out"] is True and bn["samples"] == n - 16
    assert set(bn["sqnr_with"]) == {"y", "new_state"}
    # the recalibrated statistics are the quantized Conv output's over the held-out samples, along axis 0 of x
    spec = res.plan.tensors["w"]
    assert spec.role == "weight"
    stats = res.plan.batchnorm["bn"]
    assert len(stats.mean) == C1 and np.isfinite(stats.mean).all() and np.isfinite(stats.var).all()
