"""Model I/O at the edges of the pipeline: load (external data, opset upgrade, shape inference, naming),
save (atomic, external data for models over 2 GB), conversion to and from the graphsurgeon Graph, and
onnxruntime session making."""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper
from onnx_graphsurgeon.logger import G_LOGGER

from onnxfp8.errors import ModelError

G_LOGGER.severity = G_LOGGER.ERROR
log = logging.getLogger("onnxfp8")

TWO_GB = 2**31
# onnxruntime releases load models up to this IR version; FP8 types need IR >= 9.
MIN_IR_VERSION = 9
MAX_IR_VERSION = 10
MIN_INPUT_OPSET = 13

ModelLike = Union[str, os.PathLike, onnx.ModelProto]


def external_files(model: onnx.ModelProto, folder: str) -> list:
    """The external-data files (paths under ``folder``) that ``model``'s tensors refer to, each once."""
    out = []
    for t in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(t):
            for e in t.external_data:
                if e.key == "location":
                    p = os.path.join(folder, e.value)
                    if p not in out:
                        out.append(p)
    return out


def load_model(model: ModelLike, external: Optional[list] = None) -> onnx.ModelProto:
    """Read a model file (with its external data) or pass a ModelProto through. One-line errors.
    ``external``: a list that receives the external-data files the model refers to (they are inputs too:
    no output may overwrite them)."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = os.fspath(model)
    if not os.path.exists(path):
        raise ModelError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelError(f"{path}: is a directory, not an ONNX model file")
    if not os.path.isfile(path):
        raise ModelError(f"{path}: is not a regular file, not an ONNX model file")
    try:  # what onnx.load(load_external_data=True) does, noting the external files on the way
        proto = onnx.load(path, load_external_data=False)
        folder = os.path.dirname(os.path.abspath(path))
        files = external_files(proto, folder)
        if external is not None:
            external.extend(files)
        if files:
            external_data_helper.load_external_data_for_model(proto, folder)
    except Exception as e:  # protobuf DecodeError, missing external data file, ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"{path}: not a readable ONNX model ({msg})") from None
    if not proto.graph.node:
        raise ModelError(f"{path}: the model has no nodes (is this an ONNX model?)")
    return proto


def ai_onnx_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def prepare_model(model: onnx.ModelProto, opset: int = 19, source: str = "model") -> onnx.ModelProto:
    """Bring a model to the state the passes expect: ai.onnx opset >= ``opset`` (via the version converter),
    an IR version onnxruntime loads and FP8 needs, inferred shapes, every node named."""
    version = ai_onnx_opset(model)
    if version < MIN_INPUT_OPSET:
        raise ModelError(f"{source}: opset {version} is not supported; export with opset {MIN_INPUT_OPSET} or newer")
    # the converter and shape inference work on a light copy (no weight bytes to serialize or copy), healed once
    light, heavy = light_copy(model)
    if version < opset and _unchanged_between(light, version, opset):
        for imp in light.opset_import:  # no op of the graph changed between the versions: nothing to convert
            if imp.domain in ("", "ai.onnx"):
                imp.version = opset
    elif version < opset:
        try:
            from onnx import version_converter

            light = version_converter.convert_version(light, opset)
        except Exception as e:
            raise ModelError(f"{source}: cannot upgrade from opset {version} to {opset} ({str(e).splitlines()[0]})") from None
    light.ir_version = min(max(light.ir_version, MIN_IR_VERSION), MAX_IR_VERSION)
    name_nodes(light.graph)
    light = _infer_light(light)
    return heal(light, heavy)


def _save_external(model: onnx.ModelProto, path: str, location: str) -> None:
    """Save with the tensors in one external file ``location`` beside ``path``, and leave ``model`` whole:
    onnx.save_model moves the tensors' bytes out of the proto it saves, so read them back from the file
    (no second in-memory copy of a >2 GB model)."""
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                    size_threshold=1024)
    external_data_helper.load_external_data_for_model(model, os.path.dirname(path))


def _unchanged_between(model: onnx.ModelProto, old: int, new: int) -> bool:
    """True when every ai.onnx op of the (subgraph-free) graph has the same definition at opset ``old`` and
    ``new``: raising the opset import is then the whole conversion, and onnx's version converter (which copies
    the model and takes seconds on a 100 MB one) is not needed."""
    if model.functions:
        return False
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return False
        try:
            if onnx.defs.get_schema(node.op_type, new, "").since_version > old:
                return False
        except Exception:  # an op onnx does not know: let the converter decide
            return False
    return True


def fits_protobuf(model: onnx.ModelProto) -> bool:
    """Whether ``model`` serializes to one protobuf message (under 2 GB). The tensors' payload decides it and is
    cheap to add up (from their shapes: reading ``raw_data`` copies it); protobuf's exact ByteSize (0.3 s on a
    100 MB model) is asked only near the limit."""
    payload = sum(_payload_bytes(t) for t in model.graph.initializer)
    if payload < TWO_GB - 2**28:
        return True
    return _can_bytesize(model) and model.ByteSize() < TWO_GB


# -- light copies: the graph without the bytes of its big tensors ---------------------------------------
# onnx's version converter, shape inference and checker, and onnxruntime's session, take a serialized model:
# serializing (and their parsing) a 440 MB BERT-base costs ~1 s each, and the version converter copies the
# model (4.5 s). None of them needs the weights' bytes, so they get a light copy whose tensors over
# LIGHT_THRESHOLD bytes are marked external (location IN_MEMORY) and hold no bytes; ``heal`` puts them back,
# and make_session hands them to onnxruntime as arrays (SessionOptions.add_external_initializers). This also
# spares the temporary files models over 2 GB needed.
LIGHT_THRESHOLD = 1024
IN_MEMORY = "onnxfp8-in-memory.data"
_ITEMSIZE = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.UINT8: 1, onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT16: 2,
             onnx.TensorProto.INT16: 2, onnx.TensorProto.INT32: 4, onnx.TensorProto.INT64: 8, onnx.TensorProto.BOOL: 1,
             onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.UINT32: 4,
             onnx.TensorProto.UINT64: 8, onnx.TensorProto.BFLOAT16: 2, onnx.TensorProto.FLOAT8E4M3FN: 1,
             onnx.TensorProto.FLOAT8E4M3FNUZ: 1, onnx.TensorProto.FLOAT8E5M2: 1, onnx.TensorProto.FLOAT8E5M2FNUZ: 1}

# types numpy has natively (ml_dtypes' float8 / bfloat16 go to onnxruntime as bytes tagged with their type)
_NUMPY_NATIVE = {onnx.TensorProto.FLOAT, onnx.TensorProto.UINT8, onnx.TensorProto.INT8, onnx.TensorProto.UINT16,
                 onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.BOOL,
                 onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}


def _raw_nbytes(t: onnx.TensorProto) -> int:
    """Bytes of ``t``'s raw_data from its shape and type, or -1 when that cannot tell (no raw_data, external
    data, a type without a fixed item size)."""
    size = _ITEMSIZE.get(t.data_type)
    if size is None or t.data_location == onnx.TensorProto.EXTERNAL or not t.HasField("raw_data"):
        return -1
    n = size
    for d in t.dims:
        n *= d
    return n


def _payload_bytes(t: onnx.TensorProto) -> int:
    n = _raw_nbytes(t)
    if n < 0:
        n = len(t.raw_data) if t.HasField("raw_data") else 0
    return n + 4 * (len(t.float_data) + len(t.int32_data)) + 8 * (len(t.int64_data) + len(t.double_data))


def _copy_fields(dst, src, skip: str) -> None:
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if getattr(fd, "is_repeated", False):
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def light_copy(model: onnx.ModelProto, threshold: int = LIGHT_THRESHOLD) -> Tuple[onnx.ModelProto, Dict[str, onnx.TensorProto]]:
    """A copy of ``model`` whose initializers of ``threshold`` bytes or more carry no bytes (marked external
    with location IN_MEMORY), and a dict from their names to the original TensorProtos (not copied)."""
    light = onnx.ModelProto()
    _copy_fields(light, model, skip="graph")
    _copy_fields(light.graph, model.graph, skip="initializer")
    heavy: Dict[str, onnx.TensorProto] = {}
    for t in model.graph.initializer:
        if _raw_nbytes(t) >= threshold:
            lt = light.graph.initializer.add(name=t.name, data_type=t.data_type, doc_string=t.doc_string,
                                             data_location=onnx.TensorProto.EXTERNAL)
            lt.dims.extend(t.dims)
            lt.external_data.add(key="location", value=IN_MEMORY)
            heavy[t.name] = t
        else:
            light.graph.initializer.append(t)
    return light, heavy


def _is_placeholder(t: onnx.TensorProto) -> bool:
    return (t.data_location == onnx.TensorProto.EXTERNAL
            and any(e.key == "location" and e.value == IN_MEMORY for e in t.external_data))


def heal(light: onnx.ModelProto, heavy: Dict[str, onnx.TensorProto]) -> onnx.ModelProto:
    """Put the bytes of ``heavy`` back into ``light``'s placeholders (in place; returns ``light``)."""
    for t in light.graph.initializer:
        if _is_placeholder(t):
            if t.name not in heavy:
                raise ModelError(f"internal error: no data for the tensor '{t.name}' of a light model copy")
            t.CopyFrom(heavy[t.name])
    return light


def check_model(model: onnx.ModelProto) -> None:
    """onnx.checker.check_model(full_check=True) on a light copy (any size). The checker wants an external
    file it can see, so the light copy goes to a temporary folder beside an empty IN_MEMORY file; the bytes
    of the big tensors are the only thing not checked."""
    light, _ = light_copy(model)
    with tempfile.TemporaryDirectory(prefix="onnxfp8-check-") as tmp:
        open(os.path.join(tmp, IN_MEMORY), "wb").close()
        path = os.path.join(tmp, "model.onnx")
        onnx.save_model(light, path)
        onnx.checker.check_model(path, full_check=True)


def inferred_light(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx shape inference on a light copy of ``model`` (any size, no weight bytes serialized): read its
    value_info; its big tensors hold no bytes. Raises what shape inference raises."""
    return onnx.shape_inference.infer_shapes(light_copy(model)[0])


def _infer_light(light: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception as e:  # inference is a convenience: a model that fails it can still be quantized
        log.warning("shape inference failed (%s); continuing without inferred shapes", str(e).splitlines()[0])
        return light


def name_nodes(graph: onnx.GraphProto) -> int:
    """Give every unnamed node a stable, unique name (``<op_type>_<index>``). Returns how many were named."""
    used = {n.name for n in graph.node if n.name}
    count = 0
    for i, node in enumerate(graph.node):
        if not node.name:
            base = f"{node.op_type}_{i}"
            name, k = base, 1
            while name in used:
                name, k = f"{base}_{k}", k + 1
            node.name = name
            used.add(name)
            count += 1
    return count


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    graph = gs.import_onnx(model)
    if graph.import_domains is not None:  # a view into the model's proto, which kept all of it alive
        graph.import_domains = [onnx.helper.make_opsetid(d.domain, d.version) for d in graph.import_domains]
    return graph


def load_values(graph: gs.Graph) -> int:
    """Load every constant graphsurgeon holds lazily (a reference into the source ModelProto) into numpy, for
    the types numpy has natively; returns how many. Afterwards nothing refers into the source proto, so the
    caller can let it go: the weights are then held once (numpy) instead of twice (protobuf + numpy once a
    pass reads them), and onnxruntime sessions take the arrays without a copy out of protobuf."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    count = 0
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and isinstance(t._values, LazyValues) \
                and t._values.tensor.data_type in _NUMPY_NATIVE \
                and t._values.tensor.data_location != onnx.TensorProto.EXTERNAL:
            t._values = np.array(onnx.numpy_helper.to_array(t._values.tensor))
            count += 1
    return count


def to_model(graph: gs.Graph, like: Optional[onnx.ModelProto] = None) -> onnx.ModelProto:
    """Export the working graph; keep the source model's metadata and opset imports (raised as needed)."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    if like is not None:
        model.ir_version = like.ir_version
        model.producer_name = "onnxfp8"
        model.doc_string = like.doc_string
        for p in like.metadata_props:
            model.metadata_props.add(key=p.key, value=p.value)
        domains = {imp.domain: imp.version for imp in model.opset_import}
        for imp in like.opset_import:
            if imp.domain not in domains:
                model.opset_import.add(domain=imp.domain, version=imp.version)
    model.ir_version = min(max(model.ir_version, MIN_IR_VERSION), MAX_IR_VERSION)
    return model


def to_light_model(graph: gs.Graph, like: Optional[onnx.ModelProto] = None,
                   threshold: int = LIGHT_THRESHOLD) -> Tuple[onnx.ModelProto, Dict[str, Any]]:
    """``to_model`` without the bytes of the graph's big constants: a light model (placeholders as in
    ``light_copy``) and their values by name (numpy arrays, or the TensorProtos graphsurgeon has not loaded),
    for ``make_session(model, arrays=...)``. Exporting BERT-base whole copies 440 MB into protobuf only for
    onnxruntime to get the bytes out again."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    saved = {}
    for t in graph.tensors().values():
        if not isinstance(t, gs.Constant) or t.name in saved or getattr(t, "export_dtype", t.dtype) != t.dtype:
            continue
        v = t._values
        proto = v.tensor if isinstance(v, LazyValues) else None
        if proto is not None and proto.data_location == onnx.TensorProto.EXTERNAL:
            continue
        nbytes = _raw_nbytes(proto) if proto is not None else getattr(v, "nbytes", -1)
        if nbytes < threshold:
            continue
        placeholder = onnx.TensorProto(name=t.name, data_type=gs_dtype_to_onnx(t.dtype), dims=list(t.shape),
                                       data_location=onnx.TensorProto.EXTERNAL)
        placeholder.external_data.add(key="location", value=IN_MEMORY)
        saved[t.name] = (t, v)
        t._values = LazyValues(placeholder)
    try:
        model = to_model(graph, like=like)
    finally:
        for t, v in saved.values():
            t._values = v
    return model, {name: (v.tensor if isinstance(v, LazyValues) else v) for name, (_, v) in saved.items()}


def gs_dtype_to_onnx(dtype) -> int:
    if isinstance(dtype, int):
        return dtype
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def save_model(model: onnx.ModelProto, path: Union[str, os.PathLike], protect: Iterable[str] = ()) -> str:
    """Write ``model`` atomically (a temporary beside ``path``, renamed into place: a failure leaves no partial
    file; see outputs.py). Models over 2 GB go with external data (``<file>.data``). ``protect`` lists model
    files (and so their external data) that must never be overwritten (the input model)."""
    from onnxfp8.outputs import Outputs

    path = os.fspath(path)
    with Outputs() as outs:
        for p in protect:
            outs.protect_model(p)
        outs.add(path, "the output model", model=True)
        outs.validate()
        outs.write_model(path, model)
        outs.commit()
    return path


def _can_bytesize(model: onnx.ModelProto) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:  # protobuf refuses to size messages over 2 GB in some versions
        return False


def model_bytes(model: onnx.ModelProto) -> int:
    """Serialized size of a model including the data it holds (to a few bytes per big tensor: the light copy's
    placeholders are counted instead of their tensors' headers). protobuf's ByteSize serializes to measure:
    1.5 s on BERT-base."""
    light, heavy = light_copy(model)
    try:
        size = light.ByteSize()
    except Exception:
        size = 0
    return size + sum(_payload_bytes(t) for t in heavy.values())


# -- onnxruntime ---------------------------------------------------------------------------------------
def _ort_value(src: Any, placeholder: onnx.TensorProto, ort):
    """(buffer to keep alive, OrtValue over it) for a placeholder's value: a TensorProto with raw_data or a
    numpy array (float8 / bfloat16 as bytes tagged with their ONNX type)."""
    if isinstance(src, onnx.TensorProto):
        if not src.HasField("raw_data"):  # values in the typed fields (int32_data holds BF16 / FP8 too)
            src = onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(src), src.name)
        arr = np.frombuffer(src.raw_data, dtype=np.uint8)
        elem = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(placeholder.data_type))
        # numpy types as themselves, bfloat16 / float8 as raw 2- / 1-byte codes tagged with their ONNX type
        arr = arr.view(elem if placeholder.data_type in _NUMPY_NATIVE else np.dtype(f"u{elem.itemsize}"))
        arr = arr.reshape(tuple(placeholder.dims))
    else:
        arr = np.ascontiguousarray(src)
        if placeholder.data_type not in _NUMPY_NATIVE:
            arr = arr.view(np.uint8) if arr.dtype.itemsize == 1 else arr.view(np.uint16)
    if placeholder.data_type in _NUMPY_NATIVE:
        return arr, ort.OrtValue.ortvalue_from_numpy(arr)
    return arr, ort.OrtValue.ortvalue_from_numpy_with_onnx_type(arr, placeholder.data_type)


_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}


# onnxruntime optimizers that change the function of a Q/DQ model. WeightBiasQuantization (a level-1 optimizer
# since onnxruntime 1.20) rewrites the FP32 bias of an INT8 Q/DQ Conv/Gemm into an INT32-quantized bias: measured
# on the example CNN it moves INT8 outputs by 0.10 (max abs) away from onnx.reference. Disabling it costs nothing
# for FP32 models (see tests/test_runtime_levels.py).
DISABLED_OPTIMIZERS = ("WeightBiasQuantization",)


def consumed_names(graph: onnx.GraphProto) -> set:
    """Names read by the nodes of ``graph`` and of its subgraphs (If / Loop / Scan bodies read outer names), and
    its outputs."""
    names = {o.name for o in graph.output}
    for n in graph.node:
        names.update(i for i in n.input if i)
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                names |= consumed_names(sub)
    return names


def make_session(model: Union[onnx.ModelProto, str], level: str = "basic",
                 providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0,
                 arrays: Optional[Mapping[str, Any]] = None):
    """An onnxruntime InferenceSession at a named optimization level.

    Quantized models are always run at ``basic`` inside onnxfp8: at ENABLE_ALL onnxruntime fuses Q/DQ around
    Conv/Gemm into kernels the CPU lacks for FP8 and drops a Relu feeding an FP8 QuantizeLinear (see
    tests/test_runtime_levels.py); ENABLE_BASIC, without the optimizers in DISABLED_OPTIMIZERS, computes what
    onnx.reference computes. A bfloat16 ModelProto runs as its float32 twin (bfloat16.py: onnxruntime's CPU
    provider has no bfloat16 kernels): feed it float32, it returns float32."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    available = ort.get_available_providers()
    unknown = [p for p in providers if p not in available]
    if unknown:
        from onnxfp8.errors import ConfigError

        raise ConfigError(f"execution provider(s) {', '.join(unknown)} not available; available: {', '.join(available)}")
    kwargs = dict(providers=list(providers), disabled_optimizers=list(DISABLED_OPTIMIZERS))
    if isinstance(model, onnx.ModelProto) and not arrays:
        from onnxfp8.bfloat16 import runnable

        model = runnable(model)  # a bfloat16 model runs as its float32 twin (bfloat16.py)
    if isinstance(model, onnx.ModelProto):
        light, heavy = light_copy(model)
        if arrays:
            heavy.update(arrays)  # the values of a light model's placeholders (to_light_model), or fresher ones
        names, values, keep = [], [], []
        used = consumed_names(light.graph)
        unused = [t for t in light.graph.initializer if _is_placeholder(t) and t.name not in used]
        if unused:  # onnxruntime drops initializers nothing reads, then cannot replace them: leave them out
            drop = {t.name for t in unused}
            kept = [t for t in light.graph.initializer if t.name not in drop]
            del light.graph.initializer[:]
            light.graph.initializer.extend(kept)
        for t in light.graph.initializer:
            if not _is_placeholder(t):
                continue
            if t.name not in heavy:
                raise ModelError(f"internal error: no data for the tensor '{t.name}' of a light model")
            arr, value = _ort_value(heavy[t.name], t, ort)
            names.append(t.name)
            values.append(value)
            keep.append(arr)
        if names:
            so.add_external_initializers(names, values)
        sess = ort.InferenceSession(light.SerializeToString(), so, **kwargs)
        sess._onnxfp8_buffers = (keep, values)  # onnxruntime reads them in place: they live as long as the session
        return sess
    try:
        return ort.InferenceSession(os.fspath(model), so, **kwargs)
    except Exception:
        from onnxfp8.bfloat16 import is_bfloat16

        proto = onnx.load(os.fspath(model))  # a bfloat16 file onnxruntime refused: run its float32 twin
        if not is_bfloat16(proto):
            raise
        return make_session(proto, level=level, providers=providers, threads=threads)
