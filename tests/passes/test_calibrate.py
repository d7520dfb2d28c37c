"""calibrate: max calibration over the whole calibration set, streamed batch by batch: amax = max |x| over all
batches, equal to numpy on the exposed tensor, independent of the batch size; dynamic shapes across files."""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxfp8.config import QuantConfig
from onnxfp8.errors import DataError
from onnxfp8.modelio import make_session, to_model

PASSES = ["canonicalize", "fold_batchnorm", "select_ops", "calibrate"]


def _exposed_amax(graph, tensors, feeds, level):
    m = to_model(graph.copy())
    for t in tensors:
        m.graph.output.append(onnx.ValueInfoProto(name=t))
    values = make_session(m, level=level).run(tensors, feeds)
    return {t: (float(np.abs(v).max()), float(v.min()), float(v.max())) for t, v in zip(tensors, values)}


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_amax_is_max_abs_over_all_batches(name, example_models, run_passes, load_feeds):
    ex = example_models[name]
    model = onnx.load(ex["model"])
    graph, ctx, res = run_passes(model, PASSES, config=QuantConfig(batch_size=5), calib=str(ex["calib"]))
    tensors = sorted(ctx.stats)
    assert tensors and ctx.calibration.samples == 32 and ctx.calibration.batches == 7
    feeds = load_feeds(ex["calib"])
    same_level = _exposed_amax(graph, tensors, feeds, level="all")
    plain = _exposed_amax(graph, tensors, feeds, level="disable")
    for t in tensors:
        s = ctx.stats[t]
        assert s["method"] == "max"
        assert s["amax"] == same_level[t][0], t  # max is exact: the same numbers, the same maximum
        assert s["max"] == same_level[t][2], t
        # the minimum is either measured, or the bound 0.0 of a tensor that is non-negative by construction
        assert s["min"] == same_level[t][1] or (s["min"] == 0.0 and same_level[t][1] >= 0.0), t
        assert s["amax"] == pytest.approx(plain[t][0], rel=1e-5), t
        assert s["amax"] == max(abs(s["min"]), abs(s["max"]))
    assert res["calibrate"].notes[0].startswith(f"max calibration of {len(tensors)} tensor(s) on 32 sample(s) in 7 batch(es)")


def test_streaming_batch_sizes_give_identical_ranges(example_models, run_passes):
    ex = example_models["mlp"]
    model = onnx.load(ex["model"])
    stats = {}
    for bs in (1, 3, 16):
        _, ctx, _ = run_passes(model, PASSES, config=QuantConfig(batch_size=bs), calib=str(ex["calib"]))
        stats[bs] = ctx.stats
        assert ctx.calibration.batches == -(-32 // bs)
    assert stats[1] == stats[3] == stats[16]


def test_calib_samples_limit(example_models, run_passes, load_feeds):
    ex = example_models["mlp"]
    model = onnx.load(ex["model"])
    graph, ctx, _ = run_passes(model, PASSES, config=QuantConfig(calib_samples=5, batch_size=2),
                               calib=str(ex["calib"]))
    assert ctx.calibration.samples == 5
    tensors = sorted(ctx.stats)
    want = _exposed_amax(graph, tensors, load_feeds(ex["calib"], n=5), level="all")
    assert {t: ctx.stats[t]["amax"] for t in tensors} == {t: want[t][0] for t in tensors}


def test_dynamic_sequence_lengths_across_files(tmp_path, run_passes):
    text = """<ir_version: 8, opset_import: ["" : 19]>
    g (int64[N,S] ids) => (float[N,S,3] y) {
        e = Gather (emb, ids)
        y = MatMul (e, w)
    }"""
    m = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    emb = rng.normal(0, 1, (20, 6)).astype(np.float32)
    m.graph.initializer.extend([numpy_helper.from_array(emb, "emb"),
                                numpy_helper.from_array(rng.normal(0, 1, (6, 3)).astype(np.float32), "w")])
    ids = {5: rng.integers(0, 20, (3, 5)), 9: rng.integers(0, 20, (2, 9)), 2: rng.integers(0, 20, (4, 2))}
    for s, arr in ids.items():
        np.savez(tmp_path / f"len{s}.npz", ids=arr.astype(np.int64))
    graph, ctx, _ = run_passes(m, PASSES, config=QuantConfig(batch_size=16), calib=str(tmp_path))
    assert ctx.calibration.samples == 9 and ctx.calibration.batches == 3
    # e = emb[ids]: its range is the range of the rows that were looked up
    used = np.concatenate([a.reshape(-1) for a in ids.values()])
    assert ctx.stats["e"]["amax"] == float(np.abs(emb[used]).max())
    assert ctx.stats["e"]["max"] == float(emb[used].max())


def test_no_calibration_data_is_a_data_error(example_models, run_passes):
    model = onnx.load(example_models["mlp"]["model"])
    with pytest.raises(DataError, match="calibration data is needed"):
        run_passes(model, PASSES)


def test_nothing_to_calibrate(run_passes):
    m = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 19]>\ng (float[2] x) => (float[2] y) { y = Relu (x) }')
    _, ctx, res = run_passes(m, PASSES)
    assert res["calibrate"].notes == ["no activation to calibrate"] and not ctx.stats
