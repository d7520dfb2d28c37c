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

import onnx_graphsurgeon as gs


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
    return is_const(t) and t.values.dtype.kind == "f"


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
    ``matches`` records what every pattern matched, for the report."""

    def __init__(self, patterns: Sequence[str], include: bool = False):
        self.patterns = list(patterns)
        self.include = include
        self._match = [(p, compile_pattern(p)) for p in self.patterns]
        self.matches: Dict[str, List[str]] = {p: [] for p in self.patterns}

    def decide(self, node, info):
        hit = [p for p, m in self._match if m(node.name)]
        for p in hit:
            self.matches[p].append(node.name)
        flag = "--include-node" if self.include else "--exclude-node"
        if self.include:
            return None if hit else Decision(False, f"name does not match any {flag} pattern")
        return Decision(False, f"name matches {flag} '{hit[0]}'") if hit else None

    def unmatched(self) -> List[str]:
        return [p for p, names in self.matches.items() if not names]


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
    """Which inputs of ``node`` get quantized, as {input index: "weight"|"activation"}, or (None, reason)."""
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
        if float_const(b) and not is_const(a) and b.values.ndim >= 2:
            return {0: "activation", 1: "weight"}, ""
        if float_const(a) and not is_const(b) and a.values.ndim >= 2:
            return {0: "weight", 1: "activation"}, ""
        if not is_const(a) and not is_const(b):
            if activation_matmul:
                return {0: "activation", 1: "activation"}, ""
            return None, "MatMul between two activations (extended scheme only)"
        return None, "MatMul without a constant 2-D weight"
    if op == "Gather":
        data, idx = ins[0], ins[1]
        if float_const(data) and data.values.ndim == 2 and not is_const(idx) and node.attrs.get("axis", 0) == 0:
            return {0: "weight"}, ""
        return None, "Gather is not an embedding lookup on a constant 2-D table"
    return {i: "activation" for i, t in enumerate(ins) if not is_const(t) and t.name}, ""


def weight_axis(node: gs.Node, index: int, rank: int) -> Optional[int]:
    """The per-output-channel axis of a weight input: Conv 0, ConvTranspose 1, Gemm by transB, MatMul by
    layout (weight on the right: last axis; on the left: its row axis), Gather (embedding table): rows."""
    op = node.op
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1
    if op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
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
