"""Build the example FP32 ONNX models, and their calibration / validation data, in code.

Nothing is downloaded: every model is written with ``onnx.helper`` and numpy initializers from a seeded
generator. The models are small but shaped like what exporters produce (Conv+BatchNormalization+Relu
blocks, residual Adds, BERT-style attention with the HuggingFace mask and GELU patterns), because those
patterns are what the quantizer's passes look for. After drawing the random weights, a short "settling"
pass (:func:`_settle`) runs the model node by node on a few synthetic samples and makes the weights
consistent with data the way training would: BatchNormalization running stats equal their input
statistics, LayerNorm outlier channels stay 10-20x at every depth, classifier heads are centred. It runs
onnxruntime single-threaded, so the same seed gives byte-identical files on a given machine (another CPU
may differ in the last bits of the settled values).

Importable as ``onnxfp8.examples.build`` and runnable as a script::

    python -m onnxfp8.examples.build [--out models] [--only cnn,mlp,transformer] [--calib 64] [--val 64]

which writes ``<out>/<name>.onnx`` and ``<out>/data/<name>/{calib,val}/NNNNN.npz`` (calibration data from
seed 1, validation data from seed 2). The .onnx files and data are git-ignored: build them, never commit them.

Conventions shared by every model here:

* opset 17 (``ai.onnx``), ``ir_version`` 8, passes ``onnx.checker.check_model(m, full_check=True)``;
* the batch dimension is dynamic and named ``"batch"`` (the transformer's sequence dimension is ``"sequence"``);
* the output is ``"logits"`` of shape ``[batch, num_classes]``;
* every node and tensor has a readable name: nodes are scoped with ``/`` (``"layer0/attn/q_proj"``,
  ``"res1/conv2"``), their outputs are ``"<node name>/output"``, weights are ``"<scope>.weight"`` style;
* ``metadata_props`` records ``onnxfp8.example`` (the builder's name) and, for the transformer,
  ``onnxfp8.vocab`` / ``onnxfp8.seq`` (so that :func:`make_inputs` can produce matching data) and
  ``onnxfp8.outlier_channels`` (the hidden dimensions given activation outliers).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
PRODUCER = "onnxfp8-models"

PathLike = Union[str, os.PathLike]

__all__ = [
    "OPSET",
    "IR_VERSION",
    "EXAMPLES",
    "build_cnn",
    "build_mlp",
    "build_transformer",
    "build_resnet_like",
    "build_bert_like",
    "make_inputs",
    "write_data",
    "build_all",
    "model_summary",
]


# --------------------------------------------------------------------------------------------------
# A tiny graph builder: unique readable names, initializers from numpy, nodes named by scope.
# --------------------------------------------------------------------------------------------------
class _GraphBuilder:
    def __init__(self, name: str):
        self.name = name
        self.nodes: List[onnx.NodeProto] = []
        self.initializers: List[onnx.TensorProto] = []
        self.inputs: List[onnx.ValueInfoProto] = []
        self.outputs: List[onnx.ValueInfoProto] = []
        self._tensor_names: set = set()
        self._node_names: set = set()
        self._consts: Dict[str, str] = {}

    def _claim_tensor(self, name: str) -> str:
        if name in self._tensor_names:
            raise ValueError(f"duplicate tensor name {name!r}")
        self._tensor_names.add(name)
        return name

    def input(self, name: str, elem_type: int, shape: Sequence[Union[int, str]]) -> str:
        self.inputs.append(helper.make_tensor_value_info(self._claim_tensor(name), elem_type, list(shape)))
        return name

    def output(self, name: str, elem_type: int, shape: Sequence[Union[int, str]]) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), self._claim_tensor(name)))
        return name

    def const(self, name: str, value, dtype=np.float32) -> str:
        """A shared constant initializer (``const/<name>``), created once however often it is asked for."""
        full = f"const/{name}"
        if full not in self._consts:
            self._consts[full] = self.weight(full, np.asarray(value, dtype=dtype))
        return full

    def node(self, op: str, inputs: Sequence[str], name: str, outputs: Optional[Sequence[str]] = None,
             n_out: int = 1, **attrs) -> Union[str, List[str]]:
        if name in self._node_names:
            raise ValueError(f"duplicate node name {name!r}")
        self._node_names.add(name)
        if outputs is None:
            outputs = [f"{name}/output"] if n_out == 1 else [f"{name}/output_{i}" for i in range(n_out)]
        for o in outputs:
            self._claim_tensor(o)
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name, **attrs))
        return outputs[0] if len(outputs) == 1 else list(outputs)

    def model(self, doc: str, metadata: Optional[Dict[str, str]] = None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name=PRODUCER, producer_version="0.1.0", doc_string=doc)
        model.ir_version = IR_VERSION
        if metadata:
            helper.set_model_props(model, {k: str(v) for k, v in metadata.items()})
        onnx.checker.check_model(model, full_check=True)
        return model


def _he(rng: np.random.Generator, shape, fan_in: int, gain: float = 2.0) -> np.ndarray:
    """Kaiming/He normal: std = sqrt(gain / fan_in); gain 2 keeps ReLU activations' scale constant."""
    return (rng.standard_normal(shape) * math.sqrt(gain / fan_in)).astype(np.float32)


def _heavy(rng: np.random.Generator, shape, std: float, df: float = 5.0) -> np.ndarray:
    """Student-t samples rescaled to standard deviation ``std``: normal-looking bulk, heavier tails."""
    x = rng.standard_t(df, size=shape) * math.sqrt((df - 2.0) / df)
    return (x * std).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# "Pretraining": make the random weights consistent with data, node by node
# --------------------------------------------------------------------------------------------------
_Hook = Callable[[onnx.NodeProto, Dict[str, np.ndarray], Dict[str, np.ndarray], np.random.Generator], None]


def _settle(model: onnx.ModelProto, feeds: Dict[str, np.ndarray], hooks: Dict[str, _Hook], seed: int) -> None:
    """Run ``model`` node by node in onnxruntime on ``feeds``; before a node whose op type is in ``hooks``
    runs, its hook may rewrite that node's initializers from the data reaching it. The new values are
    written back into ``model`` in place.

    This is how the builders give random weights the one property of trained weights that random init
    lacks: consistency with the data. BatchNormalization running statistics equal the statistics of their
    input (as after training), LayerNorm gammas keep outlier channels at the chosen magnitude, classifier
    heads are centred. Going node by node lets every hook see the data produced by the already-settled
    upstream weights, in one pass. Sessions use one thread so the result is bit-reproducible.
    """
    import onnxruntime as ort

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    changed: set = set()
    values: Dict[str, np.ndarray] = dict(feeds)
    last_use: Dict[str, int] = {}
    for k, node in enumerate(model.graph.node):
        for i in node.input:
            last_use[i] = k
    keep = {o.name for o in model.graph.output}
    rng = np.random.default_rng(seed)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    for k, node in enumerate(model.graph.node):
        hook = hooks.get(node.op_type)
        if hook is not None:
            before = {i: inits[i] for i in node.input if i in inits}
            hook(node, values, inits, rng)
            changed.update(i for i in before if inits[i] is not before[i])
        ins = [i for i in dict.fromkeys(node.input) if i]
        g = helper.make_graph(
            [node], "step",
            [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(values[i].dtype), None)
             for i in ins if i not in inits],
            [onnx.ValueInfoProto(name=o) for o in node.output if o],
            [numpy_helper.from_array(inits[i], i) for i in ins if i in inits])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
        m.ir_version = IR_VERSION
        sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        outs = sess.run(None, {i: values[i] for i in ins if i not in inits})
        values.update(zip([o for o in node.output if o], outs))
        for i in ins:
            if last_use.get(i) == k and i not in keep and i not in inits:
                values.pop(i, None)
    for t in model.graph.initializer:
        if t.name in changed:
            t.CopyFrom(numpy_helper.from_array(np.asarray(inits[t.name], dtype=np.float32), t.name))


def _settle_batchnorm(node, values, inits, rng) -> None:
    """Running mean/var := the statistics of the BN input, with the small mismatch an EMA over training
    batches leaves (mean off by ~5% of a std, var by ~5%)."""
    x = values[node.input[0]].astype(np.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    mean = mean + 0.05 * np.sqrt(var) * rng.standard_normal(mean.shape)
    var = var * np.exp(0.05 * rng.standard_normal(var.shape))
    inits[node.input[3]] = mean.astype(np.float32)
    inits[node.input[4]] = var.astype(np.float32)


def _settle_layernorm(node, values, inits, rng) -> None:
    """The gamma initializer holds the *target* output magnitude per channel: replace it by the gamma that
    gives that magnitude on this data, i.e. rms(gamma_c * z_c + beta_c) = target_c with z the normalized
    input (beta is kept; it must be smaller than the target)."""
    x = values[node.input[0]].astype(np.float64)
    eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
    z = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
    z = z.reshape(-1, z.shape[-1])
    m1, m2 = z.mean(0), np.maximum((z ** 2).mean(0), 1e-6)
    t = inits[node.input[1]].astype(np.float64)
    b = inits[node.input[2]].astype(np.float64)
    # gamma^2 m2 + 2 gamma b m1 + b^2 = t^2, positive root
    gamma = (-b * m1 + np.sqrt(np.maximum((b * m1) ** 2 + m2 * (t ** 2 - b ** 2), 0.0))) / m2
    inits[node.input[1]] = gamma.astype(np.float32)


def _settle_head(target_std: float) -> _Hook:
    """For the Gemm producing ``logits``: scale the weight so the logits vary by ``target_std`` across
    samples and set the bias so every class has mean logit ~0 (+ N(0, 0.1) priors), as a trained classifier."""
    def hook(node, values, inits, rng) -> None:
        if node.output[0] != "logits":
            return
        x = values[node.input[0]].astype(np.float64)
        w = inits[node.input[1]].astype(np.float64)
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        y = x @ (w.T if trans_b else w)
        scale = target_std / max(float((y - y.mean(0)).std()), 1e-6)
        inits[node.input[1]] = (w * scale).astype(np.float32)
        bias = -y.mean(0) * scale + 0.1 * rng.standard_normal(y.shape[1])
        inits[node.input[2]] = bias.astype(np.float32)
    return hook


# --------------------------------------------------------------------------------------------------
# CNN pieces
# --------------------------------------------------------------------------------------------------
def _conv_bn(g: _GraphBuilder, rng: np.random.Generator, x: str, cin: int, cout: int, k: int, *, conv: str,
             bn: str, relu: Optional[str], stride: int = 1, bias: bool = True,
             gamma_range=(0.5, 1.5)) -> str:
    """Conv (He init with a log-normal per-output-channel scale, so channel ranges differ as in trained
    nets and per-channel quantization matters) + BatchNormalization (gamma ~ U(gamma_range),
    beta ~ N(0.05, 0.2); running stats are placeholders until :func:`_settle` sets them) + optional Relu."""
    w = _he(rng, (cout, cin, k, k), cin * k * k)
    w *= np.exp(0.25 * rng.standard_normal((cout, 1, 1, 1))).astype(np.float32)
    ins = [x, g.weight(f"{conv}.weight", w)]
    if bias:
        ins.append(g.weight(f"{conv}.bias", (rng.standard_normal(cout) * 0.05).astype(np.float32)))
    pad = k // 2
    y = g.node("Conv", ins, conv, kernel_shape=[k, k], pads=[pad] * 4, strides=[stride, stride])
    gamma = rng.uniform(*gamma_range, size=cout).astype(np.float32)
    beta = (rng.standard_normal(cout) * 0.2 + 0.05).astype(np.float32)
    y = g.node("BatchNormalization",
               [y, g.weight(f"{bn}.weight", gamma), g.weight(f"{bn}.bias", beta),
                g.weight(f"{bn}.running_mean", np.zeros(cout, np.float32)),
                g.weight(f"{bn}.running_var", np.ones(cout, np.float32))],
               bn, epsilon=1e-5, momentum=0.9)
    if relu is not None:
        y = g.node("Relu", [y], relu)
    return y


def _settle_cnn(model: onnx.ModelProto, seed: int, n: int) -> onnx.ModelProto:
    feeds = make_inputs(model, n, seed=10_000 + seed)
    _settle(model, feeds, {"BatchNormalization": _settle_batchnorm, "Gemm": _settle_head(2.0)}, seed)
    return model


def build_cnn(seed: int = 0, in_ch: int = 3, size: int = 32, num_classes: int = 10) -> onnx.ModelProto:
    """A small CIFAR-style CNN (~240k parameters, ~1 MB) with every pattern the CNN passes care about.

    ``input`` [batch, in_ch, size, size] ->
    conv1(3x3, bias)+bn1+relu1 (32 ch) -> conv2+bn2+relu2 (64 ch) -> pool1 (MaxPool 2x2) ->
    conv3+bn3+relu3 (96 ch) -> residual block res1: conv1+bn1+relu1, conv2+bn2, add (with the block
    input), relu2 -> gap (GlobalAveragePool) -> flatten -> fc (Gemm, transB=1) -> ``logits`` [batch, num_classes].

    Weights look trained where it matters for quantization: convs are He-initialised with a log-normal
    per-output-channel scale (channel ranges differ, so per-channel vs per-tensor matters); every
    BatchNormalization has gamma in [0.5, 1.5], non-zero beta and running mean/var equal to the statistics
    of its input on natural-image-like data (var ~0.2-5 around 1, mean non-zero), so folding BN changes the weights
    substantially and re-estimating BN statistics on the FP32 model is (nearly) a no-op, as for a
    real checkpoint. The last BN of the residual branch has a smaller gamma, as in trained ResNets.
    The classifier is centred so logits vary by ~2 across samples and argmax is spread over classes.
    """
    rng = np.random.default_rng(seed)
    g = _GraphBuilder("cnn")
    x = g.input("input", TensorProto.FLOAT, ["batch", in_ch, size, size])
    c1, c2, c3 = 32, 64, 96
    x = _conv_bn(g, rng, x, in_ch, c1, 3, conv="conv1", bn="bn1", relu="relu1")
    x = _conv_bn(g, rng, x, c1, c2, 3, conv="conv2", bn="bn2", relu="relu2")
    x = g.node("MaxPool", [x], "pool1", kernel_shape=[2, 2], strides=[2, 2])
    x = _conv_bn(g, rng, x, c2, c3, 3, conv="conv3", bn="bn3", relu="relu3")
    y = _conv_bn(g, rng, x, c3, c3, 3, conv="res1/conv1", bn="res1/bn1", relu="res1/relu1")
    y = _conv_bn(g, rng, y, c3, c3, 3, conv="res1/conv2", bn="res1/bn2", relu=None, gamma_range=(0.2, 0.6))
    x = g.node("Add", [x, y], "res1/add")
    x = g.node("Relu", [x], "res1/relu2")
    x = g.node("GlobalAveragePool", [x], "gap")
    x = g.node("Flatten", [x], "flatten", axis=1)
    w = g.weight("fc.weight", _he(rng, (num_classes, c3), c3, gain=1.0))
    b = g.weight("fc.bias", np.zeros(num_classes, np.float32))
    g.node("Gemm", [x, w, b], "fc", outputs=["logits"], transB=1)
    g.output("logits", TensorProto.FLOAT, ["batch", num_classes])
    model = g.model(build_cnn.__doc__.split("\n")[0], {"onnxfp8.example": "cnn"})
    return _settle_cnn(model, seed, n=32)


def build_resnet_like(seed: int = 0, size: int = 224, widths=(64, 128, 256, 512), blocks=(3, 4, 6, 3),
                      num_classes: int = 1000) -> onnx.ModelProto:
    """A ResNet-50-shaped bottleneck CNN (~25.6M parameters at the defaults, ~100 MB) for benchmarks.

    Stem conv1 7x7/2 + bn1 + relu1 + MaxPool 3x3/2, then ``len(widths)`` stages ``layer{i}`` of
    ``blocks[i]`` bottlenecks ``layer{i}/block{j}`` (1x1 reduce, 3x3 (stride 2 in the first block of
    stages > 0, as in ResNet v1.5), 1x1 expand to 4*width, each followed by BN; a 1x1 conv+BN projection
    ``downsample`` on the shortcut when the shape changes; Add; Relu), GlobalAveragePool, Flatten, fc Gemm.
    Convs have no bias (as exported from torchvision); the last BN of every block has a small gamma.
    Weights are settled on data like :func:`build_cnn`'s (BN statistics match their inputs, head centred).
    Building takes a few seconds at the default size (the settling pass runs the model on 4 images).
    """
    rng = np.random.default_rng(seed)
    g = _GraphBuilder("resnet_like")
    x = g.input("input", TensorProto.FLOAT, ["batch", 3, size, size])
    stem = widths[0]
    x = _conv_bn(g, rng, x, 3, stem, 7, conv="conv1", bn="bn1", relu="relu1", stride=2, bias=False)
    x = g.node("MaxPool", [x], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = stem
    for i, (width, nblocks) in enumerate(zip(widths, blocks)):
        cout = 4 * width
        for j in range(nblocks):
            s = f"layer{i + 1}/block{j}"
            stride = 2 if (j == 0 and i > 0) else 1
            y = _conv_bn(g, rng, x, cin, width, 1, conv=f"{s}/conv1", bn=f"{s}/bn1", relu=f"{s}/relu1", bias=False)
            y = _conv_bn(g, rng, y, width, width, 3, conv=f"{s}/conv2", bn=f"{s}/bn2", relu=f"{s}/relu2",
                         stride=stride, bias=False)
            y = _conv_bn(g, rng, y, width, cout, 1, conv=f"{s}/conv3", bn=f"{s}/bn3", relu=None, bias=False,
                         gamma_range=(0.1, 0.4))
            if stride != 1 or cin != cout:
                x = _conv_bn(g, rng, x, cin, cout, 1, conv=f"{s}/downsample/conv", bn=f"{s}/downsample/bn",
                             relu=None, stride=stride, bias=False)
            x = g.node("Add", [x, y], f"{s}/add")
            x = g.node("Relu", [x], f"{s}/relu3")
            cin = cout
    x = g.node("GlobalAveragePool", [x], "gap")
    x = g.node("Flatten", [x], "flatten", axis=1)
    w = g.weight("fc.weight", _he(rng, (num_classes, cin), cin, gain=1.0))
    b = g.weight("fc.bias", np.zeros(num_classes, np.float32))
    g.node("Gemm", [x, w, b], "fc", outputs=["logits"], transB=1)
    g.output("logits", TensorProto.FLOAT, ["batch", num_classes])
    model = g.model(build_resnet_like.__doc__.split("\n")[0], {"onnxfp8.example": "resnet_like"})
    return _settle_cnn(model, seed, n=4 if size >= 128 else 32)


# --------------------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------------------
def build_mlp(seed: int = 0, in_features: int = 64, hidden=(256, 128), num_classes: int = 10) -> onnx.ModelProto:
    """A 3-layer MLP exercising the three ways exporters write a dense layer.

    ``input`` [batch, in_features] -> fc1 (Gemm, transB=1, weight [out, in]) + relu1 ->
    fc2 (MatMul, weight [in, out]) + fc2/bias_add (Add) + relu2 -> fc3 (Gemm, transB=0, weight [in, out])
    -> ``logits`` [batch, num_classes]. He-initialised, small non-zero biases.
    """
    if len(hidden) != 2:
        raise ValueError("build_mlp expects exactly two hidden sizes")
    rng = np.random.default_rng(seed)
    h1, h2 = hidden
    g = _GraphBuilder("mlp")
    x = g.input("input", TensorProto.FLOAT, ["batch", in_features])
    w1 = g.weight("fc1.weight", _he(rng, (h1, in_features), in_features))
    b1 = g.weight("fc1.bias", (rng.standard_normal(h1) * 0.05).astype(np.float32))
    x = g.node("Gemm", [x, w1, b1], "fc1", transB=1)
    x = g.node("Relu", [x], "relu1")
    w2 = g.weight("fc2.weight", _he(rng, (h1, h2), h1))
    b2 = g.weight("fc2.bias", (rng.standard_normal(h2) * 0.05).astype(np.float32))
    x = g.node("MatMul", [x, w2], "fc2")
    x = g.node("Add", [x, b2], "fc2/bias_add")
    x = g.node("Relu", [x], "relu2")
    w3 = g.weight("fc3.weight", _he(rng, (h2, num_classes), h2, gain=1.0))
    b3 = g.weight("fc3.bias", (rng.standard_normal(num_classes) * 0.05).astype(np.float32))
    g.node("Gemm", [x, w3, b3], "fc3", outputs=["logits"], transB=0)
    g.output("logits", TensorProto.FLOAT, ["batch", num_classes])
    return g.model(build_mlp.__doc__.split("\n")[0], {"onnxfp8.example": "mlp"})


# --------------------------------------------------------------------------------------------------
# Transformer
# --------------------------------------------------------------------------------------------------
_LN_EPS = 1e-12  # BERT's LayerNorm epsilon


def _layernorm(g: _GraphBuilder, x: str, gamma: np.ndarray, beta: np.ndarray, scope: str,
               decomposed: bool) -> str:
    gw = g.weight(f"{scope}.weight", gamma)
    bw = g.weight(f"{scope}.bias", beta)
    if not decomposed:
        return g.node("LayerNormalization", [x, gw, bw], scope, axis=-1, epsilon=_LN_EPS)
    # The pattern torch.onnx writes for nn.LayerNorm below opset 17.
    mean = g.node("ReduceMean", [x], f"{scope}/ReduceMean", axes=[-1], keepdims=1)
    d = g.node("Sub", [x, mean], f"{scope}/Sub")
    sq = g.node("Pow", [d, g.const("two", 2.0)], f"{scope}/Pow")
    var = g.node("ReduceMean", [sq], f"{scope}/ReduceMean_1", axes=[-1], keepdims=1)
    ve = g.node("Add", [var, g.const("ln_eps", _LN_EPS)], f"{scope}/Add")
    sd = g.node("Sqrt", [ve], f"{scope}/Sqrt")
    y = g.node("Div", [d, sd], f"{scope}/Div")
    y = g.node("Mul", [y, gw], f"{scope}/Mul")
    return g.node("Add", [y, bw], f"{scope}/Add_1")


def _linear(g: _GraphBuilder, x: str, w: np.ndarray, b: np.ndarray, scope: str) -> str:
    """MatMul with a [in, out] weight + Add bias, as torch.onnx exports nn.Linear on 3-D inputs."""
    y = g.node("MatMul", [x, g.weight(f"{scope}.weight", w)], scope)
    return g.node("Add", [y, g.weight(f"{scope}.bias", b)], f"{scope}/bias_add")


def build_transformer(seed: int = 0, num_layers: int = 1, vocab: int = 1000, seq: int = 32, hidden: int = 64,
                      heads: int = 4, ffn: int = 256, num_classes: int = 10,
                      decomposed_layernorm: bool = False) -> onnx.ModelProto:
    """A BERT-style post-LayerNorm encoder classifier, written the way torch.onnx exports HuggingFace BERT.

    Inputs: ``input_ids`` int64 [batch, sequence] and ``attention_mask`` float32 [batch, sequence]
    (1 = keep, 0 = padding; added to the attention scores as ``(1 - mask) * -10000``).
    ``seq`` is the size of the positional table (the longest sequence); shorter sequences slice it.

    embeddings: word Gather + position Add + LayerNorm ->
    per layer ``layer{i}``: attn/{q,k,v}_proj (MatMul [hidden, hidden] + Add), Reshape/Transpose to heads,
    attn/scores (MatMul Q.K^T), Div sqrt(d), Add mask, Softmax, attn/context (MatMul probs.V), Transpose/Reshape,
    attn/out_proj (MatMul + Add), residual Add, attn_ln, ffn/fc1 (MatMul + Add), GELU written as
    ``x * 0.5 * (1 + Erf(x / sqrt(2)))``, ffn/fc2, residual Add, ffn_ln ->
    head: token 0 (Gather axis=1, index 0) -> classifier (Gemm, transB=1) -> ``logits`` [batch, num_classes].
    LayerNorm is ``LayerNormalization`` (opset 17) or, with ``decomposed_layernorm=True``, the exporter pattern
    ReduceMean/Sub/Pow/ReduceMean/Add(eps)/Sqrt/Div/Mul/Add with the very same parameter values.

    Why the weights are not just Gaussian. What makes a trained transformer hard to quantize is not its size
    but the shape of its distributions; an i.i.d. N(0, s) model hides all of it and makes every quantizer
    look good. So the random weights imitate the properties that matter:

    * **Outlier channels.** Pretrained BERT-like models have a few hidden dimensions, the same in every layer,
      whose LayerNorm gamma/beta are an order of magnitude larger than the rest, so the residual stream and
      every LayerNorm output (= the input of the Q/K/V and FFN MatMuls) carry a few channels of magnitude
      10-20x the others (Kovaleva et al. 2021 "BERT Busters"; Bondarenko et al. 2021 "Understanding and
      Overcoming the Challenges of Efficient Transformer Quantization"; Dettmers et al. 2022 "LLM.int8()").
      Per-tensor activation scales are then dictated by two channels: max calibration wastes range,
      percentile clips the outliers, and FP8's dynamic range (vs INT8) pays off. Here 2 fixed channels
      (``onnxfp8.outlier_channels`` in the metadata) are given an output magnitude ~U(10, 20) times the
      others, with a large beta (+-0.2-0.5 of it), in every LayerNorm.
      The embedding LayerNorm gets this from gamma ~10-20x directly. Later LayerNorms cannot simply copy it:
      in a post-LN network the outliers already in the residual stream would be multiplied again at every
      LayerNorm (x15 per LN, and with 2 of 64 channels holding almost all the variance the other channels
      collapse). So each gamma is *settled* on data: it is the gamma that gives the chosen magnitude on the
      data reaching it, which keeps outliers at 10-20x at every depth (12 layers included).
    * **Weights**: std drawn per matrix in [0.02, 0.05] (BERT's init is 0.02; trained matrices widen a
      little) with Student-t (df=5) tails, so weight max/std is ~8-15 rather than ~4.5 for a Gaussian and
      max-based weight scales are stretched as in real checkpoints.
    * **Embeddings** std 0.05 with heavy tails, positional std 0.02; FFN fc1 biases slightly negative, as in
      trained GELU layers; the mask drives padded positions to -10000, so the softmax input has a huge,
      irrelevant negative range that naive range calibration must not chase.
    * The classifier is centred so logits vary by ~2 across samples.
    """
    model = _transformer(seed, num_layers, vocab, seq, hidden, heads, ffn, num_classes, decomposed=False)
    feeds = make_inputs(model, 32 if hidden * seq <= 64 * 128 else 4, seed=10_000 + seed)
    _settle(model, feeds, {"LayerNormalization": _settle_layernorm, "Gemm": _settle_head(2.0)}, seed)
    if not decomposed_layernorm:
        return model
    dec = _transformer(seed, num_layers, vocab, seq, hidden, heads, ffn, num_classes, decomposed=True)
    settled = {t.name: t for t in model.graph.initializer}
    for t in dec.graph.initializer:
        if t.name in settled:
            t.CopyFrom(settled[t.name])
    return dec


def _transformer(seed, num_layers, vocab, seq, hidden, heads, ffn, num_classes, decomposed) -> onnx.ModelProto:
    """The graph of :func:`build_transformer` with unsettled weights: LayerNorm gammas hold target magnitudes.
    Both LayerNorm flavours draw the same random numbers in the same order."""
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    rng = np.random.default_rng(seed)
    d = hidden // heads
    outliers = np.sort(rng.choice(hidden, size=min(2, hidden), replace=False))
    outlier_sign = rng.choice([-1.0, 1.0], size=len(outliers))  # an outlier dimension keeps its sign

    def ln_params():
        target = (1.0 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
        beta = (0.05 * rng.standard_normal(hidden)).astype(np.float32)
        target[outliers] = rng.uniform(10.0, 20.0, size=len(outliers))
        beta[outliers] = target[outliers] * rng.uniform(0.2, 0.5, size=len(outliers)) * outlier_sign
        return target, beta

    def dense(n_in, n_out, bias_mean=0.0):
        std = rng.uniform(0.02, 0.05)
        w = _heavy(rng, (n_in, n_out), std)
        b = (bias_mean + 0.02 * rng.standard_normal(n_out)).astype(np.float32)
        return w, b

    g = _GraphBuilder("transformer")
    ids = g.input("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = g.input("attention_mask", TensorProto.FLOAT, ["batch", "sequence"])

    # --- embeddings
    word = g.weight("embeddings.word_embeddings.weight", _heavy(rng, (vocab, hidden), 0.05))
    pos_table = g.weight("embeddings.position_embeddings.weight", _heavy(rng, (seq, hidden), 0.02))
    x = g.node("Gather", [word, ids], "embeddings/word_embeddings", axis=0)
    shape = g.node("Shape", [ids], "embeddings/shape")
    seqlen = g.node("Gather", [shape, g.const("one_i64", 1, np.int64)], "embeddings/seq_len", axis=0)
    seqlen = g.node("Unsqueeze", [seqlen, g.const("axes0", [0], np.int64)], "embeddings/seq_len_1d")
    pos = g.node("Slice", [pos_table, g.const("zero_1d", [0], np.int64), seqlen, g.const("axes0", [0], np.int64)],
                 "embeddings/position_embeddings")
    x = g.node("Add", [x, pos], "embeddings/add")
    x = _layernorm(g, x, *ln_params(), "embeddings/layernorm", decomposed)

    # --- extended attention mask: (1 - mask[:, None, None, :]) * -10000
    m = g.node("Unsqueeze", [mask, g.const("axes12", [1, 2], np.int64)], "mask/unsqueeze")
    m = g.node("Sub", [g.const("one", 1.0), m], "mask/invert")
    ext_mask = g.node("Mul", [m, g.const("mask_value", -10000.0)], "mask/scale")

    heads_shape = g.const("heads_shape", [0, 0, heads, d], np.int64)
    hidden_shape = g.const("hidden_shape", [0, 0, hidden], np.int64)
    for i in range(num_layers):
        s = f"layer{i}"
        q = _linear(g, x, *dense(hidden, hidden), f"{s}/attn/q_proj")
        k = _linear(g, x, *dense(hidden, hidden), f"{s}/attn/k_proj")
        v = _linear(g, x, *dense(hidden, hidden), f"{s}/attn/v_proj")
        q = g.node("Reshape", [q, heads_shape], f"{s}/attn/q_reshape")
        q = g.node("Transpose", [q], f"{s}/attn/q_transpose", perm=[0, 2, 1, 3])   # [N, h, S, d]
        k = g.node("Reshape", [k, heads_shape], f"{s}/attn/k_reshape")
        k = g.node("Transpose", [k], f"{s}/attn/k_transpose", perm=[0, 2, 3, 1])   # [N, h, d, S]
        v = g.node("Reshape", [v, heads_shape], f"{s}/attn/v_reshape")
        v = g.node("Transpose", [v], f"{s}/attn/v_transpose", perm=[0, 2, 1, 3])   # [N, h, S, d]
        sc = g.node("MatMul", [q, k], f"{s}/attn/scores")
        sc = g.node("Div", [sc, g.const(f"sqrt_head_dim_{d}", math.sqrt(d))], f"{s}/attn/scale")
        sc = g.node("Add", [sc, ext_mask], f"{s}/attn/mask_add")
        p = g.node("Softmax", [sc], f"{s}/attn/softmax", axis=-1)
        c = g.node("MatMul", [p, v], f"{s}/attn/context")
        c = g.node("Transpose", [c], f"{s}/attn/context_transpose", perm=[0, 2, 1, 3])
        c = g.node("Reshape", [c, hidden_shape], f"{s}/attn/context_reshape")
        a = _linear(g, c, *dense(hidden, hidden), f"{s}/attn/out_proj")
        x = g.node("Add", [a, x], f"{s}/attn/residual")
        x = _layernorm(g, x, *ln_params(), f"{s}/attn_ln", decomposed)
        h = _linear(g, x, *dense(hidden, ffn, bias_mean=-0.05), f"{s}/ffn/fc1")
        # GELU, as exported from `x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))`
        e = g.node("Div", [h, g.const("sqrt2", math.sqrt(2.0))], f"{s}/ffn/gelu/div")
        e = g.node("Erf", [e], f"{s}/ffn/gelu/erf")
        e = g.node("Add", [e, g.const("one", 1.0)], f"{s}/ffn/gelu/add")
        hh = g.node("Mul", [h, g.const("half", 0.5)], f"{s}/ffn/gelu/mul_half")
        h = g.node("Mul", [hh, e], f"{s}/ffn/gelu/mul")
        h = _linear(g, h, *dense(ffn, hidden), f"{s}/ffn/fc2")
        x = g.node("Add", [h, x], f"{s}/ffn/residual")
        x = _layernorm(g, x, *ln_params(), f"{s}/ffn_ln", decomposed)

    # --- head: first token -> classifier
    cls = g.node("Gather", [x, g.const("zero_i64", 0, np.int64)], "head/cls_token", axis=1)   # [N, hidden]
    w = g.weight("classifier.weight", _heavy(rng, (num_classes, hidden), 0.5 / math.sqrt(hidden)))
    b = g.weight("classifier.bias", np.zeros(num_classes, np.float32))
    g.node("Gemm", [cls, w, b], "classifier", outputs=["logits"], transB=1)
    g.output("logits", TensorProto.FLOAT, ["batch", num_classes])
    meta = {"onnxfp8.example": "transformer", "onnxfp8.vocab": vocab, "onnxfp8.seq": seq,
            "onnxfp8.outlier_channels": ",".join(str(int(c)) for c in outliers)}
    return g.model(build_transformer.__doc__.split("\n")[0], meta)


def build_bert_like(seed: int = 0, num_layers: int = 12, hidden: int = 768, heads: int = 12, ffn: int = 3072,
                    seq: int = 128, vocab: int = 30522) -> onnx.ModelProto:
    """BERT-base-sized :func:`build_transformer` (~110M parameters, ~440 MB) for benchmarks."""
    m = build_transformer(seed=seed, num_layers=num_layers, vocab=vocab, seq=seq, hidden=hidden, heads=heads,
                          ffn=ffn, num_classes=2)
    helper.set_model_props(m, {**{p.key: p.value for p in m.metadata_props}, "onnxfp8.example": "bert_like"})
    return m


EXAMPLES: Dict[str, Callable[..., onnx.ModelProto]] = {
    "cnn": build_cnn,
    "mlp": build_mlp,
    "transformer": build_transformer,
}


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
def _metadata(model: onnx.ModelProto) -> Dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def _vocab_and_seq(model: onnx.ModelProto, ids_name: str):
    """Vocabulary size and positional-table length: from metadata, else from the embedding tables."""
    meta = _metadata(model)
    vocab = int(meta["onnxfp8.vocab"]) if "onnxfp8.vocab" in meta else None
    seq = int(meta["onnxfp8.seq"]) if "onnxfp8.seq" in meta else None
    if vocab is None:
        inits = {t.name: t for t in model.graph.initializer}
        for n in model.graph.node:
            if n.op_type == "Gather" and len(n.input) == 2 and n.input[1] == ids_name and n.input[0] in inits:
                vocab = int(inits[n.input[0]].dims[0])
                break
    return vocab or 1000, seq or 32


def _smooth_images(rng: np.random.Generator, n: int, c: int, h: int, w: int) -> np.ndarray:
    """Normalized natural-image-like inputs: 1/f ("pink") noise, correlated across channels.

    Natural images have an amplitude spectrum ~1/f, neighbouring pixels are strongly correlated and RGB
    channels share most of their content (luminance). After per-image standardisation each image gets a
    random brightness/contrast, so the marginal is roughly N(0, 1) like mean/std-normalized ImageNet data,
    with slightly heavier tails.
    """
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx ** 2 + fy ** 2)
    f[0, 0] = 1.0
    amp = 1.0 / f  # 1/f amplitude
    amp[0, 0] = 0.0

    def pink(k):
        white = rng.standard_normal((k, h, w))
        x = np.fft.irfft2(np.fft.rfft2(white) * amp, s=(h, w))
        x -= x.mean(axis=(-2, -1), keepdims=True)
        x /= x.std(axis=(-2, -1), keepdims=True) + 1e-12
        return x

    lum = pink(n)[:, None]                              # [n, 1, h, w]
    chroma = pink(n * c).reshape(n, c, h, w)
    img = 0.85 * lum + 0.5 * chroma
    img -= img.mean(axis=(-2, -1), keepdims=True)
    img /= img.std(axis=(-2, -1), keepdims=True) + 1e-12
    contrast = np.exp(0.2 * rng.standard_normal((n, 1, 1, 1)))
    brightness = 0.3 * rng.standard_normal((n, c, 1, 1))
    return (img * contrast + brightness).astype(np.float32)


def make_inputs(model: onnx.ModelProto, n: int, seed: int) -> Dict[str, np.ndarray]:
    """Random but realistic inputs for ``n`` samples, keyed by the model's input names (batch on axis 0).

    * 4-D float inputs (images): normalized smooth natural-image-like noise (see ``_smooth_images``);
    * int inputs (token ids): uniform in [1, vocab); about half of the rows are padded at the end
      (id 0) from a random length in [seq/4, seq) on, and a float ``*mask*`` input is 0 exactly there;
    * other float inputs: N(0, 1).

    Dynamic dimensions: the first one is the batch (``n``), ``"sequence"`` is the transformer's positional
    table length, any other unknown dimension is 1. Works for models not built here too.
    """
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in inits]

    def resolve_shape(vi, seq_len):
        dims = []
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif k == 0:
                dims.append(n)
            elif "seq" in d.dim_param.lower() and seq_len is not None:
                dims.append(seq_len)
            else:
                dims.append(1)
        if dims:
            dims[0] = n
        return dims

    ids_inputs = [i for i in graph_inputs if helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).kind in "iu"]
    vocab, seq_len = _vocab_and_seq(model, ids_inputs[0].name) if ids_inputs else (None, None)

    out: Dict[str, np.ndarray] = {}
    lengths = None  # per-row valid length, shared by ids and mask
    for vi in graph_inputs:
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        shape = resolve_shape(vi, seq_len)
        if dtype.kind in "iu":
            arr = rng.integers(1, vocab, size=shape, dtype=np.int64)
            if len(shape) == 2:
                s = shape[1]
                if lengths is None:
                    padded = rng.random(n) < 0.5
                    lengths = np.where(padded, rng.integers(max(1, s // 4), s, size=n) if s > 1 else s, s)
                arr[np.arange(s)[None, :] >= lengths[:, None]] = 0
            out[vi.name] = arr.astype(dtype)
        elif "mask" in vi.name.lower() and len(shape) == 2:
            out[vi.name] = None  # filled once the lengths are known
        elif len(shape) == 4:
            out[vi.name] = _smooth_images(rng, *shape)
        else:
            out[vi.name] = rng.standard_normal(shape).astype(dtype)
    for vi in graph_inputs:
        if out[vi.name] is None:
            dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
            shape = resolve_shape(vi, seq_len)
            if lengths is None:
                lengths = np.full(n, shape[1])
            out[vi.name] = (np.arange(shape[1])[None, :] < lengths[:, None]).astype(dtype)
    return out


_DATA_FILE = re.compile(r"^\d{5}\.npz$")


def write_data(model: onnx.ModelProto, folder: PathLike, n: int, seed: int,
               per_file: Optional[int] = None) -> List[Path]:
    """Write ``n`` samples of :func:`make_inputs` data as ``folder/00000.npz, 00001.npz, ...``.

    Each file maps every model input name to an array with a leading batch axis: ``per_file=None`` gives one
    sample per file (batch axis of size 1), ``per_file=k`` batches of ``k`` (the last file may hold fewer).
    Files from an earlier run matching the ``NNNNN.npz`` pattern are removed first, so the folder always
    holds exactly this data set. Returns the paths in order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        if _DATA_FILE.match(old.name):
            old.unlink()
    k = 1 if per_file is None else int(per_file)
    if k < 1:
        raise ValueError("per_file must be >= 1")
    data = make_inputs(model, n, seed)
    paths = []
    for idx, start in enumerate(range(0, n, k)):
        p = folder / f"{idx:05d}.npz"
        np.savez(p, **{name: arr[start:start + k] for name, arr in data.items()})
        paths.append(p)
    return paths


# --------------------------------------------------------------------------------------------------
# Building everything
# --------------------------------------------------------------------------------------------------
def model_summary(model: onnx.ModelProto) -> Dict[str, object]:
    """Node count, op histogram, parameter count and serialized size of a model."""
    ops: Dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    return {"nodes": len(model.graph.node), "ops": dict(sorted(ops.items())), "params": params,
            "bytes": model.ByteSize()}


def _output_std(model: onnx.ModelProto, inputs: Dict[str, np.ndarray]) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(["logits"], inputs)
    return float(np.std(logits))


def build_all(out_dir: PathLike = "models", calib: int = 64, val: int = 64,
              only: Optional[Sequence[str]] = None, verbose: bool = False) -> Dict[str, Dict[str, object]]:
    """Write every example model and its data; return the paths.

    For each name in :data:`EXAMPLES` (or ``only``): ``out_dir/<name>.onnx``, ``calib`` samples of seed 1 in
    ``out_dir/data/<name>/calib/`` and ``val`` samples of seed 2 in ``out_dir/data/<name>/val/`` (one sample
    per file). Idempotent: same bytes every run, stale data files removed. Returns
    ``{name: {"model": Path, "calib": Path (dir), "val": Path (dir), "calib_files": [Path], "val_files": [Path]}}``.
    """
    out = Path(out_dir)
    names = list(EXAMPLES) if only is None else list(only)
    unknown = [nm for nm in names if nm not in EXAMPLES]
    if unknown:
        raise ValueError(f"unknown example(s) {unknown}; choose from {sorted(EXAMPLES)}")
    out.mkdir(parents=True, exist_ok=True)
    result: Dict[str, Dict[str, object]] = {}
    for name in names:
        t0 = time.perf_counter()
        model = EXAMPLES[name]()
        path = out / f"{name}.onnx"
        data = model.SerializeToString()
        if not path.exists() or path.read_bytes() != data:
            tmp = path.with_suffix(".onnx.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        calib_dir = out / "data" / name / "calib"
        val_dir = out / "data" / name / "val"
        calib_files = write_data(model, calib_dir, calib, seed=1)
        val_files = write_data(model, val_dir, val, seed=2)
        result[name] = {"model": path, "calib": calib_dir, "val": val_dir,
                        "calib_files": calib_files, "val_files": val_files}
        if verbose:
            s = model_summary(model)
            std = _output_std(model, make_inputs(model, 64, seed=2))
            print(f"{name:12s} nodes={s['nodes']:4d} params={s['params']:>9,d} size={s['bytes'] / 1e6:6.3f} MB "
                  f"logits_std={std:6.3f} calib={len(calib_files)} val={len(val_files)} "
                  f"({time.perf_counter() - t0:.2f} s) -> {path}")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Build the onnxfp8 example models and their data.")
    parser.add_argument("--out", default="models",
                        help="output folder (default: ./models)")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(EXAMPLES)}")
    parser.add_argument("--calib", type=int, default=64, help="calibration samples (seed 1)")
    parser.add_argument("--val", type=int, default=64, help="validation samples (seed 2)")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    t0 = time.perf_counter()
    try:
        build_all(args.out, calib=args.calib, val=args.val, only=only, verbose=True)
    except ValueError as e:
        parser.error(str(e))
    print(f"done in {time.perf_counter() - t0:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
