"""-q/--quiet and -v/--verbose on every subcommand, with one meaning: quiet prints only errors and failures
(nothing on success, except a listing command's bare names), verbose prints what the default output shortens.
A command registered without them, or without a case here, fails these tests."""
import shutil

import pytest

from onnxfp8.cli import cli

COMMANDS = sorted(cli.commands)


def test_every_command_has_quiet_and_verbose():
    for name in COMMANDS:
        opts = {o for p in cli.commands[name].params for o in p.opts + p.secondary_opts}
        assert {"-q", "--quiet", "-v", "--verbose"} <= opts, f"onnxfp8 {name} lacks -q/--quiet or -v/--verbose"


@pytest.fixture(scope="module")
def work(example_models, tmp_path_factory):
    """The MLP example, its data, and a quantized copy (for check and lint)."""
    from click.testing import CliRunner

    ex = example_models["mlp"]
    d = tmp_path_factory.mktemp("verbosity")
    model, calib, val = d / "mlp.onnx", d / "calib", d / "val"
    shutil.copy(ex["model"], model)
    shutil.copytree(ex["calib"], calib)
    shutil.copytree(ex["val"], val)
    quant = d / "mlp.trt.onnx"
    r = CliRunner().invoke(cli, ["quantize", str(model), "-c", str(calib), "-o", str(quant), "-q",
                                 "--recipe", "tensorrt"])
    assert r.exit_code == 0, r.stderr
    return {"model": str(model), "calib": str(calib), "val": str(val), "quant": str(quant), "dir": d}


def case(name, w):
    """(arguments, what only --verbose prints, what --quiet still prints: None for nothing) of each command."""
    m, c, v, q, d = w["model"], w["calib"], w["val"], w["quant"], w["dir"]
    return {
        "check": ([m, q, "--data", v, "--layers"], "thresholds for logits:", None),
        "example": (["mlp", "--out", str(d / "ex"), "--samples", "4"], "inputs: input float", None),
        "formats": ([], "e3m4: ", "e4m3\ne5m2\ne3m4\nint8\n"),
        "lint": ([q], "Q/DQ nodes by quantized type: FLOAT8E4M3FN", None),
        "quantize": ([m, "-c", c, "-o", str(d / "out.onnx")], "is not quantized by this scheme", None),
        "recipes": ([], "target = 'tensorrt'", "cv\nfp8-bert\nnlp\ntensorrt\n"),
        "sensitivity": ([m, "-c", c, "--val", v, "--top", "0", "--samples", "8"], "time: realize", None),
        "sweep": ([m, "-c", c, "--val", v, "--formats", "e4m3", "--schemes", "standard", "--calibrations", "max",
                   "--no-tune", "--samples", "8", "--out", str(d / "sweep")], "time per configuration: e4m3 standard max",
                  None),
    }.get(name)


@pytest.mark.parametrize("name", COMMANDS)
def test_quiet_and_verbose_mean_the_same_everywhere(name, work, runner):
    spec = case(name, work)
    assert spec is not None, f"onnxfp8 {name}: add its case to tests/test_cli_verbosity.py"
    args, verbose_only, quiet_out = spec
    plain = runner.invoke(cli, [name] + args)
    assert plain.exit_code == 0, (plain.stdout, plain.stderr)
    quiet = runner.invoke(cli, [name] + args + ["-q"])
    assert quiet.exit_code == 0, quiet.stderr
    assert quiet.stderr == ""
    if quiet_out is None:
        assert quiet.stdout == ""
    else:
        assert quiet.stdout == quiet_out
    verbose = runner.invoke(cli, [name] + args + ["--verbose"])
    assert verbose.exit_code == 0, verbose.stderr
    assert verbose_only in verbose.stdout and verbose_only not in plain.stdout, (verbose.stdout, plain.stdout)
    assert len(verbose.stdout.splitlines()) > len(plain.stdout.splitlines())
    both = runner.invoke(cli, [name] + args + ["-q", "-v"], prog_name="onnxfp8")
    assert both.exit_code == 2 and both.stdout == ""
    assert both.stderr.strip() == (f"error: -q/--quiet and -v/--verbose contradict each other: give one "
                                   f"(see 'onnxfp8 {name} --help')")


def test_quiet_still_says_why_a_gate_fails(work, runner):
    r = runner.invoke(cli, ["check", work["model"], work["quant"], "--data", work["val"], "--min-sqnr", "200", "-q"])
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.startswith("FAIL:") and "200" in r.stderr
    r = runner.invoke(cli, ["quantize", work["model"], "-c", work["calib"], "-o", str(work["dir"] / "q2.onnx"),
                            "-q"])
    assert r.exit_code == 0 and r.stdout == "" and r.stderr == ""
