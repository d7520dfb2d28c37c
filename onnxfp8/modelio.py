"""Model I/O at the edges of the pipeline: load (external data, opset upgrade, shape inference, naming),
save (atomic, external data for models over 2 GB), conversion to and from the graphsurgeon Graph, and
onnxruntime session making."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Iterable, Optional, Sequence, Union

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


def load_model(model: ModelLike) -> onnx.ModelProto:
    """Read a model file (with its external data) or pass a ModelProto through. One-line errors."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = os.fspath(model)
    if not os.path.exists(path):
        raise ModelError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelError(f"{path}: is a directory, not an ONNX model file")
    try:
        proto = onnx.load(path, load_external_data=True)
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
    if version < opset and _unchanged_between(model, version, opset):
        for imp in model.opset_import:  # no op of the graph changed between the versions: nothing to convert
            if imp.domain in ("", "ai.onnx"):
                imp.version = opset
    elif version < opset:
        try:
            from onnx import version_converter

            model = version_converter.convert_version(model, opset)
        except Exception as e:
            raise ModelError(f"{source}: cannot upgrade from opset {version} to {opset} ({str(e).splitlines()[0]})") from None
    model.ir_version = min(max(model.ir_version, MIN_IR_VERSION), MAX_IR_VERSION)
    name_nodes(model.graph)
    model = infer_shapes(model)
    return model


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
    cheap to add up; protobuf's exact ByteSize (0.3 s on a 100 MB model) is asked only near the limit."""
    payload = 0
    for t in model.graph.initializer:
        payload += len(t.raw_data) + 4 * (len(t.float_data) + len(t.int32_data)) + 8 * (len(t.int64_data) + len(t.double_data))
    if payload < TWO_GB - 2**28:
        return True
    return _can_bytesize(model) and model.ByteSize() < TWO_GB


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference that also works for models over 2 GB (through a temporary file)."""
    try:
        if fits_protobuf(model):
            return onnx.shape_inference.infer_shapes(model, data_prop=True)
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "in.onnx")
            dst = os.path.join(tmp, "out.onnx")
            _save_external(model, src, "in.data")
            onnx.shape_inference.infer_shapes_path(src, dst)
            return onnx.load(dst, load_external_data=True)
    except Exception as e:  # inference is a convenience: a model that fails it can still be quantized
        log.warning("shape inference failed (%s); continuing without inferred shapes", str(e).splitlines()[0])
        return model


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
    return gs.import_onnx(model)


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


def save_model(model: onnx.ModelProto, path: Union[str, os.PathLike], protect: Iterable[str] = ()) -> str:
    """Write ``model`` atomically: into a temporary folder beside ``path``, then renamed into place, so a
    failure leaves no partial file. Models over 2 GB go with external data (``<file>.data``).
    ``protect`` lists paths that must never be overwritten (the input model)."""
    path = os.fspath(path)
    target = os.path.abspath(path)
    for p in protect:
        if os.path.exists(p) and os.path.abspath(p) == target:
            raise ModelError(f"{path}: refusing to overwrite the input model; choose another output with -o")
    folder = os.path.dirname(target) or "."
    if not os.path.isdir(folder):
        raise ModelError(f"{path}: output folder {folder} does not exist")
    big = not fits_protobuf(model)
    data_name = os.path.basename(target) + ".data"
    tmpdir = tempfile.mkdtemp(prefix=".onnxfp8-", dir=folder)
    try:
        tmp_model = os.path.join(tmpdir, os.path.basename(target))
        if big:
            _save_external(model, tmp_model, data_name)
            if os.path.exists(os.path.join(tmpdir, data_name)):
                os.replace(os.path.join(tmpdir, data_name), os.path.join(folder, data_name))
            os.replace(tmp_model, target)
        else:
            onnx.save_model(model, tmp_model)
            os.replace(tmp_model, target)
    except OSError as e:
        raise ModelError(f"{path}: cannot write the output model ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def _can_bytesize(model: onnx.ModelProto) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:  # protobuf refuses to size messages over 2 GB in some versions
        return False


def model_bytes(model: onnx.ModelProto) -> int:
    """Serialized size of a model including the data it holds (external data counted)."""
    try:
        return model.ByteSize()
    except Exception:
        return sum(len(t.raw_data) for t in model.graph.initializer)


# -- onnxruntime ---------------------------------------------------------------------------------------
_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}


# onnxruntime optimizers that change the function of a Q/DQ model. WeightBiasQuantization (a level-1 optimizer
# since onnxruntime 1.20) rewrites the FP32 bias of an INT8 Q/DQ Conv/Gemm into an INT32-quantized bias: measured
# on the example CNN it moves INT8 outputs by 0.10 (max abs) away from onnx.reference. Disabling it costs nothing
# for FP32 models (see tests/test_runtime_levels.py).
DISABLED_OPTIMIZERS = ("WeightBiasQuantization",)


def make_session(model: Union[onnx.ModelProto, str], level: str = "basic",
                 providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0):
    """An onnxruntime InferenceSession at a named optimization level.

    Quantized models are always run at ``basic`` inside onnxfp8: at ENABLE_ALL onnxruntime fuses Q/DQ around
    Conv/Gemm into kernels the CPU lacks for FP8 and drops a Relu feeding an FP8 QuantizeLinear (see
    tests/test_runtime_levels.py); ENABLE_BASIC, without the optimizers in DISABLED_OPTIMIZERS, computes what
    onnx.reference computes."""
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
    if isinstance(model, onnx.ModelProto):
        if fits_protobuf(model):
            return ort.InferenceSession(model.SerializeToString(), so, providers=list(providers),
                                        disabled_optimizers=list(DISABLED_OPTIMIZERS))
        tmpdir = tempfile.mkdtemp(prefix="onnxfp8-session-")
        try:
            p = os.path.join(tmpdir, "model.onnx")
            _save_external(model, p, "model.data")
            return ort.InferenceSession(p, so, providers=list(providers), disabled_optimizers=list(DISABLED_OPTIMIZERS))
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
    return ort.InferenceSession(os.fspath(model), so, providers=list(providers),
                                disabled_optimizers=list(DISABLED_OPTIMIZERS))
