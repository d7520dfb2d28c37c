"""onnxfp8.check: FP32-vs-quantized metrics per output, thresholds, labels, per-layer attribution, the second
runtime, and the JSON report, on the example models (onnxfp8/examples/build.py)."""
from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import onnxfp8
from onnxfp8.examples.build import build_cnn, build_mlp, build_transformer, make_inputs
from onnxfp8 import CheckReport, QuantConfig, Thresholds, quantize
from onnxfp8.errors import ConfigError, DataError, ModelError
from onnxfp8.modelio import make_session
from onnxfp8.verify.compare import ClassifierStats, ErrorStats
from onnxfp8.verify.layers import find_layers

BUILDERS = {"cnn": build_cnn, "mlp": build_mlp, "transformer": build_transformer}
# a layer in the middle of each example whose input activation scale the broken model divides by 1000
BROKEN = {"cnn": "conv3", "mlp": "fc2", "transformer": "layer0/ffn/fc2"}
# the example models are untrained (random weights), so their logits sit close together and the E4M3 CNN keeps
# 13.3 dB, cosine 0.978, relative L2 0.216 and 87.5% top-1 agreement with FP32 on these 16 samples (it fails the
# defaults of 15 dB, 0.98, 0.2 and 90%); this gate passes all three
GATE = {"min_sqnr": 12.0, "min_cosine": 0.97, "max_rel_error": 0.25, "min_top1_agreement": 0.75}


@pytest.fixture(scope="module")
def examples():
    """name -> (fp32 model, E4M3 Q/DQ model, validation feed of 16 samples)."""
    out = {}
    for name, build in BUILDERS.items():
        model = build()
        q = quantize(model, [make_inputs(model, 32, seed=1)], QuantConfig(format="e4m3", summary_samples=0)).model
        out[name] = (model, q, make_inputs(model, 16, seed=2))
    return out


@pytest.fixture(scope="module")
def layered(examples):
    """name -> check of the E4M3 model with layers (computed once, on first use)."""
    cache = {}

    def get(name):
        if name not in cache:
            model, q, val = examples[name]
            cache[name] = onnxfp8.check(model, q, [val], GATE, layers=True)
        return cache[name]

    return get


def break_scale(quant: onnx.ModelProto, layer: str, factor: float = 1000.0):
    """A copy of ``quant`` whose activation Q/DQ scale feeding ``layer`` is ``factor`` times too small (the
    QuantizeLinear and DequantizeLinear share it), so that tensor saturates at the format's max."""
    q = onnx.ModelProto()
    q.CopyFrom(quant)
    producer = {o: n for n in q.graph.node for o in n.output}
    node = next(n for n in q.graph.node if n.name == layer)
    t = node.input[0]
    while producer[t].op_type != "DequantizeLinear":  # back through a Relu moved behind the Q/DQ
        t = producer[t].input[0]
    scale = producer[t].input[1]
    init = next(i for i in q.graph.initializer if i.name == scale)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) / factor, scale))
    users = [n.op_type for n in q.graph.node if scale in n.input]
    assert sorted(users) == ["DequantizeLinear", "QuantizeLinear"], users
    return q


def _run(model, feed, level="basic"):
    return make_session(model, level=level).run(None, feed)[0]


# -- outputs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(BUILDERS))
def test_model_against_itself_is_exact_and_passes(examples, name):
    model, _, val = examples[name]
    r = onnxfp8.check(model, model, [val], layers=True, batch_size=7)
    assert isinstance(r, CheckReport)
    assert r.passed and r.exit_code == 0 and r.failures == []
    assert r.samples == 16 and r.batches == 3
    o = r.outputs["logits"]
    assert o.sqnr_db == math.inf and o.cosine == pytest.approx(1.0, abs=1e-12)
    assert o.rel_l2 == 0.0 and o.max_abs == 0.0 and o.mean_abs == 0.0
    assert o.top1_agreement == 1.0 and o.top5_agreement == 1.0  # 10 classes
    assert r.layers == []  # the FP32 graph has no quantized layer
    d = json.loads(r.to_json())
    assert d["passed"] is True and d["outputs"][0]["sqnr_db"] == "inf" and d["layers"] == []


def test_output_metrics_equal_numpy_over_uneven_batches(examples):
    """Streamed over batches of 5 (the last one 1), the metrics equal the formulas on the whole set."""
    model, q, val = examples["cnn"]
    r = onnxfp8.check(model, q, [val], batch_size=5)
    assert r.batches == 4
    ref = _run(model, val).astype(np.float64)
    got = _run(q, val).astype(np.float64)
    d = ref - got
    o = r.outputs["logits"]
    assert o.sqnr_db == pytest.approx(10 * np.log10((ref ** 2).sum() / (d ** 2).sum()), rel=1e-6)
    assert o.cosine == pytest.approx((ref * got).sum() / np.sqrt((ref ** 2).sum() * (got ** 2).sum()), rel=1e-6)
    assert o.rel_l2 == pytest.approx(np.sqrt((d ** 2).sum() / (ref ** 2).sum()), rel=1e-6)
    assert o.max_abs == pytest.approx(np.abs(d).max(), rel=1e-6)
    assert o.mean_abs == pytest.approx(np.abs(d).mean(), rel=1e-6)
    r1 = ref.argmax(1)
    assert o.top1_agreement == (got.argmax(1) == r1).mean()
    top5 = np.argsort(-got, axis=1)[:, :5]
    assert o.top5_agreement == (top5 == r1[:, None]).any(1).mean()
    assert o.shape == [5, 10] and o.classifier.classes == 10


def test_error_stats_blocks_and_merge_equal_one_pass():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((3, 1000)).astype(np.float32)
    q = (ref + 0.01 * rng.standard_normal(ref.shape)).astype(np.float32)
    whole = ErrorStats().update(ref, q)
    small = ErrorStats()
    small.BLOCK = 7  # the block loop and its remainder
    small.update(ref, q)
    merged = ErrorStats().update(ref[:1], q[:1]).merge(ErrorStats().update(ref[1:], q[1:]))
    for s in (small, merged):
        assert s.count == whole.count == 3000
        assert s.sqnr_db == pytest.approx(whole.sqnr_db, rel=1e-12)
        assert s.max_abs == whole.max_abs and s.mean_abs == pytest.approx(whole.mean_abs, rel=1e-12)


def test_nonfinite_quantized_output_fails():
    ref = np.array([[1.0, 2.0, 3.0]], np.float32)
    q = np.array([[1.0, np.nan, np.inf]], np.float32)
    s = ErrorStats().update(ref, q)
    assert (s.nonfinite, s.q_nonfinite, s.count) == (2, 2, 1) and s.sqnr_db == math.inf
    c = ClassifierStats().update(ref, np.full_like(ref, np.nan))
    assert c.top1_agreement == 0.0  # a row of NaN agrees with nothing
    from onnxfp8.verify.check import OutputResult

    o = OutputResult("y", [1, 3], s)
    o.judge(Thresholds().for_output("y"))
    assert not o.passed and o.failures == ["y: 2 element(s) NaN/Inf (FP32 model 0, quantized model 2); the metrics "
                                           "cover only the finite rest"]
    both = OutputResult("y", [1, 3], ErrorStats().update(q, ref))  # NaN/Inf in the FP32 model fails too
    both.judge(Thresholds().for_output("y"))
    assert not both.passed and "(FP32 model 2, quantized model 0)" in both.failures[0]


# -- thresholds ------------------------------------------------------------------------------------
def test_threshold_options_parse():
    t = Thresholds.from_options({"min_sqnr": ["20", "logits=30"], "min_top1_agreement": ["99%"],
                                 "max_accuracy_loss": ["none"]})
    assert t.min_sqnr == 20.0 and t.min_top1_agreement == 0.99 and t.max_accuracy_loss is None
    assert t.for_output("logits")["min_sqnr"] == 30.0 and t.for_output("other")["min_sqnr"] == 20.0
    assert t.min_cosine == 0.98  # untouched default
    with pytest.raises(ConfigError, match="--min-cosine: 'abc' is not a number"):
        Thresholds.from_options({"min_cosine": ["abc"]})
    with pytest.raises(ConfigError, match="unknown threshold 'min_snr'"):
        Thresholds.from_options({"min_snr": ["3"]})


def test_per_output_override_decides_the_verdict(examples):
    model, q, val = examples["mlp"]
    base = onnxfp8.check(model, q, [val])
    sqnr = base.outputs["logits"].sqnr_db
    assert base.passed and 20 < sqnr < 30  # measured 23.3 dB
    strict = onnxfp8.check(model, q, [val], Thresholds.from_options({"min_sqnr": ["logits=30"]}))
    assert not strict.passed and strict.exit_code == 1
    assert strict.failures == [f"logits: SQNR {sqnr:.2f} dB < 30.00 dB"]
    # a dict works as well, and a criterion set to None is not judged
    off = onnxfp8.check(model, q, [val], {"min_sqnr": None, "overrides": {"logits": {"min_cosine": 0.9999}}})
    assert [c.metric for c in off.outputs["logits"].criteria] == ["min_cosine", "max_rel_error", "min_top1_agreement"]
    assert off.failures == [f"logits: cosine {off.outputs['logits'].cosine:.4g} < 0.9999"]
    with pytest.raises(ConfigError, match="override for 'probs'.*no such output"):
        onnxfp8.check(model, q, [val], Thresholds.from_options({"min_sqnr": ["probs=30"]}))
    with pytest.raises(ConfigError, match="unknown threshold 'sqnr'"):
        onnxfp8.check(model, q, [val], {"sqnr": 3})


# -- labels ----------------------------------------------------------------------------------------
def _labels(model, val):
    """FP32's arg-max, with the first 4 of 16 labels moved to another class: FP32 accuracy 75%."""
    lab = _run(model, val).argmax(1)
    lab[:4] = (lab[:4] + 1) % 10
    return lab


def test_labels_accuracy_and_loss(examples, tmp_path):
    model, q, val = examples["cnn"]
    lab = _labels(model, val)
    acc_q = float((_run(q, val).argmax(1) == lab).mean())
    path = tmp_path / "labels.npy"
    np.save(path, lab)
    r = onnxfp8.check(model, q, [val], {"max_accuracy_loss": 0.5}, labels=str(path), batch_size=8)
    o = r.outputs["logits"]
    assert r.labelled and o.accuracy_fp32 == 0.75 and o.accuracy_quant == acc_q
    assert o.accuracy_loss == pytest.approx((0.75 - acc_q) / 0.75, abs=1e-12)
    assert acc_q < 0.75  # measured: the E4M3 CNN moves some arg-maxes
    only_acc = {"max_accuracy_loss": 0.01, "min_top1_agreement": None, "min_sqnr": None, "min_cosine": None,
                "max_rel_error": None}
    strict = onnxfp8.check(model, q, [val], only_acc, labels=lab)
    assert strict.failures == [f"logits: relative accuracy loss {100 * o.accuracy_loss:.2f}% > 1.00%"]
    assert json.loads(strict.to_json())["outputs"][0]["accuracy_fp32"] == 0.75


def test_labels_from_npz_label_key(examples, tmp_path):
    model, q, val = examples["cnn"]
    lab = _labels(model, val)
    for i in range(0, 16, 4):  # files of 4 samples, each with its labels
        np.savez(tmp_path / f"{i:05d}.npz", input=val["input"][i:i + 4], label=lab[i:i + 4])
    from_files = onnxfp8.check(model, q, str(tmp_path), batch_size=6)
    from_array = onnxfp8.check(model, q, [val], labels=lab, batch_size=6)
    a, b = from_files.outputs["logits"], from_array.outputs["logits"]
    assert from_files.labelled and a.accuracy_fp32 == 0.75
    assert (a.accuracy_quant, a.accuracy_loss) == (b.accuracy_quant, b.accuracy_loss)


def test_bad_labels(examples, tmp_path):
    model, q, val = examples["cnn"]
    with pytest.raises(DataError, match="holds 15 labels, the data has more samples"):
        onnxfp8.check(model, q, [val], labels=np.zeros(15, np.int64))
    with pytest.raises(DataError, match="holds 17 labels for 16 samples"):
        onnxfp8.check(model, q, [val], labels=np.zeros(17, np.int64))
    with pytest.raises(DataError, match="label 10 is not a class of output 'logits'"):
        onnxfp8.check(model, q, [val], labels=np.full(16, 10))
    with pytest.raises(DataError, match="nope.npy: no such labels file"):
        onnxfp8.check(model, q, [val], labels=str(tmp_path / "nope.npy"))
    with pytest.raises(DataError, match="integer class indices"):
        onnxfp8.check(model, q, [val], labels=np.full(16, 0.5))
    # with samples=N the first N labels are used
    r = onnxfp8.check(model, q, [val], labels=np.zeros(16, np.int64), samples=8)
    assert r.samples == 8 and r.outputs["logits"].classifier.labelled == 8


def test_labels_need_a_classifier_output(examples):
    """Labels for a model whose output is not [N, C] scores are an error, not silently ignored."""
    model, _, val = examples["mlp"]
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["input"], ["y"])], "flat",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 64])])
    flat = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 19)])
    feed = {"input": val["input"][:, None, :]}  # [N, 1, 64]: not a classifier
    g3 = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["input"], ["y"])], "flat3",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 1, 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 1, 64])])
    flat3 = onnx.helper.make_model(g3, opset_imports=[onnx.helper.make_opsetid("", 19)])
    with pytest.raises(DataError, match="no output of .* is classifier-like"):
        onnxfp8.check(flat3, flat3, [feed], labels=np.zeros(16, np.int64))
    assert onnxfp8.check(flat, flat, [val], labels=np.zeros(16, np.int64)).labelled  # [N, 64] is one


# -- per layer -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(BUILDERS))
def test_broken_scale_is_the_worst_layer(examples, layered, name):
    model, q, val = examples[name]
    good = layered(name)
    bad = onnxfp8.check(model, break_scale(q, BROKEN[name]), [val], GATE, layers=True)
    assert good.passed
    assert len(bad.layers) == len(good.layers) == {"cnn": 6, "mlp": 3, "transformer": 7}[name]
    top = bad.layers[0]
    assert top.node == BROKEN[name]
    assert top.own_sqnr_db < 1.0  # saturated: measured -3.1 dB (cnn), 0.03 dB (mlp, transformer)
    assert all(l.own_sqnr_db > 15 for l in bad.layers[1:])  # the others are as good as before
    before = {l.node: l for l in good.layers}
    for l in bad.layers[1:]:  # a layer's own error does not depend on what the layers before it did
        assert l.own_sqnr_db == pytest.approx(before[l.node].own_sqnr_db, abs=0.05)
    assert good.layers[0].node != BROKEN[name] or good.layers[0].own_sqnr_db > 15
    if name == "transformer":
        # behind the residual connection the saturated FFN output costs only 1.7 dB at the logits (24.4 -> 22.8):
        # the outputs still pass and only the per-layer table shows the broken layer
        assert bad.passed and bad.outputs["logits"].sqnr_db < good.outputs["logits"].sqnr_db - 1
    else:
        assert not bad.passed and bad.exit_code == 1
        assert bad.outputs["logits"].sqnr_db < 1.0
        assert any(f.startswith("logits: SQNR") for f in bad.failures)


def test_layers_sorted_worst_own_first_with_cumulative(examples, layered):
    model, q, val = examples["cnn"]
    r = layered("cnn")
    own = [l.own_sqnr_db for l in r.layers]
    assert own == sorted(own)
    by = {l.node: l for l in r.layers}
    # conv1 reads the model input: alone or in the model, it sees the same values
    assert by["conv1"].own_sqnr_db == by["conv1"].cumulative_sqnr_db
    # the classifier's cumulative error is the output's
    assert by["fc"].cumulative_sqnr_db == pytest.approx(r.outputs["logits"].sqnr_db, abs=1e-9)
    # errors add up along the chain: later layers are worse in the model than alone
    for n in ("conv2", "conv3", "fc"):
        assert by[n].cumulative_sqnr_db < by[n].own_sqnr_db
    rows = json.loads(r.to_json())["layers"]
    assert [x["node"] for x in rows] == [l.node for l in r.layers]
    assert set(rows[0]) >= {"node", "op_type", "output", "own_sqnr_db", "cumulative_sqnr_db", "cumulative", "own"}
    assert "layers" not in json.loads(onnxfp8.check(model, q, [val]).to_json())


def test_layer_exposure_is_bounded_and_does_not_change_results(examples):
    """--max-memory bounds the tensors exposed per onnxruntime run: first by cutting the batches into smaller
    runs (one pass over the data), then, below one sample's worth, by splitting the layers over more passes.
    The figures stay the same."""
    model, q, val = examples["transformer"]
    one = onnxfp8.check(model, q, [val], layers=True, batch_size=8, max_memory_mb=64)
    # the 7 layers (the embedding Gather stays FP32 by default) expose 2.1 MB per run of 8 samples (3 copies of
    # each output: FP32, quantized, own)
    assert (one.layer_passes, one.layer_batch, one.layer_bytes_per_batch) == (1, 8, 2231232)
    small = onnxfp8.check(model, q, [val], layers=True, batch_size=8, max_memory_mb=1.0)
    assert (small.layer_passes, small.layer_batch) == (1, 3) and small.layer_bytes_per_batch <= 2**20
    tiny = onnxfp8.check(model, q, [val], layers=True, batch_size=8, max_memory_mb=0.2)
    assert (tiny.layer_passes, tiny.layer_batch) == (2, 1) and tiny.layer_bytes_per_batch <= 0.2 * 2**20
    a = {l.node: (l.own_sqnr_db, l.cumulative_sqnr_db) for l in one.layers}
    for other in (small, tiny):
        b = {l.node: (l.own_sqnr_db, l.cumulative_sqnr_db) for l in other.layers}
        assert a.keys() == b.keys()
        for k in a:  # only the float summation order of smaller runs differs (measured < 2e-5 dB)
            assert b[k] == pytest.approx(a[k], abs=1e-3)
    with pytest.raises(ConfigError, match="must be > 0 MB"):
        onnxfp8.check(model, q, [val], layers=True, max_memory_mb=0)


def test_find_layers_follows_original_names(examples):
    model, q, _ = examples["cnn"]
    layers, skipped = find_layers(model, q)
    assert skipped == []
    by = {l.node: l for l in layers}
    assert set(by) == {"conv1", "conv2", "conv3", "res1/conv1", "res1/conv2", "fc"}
    assert by["conv3"].boundaries == ["pool1/output"] and by["conv3"].output == "bn3/output"
    assert by["conv1"].boundaries == ["input"]


# -- runtimes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(BUILDERS))
def test_check_agrees_with_onnx_reference(examples, name):
    model, q, val = examples[name]
    r = onnxfp8.check(model, q, [val], reference=True, reference_samples=6)
    assert r.reference["engine"] == "onnx.reference.ReferenceEvaluator" and r.reference["samples"] == 6
    assert r.reference["max_abs_diff"]["logits"] <= 1e-5  # measured <= 3e-6
    assert r.runtime["level"] == "basic"


def test_check_runs_qdq_at_the_level_that_keeps_its_numerics(examples):
    """Why the check runs at onnxfp8's BASIC: onnxruntime's default ENABLE_ALL fuses the CNN's E4M3 Q/DQ
    around Conv into kernels that change the output by ~2, while BASIC matches onnx.reference."""
    from onnx.reference import ReferenceEvaluator

    model, q, val = examples["cnn"]
    feed = {"input": val["input"][:4]}
    want = ReferenceEvaluator(q).run(None, feed)[0]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    at_all = ort.InferenceSession(q.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert np.abs(at_all - want).max() > 0.5
    assert np.abs(_run(q, feed) - want).max() <= 1e-5
    r = onnxfp8.check(model, q, [feed], reference=True)
    assert r.reference["max_abs_diff"]["logits"] <= 1e-5


# -- bad input -------------------------------------------------------------------------------------
def test_interfaces_must_match(examples):
    cnn, _, cval = examples["cnn"]
    mlp, mq, _ = examples["mlp"]
    with pytest.raises(ModelError, match="inputs .* differ"):
        onnxfp8.check(cnn, _renamed_input(cnn), [cval])
    with pytest.raises(DataError):
        onnxfp8.check(mlp, mq, [cval])  # CNN images for the MLP


def _renamed_input(model):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.input[0].name = "pixels"
    for n in m.graph.node:
        for i, t in enumerate(n.input):
            if t == "input":
                n.input[i] = "pixels"
    return m


def test_override_that_cannot_apply_is_an_error(examples):
    """A per-output threshold that could never be judged would pass silently: it is a one-line error."""
    model, q, val = examples["transformer"]
    with pytest.raises(ConfigError, match=r"--max-accuracy-loss logits=0.50%: needs labels"):
        onnxfp8.check(model, q, [val], Thresholds.from_options({"max_accuracy_loss": ["logits=0.5%"]}))
    flat = _flat_model()
    x = {"input": np.ones((4, 1, 8), np.float32)}
    with pytest.raises(ConfigError, match=r"--min-top1-agreement y=90.00%: output 'y' \(shape \[4, 1, 8\]\) is not "
                                          r"classifier-like"):
        onnxfp8.check(flat, flat, [x], Thresholds.from_options({"min_top1_agreement": ["y=0.9"]}))
    # the global defaults simply do not apply there
    assert onnxfp8.check(flat, flat, [x]).passed


def _flat_model():
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["input"], ["y"])], "flat3",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 1, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 1, 8])])
    return onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 19)])


def test_expose_keeps_only_what_the_outputs_need(examples):
    from onnxfp8.verify.layers import expose

    model, _, val = examples["transformer"]
    t = "layer0/attn/q_proj/output"
    cut = expose(model, [t], {})
    assert [o.name for o in cut.graph.output] == [t]
    assert len(cut.graph.node) < len(model.graph.node) // 3
    assert [i.name for i in cut.graph.input] == [i.name for i in model.graph.input]  # every batch still feeds
    want = make_session(_with_output(model, t)).run([t], val)[0]
    assert np.array_equal(make_session(cut).run([t], val)[0], want)
    assert "classifier.weight" not in {i.name for i in cut.graph.initializer}


def _with_output(model, name):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return m


def test_min_layer_sqnr_catches_what_a_residual_path_hides(examples, layered):
    """The transformer's saturated FFN layer passes every output threshold; --min-layer-sqnr fails it, names
    it, and turns the per-layer attribution on by itself."""
    model, q, val = examples["transformer"]
    bad = break_scale(q, BROKEN["transformer"])
    assert onnxfp8.check(model, bad, [val], GATE).passed
    gated = onnxfp8.check(model, bad, [val], {**GATE, "min_layer_sqnr": 20.0})
    assert gated.layers is not None and not gated.passed and gated.exit_code == 1
    assert len(gated.failures) == 1
    assert gated.failures[0].startswith("layer layer0/ffn/fc2 (MatMul): own SQNR 0.0")
    assert json.loads(gated.to_json())["thresholds"]["min_layer_sqnr"] == 20.0
    # the unbroken model's worst layer is measured at 27.5 dB: the same gate passes it
    assert min(l.own_sqnr_db for l in layered("transformer").layers) > 25
    assert onnxfp8.check(model, q, [val], {**GATE, "min_layer_sqnr": 20.0}).passed


def test_json_report_is_strict_with_infinite_threshold(examples):
    """--min-sqnr inf (a gate only an exact model passes) was written as the non-JSON literal Infinity."""
    model, _, val = examples["mlp"]
    r = onnxfp8.check(model, model, [val], {"min_sqnr": math.inf})
    assert r.passed

    def refuse(literal):
        raise ValueError(f"non-strict JSON literal {literal}")

    d = json.loads(r.to_json(), parse_constant=refuse)
    assert d["thresholds"]["min_sqnr"] == "inf"
    crit = d["outputs"][0]["criteria"][0]
    assert crit["metric"] == "min_sqnr" and crit["limit"] == "inf" and crit["value"] == "inf"
