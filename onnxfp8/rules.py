"""NodeRules: operator selection as small rule objects that say include / exclude *with a reason*.

A rule's ``decide(node, graph_info)`` returns ``Decision(include, reason)`` or ``None`` when it has nothing
to say. ``select()`` runs the rules in order: the first exclusion wins, so every node left in FP32 can say
why; a node is quantized when some rule included it and none excluded it.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from onnxfp8.formats import is_float_dtype
from onnxfp8.tensorrt import FUSABLE as TRT_FUSABLE, WEIGHTED as TRT_WEIGHTED, weighted_problem


@dataclass(frozen=True)
class Decision:
    include: bool
    reason: str


@dataclass
class GraphInfo:
    """Facts about the graph rules may consult: compute-node order (for first/last rules)."""

    compute_order: List[str] = field(default_factory=list)


def is_const(t) -> bool:
    return isinstance(t, gs.Constant)


def float_const(t) -> bool:
    # t.dtype and t.shape, not t.values: graphsurgeon loads large initializers lazily, and reading .values
    # here copied every weight of a 2 GB model just to look at its type
    if not is_const(t):
        return False
    return bool(float_kind(t))  # t.dtype may be an ONNX enum (FP8 / BF16 data): float_kind reads both


def float_kind(t) -> Optional[bool]:
    """Whether tensor ``t`` holds floating-point values, from its (inferred) type: True, False (integer, bool,
    string: a shape, an index, a mask), or None when the type is unknown (shape inference could not type it)."""
    dtype = getattr(t, "dtype", None)
    if dtype is None:
        return None
    try:
        return is_float_dtype(dtype)
    except TypeError:
        return None


class NodeRule:
    def decide(self, node: gs.Node, info: GraphInfo) -> Optional[Decision]:  # pragma: no cover - abstract
        raise NotImplementedError


class OpTypeRule(NodeRule):
    """Include nodes whose op type is selected; everything else is left FP32 ('op type not selected')."""

    def __init__(self, op_types: Iterable[str]):
        self.op_types = tuple(op_types)

    def decide(self, node, info):
        if node.op in self.op_types:
            return Decision(True, f"op type {node.op} selected")
        return Decision(False, f"op type {node.op} is not quantized by this scheme")


class ExcludeOpRule(NodeRule):
    def __init__(self, op_types: Iterable[str]):
        self.op_types = tuple(op_types)

    def decide(self, node, info):
        if node.op in self.op_types:
            return Decision(False, f"op type {node.op} excluded (--exclude-op)")
        return None


class DefaultEmbeddingRule(NodeRule):
    """The schemes' default operator sets leave an embedding lookup (Gather on a constant 2-D table) in FP32.

    FP8-BERT (arXiv 2312.05725) keeps embeddings in high precision, and the zoo measured why: on its
    transformer exports quantizing the embedding tables cost up to 3.5 dB of output SQNR against the plain
    scheme (Conv/Gemm/MatMul only; docs/coverage.md), so a default that quantized them was less accurate than
    the plain scheme (issue 11 item 5). The rule is only in force when the op types are the scheme's own
    (``op_types`` not given): listing Gather in ``op_types`` / ``--op-types`` quantizes the tables."""

    REASON = ("embedding Gather kept FP32 by default (quantizing the tables lost up to 3.5 dB at the outputs of "
              "the zoo's transformers; FP8-BERT keeps embeddings in high precision): list Gather in "
              "--op-types to quantize it")

    def decide(self, node, info):
        if node.op == "Gather" and is_embedding_lookup(node):
            return Decision(False, self.REASON)
        return None


def is_embedding_lookup(node: gs.Node) -> bool:
    """A Gather reading rows (axis 0) of a constant float 2-D table with non-constant indices."""
    ins = node.inputs
    if node.op != "Gather" or len(ins) < 2:
        return False
    data, idx = ins[0], ins[1]
    return bool(float_const(data) and len(data.shape) == 2 and not is_const(idx) and node.attrs.get("axis", 0) == 0)


def compile_pattern(pattern: str):
    """``/regex/`` or ``re:regex`` is a regular expression (searched), anything else a glob on the name."""
    if len(pattern) > 1 and pattern.startswith("/") and pattern.endswith("/"):
        rx = re.compile(pattern[1:-1])
        return lambda name: rx.search(name) is not None
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return lambda name: rx.search(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


class NodeNameRule(NodeRule):
    """Exclude (or, with ``include=True``, restrict quantization to) nodes whose name matches a pattern.
    ``record(nodes)`` fills ``matches``, what every pattern matched, for the report."""

    def __init__(self, patterns: Sequence[str], include: bool = False):
        self.patterns = list(patterns)
        self.include = include
        self._match = [(p, compile_pattern(p)) for p in self.patterns]
        self.matches: Dict[str, List[str]] = {p: [] for p in self.patterns}

    def record(self, nodes: Iterable[gs.Node]) -> None:
        """Fill ``matches`` over every node, whatever other rules decide (a node another rule excludes first is
        still a match: a pattern is only 'matching nothing' when no node name matches it)."""
        self.matches = {p: [n.name for n in nodes if m(n.name)] for p, m in self._match}

    def decide(self, node, info):
        hit = [p for p, m in self._match if m(node.name)]
        flag = "--include-node" if self.include else "--exclude-node"
        if self.include:
            return None if hit else Decision(False, f"name does not match any {flag} pattern")
        return Decision(False, f"name matches {flag} '{hit[0]}'") if hit else None


class FirstLastRule(NodeRule):
    """Keep the first and the last compute layer in FP32 (a common CV practice)."""

    def decide(self, node, info):
        order = info.compute_order
        if order and node.name in (order[0], order[-1]):
            which = "first" if node.name == order[0] else "last"
            return Decision(False, f"{which} compute layer kept FP32 (--keep-first-last)")
        return None


class SupportRule(NodeRule):
    """Structural conditions under which each op type can be quantized (e.g. Conv needs a constant weight).
    Also records, per node, which inputs are weights and which are activations."""

    def __init__(self, activation_matmul: bool = False):
        self.activation_matmul = activation_matmul
        self.roles: Dict[str, Dict[int, str]] = {}

    def decide(self, node, info):
        roles, reason = quant_inputs(node, self.activation_matmul)
        if roles is None:
            return Decision(False, reason)
        self.roles[node.name] = roles
        return None


def quant_inputs(node: gs.Node, activation_matmul: bool = False):
    """Which inputs of ``node`` get quantized, as {input index: "weight"|"activation"}, or (None, reason).

    Only floating-point tensors are quantized: an activation input whose inferred type is an integer or bool
    (a shape, an index, a mask) or unknown is never given a Q/DQ, whatever the op type. Conv / ConvTranspose /
    Gemm / MatMul with a constant float weight need no inferred type: the op's type constraint makes the
    activation the weight's float type."""
    roles, reason = _structural_inputs(node, activation_matmul)
    if roles is None:
        return roles, reason
    weighted = any(r == "weight" for r in roles.values())
    kept, dropped = {}, []
    for i, r in roles.items():
        if r == "weight" or (weighted and node.op in TYPE_TIED_OPS) or float_kind(node.inputs[i]):
            kept[i] = r
        else:
            dropped.append(i)
    if dropped and not any(r == "activation" for r in kept.values()):
        t = node.inputs[dropped[0]]
        kind = float_kind(t)
        what = f"of type {np.dtype(t.dtype).name}" if kind is False else "of unknown type (shape inference could not type it)"
        return None, f"{node.op} input '{t.name}' is {what}: only floating-point tensors are quantized"
    if node.op in ("Add", "Mul", "Sub") and len(kept) < 2:
        return None, f"{node.op} with a non-float operand is left FP32"
    return kept, ""


# ops whose quantized activation input has the type of their constant float weight (ONNX type constraint T)
TYPE_TIED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _structural_inputs(node: gs.Node, activation_matmul: bool = False):
    ins = node.inputs
    op = node.op
    if op in ("Conv", "ConvTranspose"):
        if len(ins) < 2 or not float_const(ins[1]):
            return None, f"{op} weight is not a constant"
        if is_const(ins[0]):
            return None, f"{op} input is a constant"
        return {0: "activation", 1: "weight"}, ""
    if op == "Gemm":
        a, b = ins[0], ins[1]
        if not float_const(b):
            return None, "Gemm B is not a constant weight"
        if node.attrs.get("transA", 0):
            return None, "Gemm with transA=1 is not quantized"
        if is_const(a):
            return None, "Gemm A is a constant"
        return {0: "activation", 1: "weight"}, ""
    if op == "MatMul":
        a, b = ins[0], ins[1]
        if float_const(b) and not is_const(a) and len(b.shape) >= 2:
            return {0: "activation", 1: "weight"}, ""
        if float_const(a) and not is_const(b) and len(a.shape) >= 2:
            return {0: "weight", 1: "activation"}, ""
        if not is_const(a) and not is_const(b):
            if activation_matmul:
                return {0: "activation", 1: "activation"}, ""
            return None, "MatMul between two activations (extended scheme only)"
        return None, "MatMul without a constant 2-D weight"
    if op == "Gather":
        if is_embedding_lookup(node):
            return {0: "weight"}, ""
        return None, "Gather is not an embedding lookup on a constant 2-D table"
    if op in PASSTHROUGH_OPS and not (op == "Resize" and node.attrs.get("mode", "nearest") != "nearest"):
        return None, (f"{op} only carries quantized tensors through (passthrough pass); no quantized consumer "
                      f"reads its output here")
    if op in ("Add", "Mul", "Sub"):
        acts = {i: "activation" for i, t in enumerate(ins[:2]) if not is_const(t) and t.name}
        if len(acts) < 2:
            return None, f"{op} with a constant operand (a bias or a scale) is left FP32"
        return acts, ""
    if op in SINGLE_INPUT_OPS:
        if not ins or is_const(ins[0]) or not ins[0].name:
            return None, f"{op} input is a constant"
        return {0: "activation"}, ""  # normalisation parameters, Resize scales/sizes stay FP32
    return {i: "activation" for i, t in enumerate(ins) if not is_const(t) and t.name}, ""


# Ops whose output holds (a selection of) the very values of their input: a tensor quantized on their input
# stays on the same grid through them (passes/passthrough.py); Resize only in mode "nearest".
PASSTHROUGH_OPS = ("MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Concat", "Slice",
                   "Resize", "Identity", "Relu")
# Ops of the extended scheme that quantize only their data input (input 0).
SINGLE_INPUT_OPS = ("LayerNormalization", "BatchNormalization", "InstanceNormalization", "Softmax", "AveragePool",
                    "GlobalAveragePool", "Resize")


def weight_axis(node: gs.Node, index: int, rank: int) -> Optional[int]:
    """The per-output-channel axis of weight input ``index`` of ``node`` (see channel_axis)."""
    return channel_axis(node.op, node.attrs, index, rank)


def channel_axis(op: str, attrs, index: int, rank: int) -> Optional[int]:
    """The per-output-channel axis of a weight input: Conv 0, ConvTranspose 1, Gemm by transB, MatMul by
    layout (weight on the right: last axis; on the left: its row axis), Gather (embedding table): rows.
    ``attrs``: the node's attributes as a mapping (graphsurgeon's ``node.attrs``, or a dict from a NodeProto)."""
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1
    if op == "Gemm":
        return 0 if attrs.get("transB", 0) else 1
    if op == "MatMul":
        return rank - 1 if index == 1 else rank - 2
    if op == "Gather":
        return 0
    return None


def select(nodes: Iterable[gs.Node], rules: Sequence[NodeRule], info: GraphInfo) -> Dict[str, Decision]:
    out: Dict[str, Decision] = {}
    for node in nodes:
        included: Optional[Decision] = None
        excluded: Optional[Decision] = None
        for rule in rules:
            d = rule.decide(node, info)
            if d is None:
                continue
            if not d.include:
                excluded = d
                break
            included = included or d
        out[node.name] = excluded or included or Decision(False, "no rule selected it")
    return out


# --------------------------------------------------------------------------------------------------
# TensorRT placement (--target tensorrt)
# --------------------------------------------------------------------------------------------------
def weighted_branch(t, depth: int = 3) -> Optional[gs.Node]:
    """The Conv/Gemm/MatMul whose output ``t`` is, directly or through the bias Add / BatchNormalization that
    TensorRT fuses into it (the layer an Add's Q/DQ-free input comes from), else None."""
    for _ in range(depth):
        if t is None or len(getattr(t, "inputs", [])) != 1:
            return None
        p = t.inputs[0]
        if p.op in TRT_WEIGHTED:
            return p
        if p.op == "BatchNormalization" or (p.op == "Add" and any(is_const(i) for i in p.inputs)):
            t = p.inputs[0] if not is_const(p.inputs[0]) else p.inputs[1]
            continue
        return None
    return None


class TensorRTRule(SupportRule):
    """--target tensorrt: keep only the Q/DQ placements TensorRT turns into FP8 kernels, each exclusion with
    the reason. It also decides which inputs get Q/DQ (it is the pipeline's SupportRule when present).

    Sources: TensorRT's "Working with Quantized Types" (FP8 is FP8E4M3 only, symmetric: zero point 0) and
    "Explicit Quantization" (quantize all inputs of weighted layers - Conv, Deconv, GEMM/MatMul -, not their
    outputs; quantize the residual input of an Add so it fuses into the preceding layer, while a Q/DQ pair
    between the layer and the Add blocks that fusion; per-tensor activations, per-channel weights along the
    output channel axis); NVIDIA TensorRT-Model-Optimizer, modelopt/onnx/quantization/graph_utils.py
    (``find_nodes_from_convs_to_exclude``: FP8 Convs need >= 16 input and output channels and a filter of at most
    32 taps; ``find_nodes_from_matmul_to_exclude``: GEMV - one row - and K/N < 16 are left in high precision).
    Channel counts are required to be multiples of 16 (not just >= 16): FP8 Tensor Core GEMMs (cuBLASLt) need
    16-byte aligned K and N, i.e. multiples of 16 one-byte elements.

    - Conv / ConvTranspose / Gemm / MatMul with a constant weight: quantized unless channels or filter size
      fall outside what the FP8 kernels take, or the GEMM is a GEMV (static single row);
    - MatMul between two activations: left FP32 (TensorRT runs FP8 batched GEMMs only inside its fused
      attention kernels);
    - Add: only a residual Add (one input from a Conv/Gemm/MatMul, possibly through its bias Add or BN), and only
      its residual input; bias Adds and Adds of constants are left alone;
    - pooling and Concat: quantized inputs (TensorRT fuses them with the input DQ);
    - any other selected op type: left FP32 (TensorRT has no FP8 kernel for it).
    """

    def __init__(self, op_types: Iterable[str] = ()):
        super().__init__(activation_matmul=False)
        self.op_types = tuple(op_types)

    def decide(self, node, info):
        if self.op_types and node.op not in self.op_types:
            return None  # OpTypeRule says why
        if node.op not in TRT_FUSABLE:
            return Decision(False, f"TensorRT has no FP8 kernel for {node.op} (--target tensorrt)")
        roles, _ = quant_inputs(node, False)
        if roles is None:
            if node.op == "MatMul" and not any(is_const(i) for i in node.inputs[:2]):
                return Decision(False, "MatMul between two activations: TensorRT runs FP8 batched GEMMs only inside "
                                       "its fused attention kernels (--target tensorrt)")
            return None  # the structural SupportRule says why
        if node.op in TRT_WEIGHTED:
            widx = [i for i, r in roles.items() if r == "weight"]
            aidx = [i for i, r in roles.items() if r == "activation"]
            if node.op == "MatMul" and widx == [0]:
                return Decision(False, "MatMul with the constant weight on the left: TensorRT takes per-channel "
                                       "weight scales on the right operand's output columns (--target tensorrt)")
            if widx:
                act = node.inputs[aidx[0]] if aidx else None
                why = weighted_problem(node.op, node.attrs, node.inputs[widx[0]].values.shape,
                                       list(act.shape) if act is not None and act.shape is not None else None)
                if why:
                    return Decision(False, f"{why} (--target tensorrt)")
        elif node.op == "Add":
            if any(is_const(i) for i in node.inputs):
                return Decision(False, "Add of a constant (a bias or an epsilon), not a residual connection: "
                                       "TensorRT fuses it into the preceding layer (--target tensorrt)")
            branch = {i: weighted_branch(node.inputs[i]) for i in roles}
            fused = [i for i, b in branch.items() if b is not None]
            if len(fused) != 1:
                what = "both inputs come from" if fused else "neither input comes from"
                return Decision(False, f"Add where {what} a Conv/Gemm/MatMul: not the residual pattern TensorRT "
                                       "fuses (--target tensorrt)")
            roles = {i: r for i, r in roles.items() if i not in fused}
        self.roles[node.name] = roles
        return None
