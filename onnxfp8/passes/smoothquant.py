"""smoothquant: migrate per-channel activation outliers of MatMul/Gemm inputs into their weights (Xiao et al.
2022, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language Models").

For a layer ``Y = X W`` (MatMul with a constant ``[K, N]`` weight, or Gemm) and any ``s > 0`` per input
channel j,

    Y = (X diag(1/s)) (diag(s) W)

so the activation the layer quantizes is ``X / s`` and its weight ``diag(s) W`` (row j of W times ``s_j``;
Gemm with transB: column j). With ``a_j = max |X_j|`` over the calibration data and ``w_j = max |W_j|`` (the
largest over every layer reading X: the Q, K and V projections share their input and so one ``s``),

    s_j = a_j^alpha / w_j^(1 - alpha)

puts ``alpha`` of the outlier channels' range into the weights (alpha 0.5 balances them: both ranges become
``sqrt(a_j w_j)``). A channel with ``a_j = 0`` or ``w_j = 0`` keeps ``s_j = 1``.

The ``1/s`` goes where it costs nothing, into the op producing X, when every reader of X is smoothed:
LayerNormalization (``gamma / s``, ``beta / s``), a Mul by a constant (``g / s``) and a constant Add after it
(a decomposed LayerNorm's ``* gamma + beta``), or a MatMul/Gemm with a constant weight (its output channel j
and bias divided by ``s_j``). Otherwise a Mul by ``1/s`` is inserted before the smoothed layers (one
elementwise op more: said in the notes and the plan).

Alpha: ``config.smoothquant`` a number in [0, 1] uses it for every layer; ``"auto"`` picks it per activation
by a small grid search (ALPHAS, and no smoothing at all) on the layers' own quantization error: sampled rows
of X (every 7th row of each batch, up to ROWS, taken in onnxruntime) quantized per tensor in the activation
format with the range the smoothed tensor will have, times the smoothed weights quantized per channel in the
weight format, against ``X W`` in FP32. A layer where no alpha helps is left alone.

Per-channel statistics come from one pass over the calibration data reduced inside onnxruntime
(``Calibration.channel_stats``, calibrators/collector.py). Only quantized MatMul/Gemm inputs are smoothed (the pass runs
after ``select_ops``); every change is recorded in ``plan.transforms`` (``smoothquant.smooth``: the tensor,
its readers, alpha, ``s``, where ``1/s`` went) and ``replay`` redoes it without data.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx_graphsurgeon as gs

from onnxfp8.passes.equalize import Layer, as_layer, nodes_by_name, owned
from onnxfp8.pipeline import Pass, PassContext, PassResult

ALPHAS = (0.25, 0.4, 0.5, 0.6, 0.75, 0.9)
ROWS = 512
S_LIMIT = 1e4  # scales are clipped to [1/S_LIMIT, S_LIMIT]


def smoothing_scale(a: np.ndarray, w: np.ndarray, alpha: float) -> np.ndarray:
    """``s_j = a_j^alpha / w_j^(1 - alpha)`` (1 where a channel has no range), clipped to S_LIMIT."""
    a = np.asarray(a, np.float64)
    w = np.asarray(w, np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = np.power(a, alpha) / np.power(w, 1.0 - alpha)
    s = np.where(np.isfinite(s) & (s > 0) & (a > 0) & (w > 0), s, 1.0)
    return np.clip(s, 1.0 / S_LIMIT, S_LIMIT)


def _readers(x: gs.Tensor) -> Optional[List[Layer]]:
    """The layers reading ``x`` as their data input, if every reader of ``x`` is a MatMul/Gemm with a constant
    weight of its own; else None."""
    out = []
    for n in x.outputs:
        layer = as_layer(n)
        if layer is None or n.op == "Conv" or n.inputs[0] is not x or not owned(layer.weight, [n]):
            return None
        out.append(layer)
    return out


def _last_axis_const(v: np.ndarray, k: int) -> Optional[np.ndarray]:
    """A constant broadcasting along the last axis only (or a scalar) as a ``[K]`` vector, else None."""
    if v.size == 1:
        return np.full(k, float(v.reshape(-1)[0]))
    if v.shape and v.shape[-1] == k and v.size == k:
        return v.reshape(-1).astype(np.float64)
    return None


def fold_target(graph: gs.Graph, x: gs.Tensor, k: int) -> Tuple[str, List[gs.Node]]:
    """Where ``1/s`` for tensor ``x`` (K = ``k`` channels, last axis) can go: ("layernorm", [ln]),
    ("affine", [mul, add]), ("mul", [mul]), ("layer", [node]), or ("insert", [])."""
    outputs = {id(t) for t in graph.outputs}
    if id(x) in outputs or len(x.inputs) != 1:
        return "insert", []
    p = x.inputs[0]
    if p.op == "LayerNormalization":
        rank = len(x.shape) if x.shape is not None else None
        axis_ok = int(p.attrs.get("axis", -1)) == -1 or (rank is not None and int(p.attrs.get("axis", -1)) == rank - 1)
        params = isinstance(p.inputs[1], gs.Constant) and \
            (len(p.inputs) < 3 or not p.inputs[2].name or isinstance(p.inputs[2], gs.Constant))
        unused = all(not o.outputs and id(o) not in outputs for o in p.outputs[1:])
        if axis_ok and params and unused and _last_axis_const(p.inputs[1].values, k) is not None and \
                (len(p.inputs) < 3 or not p.inputs[2].name or _last_axis_const(p.inputs[2].values, k) is not None):
            return "layernorm", [p]
        return "insert", []
    consts = lambda n: [t for t in n.inputs if isinstance(t, gs.Constant)]  # noqa: E731
    if p.op == "Add" and len(p.inputs) == 2 and len(consts(p)) == 1 and \
            _last_axis_const(consts(p)[0].values, k) is not None:
        a = next(t for t in p.inputs if not isinstance(t, gs.Constant))
        m = a.inputs[0] if len(a.inputs) == 1 else None
        if m is not None and m.op == "Mul" and len(a.outputs) == 1 and id(a) not in outputs \
                and len(consts(m)) == 1 and _last_axis_const(consts(m)[0].values, k) is not None:
            return "affine", [m, p]
    if p.op == "Mul" and len(p.inputs) == 2 and len(consts(p)) == 1 and \
            _last_axis_const(consts(p)[0].values, k) is not None:
        return "mul", [p]
    producers = [p] + [t.inputs[0] for t in p.inputs if p.op == "Add" and len(t.inputs) == 1]
    for n in producers:  # a MatMul/Gemm (and its bias Add) producing x
        layer = as_layer(n)
        if layer is not None and n.op != "Conv" and layer.out is x and layer.n_out() == k and owned(layer.weight, [n]):
            return "layer", [n]
    return "insert", []


def _divide_const(n: gs.Node, s: np.ndarray, k: int, index: Optional[int] = None) -> None:
    """Divide the constant input of ``n`` (``index``, or its only constant) by ``s`` along the last axis; a
    constant other nodes read too is copied first."""
    idx = index if index is not None else next(i for i, t in enumerate(n.inputs) if isinstance(t, gs.Constant))
    c = n.inputs[idx]
    v = _last_axis_const(c.values, k) / s
    shape = c.values.shape if c.values.size == k else (k,)
    new = v.reshape(shape).astype(c.values.dtype)
    if owned(c, [n]):
        c.values = new
    else:
        n.inputs[idx] = gs.Constant(f"{c.name}.{n.name}.smoothed", new)


def apply_smooth(graph: gs.Graph, rec: Dict[str, Any]) -> None:
    """Redo one ``smoothquant.smooth`` record: readers' weights times ``s``, ``1/s`` into ``rec["fold"]``."""
    by_name = nodes_by_name(graph)
    s = np.asarray(rec["scale"], np.float64)
    k = s.size
    fold, _, names = rec["fold"].partition(":")
    readers = []
    for name in rec["readers"]:
        node = by_name.get(name)
        layer = as_layer(node) if node is not None else None
        if layer is None:
            raise ValueError(f"plan transform names '{name}', which is not a MatMul/Gemm with a constant weight")
        readers.append(layer)
    x = graph.tensors()[rec["tensor"]]
    if fold == "layernorm":
        ln = by_name[names]
        _divide_const(ln, s, k, 1)
        if len(ln.inputs) > 2 and ln.inputs[2].name:
            _divide_const(ln, s, k, 2)
    elif fold == "affine":
        mul, add = (by_name[n] for n in names.split(","))
        _divide_const(mul, s, k)
        _divide_const(add, s, k)
    elif fold == "mul":
        _divide_const(by_name[names], s, k)
    elif fold == "layer":
        layer = as_layer(by_name[names])
        w = layer.weight
        w.values = layer.scale_out(w.values.astype(np.float64), 1.0 / s).astype(w.values.dtype)
        b = layer.bias()
        if b is not None:
            layer.set_bias(b / s)
    elif fold == "insert":
        dtype = readers[0].weight.values.dtype
        out = gs.Variable(f"{rec['tensor']}.smoothed", dtype=x.dtype, shape=x.shape)
        inv = gs.Constant(f"{names}.inv_scale", (1.0 / s).astype(dtype))
        graph.nodes.append(gs.Node("Mul", name=names, inputs=[x, inv], outputs=[out]))
        for layer in readers:
            layer.node.inputs[0] = out
    else:
        raise ValueError(f"unknown smoothquant fold '{rec['fold']}'")
    for layer in readers:
        w = layer.weight
        w.values = layer.scale_in(w.values.astype(np.float64), s).astype(w.values.dtype)


def replay(graph: gs.Graph, records: Sequence[Dict[str, Any]]) -> int:
    """Redo the ``smoothquant`` records of ``plan.transforms`` on ``graph``; returns how many."""
    from onnxfp8.passes.equalize import replay as replay_records

    return replay_records(graph, records, ("smoothquant",))


def _fake(fmt, x: np.ndarray, scale, axis=None) -> np.ndarray:
    return fmt.fake_quant(x.astype(np.float32), scale, axis).astype(np.float64)


def layer_error(rows: np.ndarray, amax: np.ndarray, readers: Sequence[Layer], s: np.ndarray, act_fmt,
                w_fmt, per_channel: bool = True) -> float:
    """Relative squared error of the readers' outputs on ``rows`` when X / s is quantized per tensor (range
    ``max_j amax_j / s_j``) and the weights diag(s) W per output channel, against X W in FP32."""
    from onnxfp8.passes.assign_formats import channel_amax

    x = rows.astype(np.float64)
    xs = x / s
    xa = float(np.max(np.asarray(amax, np.float64) / s)) if amax.size else 0.0
    xq = _fake(act_fmt, xs, act_fmt.scale_for(np.float32(xa)))
    num = den = 0.0
    for layer in readers:
        w = layer.weight.values.astype(np.float64)
        ws = layer.scale_in(w, s)
        ax = layer.out_axis() if per_channel else None
        wq = _fake(w_fmt, ws, w_fmt.scale_for(channel_amax(ws.astype(np.float32), ax)), ax)
        if layer.out_axis() == 0:  # Gemm transB: W is [N, K]
            w, wq = w.T, wq.T
        y = x @ w
        num += float(np.sum((xq @ wq - y) ** 2))
        den += float(np.sum(y ** 2))
    return num / den if den > 0 else 0.0


class SmoothQuant(Pass):
    name = "smoothquant"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        from onnxfp8.formats import get_format

        cfg = ctx.config
        if cfg.smoothquant is None:
            return PassResult(False, ["smoothquant off"])
        if ctx.calib is None:
            from onnxfp8.errors import DataError

            raise DataError(f"{ctx.source}: smoothquant measures the activations' channel ranges on calibration "
                            f"data: pass --calib DIR")
        by_name = nodes_by_name(graph)
        groups: Dict[str, List[Layer]] = {}
        notes: List[str] = []
        for d in ctx.plan.quantized_nodes():
            node = by_name.get(d.node)
            if node is None or node.op not in ("MatMul", "Gemm") or d.inputs.get(0) != "activation" \
                    or d.inputs.get(1) != "weight":
                continue
            x = node.inputs[0]
            if x.name in groups:
                continue
            readers = _readers(x)
            if readers is None:  # readers that cannot be smoothed: smooth the quantized layers behind a Mul
                layer = as_layer(node)
                if layer is None or not owned(layer.weight, [node]):
                    continue
                readers = [r for r in (as_layer(n) for n in x.outputs) if r is not None and r.node.op != "Conv"
                           and r.node.inputs[0] is x and owned(r.weight, [r.node])
                           and ctx.plan.nodes.get(r.name) is not None and ctx.plan.nodes[r.name].quantized]
            if readers:
                groups[x.name] = readers
        if not groups:
            return PassResult(False, ["no quantized MatMul/Gemm with a constant weight to smooth"])
        from onnxfp8.calibrators.calibration import Calibration
        from onnxfp8.calibrators.collector import ChannelRequest
        from onnxfp8.passes.equalize import light_model

        auto = cfg.smoothquant == "auto"
        tensors = graph.tensors()
        requests = {}
        ranks = {}
        for name in groups:
            t = tensors[name]
            r = len(t.shape) if t.shape is not None else (2 if groups[name][0].node.op == "Gemm" else None)
            if r is None:
                continue
            ranks[name] = r
            requests[name] = ChannelRequest(-1, ("absmax",), ROWS if auto else 0)
        model, arrays = light_model(graph)
        stats = Calibration(cfg, ctx.calib, source=ctx.source).channel_stats(model, requests, arrays=arrays,
                                                                              rank=ranks)
        act_fmt = get_format(cfg.activation_format)
        w_fmt = get_format(cfg.weight_format)
        records = []
        kept = inserted = 0
        alphas: List[float] = []
        for name, readers in groups.items():
            st = stats.get(name)
            if st is None or st.get("absmax") is None:
                continue
            a = st["absmax"]
            k = a.size
            if any(r.n_in() != k for r in readers):
                continue
            w = np.zeros(k)
            for r in readers:
                w = np.maximum(w, r.in_ranges(r.weight.values))
            if auto:
                rows = st.get("rows")
                if rows is None or rows.size == 0:
                    continue
                best, best_err = None, layer_error(rows, a, readers, np.ones(k), act_fmt, w_fmt, cfg.per_channel)
                base = best_err
                tried = {}
                for alpha in ALPHAS:
                    e = layer_error(rows, a, readers, smoothing_scale(a, w, alpha), act_fmt, w_fmt, cfg.per_channel)
                    tried[f"{alpha:g}"] = _db(e)
                    if e < best_err * (1 - 1e-3):
                        best, best_err = alpha, e
                if best is None:
                    kept += 1
                    records.append({"pass": "smoothquant", "kind": "left_alone", "tensor": name,
                                    "readers": [r.name for r in readers], "error_db": {"none": _db(base), **tried},
                                    "reason": "no alpha lowered the layers' own quantization error on "
                                              f"{rows.shape[0]} sampled rows"})
                    continue
                alpha = best
            else:
                alpha = float(cfg.smoothquant)
                base = best_err = None
            s = smoothing_scale(a, w, alpha)
            if np.allclose(s, 1.0):
                continue
            fold, nodes = fold_target(graph, tensors[name], k) if _readers(tensors[name]) is not None \
                else ("insert", [])
            if fold == "insert":
                target = f"{name}/smoothquant_mul"
                inserted += 1
            else:
                target = ",".join(n.name for n in nodes)
            rec = {"pass": "smoothquant", "kind": "smooth", "tensor": name, "readers": [r.name for r in readers],
                   "alpha": alpha, "fold": f"{fold}:{target}", "scale": [float(v) for v in s]}
            if base is not None:
                rec["error_db"] = {"none": _db(base), "smoothed": _db(best_err)}
                rec["reason"] = f"alpha {alpha:g} lowered the layers' own quantization error the most"
            apply_smooth(graph, rec)
            tensors = graph.tensors()
            records.append(rec)
            alphas.append(alpha)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        ctx.plan.transforms.extend(records)
        smoothed = [r for r in records if r["kind"] == "smooth"]
        folded = len(smoothed) - inserted
        what = f"alpha {cfg.smoothquant}" if not auto else \
            ("alpha per layer from the data" + (f" ({', '.join(f'{a:g}' for a in sorted(set(alphas)))})" if alphas else ""))
        notes.insert(0, f"smoothed {len(smoothed)} of {len(groups)} MatMul/Gemm input(s), {what}: {folded} folded "
                        f"into the op before, {inserted} behind an inserted Mul")
        if kept:
            notes.append(f"{kept} input(s) left alone: no alpha lowered the layer's own quantization error")
        for rec in smoothed:
            if rec["fold"].startswith("insert:"):
                notes.append(f"{rec['tensor']}: no op to fold 1/s into, Mul {rec['fold'][7:]} inserted")
        return PassResult(bool(smoothed), notes)


def _db(rel: float) -> float:
    return round(float(-10 * np.log10(rel)), 3) if rel > 0 else float("inf")
