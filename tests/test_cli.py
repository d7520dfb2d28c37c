"""The command line: subcommands work, bad input is one line on stderr with exit code 2, no traceback, no
partial output, and the input model is never overwritten."""
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

from onnxfp8.cli import cli


@pytest.fixture()
def mlp(example_models, tmp_path):
    """A private copy of the MLP example and its calibration data (tests write beside the model)."""
    ex = example_models["mlp"]
    model = tmp_path / "mlp.onnx"
    shutil.copy(ex["model"], model)
    calib = tmp_path / "calib"
    shutil.copytree(ex["calib"], calib)
    return model, calib


def _one_line_error(result, *needles):
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in result.stderr + result.stdout
    for n in needles:
        assert n in err, err
    return err


def test_formats_table(runner):
    r = runner.invoke(cli, ["formats"])
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["format", "bits"]
    rows = {ln.split()[0]: ln for ln in lines[1:]}
    assert set(rows) == {"e4m3", "e5m2", "e3m4", "int8"}
    assert "448" in rows["e4m3"] and "FLOAT8E4M3FN" in rows["e4m3"]
    assert "57344" in rows["e5m2"] and "FLOAT8E5M2" in rows["e5m2"]
    assert "30" in rows["e3m4"] and "emulated" in rows["e3m4"]
    assert "INT8" in rows["int8"]


def test_quantize_default_output_name(runner, mlp):
    model, calib = mlp
    before = model.read_bytes()
    r = runner.invoke(cli, ["quantize", str(model), "--calib", str(calib), "-f", "e5m2"])
    assert r.exit_code == 0, r.stderr
    out = model.with_name("mlp.e5m2.onnx")
    assert out.exists() and f"wrote {out}" in r.stdout
    assert model.read_bytes() == before
    q = onnx.load(out)
    onnx.checker.check_model(q, full_check=True)
    assert any(t.data_type == onnx.TensorProto.FLOAT8E5M2 for t in q.graph.initializer)
    assert sorted(p.name for p in model.parent.iterdir()) == ["calib", "mlp.e5m2.onnx", "mlp.onnx"]


def test_quantize_writes_plan_and_report(runner, mlp, tmp_path):
    model, calib = mlp
    out, plan, report = tmp_path / "o.onnx", tmp_path / "plan.json", tmp_path / "report.json"
    r = runner.invoke(cli, ["quantize", str(model), "-c", str(calib), "-o", str(out), "--plan", str(plan),
                            "--report", str(report), "-q"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout == ""
    import json

    assert json.loads(plan.read_text())["tensors"]
    assert json.loads(report.read_text())


def _bad_data(calib, mutate):
    f = sorted(calib.glob("*.npz"))[3]
    d = dict(np.load(f))
    mutate(d)
    np.savez(f, **d)
    return f


@pytest.mark.parametrize("case", ["missing-model", "not-onnx", "empty-calib", "wrong-input-name", "nan",
                                  "output-is-input", "unknown-format", "calib-missing"])
def test_bad_input_one_line_exit_2(case, runner, mlp, tmp_path):
    model, calib = mlp
    out = tmp_path / "out.onnx"
    args = ["quantize", str(model), "--calib", str(calib), "-o", str(out)]
    needles = []
    if case == "missing-model":
        args[1] = str(tmp_path / "nope.onnx")
        needles = ["nope.onnx", "no such file"]
    elif case == "not-onnx":
        junk = tmp_path / "junk.onnx"
        junk.write_bytes(b"this is not a protobuf \x00\xff" * 10)
        args[1] = str(junk)
        needles = ["junk.onnx"]
    elif case == "empty-calib":
        empty = tmp_path / "empty"
        empty.mkdir()
        args[3] = str(empty)
        needles = ["empty", "no .npz or .npy"]
    elif case == "wrong-input-name":
        f = _bad_data(calib, lambda d: d.update(wrong=d.pop("input")))
        needles = [f.name, "'wrong'"]
    elif case == "nan":
        def put_nan(d):
            d["input"][0, 0] = np.nan
        f = _bad_data(calib, put_nan)
        needles = [f.name, "'input'", "NaN"]
    elif case == "output-is-input":
        args[-1] = str(model)
        needles = ["refusing to overwrite"]
    elif case == "unknown-format":
        args += ["-f", "fp7"]
        needles = ["fp7"]
    elif case == "calib-missing":
        args[3] = str(tmp_path / "nodata")
        needles = ["nodata"]
    before = model.read_bytes()
    r = runner.invoke(cli, args)
    _one_line_error(r, *needles)
    assert model.read_bytes() == before  # the input is never touched
    assert not out.exists()  # no partial output
    leftovers = [p.name for p in list(tmp_path.iterdir()) + list(model.parent.iterdir()) if p.name.startswith(".onnxfp8")]
    assert not leftovers


def test_input_names_match_model(mlp):
    model, _ = mlp
    assert [i.name for i in onnx.load(model).graph.input] == ["input"]


def test_python_m_help():
    r = subprocess.run([sys.executable, "-m", "onnxfp8", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "quantize" in r.stdout and "formats" in r.stdout


def test_console_script_error_is_one_line(tmp_path):
    """Through a real process: exit status 2 and a single stderr line, no traceback."""
    r = subprocess.run([sys.executable, "-m", "onnxfp8", "quantize", str(tmp_path / "missing.onnx")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "missing.onnx" in r.stderr and "Traceback" not in r.stderr
