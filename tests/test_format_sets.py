"""Two format sets, each where it belongs: -f auto and the tuner pick from AUTO_CANDIDATES (formats a runtime
executes: what they choose is deployed); sweep and sensitivity measure ALL_FORMATS (E3M4 too) unless told."""
import inspect
import json

from onnxfp8.cli import cli
from onnxfp8.config import ALL_FORMATS, AUTO_CANDIDATES, QuantConfig
from onnxfp8.formats import FORMATS


def test_the_sets():
    assert set(ALL_FORMATS) == set(FORMATS)
    assert set(AUTO_CANDIDATES) < set(ALL_FORMATS) and "e3m4" not in AUTO_CANDIDATES
    assert QuantConfig().formats == AUTO_CANDIDATES


def test_sweep_and_sensitivity_default_to_every_format():
    from onnxfp8.tuning.sweep import sweep
    from onnxfp8.verify.sensitivity import analyse, sensitivity

    assert inspect.signature(sweep).parameters["formats"].default == ALL_FORMATS + ("auto",)
    assert inspect.signature(sensitivity).parameters["formats"].default == ALL_FORMATS
    assert inspect.signature(analyse).parameters["formats"].default == ALL_FORMATS
    opt = next(p for p in cli.commands["sweep"].params if p.name == "sweep_formats")
    assert opt.default == "e4m3,e5m2,e3m4,int8,auto"


def test_sensitivity_cli_measures_all_four_unless_formats_names_some(example_models, runner, tmp_path):
    ex = example_models["mlp"]
    base = ["sensitivity", str(ex["model"]), "-c", str(ex["calib"]), "--val", str(ex["val"]), "--top", "0",
            "--samples", "8", "-q"]
    r = runner.invoke(cli, base + ["--json", str(tmp_path / "all.json")])
    assert r.exit_code == 0, r.stderr
    assert json.loads((tmp_path / "all.json").read_text())["formats"] == list(ALL_FORMATS)
    r = runner.invoke(cli, base + ["--formats", "e4m3,int8", "--json", str(tmp_path / "two.json")])
    assert r.exit_code == 0, r.stderr
    assert json.loads((tmp_path / "two.json").read_text())["formats"] == ["e4m3", "int8"]
