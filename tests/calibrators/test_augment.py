"""calibrators/augment.py: seeded flip / resized crop / jitter on NCHW images, clear errors otherwise."""
import numpy as np
import onnx
import pytest
from onnx import helper

from onnxfp8.calibrators.augment import AugmentedData, augment_batch, crop, flip, jitter
from onnxfp8.calibrators.data import as_data
from onnxfp8.errors import ConfigError


def _model(shape, dtype=onnx.TensorProto.FLOAT):
    node = helper.make_node("Identity", ["x"], ["y"], name="id")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", dtype, shape)],
                          [helper.make_tensor_value_info("y", dtype, shape)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])


def _images(n=20, c=3, h=8, w=8, seed=0):
    return np.random.default_rng(seed).normal(0, 1, (n, c, h, w)).astype(np.float32)


def test_flip_mirrors_about_half_of_the_samples():
    x = _images(200)
    out = flip(x, np.random.default_rng(0))
    mirrored = np.array([np.array_equal(o, s[..., ::-1]) for o, s in zip(out, x)])
    kept = np.array([np.array_equal(o, s) for o, s in zip(out, x)])
    assert np.all(mirrored ^ kept)
    assert 70 < mirrored.sum() < 130


def test_crop_of_the_whole_image_is_the_identity_and_output_keeps_the_size():
    x = _images(4, h=10, w=12)
    same = crop(x, np.random.default_rng(0), area=(1.0, 1.0), ratio=(12 / 10, 12 / 10))
    np.testing.assert_allclose(same, x, atol=1e-5)
    out = crop(x, np.random.default_rng(0))
    assert out.shape == x.shape and out.dtype == np.float32
    assert not np.allclose(out, x)
    # bilinear interpolation never leaves the range of the sample
    assert np.all(out.max(axis=(1, 2, 3)) <= x.max(axis=(1, 2, 3)) + 1e-5)
    assert np.all(out.min(axis=(1, 2, 3)) >= x.min(axis=(1, 2, 3)) - 1e-5)


def test_crop_zooms_into_a_window():
    # a horizontal ramp: a crop of width w < W resamples a sub-interval, so the output ramp is flatter
    W = 16
    x = np.broadcast_to(np.arange(W, dtype=np.float32), (3, 1, 16, W)).copy()
    out = crop(x, np.random.default_rng(3), area=(0.25, 0.25), ratio=(1.0, 1.0))
    slope = np.diff(out[:, 0, 0, :], axis=1).mean(axis=1)
    np.testing.assert_allclose(slope, 0.5, atol=0.05)


def test_jitter_is_small_brightness_and_contrast_change():
    x = _images(100)
    out = jitter(x, np.random.default_rng(0))
    ratio = out.std(axis=(1, 2, 3)) / x.std(axis=(1, 2, 3))
    assert np.all((ratio > 0.8 - 1e-4) & (ratio < 1.2 + 1e-4)) and ratio.std() > 0.02
    shift = (out.mean(axis=(1, 2, 3)) - x.mean(axis=(1, 2, 3))) / x.std(axis=(1, 2, 3))
    assert np.all(np.abs(shift) <= 0.1 + 1e-4) and np.abs(shift).max() > 0.05
    # never outside the batch's value range (the range the activation scales were calibrated on), and the
    # clip is reached: samples with contrast > 1 would have left it
    assert out.min() >= x.min() and out.max() <= x.max()
    assert out.max() == x.max() and out.min() == x.min()


def test_augmented_data_is_seeded_reproducible_and_repeats_to_samples():
    x = _images(20)
    model = _model(["n", 3, 8, 8])
    data = as_data([{"x": x}], model, batch_size=8)
    aug = AugmentedData(data, ("flip", "crop", "jitter"), seed=5, samples=50)
    a = [b["x"] for b in aug.batches()]
    b = [b["x"] for b in aug.batches()]
    assert sum(len(t) for t in a) == 50  # 20 samples gone over 2.5 times
    for p, q in zip(a, b):
        np.testing.assert_array_equal(p, q)
    first = np.concatenate(a)[:20]
    second = np.concatenate(a)[20:40]
    assert not np.allclose(first, second)  # new random draws on every pass over the data
    other = np.concatenate([t["x"] for t in AugmentedData(data, ("jitter",), seed=6, samples=20).batches()])
    assert not np.allclose(other, np.concatenate([t["x"] for t in AugmentedData(data, ("jitter",), seed=5,
                                                                                        samples=20).batches()]))
    one_pass = AugmentedData(data, ("flip",), seed=0)
    assert sum(len(t["x"]) for t in one_pass.batches()) == 20


def test_augment_batch_applies_only_the_named_ops():
    x = _images(6)
    out = augment_batch({"x": x}, ("flip",), np.random.default_rng(0))["x"]
    for o, s in zip(out, x):
        assert np.array_equal(o, s) or np.array_equal(o, s[..., ::-1])


@pytest.mark.parametrize("shape,dtype", [(["n", 16], onnx.TensorProto.FLOAT), (["n", 3, 8], onnx.TensorProto.FLOAT),
                                         (["n", 1, 8, 8], onnx.TensorProto.INT64)])
def test_non_image_inputs_are_refused_with_a_clear_message(shape, dtype):
    model = _model(shape, dtype)
    arr = np.zeros([2] + [d for d in shape[1:]], np.float32 if dtype == onnx.TensorProto.FLOAT else np.int64)
    data = as_data([{"x": arr}], model)
    with pytest.raises(ConfigError, match=r"m.onnx: --augment flip needs NCHW image inputs \(float, rank 4\), but "
                                          r"input 'x' is"):
        AugmentedData(data, ("flip",), source="m.onnx")
