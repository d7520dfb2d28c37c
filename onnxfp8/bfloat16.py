"""bfloat16 models through a float32 twin.

onnxruntime's CPU provider has no bfloat16 kernel for MatMul, Gemm, Conv, Add, Relu or Softmax and its Python
API cannot feed a bfloat16 array (measured with onnxruntime 1.32), so a bfloat16 model is calibrated, planned,
quantized and measured as its **float32 twin**, and written back in bfloat16:

* ``float32_twin(model)``: every bfloat16 tensor type (inputs, outputs, value_info) and initializer / tensor
  attribute in float32 (bf16 -> fp32 is exact), and every ``Cast(to=BFLOAT16)`` a ``Cast(to=FLOAT)`` (an
  identity on a float32 value): the precision-rounding Casts are dropped, so the twin computes the bfloat16
  model's graph on float32 kernels without rounding anywhere (tests/robustness/test_bfloat16.py measures what
  that changes against onnx.reference running the bfloat16 model itself);
* the passes make every Q/DQ scale representable in bfloat16 (``PassContext.twin_of``), so writing the scales
  back in bfloat16 is exact and the FP8 / INT8 codes are the twin's bit for bit;
* ``Bfloat16Model.back(quantized_twin)``: the quantized twin in bfloat16 again. A float tensor takes the type
  it had in the original model; a tensor the passes added (``<t>.dq``, ``<t>.scale``, ...: names.py) takes the
  type of the tensor it was named after, else bfloat16; Casts to float take their output's type. The result
  must pass strict ONNX shape inference (and the checker in quantize): before opset 22 a bfloat16 Round (the
  INT8 / E3M4 emulation's) computes in float32 between two Casts (exact); anything else ONNX cannot type in
  bfloat16 at the model's opset (Conv, pooling before opset 22, ...) is one line, exit 2.

``modelio.make_session`` runs a bfloat16 ModelProto as its twin, so every measurement of a written bfloat16
model (quantize's summary, the transform guard, ``check``) is the twin's, and says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnxfp8.errors import ModelError

BF16 = TensorProto.BFLOAT16
F32 = TensorProto.FLOAT
BF16_DTYPE = np.dtype(ml_dtypes.bfloat16)
# the message the summaries and the check print (quantize: QuantReport.measured_on, check: runtime)
TWIN_NOTE = ("measured on the float32 twin of the bfloat16 model (onnxruntime's CPU provider cannot run bfloat16): "
             "bfloat16 values in float32, bfloat16 Casts dropped, scales bfloat16-exact")
# attributes naming an output element type (Cast, EyeLike, RandomNormal(Like), RandomUniform(Like), Multinomial...)
_TYPE_ATTRS = ("to", "dtype")


def _graphs(g: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``g`` and every subgraph (If / Loop / Scan bodies) at any depth."""
    yield g
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    yield from _graphs(sub)


def _value_infos(g: onnx.GraphProto):
    return list(g.input) + list(g.output) + list(g.value_info)


def _elem(vi: onnx.ValueInfoProto) -> int:
    return vi.type.tensor_type.elem_type if vi.type.HasField("tensor_type") else 0


def bfloat16_tensors(model: onnx.ModelProto) -> List[str]:
    """Names of the inputs, outputs, initializers and typed values that are bfloat16, and of the nodes
    producing bfloat16 by attribute (Cast to=BFLOAT16, a bfloat16 Constant): where the model computes in
    bfloat16 (subgraphs included)."""
    out: List[str] = []
    for g in _graphs(model.graph):
        out += [v.name for v in _value_infos(g) if _elem(v) == BF16]
        out += [t.name for t in g.initializer if t.data_type == BF16]
        for n in g.node:
            for a in n.attribute:
                if (a.name in _TYPE_ATTRS and a.type == onnx.AttributeProto.INT and a.i == BF16) or (
                        a.type == onnx.AttributeProto.TENSOR and a.t.data_type == BF16):
                    out.append(n.name or n.op_type)
    return out


def is_bfloat16(model: onnx.ModelProto) -> bool:
    return bool(bfloat16_tensors(model))


def _to_float32(t: TensorProto) -> TensorProto:
    arr = numpy_helper.to_array(t).astype(np.float32)  # exact: every bfloat16 is a float32
    new = numpy_helper.from_array(arr, t.name)
    new.doc_string = t.doc_string
    return new


def _to_bfloat16(t: TensorProto) -> TensorProto:
    arr = numpy_helper.to_array(t).astype(np.float32).astype(BF16_DTYPE)  # round to nearest even
    new = numpy_helper.from_array(arr, t.name)
    new.doc_string = t.doc_string
    return new


def _retype(g: onnx.GraphProto, frm: int, to: int, want=None) -> None:
    """Tensor types ``frm`` -> ``to`` in ``g``'s inputs / outputs / value_info (``want(name)``: the type a
    name should get instead, when given)."""
    for vi in _value_infos(g):
        if _elem(vi) == frm:
            vi.type.tensor_type.elem_type = to if want is None else want(vi.name)


def float32_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """The float32 twin of a bfloat16 model (the module docstring); ``model`` is not touched."""
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    for g in _graphs(twin.graph):
        _retype(g, BF16, F32)
        for i, t in enumerate(g.initializer):
            if t.data_type == BF16:
                g.initializer[i].CopyFrom(_to_float32(t))
        for n in g.node:
            for a in n.attribute:
                if a.name in _TYPE_ATTRS and a.type == onnx.AttributeProto.INT and a.i == BF16:
                    a.i = F32
                elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == BF16:
                    a.t.CopyFrom(_to_float32(a.t))
    return twin


def _original_types(model: onnx.ModelProto) -> Dict[str, int]:
    """Float element type (FLOAT / BFLOAT16) of every named tensor of ``model``: declared, and inferred where
    onnx shape inference can (on a light copy)."""
    from onnxfp8.modelio import light_copy

    types: Dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(light_copy(model)[0])
    except Exception:  # inference is a help here: the declared types remain
        inferred = model
    for src in (inferred, model):
        for g in _graphs(src.graph):
            for vi in _value_infos(g):
                if _elem(vi) in (F32, BF16):
                    types[vi.name] = _elem(vi)
            for t in g.initializer:
                if t.data_type in (F32, BF16):
                    types[t.name] = t.data_type
    return types


@dataclass
class Bfloat16Model:
    """What writing a quantized twin back in bfloat16 needs: the original's float type per tensor name."""

    types: Dict[str, int] = field(default_factory=dict)
    source: str = "model"

    @classmethod
    def of(cls, model: onnx.ModelProto, source: str = "model") -> "Bfloat16Model":
        return cls(_original_types(model), source)

    def type_of(self, name: str) -> int:
        """The original type of ``name``, or of the tensor it was named after (the longest original name it
        starts with, followed by '.' or '/': names.py), else bfloat16."""
        if name in self.types:
            return self.types[name]
        best = ""
        for cut in range(len(name) - 1, 0, -1):
            if name[cut] in "./" and name[:cut] in self.types:
                best = name[:cut]
                break
        return self.types[best] if best else BF16

    def back(self, quantized: onnx.ModelProto, check: bool = True) -> onnx.ModelProto:
        """The quantized twin written in bfloat16 (the module docstring); ``check``: strict ONNX shape
        inference on the result, a failure is a ModelError (one line: what ONNX cannot express in bfloat16)."""
        m = onnx.ModelProto()
        m.CopyFrom(quantized)
        for g in _graphs(m.graph):
            _retype(g, F32, F32, self.type_of)
            for i, t in enumerate(g.initializer):
                if t.data_type == F32 and self.type_of(t.name) == BF16:
                    g.initializer[i].CopyFrom(_to_bfloat16(t))
            for n in g.node:
                out = self.type_of(n.output[0]) if n.output else F32
                for a in n.attribute:
                    if a.name in _TYPE_ATTRS and a.type == onnx.AttributeProto.INT and a.i == F32 and out == BF16:
                        a.i = BF16
                    elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == F32 and out == BF16:
                        a.t.CopyFrom(_to_bfloat16(a.t))
        if _opset(m) < 22:
            _round_in_float32(m.graph, self.type_of)
        if check:
            self.check(m)
        return m

    def check(self, model: onnx.ModelProto) -> None:
        from onnxfp8.modelio import light_copy

        try:
            onnx.shape_inference.infer_shapes(light_copy(model)[0], check_type=True, strict_mode=True)
        except Exception as e:
            text = " ".join(str(e).split())
            text = text if len(text) <= 220 else text[:217] + "..."
            opset = _opset(model)
            hint = ("; ONNX allows bfloat16 Conv and pooling from opset 22: export the model at opset 22"
                    if opset < 22 else "")
            raise ModelError(f"{self.source}: the quantized model cannot be written in bfloat16 (ONNX cannot express "
                             f"it at opset {opset}: {text}){hint}") from None


def _round_in_float32(g: onnx.GraphProto, type_of) -> None:
    """Round takes bfloat16 from opset 22 only: before, a bfloat16 Round (the INT8 / E3M4 emulation's) reads its
    input cast to float32 and casts its result back. Exact: Round of a bfloat16 value is an integer bfloat16
    holds (below 256 every integer is one; from 256 on every bfloat16 is an integer already)."""
    nodes = []
    for n in g.node:
        if n.op_type == "Round" and type_of(n.input[0]) == BF16:
            x, y = n.input[0], n.output[0]
            nodes.append(onnx.helper.make_node("Cast", [x], [x + ".round_in"], name=n.name + "/to_float", to=F32))
            nodes.append(onnx.helper.make_node("Round", [x + ".round_in"], [y + ".round_out"], name=n.name))
            nodes.append(onnx.helper.make_node("Cast", [y + ".round_out"], [y], name=n.name + "/to_bfloat16", to=BF16))
        else:
            nodes.append(n)
    if len(nodes) != len(g.node):
        del g.node[:]
        g.node.extend(nodes)


def _opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def runnable(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` as onnxruntime's CPU provider can run it: its float32 twin when it is a bfloat16 model."""
    return float32_twin(model) if is_bfloat16(model) else model


def as_float32(arr: np.ndarray) -> Optional[np.ndarray]:
    """A bfloat16 array as float32 (exact), else None."""
    return arr.astype(np.float32) if getattr(arr, "dtype", None) == BF16_DTYPE else None
