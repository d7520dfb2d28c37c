"""emulate: the graph fragments that realise a QuantSpec, in both output styles.

``qdq`` style (``QDQEmitter``): QuantizeLinear -> DequantizeLinear for activations, an FP8/INT8 initializer ->
DequantizeLinear for weights: the form TensorRT and other FP8 runtimes consume.

``emulate`` style (``EmulateEmitter``): fake quantization from ops that onnxruntime does not fuse, so the
function is the same at every optimization level:
- E4M3 / E5M2 activations: ``Div(x, s) -> Cast(FP8, saturate=1) -> Cast(FLOAT) -> Mul(s)``;
- INT8 activations: ``Div -> Round (half to even) -> Clip(-128, 127) -> Mul``;
- E3M4 (no ONNX type, so emulated in both styles): ``v = Clip(x / s, -30, 30)``, binade exponent
  ``e = Clip(Floor(Log(|v|) / ln 2), -2, 4)``, grid step ``2^(e-4)``, ``Round(v / step) * step * s``. Near a
  power of two Log may be off by an ulp and pick the neighbouring binade; rounding with either step then
  gives the same power of two, so the result is exact (tests check it against formats.E3M4 bit for bit);
- weights: the FP8 / INT8 initializer -> ``Cast(FLOAT) -> Mul(scale)``; E3M4 weights are stored as 8-bit codes
  and decoded with ``Gather`` from the format's 256-entry table, then ``Mul(scale)``.
"""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxfp8 import names
from onnxfp8.formats import SCALE_MIN, Format, is_float_dtype, np_dtype
from onnxfp8.plan import QuantSpec


def _const(name: str, value, dtype=None) -> gs.Constant:
    return gs.Constant(name, np.asarray(value) if dtype is None else np.asarray(value).astype(dtype))


def float_type(t) -> np.dtype:
    """The float type tensor ``t`` computes in (the model's own: float32, float16, bfloat16, float64); float32
    when unknown or not a float."""
    dt = getattr(t, "dtype", None)
    if isinstance(t, gs.Constant):
        dt = t.values.dtype
    try:
        return np_dtype(dt) if dt is not None and is_float_dtype(dt) else np.dtype(np.float32)
    except TypeError:
        return np.dtype(np.float32)


def typed_scale(scale, dtype) -> np.ndarray:
    """``scale`` in the float type ``dtype``, rounded up where the type cannot hold it exactly (so ``amax /
    scale`` stays within the format's range) and at least the type's smallest normal (float16 cannot hold
    2^-126): the scale a float16 / bfloat16 model's QuantizeLinear reads. float32 passes through unchanged."""
    dtype = np.dtype(dtype)
    s = np.asarray(scale, np.float32)
    if dtype == np.float32:
        return s
    if dtype == np.float64:
        return s.astype(np.float64)
    tiny = ml_dtypes.finfo(dtype).tiny
    s = np.maximum(s, np.float32(tiny))
    t = s.astype(dtype)
    low = t.astype(np.float32) < s
    if np.any(low):
        t = np.where(low, np.nextafter(t, np.asarray(np.inf, dtype)), t).astype(dtype)
    return t


def _broadcast_scale(scale: np.ndarray, axis, rank: int) -> np.ndarray:
    if scale.ndim == 0 or axis is None:
        return scale.reshape(())
    shape = [1] * rank
    shape[axis] = scale.shape[0]
    return scale.reshape(shape)


class Emitter:
    style = ""

    def __init__(self, graph: gs.Graph, twin_of: str = ""):
        self.graph = graph
        self.twin_of = twin_of  # "bfloat16": the graph is a bfloat16 model's float32 twin (bfloat16.py)

    def scale(self, spec: QuantSpec, dtype) -> np.ndarray:
        """The spec's scale in ``dtype``; in a bfloat16 model's float32 twin float32 values bfloat16 can hold
        (rounded up as typed_scale does), so the model written back in bfloat16 has the same scales."""
        if self.twin_of and np.dtype(dtype) == np.float32:
            return _typed_spec_scale(spec, np.dtype(getattr(ml_dtypes, self.twin_of))).astype(np.float32)
        return _typed_spec_scale(spec, dtype)

    def _shared(self, name: str, value) -> gs.Constant:
        """One constant per graph for tables every tensor of a format reads (a second Constant of the same
        name would be a second tensor of that name)."""
        shared = self.graph.__dict__.setdefault("_onnxfp8_shared", {})
        if name not in shared:
            shared[name] = _const(name, value)
        return shared[name]

    def _node(self, op: str, name: str, inputs, outputs, **attrs) -> None:
        self.graph.nodes.append(gs.Node(op, name=name, attrs=attrs, inputs=list(inputs), outputs=list(outputs)))

    def _var(self, name: str, like=None, dtype=None) -> gs.Variable:
        shape = like.shape if like is not None and hasattr(like, "shape") else None
        if dtype is None:
            dtype = float_type(like) if like is not None else np.float32
        return gs.Variable(name, dtype=dtype, shape=list(shape) if shape is not None else None)

    def _cast(self, x, to, name: str, like=None) -> gs.Variable:
        """``Cast(x, to)`` (the emulation computes in float32 whatever the model's float type)."""
        out = gs.Variable(name, dtype=np.dtype(to), shape=getattr(like if like is not None else x, "shape", None))
        self._node("Cast", f"{name}/Cast", [x], [out], to=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(to)))
        return out


class QDQEmitter(Emitter):
    style = "qdq"

    def weight(self, w: gs.Constant, spec: QuantSpec, fmt: Format, out_name: str) -> gs.Variable:
        scale = self.scale(spec, float_type(w))
        q = fmt.quantize(np.asarray(w.values, np.float32), scale.astype(np.float32), spec.axis)
        zp = np.zeros(scale.shape, dtype=fmt.storage_dtype)
        out = self._var(out_name, w)
        attrs = {"axis": spec.axis} if spec.axis is not None and scale.ndim else {}
        self._node("DequantizeLinear", f"{w.name}/DequantizeLinear",
                   [_const(names.quantized(w.name), q), _const(names.scale(w.name), scale),
                    _const(names.zero_point(w.name), zp)], [out], **attrs)
        return out

    def activation(self, x: gs.Variable, spec: QuantSpec, fmt: Format, tag: str, scale=None) -> gs.Variable:
        """Q -> DQ of ``x``. ``scale``: a run-time scale tensor (dynamic quantization) instead of spec.scale;
        a per-row one (``DynamicScale.per_row``) is applied as ``Div -> Q(1) -> DQ(1) -> Mul``, the same
        function (QuantizeLinear divides by 1 exactly), since QuantizeLinear's scale is 1-D at most."""
        zp = np.zeros((), dtype=fmt.storage_dtype)
        z = _const(names.zero_point(tag), zp)
        q = gs.Variable(f"{tag}.q", dtype=fmt.storage_dtype, shape=getattr(x, "shape", None))
        out = self._var(names.dq(tag), x)
        ft = float_type(x)
        if isinstance(scale, DynamicScale) and scale.per_row:
            v = gs.Variable(f"{tag}.scaled", dtype=ft)
            self._node("Div", f"{tag}/Div", [x, scale.tensor], [v])
            one = _const(f"{tag}.unit_scale", 1.0, ft)
            r = gs.Variable(f"{tag}.rounded", dtype=ft)
            self._node("QuantizeLinear", f"{tag}/QuantizeLinear", [v, one, z], [q])
            self._node("DequantizeLinear", f"{tag}/DequantizeLinear", [q, one, z], [r])
            self._node("Mul", f"{tag}/Mul", [r, scale.tensor], [out])
            return out
        s = scale.tensor if isinstance(scale, DynamicScale) else _const(names.scale(tag), self.scale(spec, ft))
        self._node("QuantizeLinear", f"{tag}/QuantizeLinear", [x, s, z], [q])
        self._node("DequantizeLinear", f"{tag}/DequantizeLinear", [q, s, z], [out])
        return out


class EmulateEmitter(Emitter):
    style = "emulate"

    def weight(self, w: gs.Constant, spec: QuantSpec, fmt: Format, out_name: str) -> gs.Variable:
        ft = float_type(w)
        scale = self.scale(spec, ft).astype(np.float32)
        q = fmt.quantize(np.asarray(w.values, np.float32), scale, spec.axis)
        s = _const(names.scale(w.name), _broadcast_scale(scale, spec.axis, w.values.ndim))
        stored = _const(names.quantized(w.name), q)
        decoded = gs.Variable(f"{w.name}.decoded", dtype=np.float32, shape=list(w.values.shape))
        if fmt.emulated:  # E3M4: 8-bit codes -> table lookup
            idx = gs.Variable(f"{w.name}.codes", dtype=np.int32, shape=list(w.values.shape))
            self._node("Cast", f"{w.name}/CastCodes", [stored], [idx], to=onnx.TensorProto.INT32)
            table = self._shared(fmt.name + names.CODE_TABLE, fmt.code_table().astype(np.float32))
            self._node("Gather", f"{w.name}/Decode", [table, idx], [decoded], axis=0)
        else:
            self._node("Cast", f"{w.name}/Cast", [stored], [decoded], to=onnx.TensorProto.FLOAT)
        out = self._var(out_name, w)
        if ft == np.float32:
            self._node("Mul", f"{w.name}/Scale", [decoded, s], [out])
            return out
        scaled = gs.Variable(f"{w.name}.scaled", dtype=np.float32, shape=list(w.values.shape))
        self._node("Mul", f"{w.name}/Scale", [decoded, s], [scaled])
        self._node("Cast", f"{w.name}/CastBack", [scaled], [out], to=onnx.helper.np_dtype_to_tensor_dtype(ft))
        return out

    def activation(self, x: gs.Variable, spec: QuantSpec, fmt: Format, tag: str, scale=None) -> gs.Variable:
        """Computed in float32 whatever the model's float type (Cast in and out): float16 / bfloat16 values are
        exact in float32, and the E3M4 rounding's Log/Floor/Pow have float32 kernels everywhere."""
        ft = float_type(x)
        x_in = x if ft == np.float32 else self._cast(x, np.float32, f"{tag}.x32", like=x)
        if isinstance(scale, DynamicScale):
            s = scale.tensor if ft == np.float32 else self._cast(scale.tensor, np.float32, f"{tag}.scale32")
        else:
            s = _const(names.scale(tag), self.scale(spec, ft).astype(np.float32))
        x = x_in
        v = gs.Variable(f"{tag}.scaled", dtype=np.float32)
        self._node("Div", f"{tag}/Div", [x, s], [v])
        r = gs.Variable(f"{tag}.rounded", dtype=np.float32)
        if fmt.emulated:
            emit_e3m4_round(self, v, r, tag, fmt)
        elif fmt.kind == "int":
            t = gs.Variable(f"{tag}.rint", dtype=np.float32)
            self._node("Round", f"{tag}/Round", [v], [t])
            self._node("Clip", f"{tag}/Clip", [t, _const(f"{tag}.qmin", np.float32(fmt.qmin)),
                                               _const(f"{tag}.qmax", np.float32(fmt.qmax))], [r])
        else:
            q = gs.Variable(f"{tag}.q", dtype=fmt.storage_dtype)
            self._node("Cast", f"{tag}/CastFP8", [v], [q], to=fmt.onnx_dtype, saturate=1)
            self._node("Cast", f"{tag}/CastFloat", [q], [r], to=onnx.TensorProto.FLOAT)
        if ft == np.float32:
            out = self._var(names.dq(tag), x)
            self._node("Mul", f"{tag}/Mul", [r, s], [out])
            return out
        y = self._var(f"{tag}.dq32", x, dtype=np.float32)
        self._node("Mul", f"{tag}/Mul", [r, s], [y])
        out = self._var(names.dq(tag), x, dtype=ft)
        self._node("Cast", f"{tag}/CastBack", [y], [out], to=onnx.helper.np_dtype_to_tensor_dtype(ft))
        return out


def _typed_spec_scale(spec: QuantSpec, dtype) -> np.ndarray:
    """The spec's scale(s) in the tensor's float type (typed_scale); the plan records the value used."""
    scale = typed_scale(spec.scale_array(), dtype)
    if np.dtype(dtype) != np.float32:
        vals = np.asarray(scale, np.float32)
        spec.scale = vals.item() if vals.ndim == 0 else vals.astype(np.float64).tolist()
    return scale


def emit_e3m4_round(em: Emitter, v: gs.Variable, out: gs.Variable, tag: str, fmt: Format) -> None:
    """Round ``v`` (already divided by the scale) to the E3M4 grid with saturation, into ``out``."""
    f = np.float32
    mb = fmt.mantissa_bits
    emin = 1 - fmt.bias  # exponent of the smallest normal
    emax = int(math.floor(math.log2(fmt.max)))
    V = lambda n: gs.Variable(f"{tag}.{n}", dtype=np.float32)  # noqa: E731
    c, a, ln, l2, fl, e, em_, step, d, rd = (V(n) for n in ("clip", "abs", "log", "log2", "floor", "exp",
                                                           "expm", "step", "div", "rnd"))
    em._node("Clip", f"{tag}/Saturate", [v, _const(f"{tag}.neg_max", f(-fmt.max)), _const(f"{tag}.max", f(fmt.max))], [c])
    em._node("Abs", f"{tag}/Abs", [c], [a])
    em._node("Log", f"{tag}/Log", [a], [ln])
    em._node("Mul", f"{tag}/Log2", [ln, _const(f"{tag}.inv_ln2", f(1.0 / math.log(2.0)))], [l2])
    em._node("Floor", f"{tag}/Floor", [l2], [fl])
    em._node("Clip", f"{tag}/Binade", [fl, _const(f"{tag}.emin", f(emin)), _const(f"{tag}.emax", f(emax))], [e])
    em._node("Sub", f"{tag}/StepExp", [e, _const(f"{tag}.mbits", f(mb))], [em_])
    em._node("Pow", f"{tag}/Step", [_const(f"{tag}.two", f(2.0)), em_], [step])
    em._node("Div", f"{tag}/DivStep", [c, step], [d])
    em._node("Round", f"{tag}/Round", [d], [rd])
    em._node("Mul", f"{tag}/MulStep", [rd, step], [out])


class DynamicScale:
    """A scale computed in the graph at run time (dynamic quantization)::

        amax  = ReduceMax(Abs(x))            (ReduceMax(x) when ``signed``: the max of relu(x))
        scale = Max(amax / format max, 2^-126)

    over the whole tensor (a scalar) or, with ``axis``, over that axis only with keepdims (one scale per
    row / token: ``axis=-1`` for the left MatMul operand, ``-2`` for the right one). ``amax / max`` in float32
    is what Format.scale_for computes; the floor keeps an all-zero tensor finite (it quantizes to 0 anyway,
    where scale_for would pick 1.0)."""

    def __init__(self, em: Emitter, x: gs.Tensor, fmt: Format, tag: str, axis=None, signed: bool = False):
        self.per_row = axis is not None
        ft = float_type(x)  # the scale is computed in the model's float type (QuantizeLinear's scale type)
        src = x
        if not signed:
            src = gs.Variable(f"{tag}.dyn_abs", dtype=ft)  # not {tag}.abs: the E3M4 rounding uses it
            em._node("Abs", f"{tag}/DynAbs", [x], [src])
        amax = gs.Variable(f"{tag}.amax", dtype=ft)
        if axis is None:
            em._node("ReduceMax", f"{tag}/DynReduceMax", [src], [amax], keepdims=0)
        else:
            em._node("ReduceMax", f"{tag}/DynReduceMax", [src, _const(f"{tag}.reduce_axes", np.asarray([axis], np.int64))],
                     [amax], keepdims=1)
        ratio = gs.Variable(f"{tag}.ratio", dtype=ft)
        em._node("Div", f"{tag}/DynDiv", [amax, _const(f"{tag}.fmt_max", fmt.max, ft)], [ratio])
        self.tensor = gs.Variable(names.scale(tag), dtype=ft)
        floor = SCALE_MIN if ft in (np.float32, np.float64) else float(ml_dtypes.finfo(ft).tiny)
        em._node("Max", f"{tag}/DynScale", [ratio, _const(f"{tag}.scale_floor", floor, ft)], [self.tensor])


def emitter_for(style: str, fmt: Format, graph: gs.Graph, twin_of: str = "") -> Emitter:
    """E3M4 has no ONNX type: it is emulated whatever the style. ``twin_of``: PassContext.twin_of."""
    if style == "emulate" or fmt.emulated:
        return EmulateEmitter(graph, twin_of)
    return QDQEmitter(graph, twin_of)
