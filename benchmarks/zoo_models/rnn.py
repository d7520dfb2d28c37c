"""Stateful streaming models (a Silero-VAD-style LSTM and a GRU), trained here for a few seconds.

``vad-lstm`` follows the layout of Silero VAD's ONNX export: inputs ``x`` [batch, time, 64] (log-mel frames of
one chunk), ``state`` [2, batch, 128] (the LSTM's h and c stacked: the batch on axis 1) and ``sr`` (an int64
scalar, the sample rate); outputs ``output`` [batch, 1] (speech probability of the chunk) and ``stateN``
[2, batch, 128]. As in Silero, ``sr`` selects the front end through an ONNX ``If`` (16 kHz and 8 kHz
encoders, Conv1d weights read from the outer graph inside the branches). ``gru-stream`` is a plain
``nn.GRU`` streaming classifier: ``x`` and ``h`` [1, batch, 64] (batch on axis 1), outputs ``output`` and
``hN``.

No audio ships with the zoo's packages, so the audio is synthesized (seeded): a stream of silence (low noise),
voiced segments (a gliding F0 of 90-260 Hz with its harmonics shaped by three formants) and unvoiced noise
bursts, at 16 kHz; features are 25 ms / 10 ms log-mel energies (64 bands), standardized. The models are
trained on the frame labels (speech vs not) for 40 Adam steps; calibration and validation data are
chunks of other streams (different seeds), fed in order with the state the FP32 model itself produced on
the previous chunk (the first chunk of a stream starts from zeros), 8 streams per batch: each
``calib/NNNNN.npz`` is one chunk step of 8 streams, the state in its own layout.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ZooModel
from .common import export, threaded_build, write_npz_files

SR = 16000
N_MELS, HOP, WIN, NFFT = 64, 160, 400, 512
CHUNK = 16  # frames per chunk (160 ms)


# -- synthetic speech-like audio and features --------------------------------------------------------
def synth_stream(rng: np.random.Generator, n_frames: int) -> Tuple[np.ndarray, np.ndarray]:
    """(audio [n_frames*HOP + WIN], speech label per sample)."""
    n = n_frames * HOP + WIN
    audio, label = np.zeros(n, np.float64), np.zeros(n, np.int64)
    t0 = 0
    while t0 < n:
        seg = int(rng.uniform(0.08, 0.45) * SR)
        kind = rng.choice(3, p=[0.4, 0.45, 0.15])
        t = np.arange(seg) / SR
        if kind == 1:  # voiced: harmonics of a gliding F0 under three formants
            f0 = np.linspace(rng.uniform(90, 260), rng.uniform(90, 260), seg)
            phase = 2 * np.pi * np.cumsum(f0) / SR
            formants = [(rng.uniform(300, 900), 120), (rng.uniform(900, 2500), 180), (rng.uniform(2500, 3500), 250)]
            y = np.zeros(seg)
            for k in range(1, int(4000 / f0.max()) + 1):
                env = sum(np.exp(-0.5 * ((k * f0 - fc) / bw) ** 2) for fc, bw in formants) + 0.02
                y += env * np.sin(k * phase) / k ** 0.5
            y *= rng.uniform(0.05, 0.4) * np.sqrt(np.clip(np.sin(np.pi * t / t[-1]), 0, None))
        elif kind == 2:  # unvoiced: high-passed noise burst
            y = np.diff(rng.normal(0, 1, seg + 1)) * rng.uniform(0.01, 0.06) * np.hanning(seg)
        else:
            y = np.zeros(seg)
        end = min(n, t0 + seg)
        audio[t0:end] += y[:end - t0]
        label[t0:end] = int(kind != 0)
        t0 = end
    audio += rng.normal(0, rng.uniform(0.001, 0.006), n)  # background noise
    return audio, label


def _mel_fb() -> np.ndarray:
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    imel = lambda m: 700 * (10 ** (m / 2595) - 1)  # noqa: E731
    pts = imel(np.linspace(mel(20), mel(SR / 2), N_MELS + 2))
    bins = np.fft.rfftfreq(NFFT, 1 / SR)
    fb = np.zeros((N_MELS, len(bins)))
    for i in range(N_MELS):
        lo, c, hi = pts[i:i + 3]
        fb[i] = np.clip(np.minimum((bins - lo) / (c - lo), (hi - bins) / (hi - c)), 0, None)
    return fb


def features(audio: np.ndarray, label: np.ndarray, n_frames: int) -> Tuple[np.ndarray, np.ndarray]:
    idx = np.arange(n_frames)[:, None] * HOP + np.arange(WIN)[None]
    frames = audio[idx] * np.hanning(WIN)
    power = np.abs(np.fft.rfft(frames, NFFT)) ** 2
    logmel = np.log(power @ _mel_fb().T + 1e-8)
    y = (label[idx].mean(1) > 0.5).astype(np.float32)
    return logmel.astype(np.float32), y


def dataset(seed: int, streams: int, n_frames: int) -> Tuple[np.ndarray, np.ndarray]:
    """x [streams, n_frames, 64] (raw log-mel), y [streams, n_frames]."""
    rng = np.random.default_rng(seed)
    xs, ys = zip(*(features(*synth_stream(rng, n_frames), n_frames) for _ in range(streams)))
    return np.stack(xs), np.stack(ys)


# -- models ------------------------------------------------------------------------------------------
@torch.jit.script
def _frontend(x: torch.Tensor, sr: torch.Tensor, w16a: torch.Tensor, b16a: torch.Tensor, w16b: torch.Tensor,
              b16b: torch.Tensor, w8a: torch.Tensor, b8a: torch.Tensor, w8b: torch.Tensor, b8b: torch.Tensor):
    if bool(sr == 16000):
        h = torch.relu(F.conv1d(x, w16a, b16a, padding=1))
        return torch.relu(F.conv1d(h, w16b, b16b, padding=1))
    else:
        h = torch.relu(F.conv1d(x, w8a, b8a, padding=2))
        return torch.relu(F.conv1d(h, w8b, b8b, padding=1))


class VADLSTM(nn.Module):
    def __init__(self, mean: np.ndarray, std: np.ndarray, hidden: int = 128):
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(mean).view(1, 1, -1))
        self.register_buffer("std", torch.from_numpy(std).view(1, 1, -1))
        self.c16a, self.c16b = nn.Conv1d(N_MELS, hidden, 3, padding=1), nn.Conv1d(hidden, hidden, 3, padding=1)
        self.c8a, self.c8b = nn.Conv1d(N_MELS, hidden, 5, padding=2), nn.Conv1d(hidden, hidden, 3, padding=1)
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True)
        self.decoder = nn.Conv1d(hidden, 1, 1)

    def frames(self, x, state, sr):
        x = ((x - self.mean) / self.std).transpose(1, 2)
        h = _frontend(x, sr, self.c16a.weight, self.c16a.bias, self.c16b.weight, self.c16b.bias,
                      self.c8a.weight, self.c8a.bias, self.c8b.weight, self.c8b.bias).transpose(1, 2)
        y, (hn, cn) = self.lstm(h, (state[0:1], state[1:2]))
        return self.decoder(F.relu(y).transpose(1, 2)).squeeze(1), torch.cat([hn, cn], 0)  # logits [B, T]

    def forward(self, x, state, sr):
        logits, new_state = self.frames(x, state, sr)
        return torch.sigmoid(logits).mean(1, keepdim=True), new_state


class GRUStream(nn.Module):
    def __init__(self, mean: np.ndarray, std: np.ndarray, hidden: int = 64):
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(mean).view(1, 1, -1))
        self.register_buffer("std", torch.from_numpy(std).view(1, 1, -1))
        self.proj = nn.Linear(N_MELS, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 2)

    def frames(self, x, h, sr=None):
        y, hn = self.gru(torch.tanh(self.proj((x - self.mean) / self.std)), h)
        z = self.out(y)
        return z[..., 1] - z[..., 0], hn

    def forward(self, x, h):
        y, hn = self.gru(torch.tanh(self.proj((x - self.mean) / self.std)), h)
        return torch.softmax(self.out(y[:, -1]), -1), hn


def _train(model, x: np.ndarray, y: np.ndarray, state_shape, steps: int, seed: int) -> float:
    """BCE on the frame labels, whole streams at a time (chunks of a stream in order, state carried)."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    sr = torch.tensor(SR)
    model.train()
    for _ in range(steps):
        idx = rng.choice(len(x), 16, replace=False)
        xb, yb = torch.from_numpy(x[idx]), torch.from_numpy(y[idx])
        state = torch.zeros(state_shape[0], 16, state_shape[1])
        logits, _ = model.frames(xb, state, sr)
        loss = F.binary_cross_entropy_with_logits(logits, yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits, _ = model.frames(torch.from_numpy(x[:64]), torch.zeros(state_shape[0], min(64, len(x)),
                                                                     state_shape[1]), sr)
    return float(((logits > 0).float() == torch.from_numpy(y[:64])).float().mean())


def _stream_batches(model, x: np.ndarray, state_name: str, state_shape, with_sr: bool) -> List[dict]:
    """One npz dict per chunk step: x [B, CHUNK, 64], the state in its layout [L, B, H], sr scalar."""
    out, b = [], len(x)
    state = torch.zeros(state_shape[0], b, state_shape[1])
    with torch.no_grad():
        for t in range(0, x.shape[1] - CHUNK + 1, CHUNK):
            xc = np.ascontiguousarray(x[:, t:t + CHUNK])
            d = {"x": xc, state_name: state.numpy().copy()}
            args = (torch.from_numpy(xc), state)
            if with_sr:
                d["sr"] = np.array(SR, np.int64)
                args = args + (torch.tensor(SR),)
            out.append(d)
            state = model(*args)[1]
    return out


def _builder(kind: str):
    def build(folder: Path, seed: int) -> None:
        torch.manual_seed(seed)
        xtr, ytr = dataset(seed * 1000 + 11, 48, 128)
        mean, std = xtr.reshape(-1, N_MELS).mean(0), xtr.reshape(-1, N_MELS).std(0) + 1e-3
        if kind == "lstm":
            model, sshape, sname, with_sr = VADLSTM(mean, std), (2, 128), "state", True
        else:
            model, sshape, sname, with_sr = GRUStream(mean, std), (1, 64), "h", False
        _train(model, xtr, ytr, sshape, 40, seed)  # 40 steps: frame accuracy ~0.97 on training streams
        calib = _stream_batches(model, dataset(seed * 1000 + 12, 8, 8 * CHUNK)[0], sname, sshape, with_sr)
        val = _stream_batches(model, dataset(seed * 1000 + 13, 8, 8 * CHUNK)[0], sname, sshape, with_sr)
        feed = calib[1]  # a chunk with a non-zero state
        names = ["x", sname] + (["sr"] if with_sr else [])
        outs = ["output", "stateN" if with_sr else "hN"]
        args = tuple(torch.from_numpy(np.asarray(feed[n])) for n in names)
        export(model, args, folder / "model.onnx", names, outs,
               {"x": {0: "batch", 1: "time"}, sname: {1: "batch"}, outs[0]: {0: "batch"}, outs[1]: {1: "batch"}},
               keep_bn=False, check_feed=feed)
        write_npz_files(folder / "calib", calib)
        write_npz_files(folder / "val", val)

    return threaded_build(build)


MODELS: List[ZooModel] = [
    ZooModel("vad-lstm", "rnn", _builder("lstm"), frozenset({"stateful", "smoke"}),
             "Silero-VAD-style streaming LSTM: x [batch, time, 64], state [2, batch, 128] (batch on axis 1), "
             "int64 scalar sr selecting the front end through an If; trained on synthetic speech/silence"),
    ZooModel("gru-stream", "rnn", _builder("gru"), frozenset({"stateful"}),
             "streaming GRU classifier: x [batch, time, 64], h [1, batch, 64] (batch on axis 1)"),
]
