"""`onnxfp8 check` and `onnxfp8 quantize --check --val` through the command line: exit code 0 when every
threshold holds, 1 when one fails (the output says which), 2 for bad input (one line on stderr, no traceback);
--json, --layers, --labels, per-output thresholds."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxfp8
from onnxfp8.cli import cli


@pytest.fixture(scope="module")
def mlp(example_models, tmp_path_factory):
    """Paths: the MLP example, its E4M3 quantization, a copy whose fc2 input scale is 1000x too small, data."""
    ex = example_models["mlp"]
    d = tmp_path_factory.mktemp("check_cli")
    quant = d / "mlp.e4m3.onnx"
    onnxfp8.quantize(str(ex["model"]), str(ex["calib"]), output=str(quant))
    q = onnx.load(quant)
    for init in q.graph.initializer:
        if init.name == "relu1/output.scale":  # the activation scale of fc2's input (Q and DQ share it)
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) / 1000, init.name))
            break
    else:
        raise AssertionError("no relu1/output.scale in the quantized MLP")
    broken = d / "mlp.broken.onnx"
    onnx.save(q, broken)
    return {"fp32": str(ex["model"]), "quant": str(quant), "broken": str(broken), "val": str(ex["val"]),
            "calib": str(ex["calib"]), "cnn_val": str(example_models["cnn"]["val"]), "dir": d}


def _one_line_error(result, *needles):
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in result.stderr + result.stdout
    for n in needles:
        assert n in err, err
    return err


def test_exit_0_model_against_itself(runner, mlp, tmp_path):
    out = tmp_path / "r.json"
    r = runner.invoke(cli, ["check", mlp["fp32"], mlp["fp32"], "--data", mlp["val"], "--json", str(out)])
    assert r.exit_code == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"checked {mlp['fp32']} against {mlp['fp32']} on 32 sample(s) (onnxruntime basic)"
    row = lines[2].split()
    assert row[:6] == ["logits", "inf", "1.00000", "0", "0", "0"] and row[-1] == "ok"
    assert lines[-1] == "PASS: every threshold holds"
    rep = json.loads(out.read_text())
    assert rep["passed"] is True and rep["samples"] == 32 and rep["outputs"][0]["sqnr_db"] == "inf"


def test_exit_0_quantized_passes_defaults(runner, mlp):
    r = runner.invoke(cli, ["check", mlp["fp32"], mlp["quant"], "-d", mlp["val"]])
    assert r.exit_code == 0, r.stdout + r.stderr
    assert r.stdout.rstrip().endswith("PASS: every threshold holds")


def test_exit_1_broken_scale_names_the_layer(runner, mlp, tmp_path):
    out = tmp_path / "r.json"
    r = runner.invoke(cli, ["check", mlp["fp32"], mlp["broken"], "--data", mlp["val"], "--layers", "--json", str(out)])
    assert r.exit_code == 1, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("per layer (3 quantized layer(s), worst first"))
    assert lines[head + 1].split() == ["layer", "op", "own", "dB", "cumul.", "dB", "cumul.", "rel", "L2", "output"]
    assert lines[head + 2].split()[:2] == ["fc2", "MatMul"]
    fail = lines.index(next(ln for ln in lines if ln.startswith("FAIL: ")))
    assert lines[fail + 1].strip().startswith("logits: SQNR ")
    rep = json.loads(out.read_text())
    assert rep["passed"] is False and rep["failures"] == [ln.strip() for ln in lines[fail + 1:]]
    assert [l["node"] for l in rep["layers"]][0] == "fc2" and rep["layers"][0]["own_sqnr_db"] < 1


def test_exit_1_per_output_threshold_and_quiet(runner, mlp):
    r = runner.invoke(cli, ["check", mlp["fp32"], mlp["quant"], "-d", mlp["val"], "--min-sqnr", "logits=40"])
    assert r.exit_code == 1
    sqnr = onnxfp8.check(mlp["fp32"], mlp["quant"], mlp["val"]).outputs["logits"].sqnr_db
    assert r.stdout.splitlines()[-1] == f"  logits: SQNR {sqnr:.2f} dB < 40.00 dB"
    q = runner.invoke(cli, ["check", mlp["fp32"], mlp["quant"], "-d", mlp["val"], "--min-sqnr", "40", "-q"])
    assert q.exit_code == 1 and q.stdout == ""
    assert q.stderr.splitlines() == ["FAIL:", f"  logits: SQNR {sqnr:.2f} dB < 40.00 dB"]
    ok = runner.invoke(cli, ["check", mlp["fp32"], mlp["quant"], "-d", mlp["val"], "--min-sqnr", "40",
                             "--min-sqnr", "logits=none", "-q"])
    assert ok.exit_code == 0 and ok.stdout == ok.stderr == ""


def test_labels_column(runner, mlp, tmp_path):
    from onnxfp8.modelio import make_session

    files = sorted(__import__("pathlib").Path(mlp["val"]).glob("*.npz"))
    x = np.concatenate([np.load(f)["input"] for f in files])
    lab = make_session(onnx.load(mlp["fp32"])).run(None, {"input": x})[0].argmax(1)
    np.save(tmp_path / "labels.npy", lab)
    r = runner.invoke(cli, ["check", mlp["fp32"], mlp["quant"], "-d", mlp["val"], "--labels",
                            str(tmp_path / "labels.npy"), "--json", str(tmp_path / "r.json")])
    rep = json.loads((tmp_path / "r.json").read_text())["outputs"][0]
    assert rep["accuracy_fp32"] == 1.0 and rep["accuracy_quant"] == rep["top1_agreement"]
    assert "with labels" in r.stdout.splitlines()[0]
    assert f"100.0>{100 * rep['accuracy_quant']:.1f}%" in r.stdout
    # the relative accuracy loss equals the top-1 disagreement here; it decides the exit code against 1%
    assert r.exit_code == (0 if rep["accuracy_loss"] <= 0.01 else 1)


@pytest.mark.parametrize("case", ["missing-fp32", "missing-quant", "not-onnx", "missing-data", "wrong-model-data",
                                  "bad-threshold", "unknown-output", "labels-count", "other-model"])
def test_exit_2_bad_input(case, runner, mlp, tmp_path):
    args = ["check", mlp["fp32"], mlp["quant"], "--data", mlp["val"]]
    if case == "missing-fp32":
        args[1] = str(tmp_path / "nope.onnx")
        needles = ["nope.onnx", "no such file"]
    elif case == "missing-quant":
        args[2] = str(tmp_path / "gone.onnx")
        needles = ["gone.onnx", "no such file"]
    elif case == "not-onnx":
        junk = tmp_path / "junk.onnx"
        junk.write_bytes(b"not a protobuf \x00\xff" * 10)
        args[2] = str(junk)
        needles = ["junk.onnx"]
    elif case == "missing-data":
        args[4] = str(tmp_path / "nodata")
        needles = ["nodata", "no such file or folder"]
    elif case == "wrong-model-data":  # CNN images for the MLP
        args[4] = mlp["cnn_val"]
        needles = ["00000.npz", "'input'"]
    elif case == "bad-threshold":
        args += ["--min-cosine", "high"]
        needles = ["--min-cosine: 'high' is not a number"]
    elif case == "unknown-output":
        args += ["--min-sqnr", "probs=30"]
        needles = ["'probs'", "no such output"]
    elif case == "labels-count":
        np.save(tmp_path / "l.npy", np.zeros(5, np.int64))
        args += ["--labels", str(tmp_path / "l.npy")]
        needles = ["l.npy", "holds 5 labels"]
    elif case == "other-model":
        args[2] = str(__import__("pathlib").Path(mlp["cnn_val"]).parents[2] / "cnn.onnx")
        needles = ["cnn.onnx", "input 'input' is float[batch, 3, 32, 32]", "not a quantization of that model"]
    _one_line_error(runner.invoke(cli, args), *needles)


def test_quantize_check_val(runner, mlp, tmp_path):
    out, rep = tmp_path / "q.onnx", tmp_path / "check.json"
    base = ["quantize", mlp["fp32"], "--calib", mlp["calib"], "-o", str(out), "--check", "--val", mlp["val"]]
    r = runner.invoke(cli, base + ["--check-json", str(rep)])
    assert r.exit_code == 0, r.stdout + r.stderr
    assert r.stdout.rstrip().endswith(f"PASS: every threshold holds\nwrote {out}")  # written once checked
    d = json.loads(rep.read_text())
    assert d["passed"] is True and d["quant"] == str(out) and d["fp32"] == mlp["fp32"] and d["samples"] == 32
    # the same thresholds as check, the same verdict
    sqnr = d["outputs"][0]["sqnr_db"]
    r = runner.invoke(cli, base + ["--min-sqnr", "logits=40", "-q"])
    assert r.exit_code == 1 and r.stderr.splitlines() == ["FAIL:", f"  logits: SQNR {sqnr:.2f} dB < 40.00 dB"]
    assert out.exists()  # the model is written; the gate only sets the exit code
    _one_line_error(runner.invoke(cli, base[:-2]), "--check needs --val")
    _one_line_error(runner.invoke(cli, base[:-3] + ["--val", mlp["val"]]), "--val is only used with --check")
    _one_line_error(runner.invoke(cli, base[:-3] + ["--min-sqnr", "20"]), "--min-sqnr is only used with --check")


def test_exit_codes_through_a_process(mlp):
    """The console entry point sets the process's exit status: 1 on a failed threshold, 2 on bad input."""
    cmd = [sys.executable, "-m", "onnxfp8", "check", mlp["fp32"], mlp["broken"], "--data", mlp["val"], "-q"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("FAIL:\n  logits: SQNR ") and "Traceback" not in r.stderr
    r = subprocess.run(cmd[:6] + ["--data", str(mlp["dir"] / "missing")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "missing" in r.stderr


def test_min_layer_sqnr_flag(runner, mlp):
    """--min-layer-sqnr turns the layer table on and fails on the broken layer, naming it; the good model passes."""
    r = runner.invoke(cli, ["check", mlp["fp32"], mlp["broken"], "-d", mlp["val"], "--min-sqnr", "none",
                            "--min-cosine", "none", "--max-rel-error", "none", "--min-top1-agreement", "none",
                            "--min-layer-sqnr", "20"])
    assert r.exit_code == 1, r.stdout + r.stderr
    assert any(ln.startswith("per layer (3 quantized layer(s)") for ln in r.stdout.splitlines())
    assert r.stdout.splitlines()[-1].strip().startswith("layer fc2 (MatMul): own SQNR ")
    ok = runner.invoke(cli, ["check", mlp["fp32"], mlp["quant"], "-d", mlp["val"], "--min-layer-sqnr", "20"])
    assert ok.exit_code == 0, ok.stdout + ok.stderr
    q = runner.invoke(cli, ["quantize", mlp["fp32"], "--calib", mlp["calib"], "-o", str(mlp["dir"] / "g.onnx"),
                            "--min-layer-sqnr", "20"])
    assert q.exit_code == 2 and "--min-layer-sqnr" in q.stderr  # a check option without --check
