"""The README's first command: `onnxfp8 example digits` trains a BatchNorm CNN on the bundled digits (no
scikit-learn needed) and its default E4M3 quantization passes `onnxfp8 check`'s default thresholds on the
held-out images; the quantize summary says whether those defaults hold, and agrees with `check`."""
import subprocess
import sys

import numpy as np
import pytest

import onnxfp8
from onnxfp8.cli import cli
from onnxfp8.examples import write_example
from onnxfp8.examples.digits import load_digits


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """`onnxfp8 example digits` (2 epochs, enough to pass) in a fresh interpreter where scikit-learn cannot be
    imported."""
    out = tmp_path_factory.mktemp("ex")
    code = ("import sys; sys.modules['sklearn'] = None; from onnxfp8.cli import main; "
            f"sys.argv = ['onnxfp8', 'example', 'digits', '--epochs', '2', '--out', {str(out)!r}]; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def test_bundled_digits_data():
    images, target = load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 16
    assert target.shape == (1797,) and sorted(np.unique(target)) == list(range(10))
    assert np.bincount(target).min() >= 170  # all ten classes, about equally


def test_example_digits_writes_model_and_data(digits):
    out, stdout = digits
    assert (out / "digits.onnx").is_file()
    calib = sorted((out / "data" / "digits" / "calib").glob("*.npz"))
    val = sorted((out / "data" / "digits" / "val").glob("*.npz"))
    assert sum(np.load(f)["input"].shape[0] for f in calib) == 1024
    assert sum(np.load(f)["label"].shape[0] for f in val) == 360
    assert not list(out.rglob("*.tmp*"))
    assert f"next: onnxfp8 quantize {out / 'digits.onnx'} --calib" in stdout
    acc = float(stdout.split("FP32 accuracy ")[1].split("%")[0])
    assert acc > 90.0, stdout


def test_readme_first_command_passes_check_defaults(digits, runner, tmp_path):
    out, _ = digits
    q = tmp_path / "digits.e4m3.onnx"
    r = runner.invoke(cli, ["quantize", str(out / "digits.onnx"), "--calib", str(out / "data/digits/calib"),
                            "-o", str(q), "--check", "--val", str(out / "data/digits/val")])
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "check defaults (SQNR >= 15 dB, cosine >= 0.98, rel L2 <= 0.2, top-1 agreement >= 90%): hold" in r.stdout
    assert "PASS: every threshold holds" in r.stdout
    assert "with labels" in r.stdout  # the held-out images carry labels: the accuracy loss is gated too


def test_summary_verdict_agrees_with_check(example_models):
    """The untrained example CNN misses the defaults at E4M3; the summary says so, names what fails and what
    to try, and `check` with default thresholds on the same calibration samples gives the same verdict."""
    ex = example_models["cnn"]
    for fmt in ("e4m3", "int8"):
        res = onnxfp8.quantize(str(ex["model"]), str(ex["calib"]), config=onnxfp8.QuantConfig(format=fmt))
        cd = res.report.check_defaults
        n = cd["samples"]
        assert n == res.report.summary_samples > 0
        rep = onnxfp8.check(str(ex["model"]), res.model, str(ex["calib"]), samples=n)
        assert cd["passed"] == rep.passed, (fmt, cd, rep.failures)
        assert cd["failures"] == rep.failures
        text = res.report.summary()
        if cd["passed"]:
            assert "): hold on these" in text
        else:
            assert "NOT met" in text and "to try:" in text and cd["failures"][0] in text
            assert "--bn-recalibrate" in text  # the example CNN has BatchNormalization
    assert "check_defaults" in res.report.to_dict()


def test_unknown_example_is_one_line(runner):
    r = runner.invoke(cli, ["example", "nope"])
    assert r.exit_code == 2
    assert r.stderr.strip() == "error: unknown example 'nope' (known: digits, cnn, mlp, transformer)"


def test_write_example_seeded(tmp_path):
    info = write_example("mlp", tmp_path, calib=5, val=3)
    assert info["model"].is_file() and len(list(info["calib"].glob("*.npz"))) == 5
    assert len(list(info["val"].glob("*.npz"))) == 3
