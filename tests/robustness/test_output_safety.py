"""Outputs never touch inputs, are written together or not at all, and leave no temporary behind
(issue 13 items 1, 2): from the CLI and the Python API."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxfp8
from onnxfp8 import outputs as outputs_mod
from onnxfp8.cli import cli
from onnxfp8.errors import ModelError
from onnxfp8.outputs import Outputs, OutputError, sweep

import robust_corpus as corpus

ROOT = Path(__file__).resolve().parents[2]


def _one_line(r, code=2, *needles):
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in r.stderr, err
    for n in needles:
        assert n in err, err
    return err


@pytest.fixture()
def model(tmp_path):
    return corpus.write(tmp_path, corpus.mlp())


def _snapshot(folder: Path):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("flag", ["--report", "--plan", "--save-stats"])
def test_artifact_onto_input_refused_before_work(runner, model, tmp_path, flag):
    m, c = model
    before = _snapshot(tmp_path)
    r = runner.invoke(cli, ["quantize", str(m), "-c", str(c), "-o", str(tmp_path / "q.onnx"), flag, str(m)])
    _one_line(r, 2, "refusing to overwrite the input model", flag)
    assert _snapshot(tmp_path) == before  # nothing written: not even the model of -o


def test_check_json_onto_calibration_and_val_refused(runner, model, tmp_path):
    m, c = model
    before = _snapshot(tmp_path)
    r = runner.invoke(cli, ["quantize", str(m), "-c", str(c), "-o", str(tmp_path / "q.onnx"), "--check",
                            "--val", str(c), "--check-json", str(c)])
    _one_line(r, 2, "refusing to overwrite", "--check-json")
    assert _snapshot(tmp_path) == before


def test_hard_link_symlink_and_symlinked_folder_reach_the_input(runner, model, tmp_path):
    m, c = model
    before = m.read_bytes()
    hard = tmp_path / "hard.onnx"
    os.link(m, hard)
    link_dir = tmp_path / "linked"
    link_dir.symlink_to(tmp_path)
    sym = tmp_path / "sym.onnx"
    sym.symlink_to(m)
    for out in (hard, link_dir / "m.onnx", sym, tmp_path / "sub" / ".." / "m.onnx"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        r = runner.invoke(cli, ["quantize", str(m), "-c", str(c), "-o", str(out)])
        _one_line(r, 2, "refusing to overwrite the input model")
    # the input given through a symlink, the output its target
    r = runner.invoke(cli, ["quantize", str(sym), "-c", str(c), "-o", str(m)])
    _one_line(r, 2, "refusing to overwrite the input model")
    assert m.read_bytes() == before
    with pytest.raises(ModelError, match="refusing to overwrite the input model"):
        onnxfp8.quantize(str(m), str(c), output=str(hard))
    assert m.read_bytes() == before


def test_output_onto_external_data_of_input_refused(runner, tmp_path):
    big = corpus.mlp()
    path = tmp_path / "ext.onnx"
    onnx.save_model(big, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.weights", size_threshold=0)
    np.savez(tmp_path / "c.npz", **corpus.calib())
    data = (tmp_path / "ext.weights").read_bytes()
    for flag in ("-o", "--plan", "--report"):
        args = ["quantize", str(path), "-c", str(tmp_path / "c.npz"), "-o", str(tmp_path / "q.onnx")]
        args += [flag, str(tmp_path / "ext.weights")]
        r = runner.invoke(cli, args)
        _one_line(r, 2, "external-data file of the input model")
    assert (tmp_path / "ext.weights").read_bytes() == data
    # the output's own .data file (written for models over 2 GB) may not be an input either
    (tmp_path / "w.onnx.data").write_bytes(b"x")
    o = Outputs()
    o.protect(tmp_path / "w.onnx.data")
    o.add(tmp_path / "w.onnx", "-o", model=True)
    with pytest.raises(OutputError, match="external data of -o"):
        o.validate()


def test_special_files_refused(runner, model, tmp_path):
    m, c = model
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for out, kind in (("/dev/null", "a device"), (str(fifo), "a FIFO"), (str(tmp_path), "a folder")):
        r = runner.invoke(cli, ["quantize", str(m), "-c", str(c), "-o", str(tmp_path / "q.onnx"), "--plan", out])
        _one_line(r, 2, kind, "not a regular file")
    assert not (tmp_path / "q.onnx").exists()
    r = runner.invoke(cli, ["lint", str(m), "--json", "/dev/null"])
    _one_line(r, 2, "a device")


def test_two_outputs_one_file_refused(runner, model, tmp_path):
    m, c = model
    r = runner.invoke(cli, ["quantize", str(m), "-c", str(c), "-o", str(tmp_path / "q.onnx"),
                            "--plan", str(tmp_path / "a.json"), "--report", str(tmp_path / "a.json")])
    _one_line(r, 2, "name the same file")


def test_unwritable_targets_refused_before_the_model_is_written(runner, model, tmp_path, monkeypatch):
    m, c = model
    q = tmp_path / "q.onnx"
    r = runner.invoke(cli, ["quantize", str(m), "-c", str(c), "-o", str(q), "--plan", str(tmp_path / "no" / "p.json")])
    _one_line(r, 2, "does not exist", "--plan")
    assert not q.exists()
    r = runner.invoke(cli, ["quantize", str(m), "-c", str(c), "-o", str(q), "--report", str(m) + "/r.json"])
    _one_line(r, 2, "is not a folder")
    assert not q.exists()
    # a read-only folder (simulated: the tests run as root, for whom chmod does not deny writing)
    real_open = os.open

    def ro_open(path, flags, *a, **k):
        if "ro" in os.path.basename(os.path.dirname(os.fspath(path))) and flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *a, **k)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(outputs_mod.os, "open", ro_open)
    r = runner.invoke(cli, ["quantize", str(m), "-c", str(c), "-o", str(q), "--report", str(tmp_path / "ro" / "r.json")])
    _one_line(r, 2, "cannot write --report (Permission denied)")
    assert not q.exists() and not list((tmp_path / "ro").iterdir())
    r = runner.invoke(cli, ["check", str(m), str(m), "-d", str(c), "--json", str(tmp_path / "ro" / "c.json")])
    _one_line(r, 2, "cannot write --json")


def test_full_disk_is_one_line_and_leaves_nothing(runner, model, tmp_path, monkeypatch):
    m, c = model
    before = _snapshot(tmp_path)

    def full(path, data):
        with open(path, "wb") as f:
            f.write(data[:7])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs_mod, "_write", full)
    r = runner.invoke(cli, ["quantize", str(m), "-c", str(c), "-o", str(tmp_path / "q.onnx"),
                            "--plan", str(tmp_path / "p.json")])
    _one_line(r, 2, "q.onnx: cannot write the output model (-o) (No space left on device)")
    assert _snapshot(tmp_path) == before and not [p for p in tmp_path.iterdir() if p.name.startswith(".onnxfp8")]


def test_all_artifacts_written_together_no_temporaries(runner, model, tmp_path):
    m, c = model
    args = ["quantize", str(m), "-c", str(c), "-o", str(tmp_path / "q.onnx"), "--plan", str(tmp_path / "p.json"),
            "--report", str(tmp_path / "r.json"), "--save-stats", str(tmp_path / "s.json"), "--check",
            "--val", str(c), "--check-json", str(tmp_path / "cj.json"), "--min-sqnr", "none", "--min-cosine", "none",
            "--max-rel-error", "none"]
    r = runner.invoke(cli, args)
    assert r.exit_code == 0, r.stderr
    for f in ("q.onnx", "p.json", "r.json", "s.json", "cj.json"):
        assert (tmp_path / f).stat().st_size > 0, f
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnxfp8")]
    # --load-stats and --save-stats may be one file: read, then replaced
    r = runner.invoke(cli, ["quantize", str(m), "-c", str(c), "-o", str(tmp_path / "q2.onnx"),
                            "--load-stats", str(tmp_path / "s.json"), "--save-stats", str(tmp_path / "s.json")])
    assert r.exit_code == 0, r.stderr


def test_stale_temporaries_of_dead_processes_are_swept(runner, model, tmp_path):
    m, c = model
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale_file = tmp_path / f".onnxfp8-tmp-{pid}-abcd1234-q.onnx"
    stale_dir = tmp_path / f".onnxfp8-tmp-{pid}-abcd1234"
    live = tmp_path / f".onnxfp8-tmp-{os.getppid()}-abcd1234-q.onnx"  # a live process's: kept
    stale_file.write_bytes(b"partial")
    stale_dir.mkdir()
    (stale_dir / "q.onnx.data").write_bytes(b"partial")
    live.write_bytes(b"busy")
    r = runner.invoke(cli, ["quantize", str(m), "-c", str(c), "-o", str(tmp_path / "q.onnx")])
    assert r.exit_code == 0, r.stderr
    assert not stale_file.exists() and not stale_dir.exists() and live.exists()
    assert sweep(tmp_path) == []


_KILL = textwrap.dedent("""
    import os, signal, sys
    import importlib; q = importlib.import_module("onnxfp8.quantize")
    from onnxfp8.cli import main
    real, sig = q._measure, getattr(signal, sys.argv[1])
    def measure(*a, **k):
        real(*a, **k)
        os.kill(os.getpid(), sig)
    q._measure = measure
    sys.argv = ["onnxfp8"] + sys.argv[2:]
    main()
""")


@pytest.mark.parametrize("sig,code,word", [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])
def test_signal_during_the_run_removes_temporaries(model, tmp_path, sig, code, word):
    m, c = model
    before = _snapshot(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", _KILL, sig, "quantize", str(m), "-c", str(c), "-o",
                        str(tmp_path / "q.onnx"), "--plan", str(tmp_path / "p.json"), "-q"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == code, p.stderr
    assert p.stderr.strip().splitlines()[-1] == f"error: {word}"
    assert _snapshot(tmp_path) == before
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".onnxfp8")]


def test_python_api_writes_atomically_and_checks_save_stats(model, tmp_path):
    m, c = model
    with pytest.raises(ModelError, match="refusing to overwrite the calibration data"):
        onnxfp8.quantize(str(m), str(c), config=onnxfp8.QuantConfig(save_stats=str(c)), output=str(tmp_path / "q.onnx"))
    assert not (tmp_path / "q.onnx").exists()
    res = onnxfp8.quantize(str(m), str(c), output=str(tmp_path / "q.onnx"))
    assert res.output and (tmp_path / "q.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m_calib.npz", "q.onnx"]
