"""select_ops: decide which nodes are quantized, each decision with its reason, into the plan.

The rules come from the config (op types of the scheme, --exclude-op, --include-node / --exclude-node globs
and regexes, --keep-first-last) plus the structural SupportRule (a Conv needs a constant weight, a Gather
must be an embedding lookup...). With the scheme's own op types (no --op-types), embedding Gathers stay FP32
(rules.DefaultEmbeddingRule: quantizing them made the default less accurate than the plain scheme). A name pattern that matches no node is an error: it is almost always a
typo or a renamed export."""
from __future__ import annotations

from typing import List

import onnx_graphsurgeon as gs

from onnxfp8.errors import ConfigError
from onnxfp8.pipeline import Pass, PassContext, PassResult
from onnxfp8.plan import NodeDecision
from onnxfp8.state import PatternMatch
from onnxfp8.rules import (DefaultEmbeddingRule, ExcludeOpRule, FirstLastRule, GraphInfo, NodeNameRule, NodeRule,
                           OpTypeRule, SupportRule, select)

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def build_rules(ctx: PassContext) -> List[NodeRule]:
    cfg = ctx.config
    rules: List[NodeRule] = []
    if cfg.exclude_nodes:
        rules.append(NodeNameRule(cfg.exclude_nodes))
    if cfg.include_nodes:
        rules.append(NodeNameRule(cfg.include_nodes, include=True))
    rules.append(OpTypeRule(cfg.selected_op_types))
    if cfg.exclude_ops:
        rules.append(ExcludeOpRule(cfg.exclude_ops))
    if cfg.op_types is None:
        rules.append(DefaultEmbeddingRule())  # embedding tables stay FP32 unless Gather is asked for by name
    if cfg.keep_first_last:
        rules.append(FirstLastRule())
    rules.append(SupportRule(activation_matmul=cfg.scheme == "extended"))
    return rules


class SelectOps(Pass):
    name = "select_ops"

    def __init__(self, extra_rules: List[NodeRule] = ()):
        self.extra_rules = list(extra_rules)

    def ensures(self, graph: gs.Graph, ctx: PassContext) -> None:
        """Every node is decided, with a reason."""
        for node in graph.nodes:
            d = ctx.plan.nodes.get(node.name)
            if d is None:
                raise ValueError(f"node '{node.name}' has no decision")
            if not d.reason:
                raise ValueError(f"node '{node.name}' is {'' if d.quantized else 'not '}quantized without a reason")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        rules = self.extra_rules + build_rules(ctx)
        info = GraphInfo(compute_order=[n.name for n in graph.nodes if n.op in COMPUTE_OPS])
        decisions = select(graph.nodes, rules, info)
        support = next(r for r in rules if isinstance(r, SupportRule))
        notes = []
        for rule in rules:
            if isinstance(rule, NodeNameRule):
                rule.record(graph.nodes)
                flag = "--include-node" if rule.include else "--exclude-node"
                for pattern, names in rule.matches.items():
                    if not names:
                        raise ConfigError(f"{ctx.source}: {flag} pattern '{pattern}' matches no node")
                    ctx.patterns.append(PatternMatch(flag, pattern, list(names)))
        by_name = {n.name: n for n in graph.nodes}
        for name, d in decisions.items():
            node = by_name[name]
            roles = support.roles.get(name, {}) if d.include else {}
            ctx.plan.nodes[name] = NodeDecision(name, node.op, d.include, d.reason, roles)
        q = sum(1 for d in decisions.values() if d.include)
        notes.insert(0, f"{q} of {len(decisions)} node(s) selected for quantization")
        if ctx.patterns:  # what each matched is ctx.patterns (the report's patterns), not prose here
            notes.append(f"{len(ctx.patterns)} node-name pattern(s) matched (report: patterns)")
        return PassResult(False, notes)
