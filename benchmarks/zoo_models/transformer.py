"""The zoo's transformers: HuggingFace architectures built from their config classes, exported by torch.

Nothing is downloaded: every model is ``XConfig(...)`` + ``XForY(config)`` with seeded random weights, at a
small size (2-4 layers, hidden 128-256) so each exports in seconds. The export is
``torch.onnx.export(dynamo=False, opset_version=17)`` (the TorchScript exporter) with dynamic batch (and, for
text and waveforms, sequence) axes, and the graph is kept as it comes: shape subgraphs
(Shape/Gather/Unsqueeze/Concat), the attention-mask arithmetic (Cast/Sub/Mul/Where/Expand), Gathers on
embedding tables, GPT-2's tied LM head (the embedding table read by a Gather and a MatMul). Attention is
``attn_implementation="eager"`` (transformers 5.x picks SDPA otherwise, which the TorchScript exporter writes
as a different, fused-looking pattern; eager is what most deployed exports contain). Every export passes
``onnx.checker.check_model(full_check=True)`` and is run in onnxruntime on a validation batch of another shape
than the one traced, against torch (relative L2 error < 1e-3, < 2e-2 for the FP16 export): the build fails
otherwise.

Why the weights are not just HuggingFace's init. Random-init transformers have nearly Gaussian activations
of unit scale everywhere, which every quantizer handles; pretrained ones do not. So, as in
``onnxfp8/examples/build.py``'s transformer (its docstring gives the sources), after HuggingFace's init:

* **Linear weights** are redrawn with a std per matrix ~U(0.02, 0.05) and Student-t (df=5) tails (max/std ~8-15
  as in checkpoints), biases N(0, 0.02); word embeddings std 0.05 with the same tails, position embeddings
  std 0.02. Query and key projections are 2x wider (std 0.04-0.1), so attention scores vary by a few units
  and attention is peaked as in trained models (at BERT's 0.02 init every head averages the whole sequence,
  every [CLS] vector is nearly the same, and the samples differ by ~1 % of the output's power).
  Convolutions (ViT/DeiT/Swin patch embeddings, Whisper's and wav2vec2's front ends) keep
  HuggingFace's init.
* **Outlier channels.** In every LayerNorm (and T5's RMS norm) over a given width, the same 2 channels are given
  an output magnitude ~U(10, 20) with a large beta (+-0.2-0.5 of it, fixed sign), the other channels ~1
  (+-10 %) with beta N(0, 0.05) (pretrained BERT, GPT-2, ViT and Whisper all have such dimensions: Kovaleva et
  al. 2021, Bondarenko et al. 2021, Dettmers et al. 2022, Darcet et al. 2023). The gammas are *settled* on
  data, as the example builder does: one forward pass on a settling batch (its own seed, neither calibration
  nor validation data) where a pre-hook on each norm sets its gamma to the one giving the target output
  magnitudes on the data reaching it, so upstream norms are already settled; the outliers then stay 10-20x at
  every depth instead of compounding.
* **Classifier heads** (sequence/image classification, the CTC head) are set in the same pass the way training
  leaves them: the weight reads the directions in which its input features vary across samples (a random mix
  of their top 8 principal directions on the settling batch, plus 10 % of the random weight), scaled so the
  logits vary by ~2 across samples, with a bias centring every class (+ N(0, 0.1) priors). A random head
  instead reads mostly the component every sample shares (random-weight encoders give nearly the same [CLS]
  vector for every input), and amplifying the small remainder made the logits' SQNR ~15 dB worse than any
  layer's.

Data (calibration and validation disjoint: different seeds, and for images different photographs):

* text: token ids from a Zipf-like law over the vocabulary (rank r has probability ~ 1/(r + 2.7)), with the
  tokenizer's special tokens (BERT [CLS] ... [SEP], RoBERTa <s> ... </s>, GPT-2 and T5 an end token), lengths
  from 8 to the full 64 (a third of the samples full), right padding with the model's pad id and a 0/1 int64
  ``attention_mask``; every batch is padded to 64 tokens;
* images (ViT, DeiT, Swin): random crops of scikit-image's bundled photographs, resized to 64x64, flipped at
  random, normalized with ImageNet's mean/std;
* audio: speech-like waveforms at 16 kHz (voiced syllables: a gliding pitch of 90-260 Hz with harmonics
  shaped by 3 moving formants, 3-6 syllables a second, unvoiced noise bursts, pauses, background noise at
  15-35 dB SNR, random gain); wav2vec2 reads them normalized (zero mean, unit variance, as its feature
  extractor does), Whisper reads their log-mel features from transformers' ``WhisperFeatureExtractor``
  (80 bins, 2 s = 200 frames: the encoder's positional table fixes the length).

Files: ``calib/`` and ``val/`` hold 4 files of 16 samples each (64 + 64), one batch per file.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from zoo_models import ZooModel
from zoo_models.common import fitted_head

OPSET = 17
SEQ = 64            # text batches are padded to this many tokens
IMAGE = 64          # ViT / DeiT / Swin input size
SR = 16000
FILES = 4           # calibration / validation files per model
PER_FILE = 16       # samples per file
OUTLIERS = 2        # outlier channels per LayerNorm width


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def zipf_tokens(rng: np.random.Generator, n: int, vocab: int, first_regular: int, *, bos: Optional[int],
                eos: Optional[int], pad: int, seq: int = SEQ, min_len: int = 8) -> Tuple[np.ndarray, np.ndarray]:
    """``n`` right-padded token sequences of ``seq`` ids and their 0/1 int64 attention masks. Regular tokens
    are ids ``first_regular..vocab-1`` drawn with Zipf-like frequencies over a random rank order."""
    regular = vocab - first_regular
    ranks = np.arange(regular)
    p = 1.0 / (ranks + 2.7)
    p /= p.sum()
    order = np.random.default_rng(12345).permutation(regular) + first_regular  # the same "language" each call
    full = rng.random(n) < 1 / 3
    lengths = np.where(full, seq, rng.integers(min_len, seq + 1, size=n))
    ids = np.full((n, seq), pad, dtype=np.int64)
    mask = np.zeros((n, seq), dtype=np.int64)
    for i, L in enumerate(lengths):
        toks = order[rng.choice(regular, size=L, p=p)]
        if bos is not None:
            toks[0] = bos
        if eos is not None:
            toks[L - 1] = eos
        ids[i, :L] = toks
        mask[i, :L] = 1
    return ids, mask


# photographs for calibration and for validation: disjoint sets of images
_CALIB_PHOTOS = ("astronaut", "coffee", "rocket", "camera", "grass", "brick")
_VAL_PHOTOS = ("chelsea", "hubble_deep_field", "immunohistochemistry", "coins", "gravel", "clock")
_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None]
_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]


def photo_crops(rng: np.random.Generator, n: int, size: int, split: str) -> np.ndarray:
    """``n`` random crops [n, 3, size, size] (ImageNet-normalized float32) of scikit-image's photographs:
    a random square of 30-100 % of the shorter side, resized, flipped half the time."""
    import skimage.data
    from skimage.transform import resize

    names = _CALIB_PHOTOS if split == "calib" else _VAL_PHOTOS
    photos = []
    for name in names:
        img = np.asarray(getattr(skimage.data, name)())
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        photos.append(img[:, :, :3].astype(np.float32) / 255.0)
    out = np.empty((n, 3, size, size), dtype=np.float32)
    for i in range(n):
        img = photos[rng.integers(len(photos))]
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.3, 1.0))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = resize(img[y:y + side, x:x + side], (size, size), anti_aliasing=True)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = (crop.transpose(2, 0, 1) - _MEAN) / _STD
    return out


def speech_like(rng: np.random.Generator, n: int, samples: int, sr: int = SR) -> np.ndarray:
    """``n`` speech-like waveforms [n, samples] float32 (see the module docstring)."""
    t = np.arange(samples) / sr
    out = np.empty((n, samples), dtype=np.float32)
    for i in range(n):
        x = np.zeros(samples)
        pos = int(rng.uniform(0.0, 0.3) * sr)
        rate = rng.uniform(3.0, 6.0)  # syllables per second
        while pos < samples:
            dur = int(sr * rng.uniform(0.6, 1.4) / rate)
            end = min(samples, pos + dur)
            tt = t[pos:end] - t[pos]
            if rng.random() < 0.8:  # voiced
                f0 = rng.uniform(90, 260) * (1 + rng.uniform(-0.15, 0.15) * tt / max(tt[-1], 1e-3))
                phase = 2 * np.pi * np.cumsum(f0) / sr
                formants = rng.uniform([300, 900, 2200], [900, 2300, 3200])
                seg = np.zeros_like(tt)
                for h in range(1, 30):
                    fh = h * f0.mean()
                    if fh > sr / 2 - 500:
                        break
                    amp = sum(1.0 / (1 + ((fh - F) / (80 + 0.1 * F)) ** 2) for F in formants) / h ** 0.5
                    seg += amp * np.sin(h * phase)
            else:  # unvoiced: high-passed noise burst
                noise = rng.standard_normal(len(tt))
                seg = np.diff(noise, prepend=0.0) * 0.5
            env = np.sin(np.pi * np.linspace(0, 1, len(tt))) ** 0.7
            x[pos:end] += seg * env * rng.uniform(0.3, 1.0)
            pos = end + (int(sr * rng.uniform(0.05, 0.5)) if rng.random() < 0.25 else int(sr * 0.02))
        sig = np.sqrt(np.mean(x ** 2)) + 1e-9
        snr_db = rng.uniform(15, 35)
        x += rng.standard_normal(samples) * sig / 10 ** (snr_db / 20)
        x *= rng.uniform(0.05, 0.5) / (np.abs(x).max() + 1e-9)
        out[i] = x
    return out


def _normalize_wave(x: np.ndarray) -> np.ndarray:
    return ((x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-7)).astype(np.float32)


def _whisper_features(rng: np.random.Generator, n: int, frames: int, mels: int) -> np.ndarray:
    from transformers import WhisperFeatureExtractor

    seconds = frames * 160 / SR
    fe = WhisperFeatureExtractor(feature_size=mels, sampling_rate=SR, hop_length=160, n_fft=400,
                                 chunk_length=int(round(seconds)))
    waves = speech_like(rng, n, int(seconds * SR))
    feats = fe(list(waves), sampling_rate=SR, return_tensors="np")["input_features"]
    return np.ascontiguousarray(feats[:, :, :frames], dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# realistic weights
# --------------------------------------------------------------------------------------------------
def _t_noise(rng: np.random.Generator, shape, std: float, df: float = 5.0) -> np.ndarray:
    x = rng.standard_t(df, size=shape) * math.sqrt((df - 2.0) / df)
    return (x * std).astype(np.float32)


# query and key projections (BERT/ViT/Swin, DistilBERT, BART-style, T5): their weights get QK_GAIN
_QK = {"query", "key", "q_lin", "k_lin", "q_proj", "k_proj", "q", "k"}
QK_GAIN = 2.0


def _is_norm(mod) -> bool:
    import torch
    name = type(mod).__name__
    w = getattr(mod, "weight", None)
    return (isinstance(mod, torch.nn.LayerNorm) or name.endswith("LayerNorm") or name.endswith("RMSNorm")) \
        and isinstance(w, torch.nn.Parameter) and w.dim() == 1


def redraw_weights(model, rng: np.random.Generator, skip: Sequence[str] = ()) -> None:
    """Linear weights and embeddings as described in the module docstring (in place)."""
    import torch

    with torch.no_grad():
        for name, mod in model.named_modules():
            if any(name == s or name.startswith(s + ".") for s in skip):
                continue
            conv1d = type(mod).__name__ == "Conv1D"  # GPT-2's Linear, weight [in, out], q|k|v fused in c_attn
            if isinstance(mod, torch.nn.Linear) or conv1d:
                if any(mod.weight is e.weight for e in model.modules() if isinstance(e, torch.nn.Embedding)):
                    continue  # a tied LM head: it is the embedding table
                std = rng.uniform(0.02, 0.05)
                w = _t_noise(rng, tuple(mod.weight.shape), std)
                leaf = name.rsplit(".", 1)[-1]
                if leaf in _QK:
                    w *= QK_GAIN
                elif conv1d and leaf == "c_attn":
                    w[:, : 2 * w.shape[1] // 3] *= QK_GAIN
                mod.weight.copy_(torch.from_numpy(w))
                if mod.bias is not None:
                    mod.bias.copy_(torch.from_numpy((0.02 * rng.standard_normal(mod.bias.shape[0])).astype(np.float32)))
            elif isinstance(mod, torch.nn.Embedding):
                std = 0.02 if "position" in name else 0.05
                mod.weight.copy_(torch.from_numpy(_t_noise(rng, tuple(mod.weight.shape), std)))
                if mod.padding_idx is not None:
                    mod.weight[mod.padding_idx].zero_()


def settle(model, feeds: Dict[str, "object"], rng: np.random.Generator, head: Optional[str] = None,
           forward: Optional[Callable] = None) -> Dict[int, List[int]]:
    """One forward pass on ``feeds`` that sets every norm's gamma to give its target magnitudes (outlier
    channels 10-20x) on the data reaching it, and rescales/centres the ``head`` Linear. Returns the
    outlier channels per width."""
    import torch

    outliers: Dict[int, np.ndarray] = {}
    signs: Dict[int, np.ndarray] = {}
    hooks = []

    def norm_hook(mod, args):
        x = args[0].detach().double()
        width = x.shape[-1]
        if width not in outliers:
            outliers[width] = np.sort(rng.choice(width, size=min(OUTLIERS, width), replace=False))
            signs[width] = rng.choice([-1.0, 1.0], size=len(outliers[width]))
        oc = outliers[width]
        target = 1.0 + 0.1 * rng.standard_normal(width)
        target[oc] = rng.uniform(10.0, 20.0, size=len(oc))
        has_beta = getattr(mod, "bias", None) is not None
        eps = getattr(mod, "eps", None) or getattr(mod, "variance_epsilon", 1e-6)
        if isinstance(mod, torch.nn.LayerNorm):
            z = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
        else:  # RMS norm (T5)
            z = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
        z = z.reshape(-1, width).numpy()
        m1, m2 = z.mean(0), np.maximum((z ** 2).mean(0), 1e-6)
        beta = np.zeros(width)
        if has_beta:
            beta = 0.05 * rng.standard_normal(width)
            beta[oc] = target[oc] * rng.uniform(0.2, 0.5, size=len(oc)) * signs[width]
        gamma = (-beta * m1 + np.sqrt(np.maximum((beta * m1) ** 2 + m2 * (target ** 2 - beta ** 2), 0.0))) / m2
        with torch.no_grad():
            mod.weight.copy_(torch.from_numpy(gamma.astype(np.float32)))
            if has_beta:
                mod.bias.copy_(torch.from_numpy(beta.astype(np.float32)))

    def head_hook(mod, args):
        x = args[0].detach().double().reshape(-1, args[0].shape[-1])
        weight, bias = fitted_head(x, mod.weight.detach().double(), rng)  # a trained classifier's head
        with torch.no_grad():
            mod.weight.copy_(weight)
            if mod.bias is not None:
                mod.bias.copy_(bias)

    for name, mod in model.named_modules():
        if _is_norm(mod):
            hooks.append(mod.register_forward_pre_hook(norm_hook))
        elif head is not None and name == head:
            hooks.append(mod.register_forward_pre_hook(head_hook))
    try:
        with torch.no_grad():
            (forward or model)(**feeds)
    finally:
        for h in hooks:
            h.remove()
    return {k: [int(c) for c in v] for k, v in outliers.items()}


# --------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------
def _wrap(model, inputs: Sequence[str], output: int = 0):
    import torch

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *args):
            out = self.m(**dict(zip(inputs, args)), return_dict=False)
            return out[output] if isinstance(out, (tuple, list)) else out

    return Wrapper(model).eval()


def _to_torch(arrays: Dict[str, np.ndarray], fp16: bool, bf16: bool = False):
    import torch

    out = {}
    for k, v in arrays.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        if t.is_floating_point() and (fp16 or bf16):
            t = t.half() if fp16 else t.to(torch.bfloat16)
        out[k] = t
    return out


def export(model, inputs: Sequence[str], output_name: str, dynamic: Dict[str, Dict[int, str]],
           trace_feed: Dict[str, np.ndarray], check_feed: Dict[str, np.ndarray], path: Path,
           fp16: bool = False, out_dynamic: Optional[Dict[int, str]] = None, bf16: bool = False) -> None:
    """Export ``model`` (called with keyword ``inputs``) to ``path``, check it with onnx.checker and run it in
    onnxruntime on ``check_feed`` (another shape than ``trace_feed``) against torch. ``bf16``: the model in
    bfloat16 (``model.to(torch.bfloat16)``); onnxruntime's CPU provider cannot run it, so the check runs its
    float32 twin (onnxfp8.bfloat16) against torch computing in bfloat16."""
    import onnx
    import onnxruntime as ort
    import torch

    wrapper = _wrap(model, inputs)
    if fp16:
        wrapper = wrapper.half()
    if bf16:
        wrapper = wrapper.to(torch.bfloat16)
    trace = _to_torch(trace_feed, fp16, bf16)
    axes = dict(dynamic)
    axes[output_name] = out_dynamic if out_dynamic is not None else {0: "batch"}
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, tuple(trace[k] for k in inputs), str(tmp), input_names=list(inputs),
                          output_names=[output_name], dynamic_axes=axes, opset_version=OPSET, dynamo=False,
                          do_constant_folding=True)
    wrapper.eval()  # the exporter restores the module's mode: keep eval for the reference run
    proto = onnx.load(str(tmp))
    onnx.checker.check_model(proto, full_check=True)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if bf16:
        from onnxfp8.modelio import make_session

        sess = make_session(proto, level="disable")  # the float32 twin
    else:
        sess = ort.InferenceSession(str(tmp), opts, providers=["CPUExecutionProvider"])
    feed = {k: (v.astype(np.float16) if fp16 and v.dtype.kind == "f" else v) for k, v in check_feed.items()}
    got = sess.run(None, feed)[0].astype(np.float64)
    with torch.no_grad():
        want = wrapper(*[_to_torch(check_feed, fp16, bf16)[k] for k in inputs]).double().numpy()
    if got.shape != want.shape:
        raise RuntimeError(f"{path}: onnxruntime gives shape {got.shape}, torch {want.shape}")
    rel = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12))
    if not rel < (5e-2 if bf16 else 2e-2 if fp16 else 1e-3):
        raise RuntimeError(f"{path}: onnxruntime and torch disagree (relative L2 error {rel:.3g})")
    os.replace(tmp, path)


def write_batches(folder: Path, arrays: Dict[str, np.ndarray], fp16: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    n = next(iter(arrays.values())).shape[0]
    for i, start in enumerate(range(0, n, PER_FILE)):
        part = {k: (v[start:start + PER_FILE].astype(np.float16) if fp16 and v.dtype.kind == "f"
                    else v[start:start + PER_FILE]) for k, v in arrays.items()}
        np.savez(folder / f"{i:05d}.npz", **part)


# --------------------------------------------------------------------------------------------------
# the models
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Spec:
    name: str
    make: Callable[[], object]                        # the torch model (random init; torch seeded before)
    data: Callable[[np.random.Generator, int, str], Dict[str, np.ndarray]]  # (rng, n, split) -> inputs
    inputs: Tuple[str, ...]
    output: str
    dynamic: Dict[str, Dict[int, str]]
    head: Optional[str] = None                        # the classifier Linear to centre
    out_dynamic: Optional[Dict[int, str]] = None
    fp16: bool = False
    bf16: bool = False  # exported in bfloat16 (its inputs here are token ids: the data files do not change)
    skip_redraw: Tuple[str, ...] = ()


def _build(spec: _Spec, folder: Path, seed: int) -> None:
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 7])
    model = spec.make().eval()
    redraw_weights(model, rng, spec.skip_redraw)
    settle_feed = spec.data(np.random.default_rng([seed, 1000]), 64, "calib")
    settle(model, _to_torch(settle_feed, False), rng, head=spec.head)
    calib = spec.data(np.random.default_rng([seed, 1]), FILES * PER_FILE, "calib")
    val = spec.data(np.random.default_rng([seed, 2]), FILES * PER_FILE, "val")
    trace = {k: v[:2] for k, v in settle_feed.items()}
    check = {k: v[:3] for k, v in val.items()}
    if "attention_mask" in check:  # another sequence length than the traced one, with padding
        ln = 40
        check = {k: v[:, :ln].copy() for k, v in check.items()}
        check["attention_mask"][0, 30:] = 0
    elif spec.name.startswith("wav2vec2"):
        check = {k: v[:, : v.shape[1] * 3 // 4] for k, v in check.items()}
    export(model, spec.inputs, spec.output, spec.dynamic, trace, check, folder / "model.onnx", fp16=spec.fp16,
           out_dynamic=spec.out_dynamic, bf16=spec.bf16)
    write_batches(folder / "calib", calib, spec.fp16)
    write_batches(folder / "val", val, spec.fp16)


def _text_axes(*names: str) -> Dict[str, Dict[int, str]]:
    return {n: {0: "batch", 1: "sequence"} for n in names}


VOCAB = 8192


def _bert():
    from transformers import BertConfig, BertForSequenceClassification
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
        max_position_embeddings=128, num_labels=3, attn_implementation="eager"))


def _bert_data(rng, n, split):  # [PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, regular ids from 999 on
    ids, mask = zipf_tokens(rng, n, VOCAB, 999, bos=101, eos=102, pad=0)
    return {"input_ids": ids, "attention_mask": mask}


def _distilbert():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification
    return DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=VOCAB, dim=256, n_layers=3, n_heads=4, hidden_dim=1024, max_position_embeddings=128,
        num_labels=2, attn_implementation="eager"))


def _roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification
    return RobertaForSequenceClassification(RobertaConfig(
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
        max_position_embeddings=SEQ + 2, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        num_labels=3, attn_implementation="eager"))


def _roberta_data(rng, n, split):  # <s>=0, <pad>=1, </s>=2
    ids, mask = zipf_tokens(rng, n, VOCAB, 4, bos=0, eos=2, pad=1)
    return {"input_ids": ids, "attention_mask": mask}


def _albert():
    from transformers import AlbertConfig, AlbertForSequenceClassification
    return AlbertForSequenceClassification(AlbertConfig(
        vocab_size=VOCAB, embedding_size=128, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=1024, max_position_embeddings=128, num_labels=3, attn_implementation="eager"))


def _albert_data(rng, n, split):  # <pad>=0, [CLS]=2, [SEP]=3
    ids, mask = zipf_tokens(rng, n, VOCAB, 5, bos=2, eos=3, pad=0)
    return {"input_ids": ids, "attention_mask": mask}


GPT2_VOCAB = 4096


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=GPT2_VOCAB, n_positions=128, n_embd=256, n_layer=4, n_head=4, bos_token_id=GPT2_VOCAB - 1,
        eos_token_id=GPT2_VOCAB - 1, attn_implementation="eager"))


def _gpt2_data(rng, n, split):  # <|endoftext|> is the last id, also used as padding
    ids, mask = zipf_tokens(rng, n, GPT2_VOCAB - 1, 0, bos=None, eos=GPT2_VOCAB - 1, pad=GPT2_VOCAB - 1)
    return {"input_ids": ids, "attention_mask": mask}


def _t5():
    from transformers import T5Config, T5EncoderModel
    return T5EncoderModel(T5Config(
        vocab_size=VOCAB, d_model=256, d_kv=64, d_ff=768, num_layers=4, num_heads=4,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, attn_implementation="eager"))


def _t5_data(rng, n, split):  # <pad>=0, </s>=1, <unk>=2
    ids, mask = zipf_tokens(rng, n, VOCAB, 3, bos=None, eos=1, pad=0)
    return {"input_ids": ids, "attention_mask": mask}


def _vit_cfg(cls):
    return cls(image_size=IMAGE, patch_size=8, num_channels=3, hidden_size=192, num_hidden_layers=4,
               num_attention_heads=3, intermediate_size=768, num_labels=10, attn_implementation="eager")


def _vit():
    from transformers import ViTConfig, ViTForImageClassification
    return ViTForImageClassification(_vit_cfg(ViTConfig))


def _deit():
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher
    return DeiTForImageClassificationWithTeacher(_vit_cfg(DeiTConfig))


def _swin():
    from transformers import SwinConfig, SwinForImageClassification
    return SwinForImageClassification(SwinConfig(
        image_size=IMAGE, patch_size=4, num_channels=3, embed_dim=48, depths=[2, 2, 2], num_heads=[3, 6, 12],
        window_size=4, mlp_ratio=4.0, num_labels=10, attn_implementation="eager"))


def _image_data(rng, n, split):
    return {"pixel_values": photo_crops(rng, n, IMAGE, split)}


WHISPER_FRAMES = 200


def _whisper():
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    return WhisperEncoder(WhisperConfig(
        num_mel_bins=80, d_model=256, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=1024,
        decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=256, max_source_positions=WHISPER_FRAMES // 2,
        vocab_size=1000, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        attn_implementation="eager"))


def _whisper_data(rng, n, split):
    return {"input_features": _whisper_features(rng, n, WHISPER_FRAMES, 80)}


def _wav2vec2():
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC
    return Wav2Vec2ForCTC(Wav2Vec2Config(
        vocab_size=32, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
        conv_dim=(128,) * 7, num_conv_pos_embeddings=64, num_conv_pos_embedding_groups=8,
        feat_extract_norm="group", do_stable_layer_norm=False, attn_implementation="eager"))


def _wav2vec2_data(rng, n, split):
    return {"input_values": _normalize_wave(speech_like(rng, n, SR))}


_SPECS = [
    (_Spec("bert", _bert, _bert_data, ("input_ids", "attention_mask"), "logits",
           _text_axes("input_ids", "attention_mask"), head="classifier"),
     {"smoke", "shapes"}, "BERT encoder, 4 layers, hidden 256, sequence classification (3 classes)"),
    (_Spec("distilbert", _distilbert, _bert_data, ("input_ids", "attention_mask"), "logits",
           _text_axes("input_ids", "attention_mask"), head="classifier"),
     {"shapes"}, "DistilBERT, 3 layers, dim 256, sequence classification (2 classes)"),
    (_Spec("distilbert-fp16", _distilbert, _bert_data, ("input_ids", "attention_mask"), "logits",
           _text_axes("input_ids", "attention_mask"), head="classifier", fp16=True),
     {"smoke", "shapes", "fp16"}, "the DistilBERT exported in FP16 (model.half() before the export)"),
    (_Spec("distilbert-bf16", _distilbert, _bert_data, ("input_ids", "attention_mask"), "logits",
           _text_axes("input_ids", "attention_mask"), head="classifier", bf16=True),
     {"shapes", "bf16"}, "the DistilBERT exported in bfloat16 (model.to(torch.bfloat16) before the export)"),
    (_Spec("roberta", _roberta, _roberta_data, ("input_ids", "attention_mask"), "logits",
           _text_axes("input_ids", "attention_mask"), head="classifier.out_proj"),
     {"shapes"}, "RoBERTa, 4 layers, hidden 256 (position ids from the padding: CumSum), 3 classes"),
    (_Spec("albert", _albert, _albert_data, ("input_ids", "attention_mask"), "logits",
           _text_axes("input_ids", "attention_mask"), head="classifier"),
     {"shapes"}, "ALBERT, embedding 128 -> hidden 256, 4 layers sharing one set of weights, 3 classes"),
    (_Spec("gpt2", _gpt2, _gpt2_data, ("input_ids", "attention_mask"), "logits",
           _text_axes("input_ids", "attention_mask"), out_dynamic={0: "batch", 1: "sequence"}),
     {"shapes"}, "GPT-2 LM, 4 layers, 256 wide, vocabulary 4096 (LM head tied to the embedding)"),
    (_Spec("t5-encoder", _t5, _t5_data, ("input_ids", "attention_mask"), "last_hidden_state",
           _text_axes("input_ids", "attention_mask"), out_dynamic={0: "batch", 1: "sequence"}),
     {"shapes"}, "T5 v1.1-style encoder (gated GELU, RMS norm, relative position buckets), 4 layers"),
    (_Spec("vit", _vit, _image_data, ("pixel_values",), "logits", {"pixel_values": {0: "batch"}},
           head="classifier"),
     {"smoke"}, "ViT, 64x64 images, 8x8 patches, 4 layers, hidden 192, 10 classes"),
    (_Spec("deit", _deit, _image_data, ("pixel_values",), "logits", {"pixel_values": {0: "batch"}},
           head="cls_classifier"),
     set(), "DeiT with its distillation token and both heads, 64x64, 4 layers, hidden 192"),
    (_Spec("swin", _swin, _image_data, ("pixel_values",), "logits", {"pixel_values": {0: "batch"}},
           head="classifier"),
     set(), "Swin, 64x64, patch 4, window 4, depths 2-2-2, embed 48, 10 classes"),
    (_Spec("whisper-encoder", _whisper, _whisper_data, ("input_features",), "last_hidden_state",
           {"input_features": {0: "batch"}}),
     set(), "Whisper encoder, 80 log-mel bins x 200 frames (2 s), 4 layers, d_model 256"),
    (_Spec("wav2vec2", _wav2vec2, _wav2vec2_data, ("input_values",), "logits", {"input_values": {0: "batch", 1: "samples"}},
           head="lm_head", out_dynamic={0: "batch", 1: "frames"}),
     set(), "wav2vec2 CTC, 1 s at 16 kHz, conv front end (7 x 128), 4 layers, hidden 256, 32 symbols"),
]


def _builder(spec: _Spec) -> Callable[[Path, int], None]:
    def build(folder: Path, seed: int = 0) -> None:
        _build(spec, Path(folder), seed)
    return build


MODELS: List[ZooModel] = [
    ZooModel(spec.name, "transformer", _builder(spec), frozenset(tags | {"transformer"}), desc)
    for spec, tags, desc in _SPECS
]
