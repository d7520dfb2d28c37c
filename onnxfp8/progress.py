"""A progress bar for long runs (calibration): samples done, samples/s and ETA, redrawn in place on stderr.

It only draws on a terminal: :func:`progress_for` returns ``None`` (no bar at all) when the stream is not a
TTY (CI logs, pipes, files) or with ``--quiet``. No dependency: one ``\\r``-redrawn line, at most every
``min_interval`` seconds, cleared and ended with a newline by :meth:`ProgressBar.close`.

The collector calls the bar as ``bar(samples_done_in_this_pass, pass_number)`` after every batch and
``bar.set_passes(n)`` once it knows how many passes over the data it will make (one max pass, then one per
group of histogrammed tensors). ``bar.begin(label, total)`` gives the number of samples per pass (from the
array headers, see :func:`count_samples`), which the ETA needs; without it the bar shows the rate only.

Between bars, ``bar.phase(text)`` says what the run is doing (``measuring output error: creating the session``):
a :class:`StatusLine`, the text and the time it has taken so far, redrawn twice a second by a daemon thread so a
long silent step (onnx.checker, an onnxruntime session on a large model) still moves; the next bar or
``close()`` clears it. ``check`` reports its progress as text (``outputs: 64 sample(s)``, ``layers: chunk 2/5
...``): :func:`status_for` gives it a StatusLine on a terminal, None otherwise.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import zipfile
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, TextIO

import numpy as np

from onnxfp8.calibrators.data import LABEL_KEYS


def _fmt_time(seconds: float) -> str:
    seconds = int(round(max(seconds, 0.0)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


STATUS_INTERVAL = 0.2  # seconds between two draws of a StatusLine (a draw per batch would flood a slow terminal)


class StatusLine:
    """``checking: layers: chunk 2/5 (12 layer(s)), 96/360 samples  0:41`` on one line, redrawn in place.

    Call it with the current text (throttled to one draw per ``min_interval``); a daemon thread redraws the
    elapsed time every ``tick`` seconds (``tick=None``: no thread). ``close()`` clears the line (the result that
    follows is printed in its place)."""

    def __init__(self, stream: Optional[TextIO] = None, prefix: str = "", min_interval: Optional[float] = None,
                 tick: Optional[float] = 0.5, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.prefix = prefix
        self.min_interval = STATUS_INTERVAL if min_interval is None else min_interval
        self.clock = clock
        self.text = ""
        self._start = clock()
        self._last_draw = -1e9
        self._drawn = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if tick:
            self._thread = threading.Thread(target=self._tick, args=(tick,), daemon=True, name="onnxfp8-status")
            self._thread.start()

    def __call__(self, text: str) -> None:
        with self._lock:
            self.text = str(text)
            now = self.clock()
            if now - self._last_draw >= self.min_interval:
                self._draw(now)

    def line(self, now: Optional[float] = None) -> str:
        now = self.clock() if now is None else now
        head = f"{self.prefix}: " if self.prefix and self.text else self.prefix
        return f"{head}{self.text}  {_fmt_time(now - self._start)}"

    def _draw(self, now: float) -> None:
        if self._stop.is_set():
            return
        text = self.line(now)
        self.stream.write("\r" + text + " " * max(0, self._drawn - len(text)))
        self.stream.flush()
        self._drawn = len(text)
        self._last_draw = now

    def _tick(self, every: float) -> None:
        while not self._stop.wait(every):
            with self._lock:
                if self.text or self.prefix:
                    try:
                        self._draw(self.clock())
                    except (ValueError, OSError):  # the stream was closed under us
                        return

    def close(self) -> None:
        """Stop the thread and clear the line (nothing when nothing was drawn)."""
        with self._lock:
            self._stop.set()
            if self._drawn:
                self.stream.write("\r" + " " * self._drawn + "\r")
                self.stream.flush()
                self._drawn = 0
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)


def status_for(stream: Optional[TextIO] = None, quiet: bool = False, prefix: str = "") -> Optional[StatusLine]:
    """A StatusLine on ``stream`` (stderr) when it is a terminal and not ``quiet``; else None (no output)."""
    stream = stream if stream is not None else sys.stderr
    if quiet or not is_terminal(stream) or os.environ.get("TERM") == "dumb":
        return None
    return StatusLine(stream, prefix)


class ProgressBar:
    """``[#######.......] 448/1024 samples  pass 1/2  85.3 samples/s  ETA 0:17`` on one line."""

    def __init__(self, stream: Optional[TextIO] = None, width: int = 24, min_interval: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.min_interval = min_interval
        self.clock = clock
        self.label = "calibrating"
        self.total: Optional[int] = None
        self.passes = 1
        self._start: Optional[float] = None
        self._last_draw = -1e9
        self._done_before = 0  # samples of the finished passes
        self._pass = 1
        self._in_pass = 0
        self._drawn = 0  # length of the line on screen
        self._base = 0  # samples done at the first report
        self._pending: Optional[float] = None  # time of a report not drawn yet
        self._status: Optional[StatusLine] = None  # the phase() line shown between bars
        self.phases: list = []  # every phase() text, in order

    # -- between bars
    def phase(self, text: str) -> None:
        """Say what the run does now (no sample count): a finished bar stays above it, the next bar or
        ``close()`` clears it."""
        self.phases.append(text)
        if self._start is not None:  # a bar is on screen: keep it, the phase goes below
            self.close()
        self._end_phase()  # each phase counts its own time
        self._status = StatusLine(self.stream, tick=0.5 if is_terminal(self.stream) else None, clock=self.clock)
        self._status(text)

    def _end_phase(self) -> None:
        if self._status is not None:
            self._status.close()
            self._status = None

    # -- what the runner tells us
    def begin(self, label: str, total: Optional[int]) -> None:
        self.label = label  # a phase line stays until the first report draws the bar (a session may take long)
        self.total = total if total and total > 0 else None
        self.passes = 1
        self._start = None
        self._done_before = 0
        self._pass, self._in_pass = 1, 0

    def set_passes(self, passes: int) -> None:
        self.passes = max(int(passes), self._pass)

    def __call__(self, samples: int, pass_no: int = 1) -> None:
        self._end_phase()
        now = self.clock()
        if self._start is None:  # the rate counts from the first report (session creation excluded)
            self._start = now
            self._base = int(samples) if pass_no == self._pass else 0
        if pass_no != self._pass:
            self._done_before += self.total if self.total else self._in_pass
            self._pass = pass_no
            self.passes = max(self.passes, pass_no)
        self._in_pass = int(samples)
        finished = self.total is not None and self._pass >= self.passes and self._in_pass >= self.total
        if finished or now - self._last_draw >= self.min_interval:
            self._draw(now)
        else:
            self._pending = now  # drawn by close() unless a later report draws it

    # -- drawing
    def line(self, now: Optional[float] = None) -> str:
        now = self.clock() if now is None else now
        elapsed = max(now - (self._start if self._start is not None else now), 1e-9)
        done = self._done_before + self._in_pass
        rate = (done - self._base) / elapsed if self._start is not None and elapsed > 1e-6 else 0.0
        parts = [self.label]
        if self.total:
            frac = min(1.0, self._in_pass / self.total)
            fill = int(round(frac * self.width))
            parts.append("[" + "#" * fill + "." * (self.width - fill) + "]")
            parts.append(f"{min(self._in_pass, self.total)}/{self.total} samples")
        else:
            parts.append(f"{self._in_pass} samples")
        if self.passes > 1:
            parts.append(f"pass {self._pass}/{self.passes}")
        parts.append(f"{rate:.1f} samples/s" if rate else "-- samples/s")
        if self.total and rate > 0:
            left = self.total * self.passes - done
            parts.append(f"ETA {_fmt_time(left / rate)}")
        return "  ".join(parts)

    def _draw(self, now: float) -> None:
        text = self.line(now)
        pad = max(0, self._drawn - len(text))
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self._drawn = len(text)
        self._last_draw = now
        self._pending = None

    def close(self) -> None:
        """Draw the last report if it was throttled, and end the line (nothing when nothing was drawn); clear
        a phase line."""
        self._end_phase()
        if self._start is not None:
            if self._pending is not None:  # the last report was throttled: show it (as of its own time)
                self._draw(self._pending)
            self.stream.write("\n")
            self.stream.flush()
        self._start = None
        self._drawn = 0


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def progress_for(stream: Optional[TextIO] = None, quiet: bool = False) -> Optional[ProgressBar]:
    """A bar on ``stream`` (stderr) when it is a terminal and not ``quiet``; else None (no output at all)."""
    stream = stream if stream is not None else sys.stderr
    if quiet or not is_terminal(stream) or os.environ.get("TERM") == "dumb":
        return None
    return ProgressBar(stream)


def _header_shape(f: Any) -> tuple:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return tuple(read(f)[0])


def _file_shape(path: str, only: Optional[str]) -> Optional[tuple]:
    """(input name, shape) of the first model input in a .npz / .npy file, from its header (no data read)."""
    try:
        if path.endswith(".npy"):
            with open(path, "rb") as f:
                return only, _header_shape(f)
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n.endswith(".npy") and n[:-4] not in LABEL_KEYS)
            with z.open(name) as f:
                return name[:-4], _header_shape(f)
    except Exception:
        return None


def count_samples(data: Any) -> Optional[int]:
    """Samples one pass over calibration data yields (bounded by its limit), cheaply: array headers of the
    files (a file one rank short of the model input is one sample, as the reader treats it), or the arrays of
    an in-memory list. None when it cannot be known without reading the data."""
    limit = getattr(data, "limit", None)
    files = getattr(data, "_files", None)
    specs = getattr(data, "specs", {}) or {}

    whole = bool(specs) and all(getattr(sp, "batch_axis", 0) is None for sp in specs.values())

    def rows(name: Optional[str], shape: tuple) -> Optional[int]:
        spec = specs.get(name) if name is not None else None
        ax = getattr(spec, "batch_axis", 0) if spec is not None else 0
        if whole:
            return 1  # no batch axis: a file is one sample
        if ax is None:
            return None  # an input without a batch axis does not count samples
        if spec is not None and spec.shape and len(shape) == len(spec.shape) - 1:
            return 1
        return int(shape[ax]) if len(shape) > ax else 1

    total = 0
    if files is not None:
        only = next(iter(specs)) if len(specs) == 1 else None
        for f in files:
            found = _file_shape(f, only)
            r = rows(*found) if found is not None else None
            if r is None:
                return limit
            total += r
            if limit is not None and total >= limit:
                return limit
        return total
    src = getattr(data, "source", None)
    if isinstance(src, (list, tuple)):
        for item in src:
            try:
                name = next((k for k in item if getattr(specs.get(k), "batch_axis", 0) is not None), None)
                name = name if name is not None else next(iter(item.keys()))
                total += rows(name, np.shape(item[name]))
            except Exception:
                return limit
        return min(total, limit) if limit is not None else total
    return limit


# -- the display as a step of its own --------------------------------------------------------------------
class ProgressObserver:
    """A progress sink as an observer of the collector's passes (collector.collect ``observers``): every batch
    reports ``sink(samples_done_in_this_pass, pass_number)``, the number of passes ``sink.set_passes(n)``."""

    def __init__(self, sink: Callable[..., None]) -> None:
        self.sink = sink

    def passes(self, n: int) -> None:
        if hasattr(self.sink, "set_passes"):
            self.sink.set_passes(n)

    def batch(self, pass_no: int, done: int, batch: Any = None, outputs: Any = None) -> None:
        self.sink(done, pass_no)


@contextmanager
def stage(sink: Any, label: str, total: Any = None) -> Iterator[Any]:
    """One stage on the display (``with stage(bar, "calibrating", n) as bar:``): ``begin(label, total)`` on
    entry and ``close()`` on exit when the sink has them; yields the sink (None: no display). ``total``: the
    samples per pass, or a function computing them (called only when there is a display)."""
    if sink is not None and hasattr(sink, "begin"):
        sink.begin(label, total() if callable(total) else total)
    try:
        yield sink
    finally:
        if sink is not None and hasattr(sink, "close"):
            sink.close()
