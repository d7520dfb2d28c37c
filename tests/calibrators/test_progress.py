"""The calibration progress bar: drawn only on a terminal (a fake TTY stream here) and not with --quiet; shows
samples, samples/s and ETA from a controlled clock; counts samples from array headers without reading data."""
from __future__ import annotations

import io

import numpy as np
import pytest
from click.testing import CliRunner

import onnxfp8
from onnxfp8.calibrators.data import CalibrationData, InputSpec
from onnxfp8.progress import ProgressBar, StatusLine, count_samples, progress_for, status_for


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_bar_only_on_a_terminal_and_not_quiet():
    assert isinstance(progress_for(FakeTTY()), ProgressBar)
    assert progress_for(io.StringIO()) is None  # a pipe / CI log
    assert progress_for(FakeTTY(), quiet=True) is None


def test_rate_and_eta_over_two_passes():
    out, clock = FakeTTY(), Clock()
    bar = ProgressBar(out, width=10, min_interval=0.0, clock=clock)
    bar.begin("calibrating", 100)
    bar(0, 1)  # the clock starts at the first report
    clock.t += 2.0
    bar(50, 1)
    assert bar.line() == "calibrating  [#####.....]  50/100 samples  25.0 samples/s  ETA 0:02"
    bar.set_passes(2)
    clock.t += 2.0
    bar(100, 1)
    clock.t += 4.0
    bar(100, 2)  # 200 samples in 8 s: 25/s, nothing left
    assert bar.line() == "calibrating  [##########]  100/100 samples  pass 2/2  25.0 samples/s  ETA 0:00"
    clock.t += 1.0
    bar.close()
    text = out.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1
    frames = text.rstrip("\n").split("\r")[1:]
    assert frames[1].startswith("calibrating  [#####.....]  50/100") and "pass 2/2" in frames[-1]
    # every frame overwrites the previous one completely (padded to its length)
    assert all(len(b) >= len(a.rstrip()) for a, b in zip(frames, frames[1:]))


def test_no_total_shows_the_rate_only_and_redraws_are_throttled():
    out, clock = FakeTTY(), Clock()
    bar = ProgressBar(out, min_interval=0.5, clock=clock)
    for i in range(1, 11):
        clock.t += 0.1
        bar(8 * i, 1)
    # 72 samples in the 0.9 s since the first report (the first batch's time is not known)
    assert bar.line() == "calibrating  80 samples  80.0 samples/s"
    assert out.getvalue().count("\r") == 2  # at 0.0 s and 0.5 s
    bar.close()
    ProgressBar(out).close()  # never drawn: writes nothing
    assert out.getvalue().count("\n") == 1


def test_count_samples_from_headers(tmp_path):
    specs = {"x": InputSpec("x", np.dtype(np.float32), ("N", 3))}
    np.savez(tmp_path / "a.npz", x=np.zeros((5, 3), np.float32))
    np.savez(tmp_path / "b.npz", x=np.zeros(3, np.float32))  # one sample without the batch axis
    np.save(tmp_path / "c.npy", np.zeros((2, 3), np.float32))
    data = CalibrationData(str(tmp_path), specs)
    assert count_samples(data) == 8 == data.count()
    assert count_samples(CalibrationData(str(tmp_path), specs, limit=6)) == 6
    mem = CalibrationData([{"x": np.zeros((4, 3))}, {"x": np.zeros(3)}], specs)
    assert count_samples(mem) == 5 == mem.count()


def test_quantize_drives_the_bar(example_models):
    ex = example_models["mlp"]
    out, clock = FakeTTY(), Clock()

    class Recording(ProgressBar):
        calls = []

        def __call__(self, samples, pass_no=1):
            self.calls.append((samples, pass_no))
            clock.t += 0.25
            super().__call__(samples, pass_no)

    bar = Recording(out, min_interval=0.0, clock=clock)
    onnxfp8.quantize(str(ex["model"]), str(ex["calib"]), config=onnxfp8.QuantConfig(batch_size=8,
                                                                                      calibration="mse"),
                     progress=bar)
    # one max pass and one histogram pass over 32 samples in batches of 8, then the summary phase (the quantized
    # model on the first 8 calibration samples) on its own bar
    assert bar.calls == [(8, 1), (16, 1), (24, 1), (32, 1), (8, 2), (16, 2), (24, 2), (32, 2), (8, 1)]
    lines = [seg.split("\r")[-1] for seg in out.getvalue().rstrip("\n").split("\n")]
    assert lines[0].startswith("calibrating  [########################]  32/32 samples  pass 2/2  32.0 samples/s  ETA 0:00")
    assert lines[-1].startswith("measuring output error  [########################]  8/8 samples")
    assert out.getvalue().endswith("\n")
    # between the bars a phase line says what runs (it sat at 100 % for seconds without a word): every pass,
    # the export, onnx.checker, the session of the summary; each is cleared by what comes next
    assert bar.phases[0] == "quantizing: canonicalize" and "quantizing: calibrate" in bar.phases
    tail = bar.phases[bar.phases.index("quantizing: calibrate") + 1:]
    assert tail[-3:] == ["exporting the quantized model", "checking the quantized model (onnx.checker)",
                         "measuring output error: creating the onnxruntime session"]
    assert "\rmeasuring output error: creating the onnxruntime session  0:00" in out.getvalue()


def test_status_line_redraws_in_place_and_clears():
    out, clock = FakeTTY(), Clock()
    st = StatusLine(out, "checking", min_interval=1.0, tick=None, clock=clock)
    st("outputs: 16/64 sample(s)")
    clock.t += 0.5
    st("outputs: 32/64 sample(s)")  # throttled: within min_interval of the last draw
    clock.t += 61.0
    st("layers: chunk 1/2 (3 layer(s)), 16/64 sample(s)")
    assert out.getvalue() == ("\rchecking: outputs: 16/64 sample(s)  0:00"
                              "\rchecking: layers: chunk 1/2 (3 layer(s)), 16/64 sample(s)  1:02")
    st.close()
    assert out.getvalue().endswith("\r" + " " * len("checking: layers: chunk 1/2 (3 layer(s)), 16/64 sample(s)  1:02") + "\r")
    st("late")  # after close: nothing more
    assert not out.getvalue().endswith("late  1:02")
    assert status_for(io.StringIO()) is None and status_for(FakeTTY(), quiet=True) is None
    live = status_for(FakeTTY(), prefix="checking")
    assert isinstance(live, StatusLine)
    live.close()


def test_status_line_ticks_while_a_step_is_silent():
    out = FakeTTY()
    st = StatusLine(out, "quantizing", tick=0.02)
    st("checking the model")
    import time

    deadline = time.monotonic() + 5
    while out.getvalue().count("\r") < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    st.close()
    assert out.getvalue().count("\rquantizing: checking the model  0:0") >= 2  # redrawn without a call


@pytest.mark.parametrize("quiet", [False, True])
def test_cli_prints_no_bar_when_stderr_is_not_a_terminal(example_models, tmp_path, quiet):
    ex = example_models["mlp"]
    args = ["quantize", str(ex["model"]), "--calib", str(ex["calib"]), "-o", str(tmp_path / "q.onnx")]
    r = CliRunner().invoke(cli_group(), args + (["--quiet"] if quiet else []))
    assert r.exit_code == 0
    assert "samples/s" not in r.output and "\r" not in r.output


def cli_group():
    from onnxfp8.cli import cli

    return cli
