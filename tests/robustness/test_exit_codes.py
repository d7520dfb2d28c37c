"""Exit codes (issue 13 item 7): 0 pass, 1 a quality gate failed, 2 bad input or usage (one line), 3 an internal
error (one line with the way to the traceback); click's usage errors are one line too; every --help says so."""
from __future__ import annotations

import pytest

from onnxfp8.cli import cli
from onnxfp8.errors import EXIT_CODES

import robust_corpus as corpus


@pytest.fixture()
def model(tmp_path):
    return corpus.write(tmp_path, corpus.mlp())


def _line(r, code):
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in r.stderr + r.stdout, err
    return err


@pytest.mark.parametrize("args,needle", [
    (["quantize", "M", "-c", "C", "--style", "bogus"], "'bogus' is not one of 'qdq', 'emulate'"),
    (["quantize", "M", "--no-such-flag"], "No such option '--no-such-flag'"),
    (["quantize"], "Missing argument 'MODEL'"),
    (["frobnicate"], "No such command 'frobnicate'"),
    (["check", "M", "M"], "Missing option '--data'"),
])
def test_usage_errors_are_one_line_exit_2(runner, model, args, needle):
    m, c = model
    args = [str(m) if a == "M" else str(c) if a == "C" else a for a in args]
    err = _line(runner.invoke(cli, args), 2)
    assert needle in err and "--help" in err


def test_every_command_documents_the_exit_codes(runner):
    assert "Exit codes" in runner.invoke(cli, ["--help"]).stdout
    for name in cli.commands:
        r = runner.invoke(cli, [name, "--help"])
        assert r.exit_code == 0 and " ".join(EXIT_CODES.split()) in " ".join(r.stdout.split()), name


def test_a_crashing_pass_is_an_internal_error_exit_3(runner, model, monkeypatch):
    from onnxfp8.passes.insert_qdq import InsertQDQ

    def boom(self, graph, ctx):
        raise ValueError("kaboom")

    monkeypatch.setattr(InsertQDQ, "run", boom)
    m, c = model
    err = _line(runner.invoke(cli, ["quantize", str(m), "-c", str(c), "-o", str(m.with_name("q.onnx"))]), 3)
    assert "kaboom" in err and "ONNXFP8_DEBUG=1" in err
    assert not m.with_name("q.onnx").exists()
    monkeypatch.setenv("ONNXFP8_DEBUG", "1")
    r = runner.invoke(cli, ["quantize", str(m), "-c", str(c), "-o", str(m.with_name("q.onnx"))])
    assert r.exit_code != 0 and r.exception is not None  # the traceback is raised


def test_out_of_memory_exit_3_with_a_hint(runner, model, monkeypatch):
    from onnxfp8.passes.calibrate import Calibrate

    def oom(self, graph, ctx):
        raise MemoryError()

    monkeypatch.setattr(Calibrate, "run", oom)
    m, c = model
    err = _line(runner.invoke(cli, ["quantize", str(m), "-c", str(c), "-o", str(m.with_name("q.onnx"))]), 3)
    assert "out of memory" in err and "--batch-size" in err


def test_a_failed_gate_is_exit_1_bad_input_exit_2(runner, model, tmp_path):
    m, c = model
    q = tmp_path / "q.onnx"
    assert runner.invoke(cli, ["quantize", str(m), "-c", str(c), "-o", str(q), "-q"]).exit_code == 0
    r = runner.invoke(cli, ["check", str(m), str(q), "-d", str(c), "--min-sqnr", "200"])
    assert r.exit_code == 1 and "FAIL" in r.stdout
    assert runner.invoke(cli, ["check", str(m), str(q), "-d", str(c), "--min-sqnr", "1"]).exit_code == 0
    _line(runner.invoke(cli, ["check", str(m), str(tmp_path / "none.onnx"), "-d", str(c)]), 2)
