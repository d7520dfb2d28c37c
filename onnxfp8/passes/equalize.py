"""equalize: cross-layer equalization, bias absorption and bias correction (Nagel et al. 2019, "Data-Free
Quantization Through Weight Equalization and Bias Correction").

**Cross-layer equalization (pass ``equalize``).** Two layers ``y = W2 f(W1 x + b1) + b2`` (Conv, Gemm, or
MatMul with a constant weight, and an optional bias Add) connected through ops ``f`` that are positively
homogeneous per channel, ``f(s * h) = s * f(h)`` for every ``s > 0`` (Relu, LeakyRelu, PRelu with any slope,
Identity, MaxPool, a Max/Min with a per-channel constant, Flatten/Squeeze after a global pool), compute the
same function when output channel i of the first layer is divided by ``S_i`` and input channel i of the second
multiplied by ``S_i``:

    W1[i] / S_i,  b1[i] / S_i,  W2[:, i] * S_i   =>   W2 diag(S) f(diag(1/S) (W1 x + b1)) == W2 f(W1 x + b1)

A Clip (ReLU6) is not homogeneous (``clip(s h, 0, 6) != s clip(h, 0, 6)``) but ``s * clip(h, lo, hi) ==
Min(Max(s h, s lo), s hi)``: a Clip on the way is rewritten into Max/Min with per-channel bounds (exact; one
elementwise op more, recorded). With ``r1_i = max |W1[i]|`` (over the output channel's weights) and
``r2_i = max |W2[:, i]|`` (over every consumer's weights reading channel i), ``S_i = sqrt(r1_i / r2_i)``
(Nagel's ``s_i = sqrt(r1_i r2_i) / r2_i``) makes both ranges ``sqrt(r1_i r2_i)``. Chains of layers
(Conv -> depthwise Conv -> Conv) share layers between pairs, so the pairs are equalized in turn until the
scales settle (at most ``ROUNDS`` rounds). Grouped convolutions work per group: input channel i of a Conv with
G groups is column ``i mod (C_in/G)`` of the rows of group ``i div (C_in/G)`` (a depthwise Conv: its own
row); a tensor read by several layers (Q/K/V, an Inception split) has one ``S`` for all of them. With
calibration data, the per-channel ranges ``a_i`` of the tensor between the layers are measured first and
``S_i >= a_i / max_j a_j`` is kept, so that no channel grows past the tensor's calibrated range (a dead
channel with a large bias would otherwise blow the per-tensor activation scale up).

**Bias absorption** (with data, same pass). When ``f`` is Relu-like (Relu, a Max(0)) and the pre-activation
``h_i = (W1 x + b1)_i`` stays above ``c_i = max(0, min_data h_i)`` on the calibration data, the tensor the
second layer reads carries an offset ``c`` it need not quantize. Since ``relu(h) = max(h - c, -c) + c`` for
every ``h`` (and ``max(h, lo) = max(h - c, lo - c) + c``, ``min(h, hi) = min(h - c, hi - c) + c``, MaxPool
commutes with the shift), ``b1 -= c``, the Relu becomes a Max with the per-channel bound ``-c``, Max/Min
bounds on the way move by ``-c``, and ``b2 += W2 c`` (Conv: ``sum_k W2[o, i, k] c_i``; Gemm
``alpha c @ B / beta``): the same function everywhere (not only on the calibration data), while on the
calibration data the tensor loses the offset (its values stay >= 0 there; the range to quantize shrinks from
``[0, M]`` to ``[0, M - c]``). Only when the second layer has no padding (padding zeros would stand for
``-c``).

**Bias correction (pass ``bias_correction``).** A quantized weight ``Q(W) = W + dW`` shifts the expected
output of its layer by ``E[dW x] = dW E[x]`` (Conv: ``mean_positions conv(dW, x)``). One pass over the
calibration data measures it for every quantized layer at once inside onnxruntime (a copy of each layer with
``dW`` as its weight, averaged per output channel, padding and strides included), with ``dW`` the error of the
weight's own format and per-channel scale (what ``assign_formats`` will choose; format auto: the candidate it
will pick), and the bias becomes ``b - E[dW x]`` (a layer without one gets one; a MatMul needs a bias Add
after it). It deliberately changes the FP32 function by that expected error, so that the quantized model's
output is unbiased; it runs after ``select_ops`` (only quantized layers) and after ``smoothquant``.

**Half-precision models (FP16 / BF16 weights).** Rescaling a half-precision weight by an arbitrary ``S``
rounds it again, and an FP16 model's output can be very sensitive to that (on the zoo's random-weight
MobileNetV2-FP16 of 2026-12-03 09:04: 6.8e-2 relative). So there every ``S_i`` is a power of two (the nearest
one, raised where the range guard needs it): multiplying by a power of two is exact in binary floating point,
so the rescaled weights, biases and Clip bounds are exactly the old ones scaled (equalization is then within
a factor sqrt(2) per channel). A pair whose rescale would still lose bits (a weight or bias pushed past the
format's largest finite value, or down into its subnormals by more than half an ulp of its channel's largest
weight) is left alone, recorded (``equalize.left_alone`` with the reason). Second, onnxruntime's CPU provider
computes an FP16 model largely in FP32 (it casts around the ops it has no FP16 kernel for, Conv among them,
and runs an FP16-capable op sitting alone between them in FP32 too), so the ops the rewrite inserts decide
where the values are rounded to FP16: a Clip(0, hi) becomes ``Relu`` + ``Min`` (not ``Max`` + ``Min``, two
FP16-capable ops in a row that onnxruntime runs in FP16, rounding the Conv's output: most of the 6.8e-2
above). Last, with calibration data, the FP16 function is measured: the equalized graph against the graph
before it on the first calibration samples (onnxruntime, no optimizations); when the output moves by more
than ``HALF_FUNCTION_EPS`` ulps of the format (relative to the output's largest magnitude), the whole
equalization is undone and recorded as left alone with the measured change.

Every change is recorded in ``plan.transforms`` (pairs, their ``S``, absorbed ``c``, biases' deltas) and
``replay(graph, records)`` redoes them without data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx_graphsurgeon as gs

from onnxfp8.pipeline import Pass, PassContext, PassResult

ROUNDS = 20
TOLERANCE = 1e-3  # stop when every scale of a round is within this of 1 (relative)
LAYER_OPS = ("Conv", "Gemm", "MatMul")
HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu", "Identity", "MaxPool", "Max", "Min", "Clip")
AFTER_GLOBAL_POOL = ("GlobalAveragePool", "GlobalMaxPool", "Flatten", "Squeeze")
HALF_FUNCTION_EPS = 4.0  # FP16/BF16 models: the measured output change allowed, in ulps (finfo.eps) of the format
FUNCTION_SAMPLES = 8  # calibration samples the FP16 function check runs on


def exact_scaling(dtype: Any) -> bool:
    """True when weights of ``dtype`` are rescaled by powers of two only (half precision: FP16, BF16)."""
    return np.dtype(dtype).kind == "f" and np.dtype(dtype).itemsize < 4 or str(dtype) == "bfloat16"


# -- layers: the weight / bias views of Conv, Gemm and MatMul ------------------------------------------------
@dataclass
class Layer:
    """A Conv / Gemm / MatMul with a constant weight, its bias (Conv input 2, Gemm C, or a constant Add after a
    MatMul) and its output tensor (after the bias Add)."""

    node: gs.Node
    bias_node: Optional[gs.Node] = None  # the Add of a MatMul's bias

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def weight(self) -> gs.Constant:
        return self.node.inputs[1]

    @property
    def out(self) -> gs.Tensor:
        return (self.bias_node or self.node).outputs[0]

    @property
    def channel_axis(self) -> int:
        """The channel axis of the layer's input and output activations (1 for Conv and Gemm, last for MatMul)."""
        return -1 if self.node.op == "MatMul" else 1

    @property
    def groups(self) -> int:
        return int(self.node.attrs.get("group", 1)) if self.node.op == "Conv" else 1

    def out_axis(self) -> int:
        op = self.node.op
        if op == "Conv":
            return 0
        if op == "Gemm":
            return 0 if self.node.attrs.get("transB", 0) else 1
        return 1  # MatMul, weight [K, N]

    def n_out(self) -> int:
        return int(self.weight.shape[self.out_axis()])

    def n_in(self) -> int:
        w = self.weight
        if self.node.op == "Conv":
            return int(w.shape[1]) * self.groups
        return int(w.shape[1 - self.out_axis()])

    # bias ------------------------------------------------------------------------------------------
    def bias(self) -> Optional[np.ndarray]:
        """The bias per output channel (float64), or None when the layer has none."""
        c = self._bias_const()
        if c is None:
            return None
        v = c.values.astype(np.float64)
        if self.node.op == "Gemm":
            v = v * float(self.node.attrs.get("beta", 1.0))
        return np.broadcast_to(v.reshape(-1), (self.n_out(),)).copy()

    def _bias_const(self) -> Optional[gs.Constant]:
        if self.bias_node is not None:
            return next(t for t in self.bias_node.inputs if isinstance(t, gs.Constant))
        if len(self.node.inputs) > 2 and self.node.inputs[2].name:
            return self.node.inputs[2]
        return None

    def set_bias(self, b: np.ndarray) -> None:
        dtype = self.weight.values.dtype
        c = self._bias_const()
        if self.node.op == "Gemm":
            self.node.attrs["beta"] = 1.0
        if c is not None:
            shape = (self.n_out(),) if self.bias_node is None else _bias_shape(c.values, self.n_out())
            c.values = np.asarray(b, np.float64).reshape(shape).astype(dtype)
            return
        if self.bias_node is not None or self.node.op == "MatMul":
            raise ValueError(f"{self.name}: a MatMul takes a bias only through an Add after it")
        self.node.inputs.append(gs.Constant(f"{self.name}.bias", np.asarray(b, np.float64).astype(dtype)))

    def can_take_bias(self) -> bool:
        return self.node.op != "MatMul" or self.bias_node is not None

    # weight ranges and scaling ---------------------------------------------------------------------
    def out_ranges(self, w: np.ndarray) -> np.ndarray:
        ax = self.out_axis()
        a = np.abs(w.astype(np.float64))
        return a.max(axis=tuple(i for i in range(a.ndim) if i != ax))

    def in_ranges(self, w: np.ndarray) -> np.ndarray:
        a = np.abs(w.astype(np.float64))
        if self.node.op == "Conv":
            G = self.groups
            cout, cg = a.shape[:2]
            a = a.reshape((G, cout // G, cg, -1)).max(axis=(1, 3))  # [G, cg]
            return a.reshape(-1)
        ax = 1 - self.out_axis()
        return a.max(axis=1 - ax)

    def scale_out(self, w: np.ndarray, s: np.ndarray) -> np.ndarray:
        """``w`` with output channel i multiplied by ``s_i``."""
        shape = [1] * w.ndim
        shape[self.out_axis()] = -1
        return w * s.reshape(shape)

    def scale_in(self, w: np.ndarray, s: np.ndarray) -> np.ndarray:
        """``w`` with input channel i multiplied by ``s_i`` (per group for a grouped Conv)."""
        if self.node.op == "Conv":
            G = self.groups
            cout, cg = w.shape[:2]
            v = w.reshape((G, cout // G, cg) + w.shape[2:]) * s.reshape((G, 1, cg) + (1,) * (w.ndim - 2))
            return v.reshape(w.shape)
        shape = [1] * w.ndim
        shape[1 - self.out_axis()] = -1
        return w * s.reshape(shape)

    def input_sum(self, w: np.ndarray, c: np.ndarray) -> np.ndarray:
        """``W c`` per output channel for an input constant per channel ``c`` (no padding): what the layer adds
        to its output when every input channel i is shifted by ``c_i``."""
        if self.node.op == "Conv":
            G = self.groups
            cout, cg = w.shape[:2]
            v = w.astype(np.float64).reshape((G, cout // G, cg, -1)).sum(axis=3)  # [G, og, cg]
            return np.einsum("goc,gc->go", v, c.reshape(G, cg)).reshape(-1)
        w64 = w.astype(np.float64)
        if self.node.op == "Gemm":
            w64 = w64 * float(self.node.attrs.get("alpha", 1.0))
        return (w64 @ c) if self.out_axis() == 0 else (c @ w64)

    def unpadded(self) -> bool:
        if self.node.op != "Conv":
            return True
        if self.node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return False
        return not any(int(p) for p in self.node.attrs.get("pads", []))


def _bias_shape(v: np.ndarray, n: int) -> Tuple[int, ...]:
    return v.shape if v.size == n else (n,)


def as_layer(node: gs.Node) -> Optional[Layer]:
    """``node`` as a Layer when it is a Conv / Gemm / MatMul with a constant weight (MatMul: 2-D, on the right;
    Gemm: transA 0) and a constant per-channel bias if any; else None."""
    if node.op not in LAYER_OPS or len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return None
    w = node.inputs[1]
    if isinstance(node.inputs[0], gs.Constant) or w.values.dtype.kind != "f":
        return None
    if node.op == "Conv" and len(w.shape) < 3:
        return None
    if node.op in ("Gemm", "MatMul") and len(w.shape) != 2:
        return None
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return None
    layer = Layer(node)
    if len(node.inputs) > 2 and node.inputs[2].name:
        b = node.inputs[2]
        if not isinstance(b, gs.Constant) or b.values.size not in (1, layer.n_out()):
            return None
        if b.values.size == 1 and layer.n_out() != 1 and node.op != "Gemm":
            return None
    if node.op == "MatMul":
        out = node.outputs[0]
        if len(out.outputs) == 1 and out.outputs[0].op == "Add":
            add = out.outputs[0]
            other = [t for t in add.inputs if t is not out]
            if len(other) == 1 and isinstance(other[0], gs.Constant) and other[0].values.size == layer.n_out() \
                    and other[0].values.shape[-1] == layer.n_out() and len(add.inputs) == 2:
                layer.bias_node = add
    return layer


def owned(t: gs.Tensor, readers: Sequence[gs.Node]) -> bool:
    """True when constant ``t`` is read by ``readers`` only (so changing it changes nothing else)."""
    ids = {id(n) for n in readers}
    return all(id(n) in ids for n in t.outputs)


# -- pairs ------------------------------------------------------------------------------------------------
@dataclass
class Pair:
    first: Layer
    seconds: List[Layer]
    chain: List[gs.Node] = field(default_factory=list)  # the homogeneous ops in between, in order
    between: str = ""  # the name of the tensor the second layers read

    @property
    def relu_like(self) -> bool:
        return any(n.op == "Relu" or (n.op in ("Max", "Clip") and _lower_bound(n) == 0.0) for n in self.chain) \
            and all(n.op in ("Relu", "Max", "Min", "Clip", "MaxPool", "Identity") for n in self.chain)

    def key(self) -> str:
        return self.first.name


def _lower_bound(n: gs.Node) -> Optional[float]:
    """The scalar lower bound of a Clip / Max(x, const), or None."""
    if n.op == "Clip":
        lo = n.inputs[1] if len(n.inputs) > 1 and n.inputs[1].name else None
        return float(lo.values) if isinstance(lo, gs.Constant) and lo.values.size == 1 else None
    if n.op == "Max":
        c = [t for t in n.inputs[1:] if isinstance(t, gs.Constant)]
        return float(c[0].values.reshape(-1)[0]) if c and np.all(c[0].values == c[0].values.reshape(-1)[0]) else None
    return None


def _chain_ok(node: gs.Node, t: gs.Tensor, channels: int, axis: int, rank: Optional[int]) -> bool:
    """True when ``node`` reading ``t`` (its data input 0) is positively homogeneous per channel."""
    if node.inputs[0] is not t or (node.domain or "") not in ("", "ai.onnx"):
        return False
    op = node.op
    if op in ("Relu", "LeakyRelu", "Identity"):
        return True
    if op == "PRelu":
        return isinstance(node.inputs[1], gs.Constant)
    if op == "MaxPool":
        return axis == 1 and (len(node.outputs) == 1 or not node.outputs[1].outputs)
    if op == "Clip":
        return all(isinstance(x, gs.Constant) and x.values.size == 1 for x in node.inputs[1:] if x.name)
    if op in ("Max", "Min"):
        if len(node.inputs) != 2 or not isinstance(node.inputs[1], gs.Constant):
            return False
        return _per_channel_const(node.inputs[1].values, channels, axis, rank) is not None
    return False


def _per_channel_const(v: np.ndarray, channels: int, axis: int, rank: Optional[int]) -> Optional[np.ndarray]:
    """A constant that broadcasts per channel (or is a scalar) as a ``[C]`` vector, else None."""
    if v.size == 1:
        return np.full(channels, float(v.reshape(-1)[0]))
    if rank is None or v.ndim > rank:
        return None
    full = (1,) * (rank - v.ndim) + v.shape
    ax = axis % rank
    if full[ax] == channels and all(d == 1 for i, d in enumerate(full) if i != ax):
        return v.reshape(-1).astype(np.float64)
    return None


def _channel_shape(channels: int, axis: int, rank: int) -> Tuple[int, ...]:
    ax = axis % rank
    return (channels,) + (1,) * (rank - 1 - ax)


def _rank(t: gs.Tensor) -> Optional[int]:
    return len(t.shape) if t.shape is not None else None


def find_pairs(graph: gs.Graph, notes: Optional[List[str]] = None) -> List[Pair]:
    """The layer pairs cross-layer equalization may rescale, in graph order."""
    outputs = {id(t) for t in graph.outputs}
    pairs: List[Pair] = []
    for node in graph.nodes:
        first = as_layer(node)
        if first is None:
            continue
        t = first.out
        C = first.n_out()
        axis = first.channel_axis
        if first.node.op == "MatMul" and _rank(t) is None:
            continue
        # where the channels are for the second layers: "nchw" (axis 1 of a Conv's tensors) or "last"
        where = "nchw" if first.node.op == "Conv" else "last"
        chain: List[gs.Node] = []
        pooled = False
        ok = True
        while id(t) not in outputs and len(t.outputs) == 1:
            n = t.outputs[0]
            if as_layer(n) is not None:
                break
            if where == "nchw" and n.op in ("GlobalAveragePool", "GlobalMaxPool") and n.inputs[0] is t:
                pooled = True  # averaging is linear, max homogeneous: both per channel
            elif pooled and where == "nchw" and n.op == "Flatten" and int(n.attrs.get("axis", 1)) == 1:
                where = "last"  # [N, C, 1, 1] -> [N, C]
            elif not _chain_ok(n, t, C, axis, _rank(t)) or (n.op == "MaxPool" and where != "nchw"):
                ok = False
                break
            chain.append(n)
            t = n.outputs[0]
        if not ok or id(t) in outputs or not t.outputs:
            continue
        seconds = []
        for c in t.outputs:
            layer = as_layer(c)
            if layer is None or c.inputs[0] is not t or layer.n_in() != C \
                    or (c.op == "Conv") != (where == "nchw"):
                seconds = []
                break
            seconds.append(layer)
        if not seconds:
            continue
        readers = [first.node] + ([first.bias_node] if first.bias_node else [])
        if not owned(first.weight, [first.node]) or not all(owned(s.weight, [s.node]) for s in seconds):
            if notes is not None:
                notes.append(f"{first.name}: weights shared with other nodes, not equalized")
            continue
        bc = first._bias_const()
        if bc is not None and not owned(bc, readers):
            if notes is not None:
                notes.append(f"{first.name}: bias shared with other nodes, not equalized")
            continue
        if any(s._bias_const() is not None and not owned(s._bias_const(), [s.node] + ([s.bias_node] if s.bias_node else []))
               for s in seconds):
            continue
        pairs.append(Pair(first, seconds, chain, t.name))
    return pairs


# -- applying (and replaying) the records --------------------------------------------------------------------
def nodes_by_name(graph: gs.Graph) -> Dict[str, gs.Node]:
    return {n.name: n for n in graph.nodes}


def _layer_by_name(by_name: Dict[str, gs.Node], name: str) -> Layer:
    node = by_name.get(name)
    layer = as_layer(node) if node is not None else None
    if layer is None:
        raise ValueError(f"plan transform names '{name}', which is not a Conv/Gemm/MatMul with a constant weight")
    return layer


def apply_scale(graph: gs.Graph, rec: Dict[str, Any]) -> None:
    """Divide output channel i of ``rec["first"]`` by ``S_i`` and multiply input channel i of every
    ``rec["second"]`` by it; ops in between that need it (Clip, Max/Min constants) follow."""
    by_name = nodes_by_name(graph)
    first = _layer_by_name(by_name, rec["first"])
    S = np.asarray(rec["scale"], np.float64)
    w = first.weight
    w.values = first.scale_out(w.values.astype(np.float64), 1.0 / S).astype(w.values.dtype)
    b = first.bias()
    if b is not None:
        first.set_bias(b / S)
    t = first.out
    half = exact_scaling(w.values.dtype)
    for name in rec.get("through", []):
        n = by_name[name]
        rank = _rank(t) or (4 if first.channel_axis == 1 else 2)
        t = n.outputs[0]
        _scale_chain_op(graph, n, S, first.channel_axis, rank, relu_for_zero=half)
    for name in rec["second"]:
        layer = _layer_by_name(by_name, name)
        w2 = layer.weight
        w2.values = layer.scale_in(w2.values.astype(np.float64), S).astype(w2.values.dtype)


def _scale_chain_op(graph: gs.Graph, n: gs.Node, S: np.ndarray, axis: int, rank: int,
                    relu_for_zero: bool = False) -> None:
    """Make ``n`` compute ``n(x / S) == n(x) / S`` per channel: Clip becomes Max/Min with per-channel bounds
    (``relu_for_zero``, half-precision models: a lower bound 0 becomes a Relu, see the module docstring),
    a Max/Min constant is divided by S; the homogeneous ops need nothing."""
    C = S.size
    if n.op == "Clip":
        lo = n.inputs[1] if len(n.inputs) > 1 and n.inputs[1].name else None
        hi = n.inputs[2] if len(n.inputs) > 2 and n.inputs[2].name else None
        x, y = n.inputs[0], n.outputs[0]
        dtype = x.dtype or np.float32
        shape = _channel_shape(C, axis, rank)
        n.outputs.clear()
        n.inputs.clear()  # graph cleanup drops the Clip
        cur = x
        for bound, op in ((lo, "Max"), (hi, "Min")):
            if bound is None:
                continue
            last = op == "Min" or hi is None
            out = y if last else gs.Variable(f"{y.name}.equalize_lower_bound", dtype=y.dtype, shape=y.shape)
            if op == "Max" and relu_for_zero and float(bound.values) == 0.0:
                graph.nodes.append(gs.Node("Relu", name=f"{n.name}/relu", inputs=[cur], outputs=[out]))
                cur = out
                continue
            const = gs.Constant(f"{n.name}/{op.lower()}_bound",
                                (float(bound.values) / S).reshape(shape).astype(dtype))
            graph.nodes.append(gs.Node(op, name=f"{n.name}/{op.lower()}", inputs=[cur, const], outputs=[out]))
            cur = out
        if lo is None and hi is None:
            graph.nodes.append(gs.Node("Identity", name=f"{n.name}/identity", inputs=[x], outputs=[y]))
    elif n.op in ("Max", "Min"):
        c = n.inputs[1]
        v = _per_channel_const(c.values, C, axis, rank)
        new = gs.Constant(f"{c.name}.{n.name}.scaled" if len(c.outputs) > 1 else c.name,
                          (v / S).reshape(_channel_shape(C, axis, rank)).astype(c.values.dtype))
        if len(c.outputs) > 1:
            n.inputs[1] = new
        else:
            c.values = new.values


def replay_chain_names(graph: gs.Graph, rec: Dict[str, Any]) -> List[str]:
    """The names of the chain after a Clip rewrite (``Clip`` -> ``Clip/max``, ``Clip/min``)."""
    by_name = nodes_by_name(graph)
    out = []
    for name in rec.get("through", []):
        if name in by_name:
            out.append(name)
        else:
            out.extend(f"{name}/{p}" for p in ("max", "relu", "min", "identity") if f"{name}/{p}" in by_name)
    return out


def apply_absorb(graph: gs.Graph, rec: Dict[str, Any]) -> None:
    """``b1 -= c``, ``b2 += W2 c`` for every second layer, Min bounds on the way ``-= c``."""
    by_name = nodes_by_name(graph)
    first = _layer_by_name(by_name, rec["first"])
    c = np.asarray(rec["shift"], np.float64)
    b = first.bias()
    first.set_bias((b if b is not None else np.zeros(c.size)) - c)
    for name in replay_chain_names(graph, rec):
        n = by_name[name]
        if n.op == "Relu":  # relu(h) == max(h - c, -c) + c: exact everywhere, not only where h >= c
            rank = _rank(n.inputs[0]) or (4 if first.channel_axis == 1 else 2)
            dtype = n.inputs[0].dtype or np.float32
            n.op = "Max"
            n.inputs.append(gs.Constant(f"{n.name}/absorbed_lower_bound",
                                        (-c).reshape(_channel_shape(c.size, first.channel_axis, rank)).astype(dtype)))
        elif n.op in ("Max", "Min"):  # max(h - c, lo - c) + c == max(h, lo): exact everywhere
            k = n.inputs[1]
            rank = _rank(n.inputs[0]) or 4
            v = _per_channel_const(k.values, c.size, first.channel_axis, rank)
            k.values = (v - c).reshape(_channel_shape(c.size, first.channel_axis, rank)).astype(k.values.dtype)
    for name in rec["second"]:
        layer = _layer_by_name(by_name, name)
        b2 = layer.bias()
        add = layer.input_sum(layer.weight.values, c)
        layer.set_bias((b2 if b2 is not None else np.zeros(add.size)) + add)


def apply_bias(graph: gs.Graph, rec: Dict[str, Any]) -> None:
    """Bias correction: ``b -= delta``."""
    layer = _layer_by_name(nodes_by_name(graph), rec["node"])
    d = np.asarray(rec["delta"], np.float64)
    b = layer.bias()
    layer.set_bias((b if b is not None else np.zeros(d.size)) - d)


APPLY = {"equalize.scale": apply_scale, "equalize.absorb": apply_absorb, "bias_correction.bias": apply_bias}


def replay(graph: gs.Graph, records: Sequence[Dict[str, Any]], passes: Sequence[str] = ("equalize", "bias_correction")
           ) -> int:
    """Redo recorded transforms (``plan.transforms``) of ``passes`` on ``graph`` without data, in their order;
    returns how many."""
    from onnxfp8.passes.smoothquant import apply_smooth

    table = dict(APPLY, **{"smoothquant.smooth": apply_smooth})
    done = 0
    for rec in records:
        fn = table.get(f"{rec.get('pass')}.{rec.get('kind')}")
        if fn is not None and rec.get("pass") in passes:
            fn(graph, rec)
            done += 1
    if done:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return done


class ReplayTransforms(Pass):
    """apply_plan: redo the plan's transforms (equalize, smoothquant, bias_correction records) without data,
    where ``use_plan`` expects the graph they made."""

    name = "replay_transforms"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        done = replay(graph, ctx.plan.transforms, ("equalize", "smoothquant", "bias_correction"))
        return PassResult(bool(done), [f"{done} recorded transform(s) redone"])


# -- the equalization pass ----------------------------------------------------------------------------------
def light_model(graph: gs.Graph):
    from onnxfp8.modelio import to_light_model

    return to_light_model(graph.copy())


def pair_statistics(graph: gs.Graph, pairs: Sequence[Pair], ctx: PassContext) -> Dict[str, Dict[str, np.ndarray]]:
    """Per pair (by first layer): ``"range"`` max |x| per channel of the tensor the second layers read and
    ``"min"`` the per-channel minimum of the first layer's output, over the calibration data (one pass, reduced
    in onnxruntime)."""
    from onnxfp8.calibrators.calibration import Calibration
    from onnxfp8.calibrators.collector import ChannelRequest

    requests: Dict[str, ChannelRequest] = {}
    ranks: Dict[str, int] = {}
    for p in pairs:
        ax = p.first.channel_axis
        tensors = graph.tensors()
        for t, kind in ((tensors[p.between], "absmax"), (p.first.out, "min")):
            r = requests.setdefault(t.name, ChannelRequest(ax, ()))
            if kind not in r.kinds:
                r.kinds = r.kinds + (kind,)
            if _rank(t):
                ranks[t.name] = _rank(t)
    model, arrays = light_model(graph)
    got = Calibration(ctx.config, ctx.calib, source=ctx.source).channel_stats(model, requests, arrays=arrays,
                                                                               rank=ranks)
    out = {}
    for p in pairs:
        a, m = got.get(p.between, {}), got.get(p.first.out.name, {})
        if a.get("absmax") is not None and m.get("min") is not None:
            out[p.key()] = {"range": a["absmax"], "min": m["min"]}
    return out


def equalize_scales(pairs: Sequence[Pair], stats: Dict[str, Dict[str, np.ndarray]],
                    rounds: int = ROUNDS) -> Dict[str, np.ndarray]:
    """The cumulative ``S`` per pair after equalizing the pairs in turn until the scales settle (on copies of
    the weights: the graph is not touched)."""
    w: Dict[str, np.ndarray] = {}
    for p in pairs:
        for layer in [p.first] + p.seconds:
            w.setdefault(layer.name, layer.weight.values.astype(np.float64))
    total = {p.key(): np.ones(p.first.n_out()) for p in pairs}
    for _ in range(rounds):
        worst = 0.0
        for p in pairs:
            r1 = p.first.out_ranges(w[p.first.name])
            r2 = np.zeros_like(r1)
            for s in p.seconds:
                r2 = np.maximum(r2, s.in_ranges(w[s.name]))
            with np.errstate(divide="ignore", invalid="ignore"):
                step = np.sqrt(r1 / r2)
            step = np.where(np.isfinite(step) & (step > 0), step, 1.0)
            st = stats.get(p.key())
            if st is not None:  # keep every channel within the tensor's calibrated range: S >= a_i / max a
                a = np.asarray(st["range"], np.float64)
                top = float(a.max()) if a.size else 0.0
                if top > 0:
                    floor = a / top
                    new = np.maximum(total[p.key()] * step, floor)
                    step = np.where(total[p.key()] > 0, new / total[p.key()], 1.0)
            total[p.key()] = total[p.key()] * step
            w[p.first.name] = p.first.scale_out(w[p.first.name], 1.0 / step)
            for s in p.seconds:
                w[s.name] = s.scale_in(w[s.name], step)
            worst = max(worst, float(np.max(np.abs(np.log(step)))) if step.size else 0.0)
        if worst < TOLERANCE:
            break
    return total


def _range_floor(st: Optional[Dict[str, np.ndarray]]) -> Optional[np.ndarray]:
    """``a_i / max_j a_j``: the smallest ``S_i`` the range guard allows (None without statistics)."""
    if st is None:
        return None
    a = np.asarray(st["range"], np.float64)
    top = float(a.max()) if a.size else 0.0
    return a / top if top > 0 else None


def power_of_two(S: np.ndarray, floor: Optional[np.ndarray] = None) -> np.ndarray:
    """Each ``S_i`` as the nearest power of two (in log2), raised to the next one where that falls below the
    range guard's ``floor_i``."""
    S = np.asarray(S, np.float64)
    k = np.round(np.log2(S))
    if floor is not None:
        with np.errstate(divide="ignore"):
            low = np.ceil(np.log2(np.maximum(floor, 1e-300)) - 1e-12)
        k = np.where(2.0 ** k < floor, np.maximum(k, low), k)
    return 2.0 ** k


def _lost(old: np.ndarray, scaled: np.ndarray, s: np.ndarray, dtype: Any, axis_max: np.ndarray) -> Optional[str]:
    """Why ``old * s`` stored as ``dtype`` (``scaled``, float64) does not give ``old * s`` back within half an
    ulp of ``axis_max`` (the channel's largest magnitude, broadcast like ``old``), or None."""
    with np.errstate(over="ignore"):
        q = scaled.astype(dtype).astype(np.float64)
    if not np.all(np.isfinite(q)):
        return f"overflows {np.dtype(dtype).name} (largest {float(np.max(np.abs(scaled))):.3g})"
    eps = float(np.finfo(dtype).eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        err = np.abs(q / s - old.astype(np.float64))
    bad = err > 0.5 * eps * axis_max
    if np.any(bad):
        return (f"{int(bad.sum())} value(s) lose precision in {np.dtype(dtype).name} subnormals (error up to "
                f"{float(np.max(np.where(bad, err / np.maximum(axis_max, 1e-300), 0))):.2g} of the channel's largest)")
    return None


def rescale_loss(p: Pair, S: np.ndarray) -> Optional[str]:
    """Half precision: why rescaling pair ``p`` by ``S`` (powers of two) would not be exact (a weight or bias
    overflowing, or losing more than half an ulp of its channel's largest weight, of the layer's largest bias,
    in subnormals), or None."""
    first = p.first
    w = first.weight.values
    dtype = w.dtype
    w64 = w.astype(np.float64)
    shape = [1] * w.ndim
    shape[first.out_axis()] = -1
    top = first.out_ranges(w).reshape(shape)
    why = _lost(w64, first.scale_out(w64, 1.0 / S), 1.0 / S.reshape(shape), dtype, top)
    if why:
        return f"{first.name} weight {why}"
    b = first.bias()
    if b is not None:
        why = _lost(b, b / S, 1.0 / S, first._bias_const().values.dtype, np.full(b.shape, np.max(np.abs(b))))
        if why:
            return f"{first.name} bias {why}"
    for s in p.seconds:
        w2 = s.weight.values
        w2_64 = w2.astype(np.float64)
        scaled = s.scale_in(w2_64, S)
        with np.errstate(invalid="ignore", over="ignore"):
            ratio = np.divide(scaled, w2_64, out=np.ones_like(scaled), where=w2_64 != 0)
        top2 = s.out_ranges(w2_64).reshape([-1 if i == s.out_axis() else 1 for i in range(w2.ndim)])
        why = _lost(w2_64, scaled, ratio, w2.dtype, top2)
        if why:
            return f"{s.name} weight {why}"
    return None


def function_change(before: gs.Graph, after: gs.Graph, ctx: PassContext) -> Tuple[float, float, str]:
    """The largest change of a float output of ``after`` against ``before`` over the first FUNCTION_SAMPLES
    calibration samples, relative to that output's largest magnitude; the format's eps; the output's name
    (onnxruntime, no optimizations)."""
    from onnxfp8.calibrators.data import batch_size, take_samples
    from onnxfp8.modelio import make_session, to_light_model

    cfg = ctx.config
    sessions = []
    for g in (before, after):
        model, arrays = to_light_model(g.copy())
        sessions.append(make_session(model, level="disable", providers=cfg.providers, threads=cfg.threads,
                                     arrays=arrays))
    names = [o.name for o in sessions[0].get_outputs()]
    diff = {n: 0.0 for n in names}
    top = {n: 0.0 for n in names}
    eps = {n: float(np.finfo(np.float16).eps) for n in names}
    seen = 0
    for b in ctx.calib.batches():
        k = batch_size(b)
        if seen + k > FUNCTION_SAMPLES:
            b, k = take_samples(b, FUNCTION_SAMPLES - seen), FUNCTION_SAMPLES - seen
        feed = dict(b)
        for n, x, y in zip(names, sessions[0].run(names, feed), sessions[1].run(names, feed)):
            x, y = np.asarray(x), np.asarray(y)
            if x.dtype.kind != "f":
                continue
            eps[n] = float(np.finfo(x.dtype).eps)
            x64, y64 = x.astype(np.float64), y.astype(np.float64)
            fin = np.isfinite(x64)
            if np.any(fin & ~np.isfinite(y64)):
                diff[n] = math.inf
            if fin.any():
                diff[n] = max(diff[n], float(np.max(np.abs(x64[fin] - y64[fin]))))
                top[n] = max(top[n], float(np.max(np.abs(x64[fin]))))
        seen += k
        if seen >= FUNCTION_SAMPLES:
            break
    rel = {n: diff[n] / top[n] if top[n] > 0 else (0.0 if diff[n] == 0 else math.inf) for n in names}
    if not rel:
        return 0.0, eps.get(names[0], 1e-3) if names else 1e-3, ""
    worst = max(rel, key=lambda n: rel[n] / eps[n])
    return rel[worst], eps[worst], worst


def _restore(graph: gs.Graph, backup: gs.Graph) -> None:
    """Make ``graph`` the copy ``backup`` again (in place: the pipeline holds ``graph``)."""
    fresh = backup.copy()
    graph.nodes = fresh.nodes
    graph.inputs = fresh.inputs
    graph.outputs = fresh.outputs


def _finite(v: float) -> Optional[float]:
    return float(v) if math.isfinite(v) else None


class Equalize(Pass):
    """Cross-layer equalization and bias absorption (``config.equalize``): see the module docstring."""

    name = "equalize"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if not ctx.config.equalize:
            return PassResult(False, ["equalization off"])
        notes: List[str] = []
        pairs = find_pairs(graph, notes)
        if not pairs:
            return PassResult(False, ["no layer pair to equalize (no Conv/Gemm/MatMul -> Relu-like -> Conv/Gemm/"
                                      "MatMul chain with weights of their own)"] + notes)
        stats: Dict[str, Dict[str, np.ndarray]] = {}
        if ctx.calib is not None:
            stats = pair_statistics(graph, pairs, ctx)
        else:
            notes.append("no calibration data: equalized without the range guard, no bias absorption")
        scales = equalize_scales(pairs, stats)
        half = [p for p in pairs if exact_scaling(p.first.weight.values.dtype)]
        if half:  # half precision: powers of two only, so the rescale is exact (module docstring)
            for p in half:
                scales[p.key()] = power_of_two(scales[p.key()], _range_floor(stats.get(p.key())))
        backup = graph.copy() if half and ctx.calib is not None else None
        records: List[Dict[str, Any]] = []
        left: List[Dict[str, Any]] = []
        changed = 0
        clips = 0
        for p in pairs:
            S = scales[p.key()]
            if np.allclose(S, 1.0, rtol=1e-6, atol=0):
                continue
            why = rescale_loss(p, S) if exact_scaling(p.first.weight.values.dtype) else None
            if why:
                left.append({"pass": "equalize", "kind": "left_alone", "first": p.first.name,
                             "second": [s.name for s in p.seconds], "reason": why})
                scales[p.key()] = np.ones_like(S)
                continue
            clips += sum(1 for n in p.chain if n.op == "Clip")
            rec = {"pass": "equalize", "kind": "scale", "first": p.first.name,
                   "second": [s.name for s in p.seconds], "through": [n.name for n in p.chain],
                   "tensor": p.between, "scale": [float(x) for x in S]}
            apply_scale(graph, rec)
            records.append(rec)
            changed += 1
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        absorbed = 0
        for p in pairs:
            st = stats.get(p.key())
            if st is None or not p.relu_like or not all(s.unpadded() and s.can_take_bias() for s in p.seconds) \
                    or not p.first.can_take_bias():
                continue
            c = np.maximum(0.0, np.asarray(st["min"], np.float64) / scales[p.key()])
            if exact_scaling(p.first.weight.values.dtype):  # the bound -c exact in the format, c <= the minimum
                dt = p.first.weight.values.dtype
                c = np.where(c.astype(dt).astype(np.float64) > c, np.nextafter(c.astype(dt), np.zeros((), dt)),
                             c.astype(dt)).astype(np.float64)
            if not np.any(c > 0):
                continue
            rec = {"pass": "equalize", "kind": "absorb", "first": p.first.name,
                   "second": [s.name for s in p.seconds], "through": [n.name for n in p.chain],
                   "tensor": p.between, "shift": [float(x) for x in c]}
            apply_absorb(graph, rec)
            records.append(rec)
            absorbed += 1
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        if backup is not None and records:
            moved, eps, outname = function_change(backup, graph, ctx)
            if not moved <= HALF_FUNCTION_EPS * eps:  # NaN or inf refuse too
                _restore(graph, backup)
                reason = (f"the half-precision output '{outname}' moved by {moved:.3g} of its largest magnitude on "
                          f"{FUNCTION_SAMPLES} calibration sample(s) (allowed {HALF_FUNCTION_EPS:g} ulps = "
                          f"{HALF_FUNCTION_EPS * eps:.3g}): equalization undone")
                ctx.plan.transforms.append({"pass": "equalize", "kind": "left_alone", "first": None,
                                            "second": [], "reason": reason, "change": _finite(moved)})
                return PassResult(False, [reason] + notes)
            notes.append(f"half precision: scales are powers of two; output moved by {moved:.3g} of its largest "
                         f"magnitude on the calibration samples (allowed {HALF_FUNCTION_EPS * eps:.3g})")
        ctx.plan.transforms.extend(records + left)
        if left:
            notes.append(f"{len(left)} pair(s) left alone: " + "; ".join(f"{r['first']}: {r['reason']}" for r in left[:3])
                         + (" ..." if len(left) > 3 else ""))
        spread = [float(np.max(np.abs(np.log2(scales[r["first"]])))) for r in records if r["kind"] == "scale"]
        notes.insert(0, f"equalized {changed} of {len(pairs)} layer pair(s)"
                     + (f" (largest channel scale 2^{max(spread):.1f})" if spread else "")
                     + (f", {clips} Clip(s) rewritten with per-channel bounds (Max/Min; Relu/Min in half precision)" if clips else "")
                     + (f", bias absorbed in {absorbed}" if absorbed else ""))
        return PassResult(bool(records), notes)


# -- the bias correction pass ---------------------------------------------------------------------------------
def weight_error(w: np.ndarray, layer: Layer, ctx: PassContext) -> np.ndarray:
    """``Q(W) - W`` in the format and with the per-channel scale ``assign_formats`` will use for this weight."""
    from onnxfp8.formats import get_format
    from onnxfp8.passes.assign_formats import channel_amax, choose_weight_format
    from onnxfp8.rules import weight_axis

    cfg = ctx.config
    over = cfg.overrides.get(layer.weight.name, {})
    axis = over.get("axis", weight_axis(layer.node, 1, w.ndim) if cfg.per_channel else None)
    if axis is not None and axis < 0:
        axis += w.ndim
    fmt = get_format(over.get("format", cfg.weight_format))
    if cfg.weights_auto and "format" not in over:
        fmt = get_format(choose_weight_format(w, axis, cfg.formats)[0])
    amax = channel_amax(w, axis)
    if "amax" in over:
        a = np.asarray(over["amax"], np.float32).reshape(-1)
        amax = np.full(np.shape(amax), a[0], np.float32) if a.size == 1 else a.reshape(np.shape(amax))
    scale = np.asarray(over["scale"], np.float32) if "scale" in over else fmt.scale_for(amax)
    if axis is None:
        q = fmt.fake_quant(w.astype(np.float32), scale.reshape(-1)[0], None)
    else:
        q = fmt.fake_quant(w.astype(np.float32), np.broadcast_to(scale.reshape(-1), (w.shape[axis],)), axis)
    return q.astype(np.float64) - w.astype(np.float64)


def _error_node(layer: Layer, dw: np.ndarray, i: int) -> Tuple[List[gs.Node], gs.Variable]:
    """A copy of the layer computing ``dW x`` (no bias)."""
    n = layer.node
    dtype = layer.weight.values.dtype  # an FP16 model's layer takes FP16 weights (channel_stats casts the output)
    out = gs.Variable(f"{layer.name}__onnxfp8_dw_out", dtype=dtype)
    const = gs.Constant(f"{layer.name}__onnxfp8_dw", dw.astype(dtype))
    attrs = dict(n.attrs)
    if n.op == "Gemm":
        attrs["beta"] = 1.0
    node = gs.Node(n.op, name=f"onnxfp8_bc_{i}", attrs=attrs, inputs=[n.inputs[0], const], outputs=[out])
    return [node], out


class BiasCorrection(Pass):
    """Bias correction of every quantized layer's expected weight quantization error (``config.bias_correction``,
    on with ``equalize`` unless set): see the module docstring."""

    name = "bias_correction"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        cfg = ctx.config
        want = cfg.bias_correction if cfg.bias_correction is not None else cfg.equalize
        if not want:
            return PassResult(False, ["bias correction off"])
        if cfg.bn_recalibrate:  # only implied by equalize here: the config refuses it when asked for
            return PassResult(False, ["BatchNorm recalibration re-quantizes the folded weights later: no bias correction"])
        if cfg.dynamic and ctx.calib is None and cfg.bias_correction is None:
            return PassResult(False, ["no calibration data (dynamic quantization): no bias correction"])
        if ctx.calib is None:
            from onnxfp8.errors import DataError

            raise DataError(f"{ctx.source}: bias correction measures the layers' inputs on calibration data: "
                            f"pass --calib DIR (or --no-bias-correction)")
        by_name = nodes_by_name(graph)
        layers: List[Tuple[Layer, np.ndarray]] = []
        skipped = 0
        for d in ctx.plan.quantized_nodes():
            node = by_name.get(d.node)
            if node is None or d.inputs.get(1) != "weight":
                continue
            layer = as_layer(node)
            if layer is None or not layer.can_take_bias():
                skipped += 1
                continue
            bc = layer._bias_const()
            if bc is not None and not owned(bc, [layer.node] + ([layer.bias_node] if layer.bias_node else [])):
                skipped += 1
                continue
            if isinstance(node.inputs[0], gs.Constant):
                continue
            layers.append((layer, weight_error(layer.weight.values, layer, ctx)))
        if not layers:
            return PassResult(False, ["no quantized layer whose bias can be corrected"])
        # a copy of the graph with a dW-layer beside every layer: their per-channel means are E[dW x]
        work = graph.copy()
        wby = nodes_by_name(work)
        from onnxfp8.calibrators.calibration import Calibration
        from onnxfp8.calibrators.collector import ChannelRequest
        from onnxfp8.modelio import to_light_model

        requests: Dict[str, ChannelRequest] = {}
        ranks: Dict[str, int] = {}
        for i, (layer, dw) in enumerate(layers):
            wl = as_layer(wby[layer.name])
            nodes, out = _error_node(wl, dw, i)
            work.nodes.extend(nodes)
            work.outputs.append(out)  # kept through the export's cleanup (channel_stats fetches only its own)
            requests[out.name] = ChannelRequest(layer.channel_axis, ("mean",))
            r = _rank(layer.node.outputs[0])
            if r:
                ranks[out.name] = r
            elif layer.node.op == "Gemm":
                ranks[out.name] = 2
        model, arrays = to_light_model(work)
        got = Calibration(cfg, ctx.calib, source=ctx.source).channel_stats(model, requests, arrays=arrays,
                                                                            rank=ranks)
        records = []
        shifts = []
        for layer, dw in layers:
            r = got.get(f"{layer.name}__onnxfp8_dw_out", {})
            delta = r.get("mean")
            if delta is None or delta.size != layer.n_out() or not np.all(np.isfinite(delta)):
                skipped += 1
                continue
            rec = {"pass": "bias_correction", "kind": "bias", "node": layer.name,
                   "format": cfg.weight_format, "delta": [float(x) for x in delta]}
            apply_bias(graph, rec)
            records.append(rec)
            b = layer.bias()
            scale = float(np.sqrt(np.mean(b ** 2))) if b is not None and b.size else 0.0
            shifts.append(float(np.max(np.abs(delta))))
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        ctx.plan.transforms.extend(records)
        notes = [f"bias corrected in {len(records)} quantized layer(s) (expected weight quantization error on "
                 f"{next(iter(got.values()))['samples'] if got else 0} sample(s); largest shift "
                 f"{max(shifts) if shifts else 0.0:.3g})"]
        if skipped:
            notes.append(f"{skipped} layer(s) left alone (MatMul without a bias Add, a shared bias, or no "
                         f"statistics)")
        return PassResult(bool(records), notes)
