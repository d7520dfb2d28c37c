"""The statistics cache (--save-stats / --load-stats): one calibration serves every format and method with the
same ranges a direct run computes; it is refused for another model or other data (one line naming the file);
per-tensor calibration methods from the config overrides."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import onnxfp8
from onnxfp8.calibrators.cache import CalibrationStats, DataFingerprint, StatsCacheError, model_fingerprint
from onnxfp8.cli import cli
from onnxfp8.config import QuantConfig
from onnxfp8.errors import ConfigError


def _amax(result):
    return {t: s.amax for t, s in result.plan.tensors.items() if s.role == "activation"}


def _scales(result):
    return {t: s.scale for t, s in result.plan.tensors.items()}


@pytest.fixture(scope="module")
def mlp(example_models):
    ex = example_models["mlp"]
    return str(ex["model"]), str(ex["calib"])


@pytest.fixture(scope="module")
def saved(mlp, tmp_path_factory):
    """Statistics of the MLP saved by a max-calibrated run (batch size 5)."""
    model, calib = mlp
    path = str(tmp_path_factory.mktemp("stats") / "mlp.stats.json")
    res = onnxfp8.quantize(model, calib, config=QuantConfig(save_stats=path, batch_size=5))
    return path, res


def _no_calibration(monkeypatch):
    import onnxfp8.calibrators.calibration as cal  # the calibration object calls the collector

    def fail(*a, **k):
        raise AssertionError("calibration ran although the statistics were cached")

    monkeypatch.setattr(cal, "collect", fail)


def test_saved_file_holds_minmax_and_histograms(saved, mlp):
    path, res = saved
    d = json.load(open(path))
    assert d["format"] == "onnxfp8-calibration-stats" and d["samples"] == 32 and d["num_bins"] == 2048
    acts = _amax(res)
    assert set(d["tensors"]) == set(acts)
    for t, v in d["tensors"].items():
        assert max(abs(v["min"]), abs(v["max"])) == acts[t]  # max calibration: amax = max |x|
        h = v["histogram"]
        assert sum(h["counts"]) > 0 and h["max"] == acts[t] and h["range"] == acts[t]
    assert res.report.calibration.saved_stats == path


@pytest.mark.parametrize("fmt,method", [("e4m3", "max"), ("e5m2", "max"), ("e4m3", "mse"), ("int8", "mse"),
                                        ("e4m3", "percentile"), ("e4m3", "entropy")])
def test_loaded_statistics_give_the_direct_ranges_without_calibrating(saved, mlp, fmt, method, monkeypatch):
    path, _ = saved
    model, calib = mlp
    direct = onnxfp8.quantize(model, calib, config=QuantConfig(format=fmt, calibration=method, percentile=99.9))
    _no_calibration(monkeypatch)
    loaded = onnxfp8.quantize(model, calib, config=QuantConfig(format=fmt, calibration=method, percentile=99.9,
                                                               load_stats=path))
    assert _scales(loaded) == _scales(direct)
    assert loaded.report.calibration.passes == 0 and loaded.report.calibration.loaded_stats == path
    # the summary still runs (on the first samples, FP32 outputs computed without a calibration pass)
    assert loaded.report.outputs["logits"] == direct.report.outputs["logits"]


def test_format_auto_reads_the_cached_histograms(saved, mlp, monkeypatch):
    path, _ = saved
    model, calib = mlp
    direct = onnxfp8.quantize(model, calib, config=QuantConfig(format="auto", calibration="mse"))
    _no_calibration(monkeypatch)
    import onnxfp8.calibrators.collector as col

    monkeypatch.setattr(col, "collect", lambda *a, **k: (_ for _ in ()).throw(AssertionError("collected")))
    loaded = onnxfp8.quantize(model, calib, config=QuantConfig(format="auto", calibration="mse", load_stats=path))
    assert {t: (s.format, s.scale) for t, s in loaded.plan.tensors.items()} == \
        {t: (s.format, s.scale) for t, s in direct.plan.tensors.items()}


def test_load_without_data(saved, mlp):
    path, res = saved
    model, _ = mlp
    loaded = onnxfp8.quantize(model, None, config=QuantConfig(load_stats=path))
    assert _scales(loaded) == _scales(res)
    assert loaded.report.calibration.samples == 32 and not loaded.report.outputs


def test_other_model_is_refused_naming_the_file(saved, example_models, tmp_path):
    path, _ = saved
    ex = example_models["cnn"]
    with pytest.raises(StatsCacheError, match=r"mlp\.stats\.json: these statistics belong to another model"):
        onnxfp8.quantize(str(ex["model"]), str(ex["calib"]), config=QuantConfig(load_stats=path))
    # the same graph with one weight changed is another model too
    m = onnx.load(mlp_path := str(example_models["mlp"]["model"]))
    w = m.graph.initializer[0]
    arr = numpy_helper.to_array(w).copy()
    arr.flat[0] += 1.0
    w.CopyFrom(numpy_helper.from_array(arr, w.name))
    changed = str(tmp_path / "changed.onnx")
    onnx.save(m, changed)
    with pytest.raises(StatsCacheError, match="belong to another model"):
        onnxfp8.quantize(changed, None, config=QuantConfig(load_stats=path))
    assert model_fingerprint(onnx.load(mlp_path)) != model_fingerprint(m)


def test_cli_refuses_with_one_line_and_exit_2(saved, example_models, tmp_path):
    path, _ = saved
    ex = example_models["cnn"]
    r = CliRunner().invoke(cli, ["quantize", str(ex["model"]), "--calib", str(ex["calib"]), "--load-stats", path,
                                 "-o", str(tmp_path / "x.onnx")])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: these statistics belong to another model")
    assert not (tmp_path / "x.onnx").exists()


def test_other_data_is_refused_batching_is_not(saved, mlp, tmp_path):
    path, _ = saved
    model, calib = mlp
    with pytest.raises(StatsCacheError, match="collected on other calibration data"):
        onnxfp8.quantize(model, calib, config=QuantConfig(load_stats=path, calib_samples=31))
    # the data fingerprint does not depend on how the samples are batched (saved with batch size 5)
    res = onnxfp8.quantize(model, calib, config=QuantConfig(load_stats=path, batch_size=16))
    assert res.report.calibration.passes == 0


def test_data_fingerprint_is_batching_independent_and_content_sensitive():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 3, 4)).astype(np.float32)
    a, b, c = DataFingerprint(), DataFingerprint(), DataFingerprint()
    a.update({"x": x})
    for part in np.array_split(x, 4):
        b.update({"x": part})
    y = x.copy()
    y[7, 2, 3] = np.nextafter(y[7, 2, 3], np.float32(np.inf))
    c.update({"x": y})
    assert a.hexdigest() == b.hexdigest() != c.hexdigest()
    d = DataFingerprint()  # same bytes, other per-sample shape
    d.update({"x": x.reshape(10, 4, 3)})
    assert d.hexdigest() != a.hexdigest()


def test_missing_tensors_are_calibrated_and_added(mlp, tmp_path):
    model, calib = mlp
    part = str(tmp_path / "part.json")
    onnxfp8.quantize(model, calib, config=QuantConfig(save_stats=part, exclude_nodes=("fc3",)))
    assert "fc3" not in str(list(json.load(open(part))["tensors"]))
    full = onnxfp8.quantize(model, calib, config=QuantConfig())
    both = onnxfp8.quantize(model, calib, config=QuantConfig(load_stats=part, save_stats=part))
    assert _scales(both) == _scales(full)
    note = next(n for r in both.report.passes if r.name == "calibrate" for n in r.notes if "calibrated now" in n)
    assert note == f"statistics of 2 tensor(s) from {part}, 1 calibrated now"
    assert set(json.load(open(part))["tensors"]) == set(_amax(full))
    with pytest.raises(StatsCacheError, match=r"part2\.json: the statistics lack 1 of the 3 tensor"):
        p2 = str(tmp_path / "part2.json")
        onnxfp8.quantize(model, calib, config=QuantConfig(save_stats=p2, exclude_nodes=("fc3",)))
        onnxfp8.quantize(model, None, config=QuantConfig(load_stats=p2))


@pytest.mark.parametrize("content,message", [
    (None, "statistics file not found"),
    ("{not json", "not a statistics file"),
    ('{"format": "something"}', "not an onnxfp8 statistics file"),
    ('{"format": "onnxfp8-calibration-stats", "version": 99}', "version 99"),
    ('{"format": "onnxfp8-calibration-stats", "version": 1, "model_sha256": "x", "tensors": {"a": {"min": 1}}}',
     "malformed statistics file"),
    ('{"format": "onnxfp8-calibration-stats", "version": 1, "model_sha256": "x", "tensors": '
     '{"a": {"min": 0, "max": 1, "histogram": {"range": 1, "max": 1, "counts": [1, -2]}}}}',
     "malformed statistics file"),
])
def test_bad_files(tmp_path, content, message):
    p = tmp_path / "s.json"
    if content is not None:
        p.write_text(content)
    with pytest.raises(StatsCacheError, match=message) as e:
        CalibrationStats.load(str(p))
    assert str(e.value).startswith(str(p)) and "\n" not in str(e.value)


def test_per_tensor_calibration_override(mlp):
    model, calib = mlp
    base = onnxfp8.quantize(model, calib, config=QuantConfig())
    acts = sorted(_amax(base))
    t = acts[1]
    pct = onnxfp8.quantize(model, calib, config=QuantConfig(calibration="percentile", percentile=99.0))
    mixed = onnxfp8.quantize(model, calib, config=QuantConfig(
        overrides={t: {"calibration": "percentile", "percentile": 99.0}}))
    got = _amax(mixed)
    assert got[t] == _amax(pct)[t] < _amax(base)[t]
    assert {k: v for k, v in got.items() if k != t} == {k: v for k, v in _amax(base).items() if k != t}
    note = next(n for r in mixed.report.passes if r.name == "calibrate" for n in r.notes)
    assert note.startswith("max (2) + percentile (1) calibration of 3 tensor(s)")


def test_override_method_is_validated():
    with pytest.raises(ConfigError, match=r"overrides\.x\.calibration: unknown method 'maxx'"):
        QuantConfig(overrides={"x": {"calibration": "maxx"}})
    with pytest.raises(ConfigError, match=r"overrides\.x\.percentile must be in \(0, 100\]"):
        QuantConfig(overrides={"x": {"percentile": 0}})
    with pytest.raises(ConfigError, match="calibration: unknown method 'kl'"):
        QuantConfig(calibration="kl")


def test_stats_with_dynamic_quantization_is_refused():
    with pytest.raises(ConfigError, match="save_stats: dynamic quantization calibrates no activation"):
        QuantConfig(dynamic=True, save_stats="s.json")
    with pytest.raises(ConfigError, match="load_stats: dynamic quantization"):
        QuantConfig(dynamic=True, load_stats="s.json")
