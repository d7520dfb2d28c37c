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

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxfp8.formats import Format
from onnxfp8.plan import QuantSpec


def _const(name: str, value) -> gs.Constant:
    return gs.Constant(name, np.asarray(value))


def _broadcast_scale(scale: np.ndarray, axis, rank: int) -> np.ndarray:
    if scale.ndim == 0 or axis is None:
        return scale.reshape(())
    shape = [1] * rank
    shape[axis] = scale.shape[0]
    return scale.reshape(shape)


class Emitter:
    style = ""

    def __init__(self, graph: gs.Graph):
        self.graph = graph

    def _node(self, op: str, name: str, inputs, outputs, **attrs) -> None:
        self.graph.nodes.append(gs.Node(op, name=name, attrs=attrs, inputs=list(inputs), outputs=list(outputs)))

    def _var(self, name: str, like=None, dtype=np.float32) -> gs.Variable:
        shape = like.shape if like is not None and hasattr(like, "shape") else None
        return gs.Variable(name, dtype=dtype, shape=shape)


class QDQEmitter(Emitter):
    style = "qdq"

    def weight(self, w: gs.Constant, spec: QuantSpec, fmt: Format, out_name: str) -> gs.Variable:
        scale = spec.scale_array()
        q = fmt.quantize(w.values, scale, spec.axis)
        zp = np.zeros(scale.shape, dtype=fmt.storage_dtype)
        out = self._var(out_name, w)
        attrs = {"axis": spec.axis} if spec.axis is not None and scale.ndim else {}
        self._node("DequantizeLinear", f"{w.name}/DequantizeLinear",
                   [_const(f"{w.name}.quantized", q), _const(f"{w.name}.scale", scale),
                    _const(f"{w.name}.zero_point", zp)], [out], **attrs)
        return out

    def activation(self, x: gs.Variable, spec: QuantSpec, fmt: Format, tag: str) -> gs.Variable:
        scale = np.asarray(spec.scale, dtype=np.float32)
        zp = np.zeros((), dtype=fmt.storage_dtype)
        s = _const(f"{tag}.scale", scale)
        z = _const(f"{tag}.zero_point", zp)
        q = gs.Variable(f"{tag}.q", dtype=fmt.storage_dtype, shape=getattr(x, "shape", None))
        out = self._var(f"{tag}.dq", x)
        self._node("QuantizeLinear", f"{tag}/QuantizeLinear", [x, s, z], [q])
        self._node("DequantizeLinear", f"{tag}/DequantizeLinear", [q, s, z], [out])
        return out


class EmulateEmitter(Emitter):
    style = "emulate"

    def weight(self, w: gs.Constant, spec: QuantSpec, fmt: Format, out_name: str) -> gs.Variable:
        scale = spec.scale_array()
        q = fmt.quantize(w.values, scale, spec.axis)
        s = _const(f"{w.name}.scale", _broadcast_scale(scale, spec.axis, w.values.ndim))
        stored = _const(f"{w.name}.quantized", q)
        decoded = gs.Variable(f"{w.name}.decoded", dtype=np.float32, shape=list(w.values.shape))
        if fmt.emulated:  # E3M4: 8-bit codes -> table lookup
            idx = gs.Variable(f"{w.name}.codes", dtype=np.int32, shape=list(w.values.shape))
            self._node("Cast", f"{w.name}/CastCodes", [stored], [idx], to=onnx.TensorProto.INT32)
            table = _const(f"{fmt.name}.code_table", fmt.code_table().astype(np.float32))
            self._node("Gather", f"{w.name}/Decode", [table, idx], [decoded], axis=0)
        else:
            self._node("Cast", f"{w.name}/Cast", [stored], [decoded], to=onnx.TensorProto.FLOAT)
        out = self._var(out_name, w)
        self._node("Mul", f"{w.name}/Scale", [decoded, s], [out])
        return out

    def activation(self, x: gs.Variable, spec: QuantSpec, fmt: Format, tag: str) -> gs.Variable:
        scale = np.asarray(spec.scale, dtype=np.float32)
        s = _const(f"{tag}.scale", scale)
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
        out = self._var(f"{tag}.dq", x)
        self._node("Mul", f"{tag}/Mul", [r, s], [out])
        return out


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


def emitter_for(style: str, fmt: Format, graph: gs.Graph) -> Emitter:
    """E3M4 has no ONNX type: it is emulated whatever the style."""
    if style == "emulate" or fmt.emulated:
        return EmulateEmitter(graph)
    return QDQEmitter(graph)
