"""TensorRT lint: Q/DQ placements TensorRT cannot fuse into FP8 (or INT8) kernels, each with node names and a
reason. ``onnxfp8 lint model.onnx --target tensorrt`` exits 1 when it finds any error.

What TensorRT needs (sources: TensorRT documentation, "Working with Quantized Types" and "Explicit
Quantization"; NVIDIA TensorRT-Model-Optimizer, modelopt/onnx/quantization/graph_utils.py; see
rules.TensorRTRule for the channel and filter limits):

- ``dtype``: FP8 is FLOAT8E4M3FN only (E5M2 and the FNUZ types are not TensorRT types); INT8 is accepted;
  UINT8 / INT16 / INT4... are not 8-bit symmetric types TensorRT's FP8/INT8 kernels take;
- ``zero-point``: quantization is symmetric: every zero point must be 0;
- ``scale``: a build-time constant, finite and > 0 (scales computed in the graph, i.e. dynamic quantization,
  are not fused);
- ``axis``: activations per tensor; per-channel scales only on a constant weight, along the output-channel
  axis of the layer that consumes it (Conv 0, ConvTranspose 1, Gemm 0 with transB=1 else 1, MatMul the last);
- ``output``: no Q/DQ on a graph output (the engine's outputs are high precision);
- ``bias``: no Q/DQ on a bias (Conv/Gemm input 2, or the constant of the Add after a MatMul): TensorRT fuses
  biases in high precision;
- ``channels``: quantized Conv / ConvTranspose / Gemm / MatMul whose channel counts are not multiples of 16,
  whose filter has more than 32 taps, or which are a GEMV: the FP8 kernels do not take them;
- ``mixed-types``: a weighted layer whose quantized input and weight have different types (FP8 and INT8):
  TensorRT's kernels take both operands in one type;
- ``half-quantized``: a weighted layer with a quantized weight but an FP32 input (or the reverse): it cannot
  run in FP8;
- ``unfused-dq``: a DequantizeLinear whose value reaches no op TensorRT runs on quantized input
  (Conv/ConvTranspose/Gemm/MatMul, Add, pooling, Concat; looked for through Reshape, Transpose, Flatten,
  Squeeze, Unsqueeze, Slice, Identity): the Q/DQ pair costs time and changes the numbers for nothing;
- ``orphan``: a QuantizeLinear whose output is not dequantized, or a DequantizeLinear fed by neither a Q nor a
  constant;
- ``emulated``: Cast-to-FP8 fake quantization (``--style emulate``) or an emulated format (E3M4 codes): not
  Q/DQ, so TensorRT builds no FP8 kernel from it;
- ``nothing-quantized``: no Q/DQ node and no emulated quantization at all (an FP32 model, linted by mistake);
- ``dq-relu`` (warning): Conv/Gemm -> Q -> DQ -> Relu -> layer: the Q sits on the layer's output before the Relu
  (onnxfp8 places it there by default for onnxruntime's sake; relu(dq(q(x))) == dq(q(relu(x))) for
  symmetric quantization). TensorRT's documented form is layer -> Relu -> Q -> DQ -> layer; whether its
  optimizer moves the DQ across the Relu is not documented, so this is a warning, not an error.

Errors make the exit code 1; warnings only with ``strict``.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Union

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnxfp8 import names
from onnxfp8.modelio import inferred_light
from onnxfp8.tensorrt import QUANTIZED_TYPES, WEIGHTED, weight_axis, weighted_problem

TARGETS = ("tensorrt",)
ALLOWED_TYPES = QUANTIZED_TYPES
QUANTIZABLE = WEIGHTED + ("Add", "MaxPool", "AveragePool", "GlobalAveragePool", "Concat", "QuantizeLinear")
PASS_THROUGH = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Identity")
FP8_TYPES = {getattr(TensorProto, n) for n in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ")}


@dataclass
class Finding:
    check: str
    nodes: List[str]
    message: str
    severity: str = "error"  # "error" | "warning"

    def line(self) -> str:
        return f"{self.severity}: [{self.check}] {', '.join(self.nodes)}: {self.message}"


@dataclass
class LintReport:
    source: str
    target: str
    findings: List[Finding] = field(default_factory=list)
    qdq_nodes: int = 0
    qdq_types: Dict[str, int] = field(default_factory=dict)  # Q/DQ nodes per quantized type (lint -v)

    @property
    def errors(self) -> List[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> List[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def exit_code(self, strict: bool = False) -> int:
        return 1 if self.errors or (strict and self.warnings) else 0

    def to_dict(self) -> Dict:
        from onnxfp8.versions import software

        return {"software": software(), "source": self.source, "target": self.target, "qdq_nodes": self.qdq_nodes,
                "errors": len(self.errors), "warnings": len(self.warnings),
                "findings": [asdict(f) for f in self.findings]}

    def to_json(self, indent: int = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self, verbose: bool = False) -> str:
        lines = [f.line() for f in self.findings]
        if verbose:
            lines.append("Q/DQ nodes by quantized type: " + (", ".join(
                f"{k} {v}" for k, v in sorted(self.qdq_types.items())) or "none"))
        verdict = "clean" if not self.findings else f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        lines.append(f"{self.source}: {self.qdq_nodes} Q/DQ node(s) checked for {self.target}: {verdict}")
        return "\n".join(lines)


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.nodes = list(g.node)
        self.inits = {t.name: t for t in g.initializer}
        for n in self.nodes:  # Constant nodes count as initializers
            if n.op_type == "Constant" and n.output:
                for a in n.attribute:
                    if a.name == "value":
                        self.inits[n.output[0]] = a.t
        self.producer: Dict[str, onnx.NodeProto] = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: Dict[str, List[onnx.NodeProto]] = {}
        for n in self.nodes:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in g.output}
        self.shapes: Dict[str, List] = {}
        try:
            inferred = inferred_light(model)
            for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
                dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
                self.shapes[vi.name] = dims
        except Exception:  # shape inference is a help, not a requirement
            pass

    def const(self, name: str) -> Optional[np.ndarray]:
        t = self.inits.get(name)
        return numpy_helper.to_array(t) if t is not None else None

    def elem_type(self, name: str) -> Optional[int]:
        t = self.inits.get(name)
        return t.data_type if t is not None else None

    def attr(self, node: onnx.NodeProto, name: str, default=None):
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default


def _label(n: onnx.NodeProto) -> str:
    return n.name or f"<{n.op_type} -> {n.output[0] if n.output else '?'}>"


def _qdq_type(g: _Graph, node: onnx.NodeProto) -> Optional[int]:
    """The quantized type of a Q (output_dtype / zero point, default UINT8) or DQ (its input's type)."""
    if len(node.input) > 2 and node.input[2]:
        t = g.elem_type(node.input[2])
        if t is not None:
            return t
    if node.op_type == "QuantizeLinear":
        od = g.attr(node, "output_dtype", 0)
        return od or TensorProto.UINT8
    src = node.input[0]
    t = g.elem_type(src)
    if t is not None:
        return t
    p = g.producer.get(src)
    if p is not None and p.op_type == "QuantizeLinear":
        return _qdq_type(g, p)
    return None


def _reaches(g: _Graph, tensor: str, depth: int = 8) -> List[onnx.NodeProto]:
    """The consumers of ``tensor``, looking through layout-only ops."""
    out = []
    for c in g.consumers.get(tensor, []):
        if c.op_type in PASS_THROUGH and depth > 0:
            out.extend(_reaches(g, c.output[0], depth - 1))
        else:
            out.append(c)
    return out


def _dq_source(g: _Graph, tensor: str, depth: int = 8) -> Optional[onnx.NodeProto]:
    """The DequantizeLinear whose value ``tensor`` is (through layout-only ops and a Relu: the Relu case is
    the ``dq-relu`` warning), else None."""
    p = g.producer.get(tensor)
    while p is not None and (p.op_type in PASS_THROUGH or p.op_type == "Relu") and depth > 0:
        p = g.producer.get(p.input[0])
        depth -= 1
    return p if p is not None and p.op_type == "DequantizeLinear" else None


def lint_model(model: Union[str, os.PathLike, onnx.ModelProto], target: str = "tensorrt",
               source: Optional[str] = None) -> LintReport:
    """Check ``model`` (a path or ModelProto) for Q/DQ placements ``target`` cannot fuse."""
    from onnxfp8.errors import ConfigError, ModelError

    if target not in TARGETS:
        raise ConfigError(f"lint: unknown target '{target}'; choose one of {', '.join(TARGETS)}")
    if isinstance(model, (str, os.PathLike)):
        model = os.fspath(model)
        source = source or model
        from onnxfp8.modelio import load_model

        model = load_model(model)  # one line, exit 2: missing, a folder, not a model, no nodes
    source = source or "model"
    g = _Graph(model)
    rep = LintReport(source, target)
    add = rep.findings.append
    qdq = [n for n in g.nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    rep.qdq_nodes = len(qdq)

    for n in qdq:
        name = _label(n)
        # dtype
        t = _qdq_type(g, n)
        kind = TensorProto.DataType.Name(t) if t is not None else "unknown"
        rep.qdq_types[kind] = rep.qdq_types.get(kind, 0) + 1
        if t is not None and t not in ALLOWED_TYPES:
            what = TensorProto.DataType.Name(t)
            why = ("TensorRT's FP8 is FLOAT8E4M3FN only" if t in FP8_TYPES else
                   "TensorRT quantizes to FLOAT8E4M3FN or signed INT8 only")
            add(Finding("dtype", [name], f"quantized type {what}: {why}"))
        # zero point
        if len(n.input) > 2 and n.input[2]:
            zp = g.const(n.input[2])
            if zp is None:
                add(Finding("zero-point", [name], "zero point is not a constant: TensorRT needs it to be 0"))
            elif np.any(zp.astype(np.float32) != 0):
                add(Finding("zero-point", [name], f"zero point {zp.ravel()[:4].tolist()} is not 0: TensorRT's "
                                                  "quantization is symmetric"))
        # scale
        scale = g.const(n.input[1]) if len(n.input) > 1 else None
        if scale is None:
            add(Finding("scale", [name], "scale is computed in the graph (dynamic quantization): TensorRT fuses "
                                         "Q/DQ only with build-time constant scales"))
        elif not (np.isfinite(scale).all() and (scale > 0).all()):
            add(Finding("scale", [name], "scale must be finite and > 0"))
        per_channel = scale is not None and scale.size > 1
        if per_channel and g.attr(n, "block_size", 0):
            add(Finding("axis", [name], "block quantization: TensorRT takes it for INT4/FP4 weights only"))
            per_channel = False
        # per-channel axis
        if per_channel:
            src = n.input[0]
            w = g.const(src) if n.op_type == "DequantizeLinear" else None
            if w is None:
                add(Finding("axis", [name], f"per-channel scale ({scale.size}) on an activation: TensorRT quantizes "
                                            "activations per tensor"))
            else:
                axis = g.attr(n, "axis", 1)
                axis = axis + w.ndim if axis < 0 else axis
                for c in g.consumers.get(n.output[0], []):
                    idx = [i for i, x in enumerate(c.input) if x == n.output[0]]
                    want = weight_axis(c.op_type, _attrs(c), idx[0], w.ndim)
                    if want is None:
                        add(Finding("axis", [name, _label(c)], f"per-channel weight feeds input {idx[0]} of "
                                    f"{c.op_type}, which TensorRT takes per tensor only"))
                    elif want != axis:
                        add(Finding("axis", [name, _label(c)], f"per-channel axis {axis}, but {c.op_type}'s "
                                    f"output channels are on axis {want}"))
        # outputs
        if n.op_type == "DequantizeLinear" and n.output[0] in g.outputs:
            add(Finding("output", [name], f"dequantizes the graph output '{n.output[0]}': outputs of a TensorRT "
                                          "engine are high precision, the Q/DQ is not fused"))
        if n.op_type == "QuantizeLinear" and n.input[0] in g.outputs:
            add(Finding("output", [name], f"quantizes the graph output '{n.input[0]}'"))
        # orphans
        if n.op_type == "QuantizeLinear":
            cons = g.consumers.get(n.output[0], [])
            if not cons or any(c.op_type != "DequantizeLinear" for c in cons):
                add(Finding("orphan", [name], "QuantizeLinear output is not (only) dequantized: TensorRT fuses Q "
                                              "only as part of a Q -> DQ pair"))
        else:
            src = n.input[0]
            p = g.producer.get(src)
            if src not in g.inits and (p is None or p.op_type != "QuantizeLinear"):
                add(Finding("orphan", [name], "DequantizeLinear fed by neither a QuantizeLinear nor a constant"))
        # bias
        if n.op_type == "DequantizeLinear":
            for c in g.consumers.get(n.output[0], []):
                idx = [i for i, x in enumerate(c.input) if x == n.output[0]]
                if c.op_type in ("Conv", "ConvTranspose", "Gemm") and 2 in idx:
                    add(Finding("bias", [name, _label(c)], f"quantized bias of {c.op_type}: TensorRT keeps biases in "
                                                           "high precision and fuses them into the layer"))
                elif c.op_type == "Add" and n.input[0] in g.inits:
                    other = [x for x in c.input if x != n.output[0]]
                    p = g.producer.get(other[0]) if other else None
                    if p is not None and p.op_type in WEIGHTED:
                        add(Finding("bias", [name, _label(c)], f"quantized bias added to the output of {p.op_type} "
                                    f"'{_label(p)}': TensorRT fuses the bias in high precision"))
        # unfused DQ
        if n.op_type == "DequantizeLinear" and n.output[0] not in g.outputs:
            reach = _reaches(g, n.output[0])
            relu = [c for c in reach if c.op_type == "Relu"]
            bad = [c for c in reach if c.op_type not in QUANTIZABLE and c.op_type != "Relu"]
            if bad:
                kinds = sorted({c.op_type for c in bad})
                add(Finding("unfused-dq", [name] + [_label(c) for c in bad[:4]],
                            f"the dequantized value feeds {', '.join(kinds)}, which TensorRT does not run on "
                            "quantized input: the Q/DQ pair costs time and accuracy for nothing"))
            for r in relu:
                p = g.producer.get(n.input[0])
                q_src = g.producer.get(p.input[0]) if p is not None and p.op_type == "QuantizeLinear" else None
                after = _reaches(g, r.output[0])
                layer = f"{q_src.op_type} '{_label(q_src)}' -> " if q_src is not None else ""
                if after and all(c.op_type in QUANTIZABLE for c in after):
                    add(Finding("dq-relu", [name, _label(r)],
                                f"{layer}Q -> DQ -> Relu: TensorRT's documented placement is layer -> Relu -> Q -> "
                                "DQ; quantize after the Relu for a guaranteed fusion", severity="warning"))
                else:
                    add(Finding("unfused-dq", [name, _label(r)], "the dequantized value goes through a Relu to ops "
                                "TensorRT does not run on quantized input"))

    # weighted layers: both sides quantized, channel counts
    for n in g.nodes:
        if n.op_type not in WEIGHTED or len(n.input) < 2:
            continue
        a_dq, w_dq = _dq_source(g, n.input[0]), _dq_source(g, n.input[1])
        if n.op_type == "MatMul" and n.input[0] in g.inits or (a_dq is not None and a_dq.input[0] in g.inits):
            a_dq, w_dq = w_dq, a_dq  # the weight on the left
        if a_dq is None and w_dq is None:
            continue
        if (a_dq is None) != (w_dq is None):
            which = "weight" if w_dq is not None else "input"
            other = "input" if w_dq is not None else "weight"
            add(Finding("half-quantized", [_label(n)], f"{n.op_type} has a quantized {which} but a high-precision "
                                                       f"{other}: TensorRT runs it in high precision"))
        if a_dq is not None and w_dq is not None:
            ta, tw = _qdq_type(g, a_dq), _qdq_type(g, w_dq)
            if ta is not None and tw is not None and ta != tw:
                add(Finding("mixed-types", [_label(n)], f"{n.op_type} reads a {TensorProto.DataType.Name(ta)} input "
                            f"and a {TensorProto.DataType.Name(tw)} weight: TensorRT's FP8 and INT8 kernels take "
                            "both operands in one type"))
        w = g.const(w_dq.input[0]) if w_dq is not None else None
        if w is None:
            continue
        problem = _channel_problem(g, n, w)
        if problem:
            add(Finding("channels", [_label(n)], problem))

    # emulated quantization
    casts = [n for n in g.nodes if n.op_type == "Cast" and g.attr(n, "to") in FP8_TYPES]
    if casts:
        add(Finding("emulated", [_label(c) for c in casts[:4]] + ([f"(+{len(casts) - 4} more)"] if len(casts) > 4 else []),
                    f"{len(casts)} Cast(s) to FP8: emulate-style fake quantization is not Q/DQ, TensorRT builds no "
                    "FP8 kernel from it (quantize with --style qdq)"))
    codes = [n for n in g.nodes if n.op_type == "Gather" and n.input and g.elem_type(n.input[0]) is not None
             and n.input[0].endswith(names.CODE_TABLE)]
    if codes:
        add(Finding("emulated", [_label(c) for c in codes[:4]], "emulated format (E3M4 codes decoded by a table): "
                    "not a TensorRT type"))
    if not qdq and not any(f.check == "emulated" for f in rep.findings):
        add(Finding("nothing-quantized", [source], "the model holds no QuantizeLinear / DequantizeLinear node: "
                    "nothing in it is quantized (lint the model `onnxfp8 quantize` wrote)"))
    return rep


def _attrs(node: onnx.NodeProto) -> Dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _channel_problem(g: _Graph, node: onnx.NodeProto, w: np.ndarray) -> Optional[str]:
    """tensorrt.weighted_problem on the node (the rule --target tensorrt selects by)."""
    return weighted_problem(node.op_type, _attrs(node), w.shape, g.shapes.get(node.input[0]))
