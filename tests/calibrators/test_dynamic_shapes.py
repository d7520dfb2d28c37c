"""Dynamic dimensions in calibration: batch and sequence length varying between files, for the max pass and the
histogram passes (several passes under a small --max-memory), and through the statistics cache."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxfp8.calibrators.base import make_calibrator
from onnxfp8.config import QuantConfig
from onnxfp8.modelio import make_session

PASSES = ["canonicalize", "fold_batchnorm", "select_ops", "calibrate"]
TENSORS = ("x", "a")  # the MatMul inputs (quantized activations)


def _model():
    text = """<ir_version: 8, opset_import: ["" : 19]>
    g (float[N,S,8] x) => (float[N,S,4] y) {
        h = MatMul (x, w1)
        a = Tanh (h)
        y = MatMul (a, w2)
    }"""
    m = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    m.graph.initializer.extend([numpy_helper.from_array(rng.normal(0, 1, (8, 16)).astype(np.float32), "w1"),
                                numpy_helper.from_array(rng.normal(0, 1, (16, 4)).astype(np.float32), "w2")])
    return m


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Files with batch 1..4 and sequence length 3..6000 (one batch of "a" is over 1 MB), one with a big
    value, and the values of the calibrated tensors over all files."""
    folder = tmp_path_factory.mktemp("dyn")
    rng = np.random.default_rng(1)
    m = _model()
    m.graph.output.extend([onnx.ValueInfoProto(name="a")])
    sess = make_session(m, level="disable")
    values = {t: [] for t in TENSORS}
    for i, (n, s) in enumerate([(3, 5), (3, 6000), (4, 3), (2, 17), (1, 9)]):
        x = rng.normal(0, 1, (n, s, 8)).astype(np.float32)
        if i == 3:
            x[1, 7, 2] = 9.0
        np.savez(folder / f"{i:02d}.npz", x=x)
        values["x"].append(x.reshape(-1))
        values["a"].append(sess.run(["a"], {"x": x})[0].reshape(-1))
    return folder, {t: np.concatenate(v) for t, v in values.items()}


@pytest.mark.parametrize("batch_size", [1, 16])
def test_max_over_varying_batch_and_sequence(data, run_passes, batch_size):
    folder, values = data
    _, ctx, _ = run_passes(_model(), PASSES, config=QuantConfig(batch_size=batch_size), calib=str(folder))
    assert ctx.calibration.samples == 13
    # files of different sequence lengths are never batched together: one batch per file at batch size 16
    assert ctx.calibration.batches == (13 if batch_size == 1 else 5)
    for t in TENSORS:
        assert ctx.stats[t]["amax"] == pytest.approx(float(np.abs(values[t]).max()), rel=1e-6)
        assert ctx.stats[t]["min"] == pytest.approx(float(values[t].min()), rel=1e-6)


@pytest.mark.parametrize("method", ["percentile", "mse", "entropy"])
def test_histogram_methods_over_varying_shapes_and_split_passes(data, run_passes, method):
    folder, values = data
    cfg = QuantConfig(calibration=method, percentile=99.0, batch_size=4)
    _, ctx, _ = run_passes(_model(), PASSES, config=cfg, calib=str(folder))
    assert ctx.calibration.passes == 2  # max pass + one histogram pass (both tensors fit)
    # a 1 MB budget (below the 1.15 MB of "a" in the largest batch): one histogram pass per tensor, same ranges
    _, split, _ = run_passes(_model(), PASSES, config=cfg.replace(max_memory_mb=1), calib=str(folder))
    assert split.calibration.passes == 3
    # the same method on all the values at once (numpy arrays, not onnxruntime batches)
    ref = make_calibrator(method, **({"percentile": 99.0} if method == "percentile" else {}))
    for t in TENSORS:
        ref.set_ranges({t: float(np.abs(values[t]).max())})
        ref.observe(t, values[t])
    want = ref.result()
    for t in TENSORS:
        assert ctx.stats[t]["amax"] == split.stats[t]["amax"]
        assert ctx.stats[t]["amax"] == pytest.approx(want[t], rel=1e-5), t
    if method == "percentile":
        assert ctx.stats["x"]["amax"] < 0.5 * ctx.stats["x"]["max"]  # the 9.0 input is an outlier


def test_cache_with_dynamic_shapes(data, tmp_path):
    import onnxfp8

    folder, _ = data
    path = str(tmp_path / "dyn.json")
    model = str(tmp_path / "dyn.onnx")
    onnx.save(_model(), model)
    saved = onnxfp8.quantize(model, str(folder), config=QuantConfig(save_stats=path, batch_size=2))
    direct = onnxfp8.quantize(model, str(folder), config=QuantConfig(calibration="mse"))
    loaded = onnxfp8.quantize(model, str(folder), config=QuantConfig(load_stats=path, calibration="mse"))
    assert loaded.report.calibration.passes == 0
    assert {t: s.scale for t, s in loaded.plan.tensors.items()} == {t: s.scale for t, s in direct.plan.tensors.items()}
    assert {t: s.scale for t, s in saved.plan.tensors.items()} != {t: s.scale for t, s in direct.plan.tensors.items()}
