"""Reports as dataclasses with ``to_json()``: what each pass did, per-node decisions, FP32-vs-quantized
metrics and timings."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from onnxfp8.pipeline import PassRecord
from onnxfp8.versions import software
from onnxfp8.plan import QuantPlan, json_plain
from onnxfp8.state import BatchNormReport, CalibrationInfo, PatternMatch

RUN_EXACTLY = ("run it in onnxruntime with SessionOptions.graph_optimization_level = ORT_ENABLE_BASIC and "
               "InferenceSession(..., disabled_optimizers=['WeightBiasQuantization']) (onnxfp8.modelio.make_session "
               "does both): at the default ENABLE_ALL onnxruntime's Q/DQ fusions around Conv/Gemm change the numbers, "
               "and WeightBiasQuantization turns INT8 biases into INT32; or quantize with --style emulate, which is "
               "exact at every level")


@dataclass
class QuantReport:
    source: str
    output: Optional[str]
    config: Dict[str, Any]
    passes: List[PassRecord]
    plan: QuantPlan
    size_before: int = 0
    size_after: int = 0
    outputs: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # output -> metrics on summary samples
    summary_samples: int = 0
    calibration: Optional[CalibrationInfo] = None
    seconds: float = 0.0
    how_to_run: str = ""
    measured_on: str = ""  # a bfloat16 model: the summary's figures are its float32 twin's (bfloat16.py)
    batchnorm: Optional[BatchNormReport] = None  # BN recalibration: per-layer shifts, SQNR without/with
    patterns: List[PatternMatch] = field(default_factory=list)  # what each node-name pattern matched
    warnings: List[str] = field(default_factory=list)  # one line each, printed as "warning: ..." (control flow)
    control_flow: List[Dict[str, str]] = field(default_factory=list)  # nodes in If/Loop/Scan bodies left FP32
    # would `onnxfp8 check`'s default thresholds hold on the summary samples: passed, failures, what to try
    check_defaults: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "software": software(), "source": self.source, "output": self.output, "config": self.config,
            "passes": [p.to_dict() for p in self.passes],
            "quantized_by_op": self.plan.counts_by_op(),
            "skipped": [{"node": d.node, "op_type": d.op_type, "reason": d.reason} for d in self.plan.skipped_nodes()],
            "plan": self.plan.to_dict(),
            "size_before": self.size_before, "size_after": self.size_after,
            "outputs": self.outputs, "summary_samples": self.summary_samples,
            "calibration": self.calibration.to_dict() if self.calibration else {},
            "seconds": round(self.seconds, 4), "how_to_run": self.how_to_run, "measured_on": self.measured_on,
            "batchnorm": json_plain(self.batchnorm.to_dict()) if self.batchnorm else {},
            "patterns": [m.to_dict() for m in self.patterns],
            "warnings": self.warnings, "control_flow": self.control_flow,
            "check_defaults": json_plain(self.check_defaults),
        }

    def to_json(self, indent: int = 1) -> str:
        return json.dumps(json_plain(self.to_dict()), indent=indent, allow_nan=False)

    def summary(self, verbose: bool = False) -> str:
        """The human summary the CLI prints; ``verbose`` (quantize -v): every node left FP32 and every tensor
        format auto chose, nothing shortened."""
        lines = []
        by_op = self.plan.counts_by_op()
        total = sum(by_op.values())
        fmt = self.config.get("format")
        wf = self.config.get("weights_format") or fmt
        af = self.config.get("activations_format") or fmt
        lines.append(f"quantized {total} node(s): " + (", ".join(f"{k} {v}" for k, v in by_op.items()) or "none")
                     + f"  [weights {wf}, activations {af}, {self.config.get('style')} style]")
        e3m4 = sum(1 for t in self.plan.tensors.values() if t.format == "e3m4")
        if e3m4:
            lines.append(f"emulation-only: {e3m4} tensor(s) in E3M4, which has no ONNX type: they are emulated in "
                         f"float ops (weights as 8-bit codes and a lookup table), which no runtime runs as 8-bit "
                         f"kernels; deploy E4M3 or INT8 (format auto leaves E3M4 out unless --formats names it)")
        skipped = self.plan.skipped_nodes()
        reasons: Dict[str, List[str]] = {}
        for d in skipped:
            reasons.setdefault(d.reason, []).append(d.node)
        interesting = {r: n for r, n in reasons.items() if verbose or "is not quantized by this scheme" not in r}
        plain = sum(len(n) for r, n in reasons.items() if r not in interesting)
        lines.append(f"left FP32: {len(skipped)} node(s)" + (f" ({plain} of op types outside the scheme)" if plain else ""))
        for r, names in sorted(interesting.items(), key=lambda kv: -len(kv[1])):
            show = names if verbose else names[:4]
            more = f" (+{len(names) - 4} more)" if len(names) > len(show) else ""
            lines.append(f"  {len(names):4d} x {r}: {', '.join(show)}{more}")
        matched = [m.describe() for m in self.patterns]
        if matched:  # what each node-name pattern matched (select_ops fails on a pattern matching nothing)
            lines.append("node patterns: " + "; ".join(matched))
        if self.size_before:
            ratio = self.size_after / self.size_before if self.size_before else 0
            lines.append(f"file size: {_mb(self.size_before)} -> {_mb(self.size_after)} ({ratio:.2f}x)")
        lines.append("time per pass: " + ", ".join(f"{p.name} {p.seconds:.2f}s" for p in self.passes)
                     + f"; total {self.seconds:.2f}s")
        if self.outputs:
            lines.append(f"output SQNR vs FP32 on {self.summary_samples} calibration sample(s):")
            for name, m in self.outputs.items():
                s = m["sqnr_db"]
                s = f"{s:.2f} dB" if isinstance(s, float) and math.isfinite(s) else str(s)
                top1 = f", top-1 agreement {100 * m['top1_agreement']:.1f}%" if "top1_agreement" in m else ""
                lines.append(f"  {name}: SQNR {s}, cosine {m['cosine']:.6f}, max |err| {m['max_abs']:.4g}{top1}")
            if self.measured_on:
                lines.append(f"  ({self.measured_on})")
            lines.extend(check_defaults_lines(self.check_defaults, self.source, self.output))
        lines.extend(transform_lines(self.plan))
        if self.batchnorm:
            lines.extend(batchnorm_lines(self.batchnorm))
        if self.how_to_run:
            lines.append(f"to compute it exactly: {self.how_to_run}")
        lines.extend(auto_summary(self.plan, limit=None if verbose else 8) + dynamic_summary(self.plan))  # auto: what won where; dynamic
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def transform_lines(plan) -> List[str]:
    """What the transform guard kept and reverted (plan.transforms' ``transform_guard`` records), or the
    transforms applied unguarded."""
    guard = [r for r in plan.transforms if r.get("pass") == "transform_guard"]
    if guard:
        parts = []
        for r in guard:
            verdict = "kept" if r.get("kept") else ("no change" if r.get("with_db") is None else "reverted")
            parts.append(f"{r['transform']} {verdict}" + (f" ({r['reason']})" if r.get("with_db") is not None else ""))
        where = "held-out calibration" if guard[0].get("held_out") else "calibration"
        return [f"transforms, measured on {guard[0].get('samples', 0)} {where} sample(s): " + "; ".join(parts)]
    done = sorted({r.get("pass") for r in plan.transforms if r.get("kind") != "left_alone"})
    return [f"transforms (unguarded): {', '.join(done)}"] if done else []


def check_defaults_lines(cd: Dict[str, Any], source: str = "MODEL", output: Optional[str] = None) -> List[str]:
    """Whether `onnxfp8 check`'s defaults hold on the summary samples, and what to try when they do not."""
    if not cd:
        return []
    t = cd.get("thresholds", {})
    crit = ", ".join(x for x in (
        f"SQNR >= {t['min_sqnr']:g} dB" if t.get("min_sqnr") is not None else "",
        f"cosine >= {t['min_cosine']:g}" if t.get("min_cosine") is not None else "",
        f"rel L2 <= {t['max_rel_error']:g}" if t.get("max_rel_error") is not None else "",
        f"top-1 agreement >= {100 * t['min_top1_agreement']:g}%" if t.get("min_top1_agreement") is not None else "",
    ) if x)
    n = cd.get("samples", 0)
    if cd.get("passed"):
        return [f"check defaults ({crit}): hold on these {n} calibration sample(s); gate on held-out data with "
                f"--check --val DIR (or onnxfp8 check)"]
    lines = [f"check defaults ({crit}): NOT met on these {n} calibration sample(s): " + "; ".join(cd.get("failures", []))]
    if cd.get("try"):
        tips = [t.replace("MODEL QUANT", f"{source} {output or 'QUANT'}") for t in cd["try"]]
        lines.append("  to try: " + "; ".join(tips))
    return lines


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"


def batchnorm_lines(report: BatchNormReport) -> List[str]:
    """Summary of BatchNorm recalibration: per layer the mean shift (in old standard deviations, mean and max
    over channels) and the variance ratio new/old, then the output SQNR without and with recalibration."""
    bn = report.to_dict()
    aug = f", augmented {','.join(bn['augment'])}" if bn.get("augment") else ""
    lines = [f"BatchNorm recalibration ({bn.get('mode', 'replace')} mode, {bn.get('statistics', 'pooled')} statistics) "
             f"on {bn.get('samples', 0)} "
             f"sample(s) in {bn.get('batches', 0)} batch(es){aug}:"]
    for name, d in bn.get("layers", {}).items():
        lines.append(f"  {name}: mean shift {d['mean_shift']:.4f} sigma (max {d['max_mean_shift']:.4f}), variance "
                     f"x{d['var_ratio']:.4f} (range {d['min_var_ratio']:.4f}-{d['max_var_ratio']:.4f}), "
                     f"{d['channels']} channel(s)")
    n_eval = bn.get("eval_samples") or 0
    where = (f"{n_eval} held-out calibration sample(s)" if bn.get("eval_held_out")
             else f"{n_eval} calibration sample(s), also used for recalibration")
    without, with_ = bn.get("sqnr_without") or {}, bn.get("sqnr_with") or {}
    for out in without:
        if out in with_:
            line = f"  output {out}: SQNR vs FP32 without recalibration {_db(without[out])}, with {_db(with_[out])}"
            for key, what in (("top1", "top-1 agreement"), ("accuracy", "accuracy")):
                a, b = (bn.get(f"{key}_without") or {}).get(out), (bn.get(f"{key}_with") or {}).get(out)
                if a is not None and b is not None:
                    line += f"; {what} {100 * a:.2f}% -> {100 * b:.2f}%"
            lines.append(line + f" (on {where})")
    if bn.get("layers") and not bn.get("applied", True):
        lines.append(f"  kept the stored statistics: recalibration lowered {bn.get('worse')} (the shifts above "
                     f"were measured, not applied; --no-bn-guard applies them)")
    elif bn.get("worse"):
        lines.append(f"  recalibration lowered {bn['worse']}; applied anyway (--no-bn-guard)")
    return lines


def _db(v: Any) -> str:
    return f"{v:.2f} dB" if isinstance(v, float) and math.isfinite(v) else str(v)


def auto_summary(plan, limit: Optional[int] = 8) -> List[str]:
    """What format auto chose, in words, for the CLI summary: the count per format, then the tensors where the
    choice mattered most (largest margin between the best and the second-best candidate) with their reasons
    (QuantSpec.auto_reason, a field: no note is parsed) ('layer0/attn_ln/output (activation): this tensor has outliers (max/rms 25.3): E4M3 beats E3M4 by 6.1 dB
    (SQNR ...)'). Every candidate's SQNR is in the plan (QuantSpec.candidates) and the JSON report."""
    specs = [s for s in plan.tensors.values() if len(s.candidates) > 1]
    if not specs:
        return []
    won: Dict[str, int] = {}
    for s in specs:
        won[s.format] = won.get(s.format, 0) + 1

    def margin(s) -> float:
        top = sorted(s.candidates.values(), reverse=True)
        d = top[0] - top[1]
        return d if math.isfinite(d) else 0.0

    line = ("format auto (per tensor, the candidate with the best SQNR on the weight's values or the activation's "
            "calibration histogram): ") + ", ".join(
        f"{f} chosen for {k} tensor(s)" for f, k in sorted(won.items(), key=lambda kv: -kv[1]))
    if "int8" in won:
        line += f"; INT8 wins {won['int8']} tensor(s)"
    lines = [line]
    for s in sorted(specs, key=margin, reverse=True)[:limit]:
        lines.append(f"  {s.tensor} ({s.role}): {s.auto_reason}")
    if limit is not None and len(specs) > limit:
        lines.append(f"  (+{len(specs) - limit} more; -v shows all; --plan and --report hold every candidate's SQNR)")
    return lines


def dynamic_summary(plan) -> List[str]:
    """Dynamic quantization, in words: how many activation scales are computed at run time, per row (token) /
    per column / per tensor (from the specs' ``dynamic`` field)."""
    kinds: Dict[str, int] = {}
    for s in plan.activations():
        if s.dynamic is not None and s.scale is None:
            kinds[s.dynamic.kind] = kinds.get(s.dynamic.kind, 0) + 1
    if not kinds:
        return []
    return [f"dynamic quantization: {sum(kinds.values())} activation scale(s) computed at run time "
            f"(ReduceMax(Abs(x)) / format max, no calibration): "
            + ", ".join(f"{n} {kind}" for n, kind in sorted(((n, k) for k, n in kinds.items()), reverse=True))]
