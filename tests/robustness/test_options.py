"""Every option validated, one line naming it (issue 13 item 9), from the CLI and the Python API."""
from __future__ import annotations

import pytest

import onnxfp8
from onnxfp8.cli import cli
from onnxfp8.errors import ConfigError
from onnxfp8.verify.check import Thresholds, check

import robust_corpus as corpus


@pytest.fixture()
def model(tmp_path):
    return corpus.write(tmp_path, corpus.mlp())


@pytest.mark.parametrize("args,needle", [
    (["--threads", "-1"], "threads must be >= 0"),
    (["--max-memory", "0"], "max_memory_mb must be >= 1"),
    (["--percentile", "99.9"], "--percentile is only used with --calibration percentile"),
    (["--dynamic", "--activations-format", "e4m3", "--calibration", "mse"], "dynamic quantization calibrates no activation"),
    (["--dynamic-granularity", "token"], "needs dynamic (--dynamic)"),
    (["--bn-mode", "replace"], "--bn-mode is only used with --bn-recalibrate"),
    (["--bn-samples", "10"], "--bn-samples is only used with --bn-recalibrate"),
    (["--style", "bogus"], "'bogus' is not one of"),
    (["--batch-size", "0"], "batch_size must be >= 1"),
])
def test_quantize_options(runner, model, tmp_path, args, needle):
    m, c = model
    r = runner.invoke(cli, ["quantize", str(m), "-c", str(c), "-o", str(tmp_path / "q.onnx"), *args])
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    err = r.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err
    assert not (tmp_path / "q.onnx").exists()


def test_percentile_with_its_method_is_accepted(runner, model, tmp_path):
    m, c = model
    r = runner.invoke(cli, ["quantize", str(m), "-c", str(c), "-o", str(tmp_path / "q.onnx"), "--calibration",
                            "percentile", "--percentile", "99.9", "-q"])
    assert r.exit_code == 0, r.stderr


@pytest.mark.parametrize("kw,needle", [
    ({"threads": -1}, "threads must be >= 0"), ({"max_memory_mb": 0}, "max_memory_mb must be >= 1"),
    ({"dynamic": True, "activations_format": "e4m3", "calibration": "entropy"}, "calibrates no activation"),
    ({"dynamic_granularity": "token"}, "needs dynamic"),
    ({"batch_size": "16"}, "batch_size must be an integer, got '16' (str)"),
    ({"per_channel": "yes"}, "per_channel must be true or false"),
    ({"exclude_ops": [1, 2]}, "exclude_ops must be a list of strings"),
])
def test_config_values(kw, needle):
    with pytest.raises(ConfigError) as e:
        onnxfp8.QuantConfig(**kw)
    assert needle in str(e.value), str(e.value)


def test_recipe_values_of_the_wrong_type_name_the_file(runner, model, tmp_path):
    m, c = model
    recipe = tmp_path / "r.toml"
    recipe.write_text('batch_size = "16"\n')
    r = runner.invoke(cli, ["quantize", str(m), "-c", str(c), "--recipe", str(recipe)])
    assert r.exit_code == 2 and f"{recipe}: batch_size must be an integer, got '16' (str)" in r.stderr, r.stderr
    recipe.write_text('threads = -3\n')
    r = runner.invoke(cli, ["quantize", str(m), "-c", str(c), "--recipe", str(recipe)])
    assert r.exit_code == 2 and f"{recipe}: threads must be >= 0" in r.stderr, r.stderr


@pytest.mark.parametrize("flag,value,ok", [
    ("--min-top1-agreement", "80", False), ("--min-top1-agreement", "80%", True),
    ("--min-top1-agreement", "0.8", True), ("--max-accuracy-loss", "1", True), ("--max-accuracy-loss", "1.5", False),
    ("--max-accuracy-loss", "150%", False), ("--min-cosine", "2", False), ("--max-rel-error", "-1", False),
])
def test_percent_options(runner, model, tmp_path, flag, value, ok):
    m, c = model
    r = runner.invoke(cli, ["check", str(m), str(m), "-d", str(c), flag, value])
    if ok:
        assert r.exit_code == 0, r.stderr
    else:
        assert r.exit_code == 2 and flag.lstrip("-").split("-")[1] in r.stderr.replace("_", "-"), r.stderr
        assert "\n" not in r.stderr.strip()
    if value == "80":
        assert "write 80% for a percentage or a fraction like 0.8" in r.stderr


def test_check_numbers_and_thresholds_from_the_api(model):
    m, c = model
    with pytest.raises(ConfigError, match="not a fraction in"):
        Thresholds(min_top1_agreement=80)
    with pytest.raises(ConfigError, match="batch_size must be a number >= 1"):
        check(str(m), str(m), str(c), batch_size=0)


@pytest.mark.parametrize("args,needle", [(["--threads", "-1"], "-1 is not in the range x>=0"),
                                         (["--batch-size", "0"], "0 is not in the range x>=1"),
                                         (["--samples", "0"], "0 is not in the range x>=1")])
def test_check_int_options(runner, model, args, needle):
    m, c = model
    r = runner.invoke(cli, ["check", str(m), str(m), "-d", str(c), *args])
    assert r.exit_code == 2 and needle in r.stderr and "\n" not in r.stderr.strip(), r.stderr
