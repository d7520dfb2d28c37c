"""sweep: formats x schemes x calibration methods + the tuned row, as markdown, JSON and one HTML page."""
from __future__ import annotations

import base64
import json
import re

import pytest
from click.testing import CliRunner

from onnxfp8.cli import cli
from onnxfp8.config import QuantConfig
from onnxfp8.quantize import quantize
from onnxfp8.report.plots import format_grid
from onnxfp8.formats import get_format
from onnxfp8.tuning.sweep import sweep
from onnxfp8.verify.check import check


@pytest.fixture(scope="module")
def mlp_sweep(example_models):
    ex = example_models["mlp"]
    return ex, sweep(ex["model"], ex["calib"], ex["val"], formats=("e4m3", "int8", "auto"),
                     schemes=("standard",), calibrations=("max", "mse"))


def test_rows_are_what_quantize_and_check_give(mlp_sweep):
    ex, rep = mlp_sweep
    plain = [r for r in rep.rows if not r.tuned]
    assert [(r.format, r.calibration) for r in plain] == [(f, c) for f in ("e4m3", "int8", "auto")
                                                           for c in ("max", "mse")]
    row = next(r for r in plain if r.format == "int8" and r.calibration == "mse")
    q = quantize(ex["model"], ex["calib"], QuantConfig(format="int8", calibration="mse"))
    out = next(iter(check(ex["model"], q.model, ex["val"]).outputs.values()))
    assert row.metrics["sqnr_db"] == pytest.approx(out.error.sqnr_db, abs=1e-6)
    assert row.met == (out.error.cosine >= 0.995)
    assert 0 < row.size_bytes < rep.fp32_size
    tuned = [r for r in rep.rows if r.tuned]
    assert len(tuned) == 1 and tuned[0].met == rep.tuning.met


def test_markdown_json(mlp_sweep):
    _, rep = mlp_sweep
    md = rep.to_markdown()
    assert "| int8 standard mse |" in md and "| tuned (standard) |" in md and "## sensitivity" in md
    data = json.loads(rep.to_json())
    assert len(data["rows"]) == 7 and data["criterion"]["metric"] == "cosine"
    assert data["sensitivity"]["layers"]


def test_format_grid_is_the_formats_values():
    g = format_grid(get_format("e4m3"), 1.0, 448.0)
    assert g[0] == 0.0 and g[-1] == 448.0 and len(g) == 127  # 0 and 126 positive finite E4M3 magnitudes
    g = format_grid(get_format("int8"), 0.5, 10.0)
    assert list(g[:3]) == [0.0, 0.5, 1.0] and g[-1] == 10.0


def test_cli_sweep_writes_three_files(example_models, tmp_path):
    ex = example_models["mlp"]
    out = tmp_path / "sw"
    r = CliRunner().invoke(cli, ["sweep", str(ex["model"]), "--calib", str(ex["calib"]), "--val", str(ex["val"]),
                                 "--formats", "e4m3,int8", "--schemes", "standard", "--calibrations", "max",
                                 "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    html = (out / "sweep.html").read_text()
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(imgs) >= 3  # sweep bars, sensitivity bars, histograms
    assert all(base64.b64decode(i)[:4] == b"\x89PNG" for i in imgs)
    assert "<table>" in html and "http" not in html.replace("http-equiv", "")  # self-contained
    assert json.loads((out / "sweep.json").read_text())["rows"]
    assert (out / "sweep.md").read_text().startswith("# sweep:")


def test_cli_sweep_bad_scheme(example_models, tmp_path):
    ex = example_models["mlp"]
    r = CliRunner().invoke(cli, ["sweep", str(ex["model"]), "--calib", str(ex["calib"]), "--val", str(ex["val"]),
                                 "--schemes", "fancy", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "unknown scheme 'fancy'" in r.output


def test_transform_rows_and_table(example_models, tmp_path):
    """Format x transform: each row is quantize() with the transform on (unguarded) checked on the validation
    data; a transform that changes nothing is n/a."""
    ex = example_models["cnn"]
    rep = sweep(ex["model"], ex["calib"], ex["val"], formats=("e4m3", "int8"), schemes=("standard",),
                calibrations=("max",), tune=False, transforms=("equalize", "smoothquant", "bias_correction"))
    rows = {(r.format, r.transform): r for r in rep.rows}
    assert set(rows) == {(f, t) for f in ("e4m3", "int8") for t in ("", "equalize", "smoothquant", "bias_correction")}
    row = rows[("int8", "equalize")]
    assert row.label == "int8 standard max + equalize" and not row.error
    q = quantize(ex["model"], ex["calib"], QuantConfig(format="int8", equalize=True, bias_correction=False,
                                                       transform_guard=False))
    out = next(iter(check(ex["model"], q.model, ex["val"]).outputs.values()))
    assert row.metrics["sqnr_db"] == pytest.approx(out.error.sqnr_db, abs=1e-6)
    md = rep.to_markdown()
    assert "## transforms (standard, calibration max" in md
    assert "| format | none | equalize | smoothquant | bias_correction |" in md
    line = next(l for l in md.splitlines() if l.startswith("| int8 |") and "/" in l)
    assert f"{row.metrics['sqnr_db']:.2f}" in line
    assert json.loads(rep.to_json())["rows"][-1]["transform"] == "bias_correction"
    with pytest.raises(Exception, match="unknown transform 'cle'"):
        sweep(ex["model"], ex["calib"], ex["val"], formats=("e4m3",), transforms=("cle",))
