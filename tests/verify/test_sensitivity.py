"""Per-layer sensitivity from shared passes: the same own SQNR as check --layers, every format at once."""
from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from onnxfp8.cli import cli
from onnxfp8.config import QuantConfig
from onnxfp8.modelio import load_model
from onnxfp8.quantize import quantize
from onnxfp8.verify.check import check
from onnxfp8.verify.layers import compare_layers
from onnxfp8.verify.sensitivity import node_pattern, sensitivity


@pytest.fixture(scope="module")
def cnn_report(example_models):
    ex = example_models["cnn"]
    return ex, sensitivity(ex["model"], ex["calib"], ex["val"], QuantConfig(), top=1,
                           formats=("e4m3", "e3m4", "e5m2", "int8"))  # E3M4 too (not a default auto candidate)


def test_own_sqnr_per_format_matches_check_layers(cnn_report):
    """The shared pass measures, per format, the own SQNR check --layers measures on that format's model."""
    ex, rep = cnn_report
    assert rep.formats == ["e4m3", "e3m4", "e5m2", "int8"]
    from onnxfp8.calibrators.data import as_data

    fp32 = load_model(str(ex["model"]))
    for f in ("int8", "e3m4"):
        q = quantize(ex["model"], ex["calib"], QuantConfig(format=f)).model
        run = compare_layers(fp32, q, as_data(ex["val"], fp32))
        for res in run.results:
            assert rep.layer(res.node).own[f] == pytest.approx(res.own_sqnr_db, abs=1e-6)


def test_ranking_and_best_format(cnn_report):
    _, rep = cnn_report
    own = [l.own_db for l in rep.layers]
    assert own == sorted(own) and [l.rank for l in rep.layers] == list(range(1, len(own) + 1))
    for l in rep.layers:
        assert l.own[l.best_format] == max(l.own.values())
        assert l.margin_db == pytest.approx(l.own[l.best_format] - l.own["e4m3"])
        assert l.tensors  # its weight and activation(s) from the plan
    assert sum(rep.wins().values()) == len(rep.layers)
    # whole-model figures: E3M4 beats E5M2 on this CNN (more mantissa, ranges that fit)
    assert rep.model["e3m4"]["sqnr_db"] > rep.model["e5m2"]["sqnr_db"]


def test_output_level_figures_are_whole_model_runs(cnn_report):
    ex, rep = cnn_report
    top = rep.layers[0]
    assert rep.layers[1].only_fp32 is None  # only --top layers
    fp32_only = quantize(ex["model"], ex["calib"], QuantConfig(exclude_nodes=(node_pattern(top.node),))).model
    cos = next(iter(check(ex["model"], fp32_only, ex["val"]).outputs.values())).error.cosine
    assert top.only_fp32["cosine"] == pytest.approx(cos, abs=1e-9)
    only_q = quantize(ex["model"], ex["calib"], QuantConfig(include_nodes=(node_pattern(top.node),))).model
    cos = next(iter(check(ex["model"], only_q, ex["val"]).outputs.values())).error.cosine
    assert top.only_quantized["cosine"] == pytest.approx(cos, abs=1e-9)


def test_report_json_and_summary(cnn_report):
    _, rep = cnn_report
    data = json.loads(rep.to_json())
    assert data["layers"][0]["rank"] == 1 and set(data["layers"][0]["own_sqnr_db"]) == set(rep.formats)
    text = rep.summary()
    assert "E4M3" in text and rep.layers[0].node in text and "best format per layer" in text


def test_cli_sensitivity(example_models, tmp_path):
    ex = example_models["transformer"]
    js = tmp_path / "s.json"
    png = tmp_path / "s.png"
    r = CliRunner().invoke(cli, ["sensitivity", str(ex["model"]), "--calib", str(ex["calib"]), "--val",
                                 str(ex["val"]), "--top", "0", "--json", str(js), "--plot", str(png),
                                 "--formats", "e4m3,int8"])
    assert r.exit_code == 0, r.output
    data = json.loads(js.read_text())
    assert data["formats"] == ["e4m3", "int8"] and len(data["layers"]) == 7  # the embedding Gather stays FP32
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_sensitivity_needs_calib(example_models):
    ex = example_models["mlp"]
    r = CliRunner().invoke(cli, ["sensitivity", str(ex["model"]), "--val", str(ex["val"])])
    assert r.exit_code == 2 and "needs --calib" in r.output
