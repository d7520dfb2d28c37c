"""The data-source protocol (calibrators/data.py): every stream of model inputs offers specs, batch_size,
batches(with_labels) and describe(); the BatchNorm recalibration stream is built from the config in one place;
the option checks BN recalibration needs run once, in the config, before any work."""
import numpy as np
import onnx
import pytest
from onnx import helper

import onnxfp8
from onnxfp8.calibrators.augment import AugmentedData
from onnxfp8.calibrators.cache import FingerprintingData
from onnxfp8.calibrators.data import (BN_MIN_BATCH, DataSource, HeldOut, Samples, as_data, first_labels,
                                      holds_at_least, recalibration_stream)
from onnxfp8.config import QuantConfig
from onnxfp8.errors import ConfigError, DataError


def _model(shape=("n", 3, 8, 8), elem=onnx.TensorProto.FLOAT):
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
                          [helper.make_tensor_value_info("x", elem, list(shape))],
                          [helper.make_tensor_value_info("y", elem, list(shape))])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)


def _data(n=100, labels=True):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (n, 3, 8, 8)).astype(np.float32)
    lab = np.arange(n) % 7
    items = [{"x": x[i:i + 10], **({"label": lab[i:i + 10]} if labels else {})} for i in range(0, n, 10)]
    return x, lab, items


def test_every_stream_is_a_data_source_and_streams_the_same_samples():
    model = _model()
    x, lab, items = _data()
    data = as_data(items, model, batch_size=16)
    streams = [data, HeldOut(data, 0), FingerprintingData(data), Samples(list(data.batches()), lab, data.specs),
               AugmentedData(data, ("flip",), seed=1)]
    for s in streams:
        assert isinstance(s, DataSource), type(s).__name__
        assert s.specs.keys() == {"x"} and s.batch_size == 16 and isinstance(s.describe(), str)
        got = list(s.batches(with_labels=True))
        assert sum(len(b["x"]) for b, _ in got) == 100
        np.testing.assert_array_equal(np.concatenate([lb for _, lb in got]), lab)
        if not isinstance(s, AugmentedData):  # the others yield the data unchanged
            np.testing.assert_array_equal(np.concatenate([b["x"] for b in s.batches()]), x)
    assert Samples(list(data.batches())).describe() == "100 samples"


def test_first_labels_and_holds_at_least():
    model = _model()
    _, lab, items = _data()
    data = as_data(items, model, batch_size=16)
    np.testing.assert_array_equal(first_labels(data, 40), lab[:40])
    assert first_labels(data, 101) is None  # fewer samples than asked: no labels
    assert first_labels(as_data(_data(labels=False)[2], model), 10) is None
    assert holds_at_least(data, 100) and not holds_at_least(data, 101)


def test_recalibration_stream_batches_holds_out_and_limits():
    model = _model()
    x, _, items = _data()
    cfg = QuantConfig(bn_recalibrate=True, bn_samples=60, batch_size=8)
    calib = as_data(items, model, batch_size=8)
    s = recalibration_stream(model, cfg, calib, "m.onnx")
    assert s.batch_size == BN_MIN_BATCH and [len(b["x"]) for b in s.batches()] == [60]
    held = recalibration_stream(model, cfg, calib, "m.onnx", hold_out=30)  # 60 samples after the first 30
    assert isinstance(held, HeldOut) and "without its first 30 sample(s)" in held.describe()
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in held.batches()]), x[30:90])
    with pytest.raises(DataError, match="m.onnx: BatchNorm recalibration needs data"):
        recalibration_stream(model, cfg, None, "m.onnx")


def test_bn_option_checks_live_in_the_config():
    with pytest.raises(ConfigError, match="bn_ranges: .* supports max calibration, not mse"):
        QuantConfig(bn_recalibrate=True, bn_ranges=True, calibration="mse")
    with pytest.raises(ConfigError, match="bn_ranges: .* needs fold_batchnorm"):
        QuantConfig(bn_recalibrate=True, bn_ranges=True, fold_batchnorm=False)
    QuantConfig(bn_recalibrate=True, bn_ranges=True)  # max calibration, folded: fine


def test_augment_on_non_image_inputs_is_refused_before_any_work():
    """The input check runs once, before the pipeline: without data the calibrate pass would fail with a
    DataError, so a ConfigError proves no pass ran."""
    cfg = QuantConfig(bn_recalibrate=True, augment=("flip",))
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 2])],
                          [onnx.numpy_helper.from_array(np.ones((4, 2), np.float32), "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    with pytest.raises(ConfigError, match=r"model: --augment flip needs NCHW image inputs .* input 'x' is float32 \[n, 4\]"):
        onnxfp8.quantize(m, None, config=cfg)
