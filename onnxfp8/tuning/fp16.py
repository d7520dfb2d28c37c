"""FP16-safety of layers, from calibration statistics: which fallback layers may run in FP16.

A layer in high-precision fallback runs as an FP16 island (passes/fp16_fallback.py) when it is FP16-safe, else
in FP32. Safe means, on the calibration data (one max pass of the FP32 model over it, reductions in-graph):

- its op has an FP16 island (plan.FALLBACK_FP16_OPS);
- every float input and its output stay within FP16's range with FP16_HEADROOM to spare (data beyond the
  calibration set: a range of 40000 is not safe with the default 2x), and none is ever non-finite (a mask value
  of -3.4e38 added to attention scores is not FP16-safe);
- an activation's range is not so small that FP16's subnormal step is coarser than its relative precision at
  the top of that range (amax >= FP16_MIN_RANGE);
- its weights and bias round to FP16 with at least WEIGHT_MIN_SQNR_DB of SQNR (a weight of tiny values that
  FP16 flushes to subnormals or zero is not safe; plain FP16 rounding gives ~75 dB).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import numpy as np
from onnx import numpy_helper

from onnxfp8.plan import FALLBACK_FP16_OPS

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
FP16_HEADROOM = 2.0
FP16_MIN_RANGE = 2.0 ** -13  # FP16's subnormal step 2^-24 within the 2^-11 relative precision at the top
WEIGHT_MIN_SQNR_DB = 60.0


@dataclass
class FP16Verdict:
    node: str
    safe: bool
    reason: str

    def to_dict(self) -> Dict[str, Any]:
        return {"node": self.node, "safe": self.safe, "reason": self.reason}


def weight_sqnr_db(w: np.ndarray) -> float:
    w = np.asarray(w, np.float64)
    err = w - w.astype(np.float16).astype(np.float64)
    p, e = float(np.sum(w * w)), float(np.sum(err * err))
    if e == 0:
        return math.inf
    return 10 * math.log10(p / e) if p > 0 else -math.inf


def fp16_safety(model, nodes: Sequence[str], data, *, providers=("CPUExecutionProvider",), threads: int = 0,
                max_memory_mb: float = 2048, progress=None) -> Dict[str, FP16Verdict]:
    """A verdict for every node of ``nodes`` in the FP32 ``model`` (an onnx.ModelProto whose node and tensor
    names are the plan's), from one max pass over ``data`` (calibrators.data.CalibrationData)."""
    from onnxfp8.calibrators.collector import collect
    from onnxfp8.calibrators.max import MaxCalibrator

    g = model.graph
    by_name = {n.name: n for n in g.node}
    inits = {t.name: t for t in g.initializer}
    want: Dict[str, Dict[str, list]] = {}
    tensors = []
    out: Dict[str, FP16Verdict] = {}
    for name in nodes:
        n = by_name.get(name)
        if n is None:
            out[name] = FP16Verdict(name, False, "not in the model")
            continue
        if n.op_type not in FALLBACK_FP16_OPS:
            out[name] = FP16Verdict(name, False, f"no FP16 island for {n.op_type} (made for "
                                                 f"{', '.join(FALLBACK_FP16_OPS)})")
            continue
        ins = list(n.input[:1]) if n.op_type == "Gather" else [i for i in n.input if i]
        acts = [i for i in ins if i not in inits]
        want[name] = {"acts": acts, "consts": [i for i in ins if i in inits], "out": [n.output[0]]}
        tensors += acts + [n.output[0]]
    res = None
    if tensors:
        res = collect(model, list(dict.fromkeys(tensors)), data, MaxCalibrator(), providers=providers,
                      threads=threads, max_memory_mb=max_memory_mb, level="all", progress=progress)
    minmax = res.max_calibrator.minmax() if res is not None else {}
    nonfinite = res.nonfinite if res is not None else {}
    limit = FP16_MAX / FP16_HEADROOM
    for name, w in want.items():
        problems, seen = [], []
        for t in w["acts"] + w["out"]:
            kind = "output" if t in w["out"] else "input"
            if t in nonfinite:
                problems.append(f"{kind} {t} is non-finite on the calibration data")
                continue
            if t not in minmax:
                problems.append(f"{kind} {t} has no range on the calibration data")
                continue
            lo, hi = minmax[t]
            amax = max(abs(lo), abs(hi))
            seen.append(f"{kind} {t} within ±{amax:.4g}")
            if amax > limit:
                problems.append(f"{kind} {t} reaches {amax:.4g}, beyond FP16's {FP16_MAX:g} / {FP16_HEADROOM:g} headroom")
            elif 0 < amax < FP16_MIN_RANGE:
                problems.append(f"{kind} {t} spans only ±{amax:.3g}, below FP16's normal range (2^-13)")
        for c in w["consts"]:
            v = numpy_helper.to_array(inits[c])
            if v.dtype.kind != "f" or v.size == 0:
                continue
            big = float(np.max(np.abs(v)))
            if not math.isfinite(big) or big > FP16_MAX:
                problems.append(f"constant {c} holds |w| = {big:.4g}, beyond FP16's {FP16_MAX:g}")
                continue
            db = weight_sqnr_db(v)
            if db < WEIGHT_MIN_SQNR_DB:
                problems.append(f"constant {c} rounds to FP16 at {db:.1f} dB SQNR (< {WEIGHT_MIN_SQNR_DB:g} dB)")
            else:
                seen.append(f"{c} FP16 SQNR {db:.0f} dB" if math.isfinite(db) else f"{c} exact in FP16")
        if problems:
            out[name] = FP16Verdict(name, False, "not FP16-safe: " + "; ".join(problems))
        else:
            out[name] = FP16Verdict(name, True, "FP16-safe on the calibration data: " + ", ".join(seen))
    return out


def fp32_model(ws):
    """The FP32 model of a tuning Workspace with the plan's names (every node unquantized, graph passes as
    quantizing): what the FP16 ranges are measured on."""
    plan = ws.first.plan.copy()
    for d in plan.quantized_nodes():
        plan.keep_fp32(d.node, "fp16 safety: FP32 reference")
    return ws.apply(plan).model


def workspace_safety(ws, nodes: Sequence[str], progress=None) -> Dict[str, FP16Verdict]:
    """fp16_safety for ``nodes`` on a Workspace's calibration data."""
    from onnxfp8.calibrators.data import as_data

    cfg = ws.config
    data = as_data(ws.calib, ws.prepared.proto, batch_size=cfg.batch_size, limit=cfg.calib_samples)
    return fp16_safety(fp32_model(ws), nodes, data, providers=cfg.providers, threads=cfg.threads,
                       max_memory_mb=cfg.max_memory_mb or 2048, progress=progress)
