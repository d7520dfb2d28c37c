"""collector.channel_stats: per-channel max |x|, min, max and mean reduced in onnxruntime equal numpy's over
the whole data, for NCHW tensors (channel axis 1) and [B, T, C] tensors (last axis); sampled rows are rows."""
import numpy as np
import onnx

from onnxfp8.calibrators.collector import ChannelRequest, channel_stats
from onnxfp8.calibrators.data import as_data


def _model():
    text = """<ir_version: 8, opset_import: ["" : 19]>
    g (float[N,3,5,7] x, float[N,6,4] z) => (float[N,3,5,7] y, float[N,6,4] u) {
        y = Sin (x)
        u = Cos (z)
    }"""
    return onnx.parser.parse_model(text)


def test_channel_statistics_match_numpy():
    rng = np.random.default_rng(0)
    batches = [{"x": rng.normal(i, 2, (n, 3, 5, 7)).astype(np.float32),
                "z": rng.normal(0, 1 + i, (n, 6, 4)).astype(np.float32)} for i, n in enumerate((4, 3, 5))]
    model = _model()
    data = as_data(batches, model, batch_size=4)
    kinds = ("absmax", "min", "max", "mean")
    got = channel_stats(model, {"y": ChannelRequest(1, kinds), "u": ChannelRequest(-1, kinds, rows=5)}, data)
    y = np.sin(np.concatenate([b["x"] for b in batches]).astype(np.float64))
    u = np.cos(np.concatenate([b["z"] for b in batches]).astype(np.float64))
    for name, v, axes in (("y", y, (0, 2, 3)), ("u", u, (0, 1))):
        np.testing.assert_allclose(got[name]["absmax"], np.abs(v).max(axis=axes), rtol=1e-6)
        np.testing.assert_allclose(got[name]["min"], v.min(axis=axes), rtol=1e-6)
        np.testing.assert_allclose(got[name]["max"], v.max(axis=axes), rtol=1e-6)
        np.testing.assert_allclose(got[name]["mean"], v.mean(axis=axes), rtol=1e-5, atol=1e-7)
        assert got[name]["samples"] == 12
    rows = got["u"]["rows"]
    assert rows.shape == (5, 4)
    flat = u.reshape(-1, 4)
    for r in rows:  # every sampled row is a row of the data
        assert np.min(np.abs(flat - r).max(axis=1)) < 1e-6
