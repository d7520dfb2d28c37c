"""Up-front validation of a model a user gave: every problem one short line (ModelError, exit 2), found before
any work, so that a malformed model never reaches a pass (where it would surface as "pass 'calibrate'
failed"). What is checked, in order:

* the IR version and the ai.onnx opset against what the installed onnx knows (onnx.IR_VERSION,
  onnx.defs.onnx_opset_version()): a newer one is refused instead of being restamped;
* operator domains: a node of a domain neither onnx nor onnxruntime implements, and that no model-local
  function defines, cannot run;
* already quantized models (Q/DQ, onnxruntime's QLinear / Integer ops, Cast-based FP8 fake quantization,
  8-bit weights decoded by Cast or Gather): quantizing again would stack a second quantization;
* non-finite weights (a NaN initializer poisons every output; an Inf is refused only in a tensor read as a
  weight, whose scale it would break: elsewhere it is a mask, as FP16 exports write them);
* onnx.checker with full_check (topological order, arity, types, SSA names, strict shape inference), on a
  light copy (modelio.check_model: any size);
* a first onnxruntime session on the FP32 model (what onnxruntime alone refuses).

``control_flow_nodes`` lists the nodes inside If / Loop / Scan bodies (which onnxfp8 leaves FP32) for the
summary's warning.
"""
from __future__ import annotations

import logging
import re
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto

from onnxfp8.errors import ModelError

log = logging.getLogger("onnxfp8")

# domains onnxruntime implements (the CPU build's contrib ops included)
KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "ai.onnx.training", "ai.onnx.preview.training", "com.microsoft",
                 "com.microsoft.nchwc", "com.microsoft.experimental", "com.ms.internal.nhwc"}
QUANT_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
             "QLinearAdd", "QLinearMul", "QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
             "DynamicQuantizeMatMul", "QAttention", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat",
             "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSoftmax", "MatMulNBits")
FP8_TYPES = {TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2,
             TensorProto.FLOAT8E5M2FNUZ}
EIGHT_BIT = FP8_TYPES | {TensorProto.INT8, TensorProto.UINT8}
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
CONTROL_FLOW = ("If", "Loop", "Scan")


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def ort_message(e: BaseException, limit: int = 200) -> str:
    """onnxruntime's error without its code prefix and C++ source location / signature, one short line."""
    text = " ".join(str(e).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    m = re.search(r"/onnxruntime_src/\S+:\d+ ", text)
    if m:  # "<file>:<line> <C++ signature>) Message": keep the message
        rest = text[m.end():]
        cut = [i for i in (k.end() for k in re.finditer(r"\) (?=[A-Z])", rest))]
        text = text[:m.start()] + (rest[cut[0]:] if cut else rest)
    text = text.replace("This is an invalid model. ", "").strip()
    text = re.sub(r"^In Node, .*? , Error ", "", text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def subgraphs(node: onnx.NodeProto) -> Iterator[Tuple[str, onnx.GraphProto]]:
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.name, a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            for i, g in enumerate(a.graphs):
                yield f"{a.name}[{i}]", g


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for n in graph.node:
        yield n
        for _, g in subgraphs(n):
            yield from all_nodes(g)


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t
        for _, g in subgraphs(n):
            yield from _all_tensors(g)


# -- the checks -----------------------------------------------------------------------------------------
def check_versions(model: onnx.ModelProto, source: str) -> None:
    if model.ir_version > onnx.IR_VERSION:
        raise ModelError(f"{source}: IR version {model.ir_version} is newer than the installed onnx "
                         f"{onnx.__version__} supports (up to {onnx.IR_VERSION}); re-export it or upgrade onnx")
    top = onnx.defs.onnx_opset_version()
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version > top:
            raise ModelError(f"{source}: opset {imp.version} is newer than the installed onnx {onnx.__version__} "
                             f"supports (up to {top}); export with opset {top} or older")


def check_domains(model: onnx.ModelProto, source: str) -> None:
    local = {f.domain for f in model.functions}
    for n in all_nodes(model.graph):
        if n.domain not in KNOWN_DOMAINS and n.domain not in local:
            raise ModelError(f"{source}: node '{n.name or n.op_type}' ({n.op_type}) is of the custom domain "
                             f"'{n.domain}', which neither onnx nor onnxruntime implements (no custom op library "
                             f"is loaded)")


def quantization_markers(model: onnx.ModelProto) -> Dict[str, int]:
    """What makes ``model`` look quantized: op type (or pattern) -> count."""
    inits = {t.name: t.data_type for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    inits[n.output[0]] = a.t.data_type
    out: Dict[str, int] = {}

    def add(key: str) -> None:
        out[key] = out.get(key, 0) + 1

    codes = set()  # 8-bit initializers cast to indices
    for n in all_nodes(model.graph):
        if n.op_type in QUANT_OPS:
            add(n.op_type)
        elif n.op_type == "Cast":
            to = next((a.i for a in n.attribute if a.name == "to"), None)
            if to in FP8_TYPES:
                add("Cast to FP8")
            elif n.input and inits.get(n.input[0]) in EIGHT_BIT:
                if to in FLOAT_TYPES:
                    add("Cast of an 8-bit weight")
                else:
                    codes.update(n.output)
        elif n.op_type == "Gather" and len(n.input) > 1 and inits.get(n.input[0]) in FLOAT_TYPES \
                and (inits.get(n.input[1]) == TensorProto.UINT8 or n.input[1] in codes):
            add("Gather decoding 8-bit codes")
    return out


def check_not_quantized(model: onnx.ModelProto, source: str) -> None:
    found = quantization_markers(model)
    if found:
        what = ", ".join(f"{v} {k}" + ("" if k.startswith(("Cast", "Gather")) else " node(s)")
                         for k, v in sorted(found.items(), key=lambda kv: -kv[1]))
        raise ModelError(f"{source}: already quantized: {what}; quantize the FP32 model instead")


# (op type, input index) whose constant input is quantized as a weight, with a scale from its range
_SCALED_WEIGHT_INPUTS = {("Conv", 1), ("ConvTranspose", 1), ("Gemm", 0), ("Gemm", 1), ("MatMul", 0), ("MatMul", 1),
                         ("Gather", 0)}


def scaled_weight_names(model: onnx.ModelProto) -> set:
    """Names of the constants a weighted op reads where a weight scale would be computed from them."""
    return {n.input[i] for n in model.graph.node for op, i in _SCALED_WEIGHT_INPUTS
            if n.op_type == op and len(n.input) > i and n.input[i]}


def nonfinite_weights(model: onnx.ModelProto) -> List[Tuple[str, int, int, str]]:
    """(tensor, count, size, "NaN" | "Inf") of every float initializer / Constant holding NaN, or Inf where a
    weight scale would be computed from it. An Inf elsewhere is a mask (FP16 exports fill attention masks with
    -inf) and is no error."""
    out = []
    scaled = None
    for t in _all_tensors(model.graph):
        if t.data_type not in FLOAT_TYPES or t.data_location == TensorProto.EXTERNAL:
            continue
        try:
            a = onnx.numpy_helper.to_array(t)
        except Exception:
            continue
        if a.size and not np.isfinite(a.sum(dtype=np.float64)):  # one reduction; count only when it fails
            a32 = a.astype(np.float32, copy=False)
            nan = int(np.count_nonzero(np.isnan(a32)))
            if nan:
                out.append((t.name, nan, int(a.size), "NaN"))
                continue
            if scaled is None:
                scaled = scaled_weight_names(model)
            inf = int(np.count_nonzero(np.isinf(a32)))
            if inf and t.name in scaled:
                out.append((t.name, inf, int(a.size), "Inf"))
    return out


def check_weights(model: onnx.ModelProto, source: str) -> None:
    bad = nonfinite_weights(model)
    if bad:
        name, n, size, kind = bad[0]
        more = f" (and {len(bad) - 1} more tensor(s))" if len(bad) > 1 else ""
        why = ("every output depends on it" if kind == "NaN" else
               "it is read as a weight, and no quantization scale covers an infinity")
        raise ModelError(f"{source}: weight '{name}' holds {n} {kind} value(s) of {size}{more}: {why}; fix the model")


def check_onnx(model: onnx.ModelProto, source: str) -> None:
    from onnxfp8.modelio import check_model

    try:
        check_model(model)
    except Exception as e:  # ValidationError, InferenceError (strict shape inference)
        text = _first_line(e)
        text = re.sub(r"^\[ShapeInferenceError\] Inference error\(s\): ", "", text).replace("==> Context: ", "")
        raise ModelError(f"{source}: invalid model: {text}") from None


def session(model, source: str, **kwargs):
    """modelio.make_session, with onnxruntime's refusal of a user's model as one line (ModelError)."""
    from onnxfp8.errors import OnnxFp8Error
    from onnxfp8.modelio import make_session

    try:
        return make_session(model, **kwargs)
    except OnnxFp8Error:
        raise
    except Exception as e:
        if type(e).__module__.startswith("onnxruntime"):
            raise ModelError(f"{source}: onnxruntime cannot load the model: {ort_message(e)}") from None
        raise


def validate_model(model: onnx.ModelProto, source: str = "model", *, quantized_ok: bool = False,
                   run_session: bool = True, providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
    """Every check above (``quantized_ok``: skip the already-quantized one, for ``check``'s second model)."""
    check_versions(model, source)
    check_domains(model, source)
    if not quantized_ok:
        check_not_quantized(model, source)
    check_weights(model, source)
    try:
        check_onnx(model, source)
    except ModelError as e:
        if not run_session:
            raise
        # onnxruntime decides: its refusal is the error (the checker is stricter in places, e.g. a graph output
        # declared without a shape, which onnxruntime runs and the passes handle)
        session(model, source, level="disable", providers=providers)
        log.warning("%s (onnxruntime loads it; continuing)", e)
        return
    if run_session:
        session(model, source, level="disable", providers=providers)


def control_flow_nodes(model: onnx.ModelProto, op_types: Optional[Iterable[str]] = None) -> List[Dict[str, str]]:
    """Nodes inside If / Loop / Scan bodies (at any depth) whose op type is in ``op_types`` (all when None):
    ``{"node", "op_type", "parent", "parent_op", "body"}`` each. onnxfp8 does not quantize inside subgraphs."""
    want = set(op_types) if op_types is not None else None
    out: List[Dict[str, str]] = []

    def walk(graph: onnx.GraphProto, parent: Optional[onnx.NodeProto], body: str) -> None:
        for n in graph.node:
            if parent is not None and (want is None or n.op_type in want):
                out.append({"node": n.name or n.op_type, "op_type": n.op_type, "parent": parent.name or parent.op_type,
                            "parent_op": parent.op_type, "body": body})
            for name, g in subgraphs(n):
                walk(g, n, name)

    walk(model.graph, None, "")
    return out


# -- non-finite values on the calibration data ---------------------------------------------------------
def first_nonfinite(model: onnx.ModelProto, batch: Dict[str, np.ndarray], arrays=None,
                    providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0
                    ) -> Optional[Tuple[str, str, str]]:
    """(tensor, node, op type) of the first tensor in graph order that is NaN on ``batch`` (an input of
    the batch itself is reported with node ''), or None. Runs ``model`` once with every float tensor exposed,
    on the first sample alone when the batch axis is free, else on the whole batch: only called when the
    calibration pass has seen a non-finite value, to name where it starts."""
    from onnx import helper

    from onnxfp8.calibrators.collector import elem_type, tensor_types
    from onnxfp8.modelio import make_session

    for name, v in batch.items():
        v = np.asarray(v)
        if v.dtype.kind == "f" and np.isnan(v).any():
            return name, "", "input"
    types = tensor_types(model)
    order: List[Tuple[str, str, str]] = []
    for n in model.graph.node:
        for o in n.output:
            et = elem_type(types.get(o))
            if o and (et is None or et in FLOAT_TYPES):
                order.append((o, n.name, n.op_type))
    m = onnx.ModelProto()
    m.CopyFrom(model)
    present = {o.name for o in m.graph.output}
    for o, _, _ in order:
        if o not in present:
            m.graph.output.append(helper.make_tensor_value_info(o, elem_type(types.get(o)) or TensorProto.FLOAT, None))
    sess = make_session(m, level="disable", providers=providers, threads=threads, arrays=arrays)
    fixed = any(i.shape and isinstance(i.shape[0], int) for i in sess.get_inputs())
    feed = batch if fixed else {k: np.asarray(v)[:1] for k, v in batch.items()}
    names = [o for o, _, _ in order]
    for attempt in range(2):
        values = sess.run(names, feed)
        for (o, node, op), v in zip(order, values):
            v = np.asarray(v)
            if v.dtype.kind == "f" and v.size and np.isnan(v).any():
                return o, node, op
        if feed is batch:
            break
        feed = batch  # the first sample was finite: the whole batch
    return None


def refuse_nonfinite(nonfinite: Dict[str, int], model: onnx.ModelProto, data, source: str, arrays=None,
                     providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0) -> None:
    """Raise a DataError naming the first tensor that goes NaN when the calibration pass saw any
    (``nonfinite``: CollectResult.nonfinite). An infinity is not refused: FP16 exports write attention masks as
    -inf; the calibrators count it as the type's extreme value and its readers stay FP32 (assign_formats)."""
    from onnxfp8.errors import DataError

    if not nonfinite:
        return
    first_batch = min(nonfinite.values())
    seen = [t for t, b in nonfinite.items() if b == first_batch]
    where = None
    for i, batch in enumerate(data.batches()):
        if i == first_batch:
            where = first_nonfinite(model, batch, arrays, providers, threads)
            break
    outputs = {o.name for o in model.graph.output}
    if where is None:
        t, node, op = seen[0], "", ""
    else:
        t, node, op = where
    at = (f"tensor '{t}' (output of {op} '{node}')" if node else
          f"input '{t}'" if op == "input" else f"tensor '{t}'")
    out_note = "" if t in outputs else (" and reaches the outputs" if outputs & set(nonfinite) else "")
    raise DataError(f"{source}: the FP32 model produces NaN on the calibration data (batch {first_batch}): "
                    f"first at {at}{out_note}; quantizing would hide it: fix the model or the data")
