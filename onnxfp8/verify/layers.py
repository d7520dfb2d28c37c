"""Per-layer error attribution: where in the quantized graph the error comes from.

Tensors of the quantized graph are matched to FP32 tensors by name. insert_qdq keeps every original tensor name
on its FP32 producer's output (the dequantized copy of an activation is ``<tensor>.dq``; a dequantized weight
keeps the weight's name; a Relu that the quantizer moved behind a Q/DQ keeps its output name), so:

* a **quantized layer** is a node of the quantized graph, outside the quantization fragments, that reads at
  least one quantized value (a DequantizeLinear output, an emulated fake-quant output, or a Relu of one);
* its **fragment** is what lies between the layer and the tensors it shares with the FP32 graph: the
  Q/DQ (or emulation) nodes of its inputs, the weight decode, a commuting Relu, read back until a tensor that
  the FP32 graph computes too (the *boundary*) or a constant;
* **cumulative SQNR**: the layer's output in the quantized model vs the same tensor in the FP32 model: the
  error of everything up to and including the layer;
* **own SQNR** (the error the layer adds itself): the layer with its fragment run on the FP32 values of its
  boundary tensors, vs the FP32 output. A layer with a bad scale shows a low own SQNR however good the
  layers before it are, so sorting by it puts the culprits on top.

Memory: the compared tensors are exposed as outputs of the FP32, quantized and isolated-layer models, each
cut down to the nodes its outputs need. Per onnxruntime run the exposed bytes (FP32 reference, quantized
output, own output, and the boundaries fed to the isolated layers) fit ``max_memory_mb``: the batches are cut
into micro-batches small enough for every layer to fit one streamed pass over the data, and only when a single
sample's tensors exceed the budget are the layers split into chunks, one pass each. Each run is reduced to
``ErrorStats`` at once and dropped, so memory depends on the budget, not on depth times data. Sizes per sample
come from a cheap pass over one sample that fetches only ``Size`` scalars.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np
import onnx
from onnx import helper

from onnxfp8 import names
from onnxfp8.names import SIZE_SUFFIX
from onnxfp8.calibrators.data import batch_size, take_samples
from onnxfp8.errors import ConfigError
from onnxfp8.modelio import inferred_light, make_session
from onnxfp8.plan import json_plain
from onnxfp8.verify.compare import ErrorStats

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
COMMUTING_OPS = ("Relu",)  # ops the quantizer may move behind a Q/DQ ("before:" placement)
LOCAL_PREFIX = "__onnxfp8_own/"


@dataclass
class Layer:
    """A quantized layer and the quantized-graph nodes needed to run it alone on FP32 inputs."""

    node: str
    op_type: str
    output: str  # the compared tensor (the layer's first output, a name the FP32 graph has)
    quantized_inputs: List[str]  # input tensors of the layer that carry quantized values (quant-graph names)
    boundaries: List[str]  # FP32 tensors the isolated layer reads
    nodes: List[onnx.NodeProto]  # fragment nodes and the layer, in graph order
    constants: List[str]  # initializers of the quantized graph the isolated layer reads
    index: int = 0  # position in the quantized graph


@dataclass
class LayerResult:
    node: str
    op_type: str
    output: str
    quantized_inputs: List[str]
    cumulative: ErrorStats
    own: Optional[ErrorStats]
    own_note: str = ""

    @property
    def cumulative_sqnr_db(self) -> float:
        return self.cumulative.sqnr_db

    @property
    def own_sqnr_db(self) -> Optional[float]:
        return self.own.sqnr_db if self.own is not None else None

    def sort_key(self) -> Tuple[float, float]:
        own = self.own_sqnr_db
        own = math.inf if own is None or math.isnan(own) else own
        return own, self.cumulative_sqnr_db

    def to_dict(self) -> Dict[str, Any]:
        return json_plain({"node": self.node, "op_type": self.op_type, "output": self.output,
                           "quantized_inputs": self.quantized_inputs, "own_sqnr_db": self.own_sqnr_db,
                           "cumulative_sqnr_db": self.cumulative_sqnr_db, "cumulative": self.cumulative.to_dict(),
                           "own": self.own.to_dict() if self.own is not None else None,
                           **({"own_note": self.own_note} if self.own_note else {})})


# -- finding the layers ------------------------------------------------------------------------------
def _fp32_variables(model: onnx.ModelProto) -> Set[str]:
    """Tensors the FP32 graph computes from its inputs (not initializers, not Constant outputs)."""
    inits = {t.name for t in model.graph.initializer}
    names = {i.name for i in model.graph.input if i.name not in inits}
    for n in model.graph.node:
        if n.op_type != "Constant":
            names.update(o for o in n.output if o)
    return names


def find_layers(fp32: onnx.ModelProto, quant: onnx.ModelProto) -> Tuple[List[Layer], List[Dict[str, str]]]:
    """The quantized layers of ``quant`` that can be compared with ``fp32``, and the ones that cannot
    (``[{"node", "reason"}]``)."""
    fp32_vars = _fp32_variables(fp32)
    g = quant.graph
    inits = {t.name for t in g.initializer}
    producer: Dict[str, Tuple[int, onnx.NodeProto]] = {}
    for i, n in enumerate(g.node):
        for o in n.output:
            if o:
                producer[o] = (i, n)

    fragment: Dict[int, bool] = {}
    quantized: Dict[int, bool] = {}  # fragment nodes whose output carries a quantized value

    def is_fragment(i: int, n: onnx.NodeProto) -> bool:
        if i in fragment:
            return fragment[i]
        if n.op_type in QDQ_OPS or n.op_type == "Constant":
            res = True
        elif n.op_type in COMMUTING_OPS:
            src = producer.get(n.input[0]) if n.input else None
            res = src is not None and is_fragment(*src) and carries_quantized(*src)
            res = res or not any(o in fp32_vars for o in n.output)
        else:  # emulation nodes and weight decodes write tensors the FP32 graph does not compute
            res = not any(o in fp32_vars for o in n.output if o)
        fragment[i] = res
        return res

    fp32_inits = {t.name for t in fp32.graph.initializer}

    def carries_quantized(i: int, n: onnx.NodeProto) -> bool:
        """A fragment node whose output is a quantized value: a DequantizeLinear, the last node of an emulated
        fake-quant (``<tensor>.dq``) or weight decode (the weight's name), a Relu of a quantized value."""
        if i in quantized:
            return quantized[i]
        quantized[i] = False  # cycle guard
        if n.op_type == "DequantizeLinear":
            res = True
        elif n.op_type in ("QuantizeLinear", "Constant"):
            res = False
        elif n.op_type in COMMUTING_OPS and n.input and n.input[0] in producer:
            src = producer[n.input[0]]
            res = is_fragment(*src) and carries_quantized(*src)
        else:
            res = any(o.endswith(names.QUANTIZED_OUTPUTS) or o in fp32_inits for o in n.output if o)
        quantized[i] = res
        return res

    layers: List[Layer] = []
    skipped: List[Dict[str, str]] = []
    for i, n in enumerate(g.node):
        if is_fragment(i, n):
            continue
        q_inputs = [t for t in n.input if t and t in producer and is_fragment(*producer[t])
                    and carries_quantized(*producer[t])]
        if not q_inputs:
            continue
        out = n.output[0] if n.output else ""
        if out not in fp32_vars:
            skipped.append({"node": n.name, "reason": f"output '{out}' has no FP32 tensor of the same name"})
            continue
        nodes: Dict[int, onnx.NodeProto] = {i: n}
        boundaries: List[str] = []
        constants: List[str] = []
        missing: List[str] = []
        stack = [t for t in n.input if t]
        seen: Set[str] = set()
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            if t in inits:
                constants.append(t)
            elif t in producer and is_fragment(*producer[t]):
                j, p = producer[t]
                if j not in nodes:
                    nodes[j] = p
                    stack.extend(x for x in p.input if x)
            elif t in fp32_vars:
                boundaries.append(t)
            else:
                missing.append(t)
        if missing:
            skipped.append({"node": n.name, "reason": f"input '{missing[0]}' has no FP32 tensor of the same name"})
            continue
        layers.append(Layer(n.name, n.op_type, out, q_inputs, sorted(boundaries),
                            [nodes[j] for j in sorted(nodes)], sorted(constants), index=i))
    return layers, skipped


# -- models for one chunk -----------------------------------------------------------------------------
def _value_types(model: onnx.ModelProto) -> Dict[str, int]:
    types: Dict[str, int] = {}
    try:
        inferred = inferred_light(model)
    except Exception:
        inferred = model
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def _node_reads(node: onnx.NodeProto) -> List[str]:
    """The tensors a node reads: its inputs and the outer-scope names its subgraphs (If/Loop/Scan) use."""
    names = [t for t in node.input if t]
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for n in g.node:
                names.extend(_node_reads(n))
    return names


def expose(model: onnx.ModelProto, tensors: Sequence[str], types: Dict[str, int]) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are exactly ``tensors``, cut down to the nodes and initializers they
    depend on (the graph inputs all stay, so every batch feeds as is). onnxruntime runs every node of a graph
    whatever outputs are fetched, so without the cut each chunk of layers would cost a whole-model run; with it
    the chunks near the input are cheap. The copy shares nothing with ``model``."""
    g = model.graph
    producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    keep: Set[int] = set()
    stack = list(tensors)
    needed: Set[str] = set()
    while stack:
        t = stack.pop()
        if t in needed:
            continue
        needed.add(t)
        i = producer.get(t)
        if i is not None and i not in keep:
            keep.add(i)
            stack.extend(_node_reads(g.node[i]))
    m = onnx.ModelProto()
    for f in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(m, f, getattr(model, f))
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    m.graph.name = g.name
    m.graph.node.extend(g.node[i] for i in sorted(keep))
    m.graph.initializer.extend(t for t in g.initializer if t.name in needed)
    m.graph.sparse_initializer.extend(t for t in g.sparse_initializer if t.values.name in needed)
    inits = {t.name for t in g.initializer} | {t.values.name for t in g.sparse_initializer}
    m.graph.input.extend(i for i in g.input if i.name not in inits or i.name in needed)
    m.graph.value_info.extend(v for v in g.value_info if v.name in needed)
    outs = {o.name: o for o in g.output}
    for t in dict.fromkeys(tensors):
        m.graph.output.append(outs[t] if t in outs else
                              helper.make_tensor_value_info(t, types.get(t, onnx.TensorProto.FLOAT), None))
    return m


def own_model(quant: onnx.ModelProto, layers: Sequence[Layer], input_types: Dict[str, int]) -> onnx.ModelProto:
    """A model that runs ``layers`` alone: inputs are their FP32 boundary tensors, every node of their
    fragments is copied from the quantized graph with its outputs renamed under ``LOCAL_PREFIX``; outputs are
    ``LOCAL_PREFIX + layer.output``."""
    inits = {t.name: t for t in quant.graph.initializer}
    boundaries = sorted({b for l in layers for b in l.boundaries})
    bset = set(boundaries)
    renamed: Dict[str, str] = {}
    nodes: Dict[str, onnx.NodeProto] = {}
    constants: Set[str] = set()
    for l in layers:
        constants.update(l.constants)
        for n in l.nodes:
            key = n.name or "|".join(n.output)
            if key in nodes:
                continue
            nodes[key] = n
            for o in n.output:
                if o:
                    renamed[o] = LOCAL_PREFIX + o
    graph_nodes = []
    # keep the quantized graph's (topological) order
    position = {(n.name or "|".join(n.output)): i for i, n in enumerate(quant.graph.node)}
    for key in sorted(nodes, key=lambda k: position.get(k, 0)):
        n = nodes[key]
        c = onnx.NodeProto()
        c.CopyFrom(n)
        c.name = LOCAL_PREFIX + n.name
        del c.input[:]
        for t in n.input:
            if not t or t in bset or t in constants:
                c.input.append(t)
            else:
                c.input.append(renamed.get(t, t))
        del c.output[:]
        c.output.extend(renamed.get(o, o) if o else o for o in n.output)
        graph_nodes.append(c)
    g = helper.make_graph(
        graph_nodes, "onnxfp8_own_layers",
        [helper.make_tensor_value_info(b, input_types.get(b, onnx.TensorProto.FLOAT), None) for b in boundaries],
        [helper.make_tensor_value_info(LOCAL_PREFIX + l.output, input_types.get(l.output, onnx.TensorProto.FLOAT), None)
         for l in layers],  # the layer's output keeps the FP32 model's name and type (float16 models)
        [inits[c] for c in sorted(constants)])
    m = helper.make_model(g, opset_imports=list(quant.opset_import))
    m.ir_version = quant.ir_version
    return m


def _size_model(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i, t in enumerate(tensors):
        m.graph.node.append(helper.make_node("Size", [t], [t + SIZE_SUFFIX], name=f"onnxfp8_check_size_{i}"))
        m.graph.output.append(helper.make_tensor_value_info(t + SIZE_SUFFIX, onnx.TensorProto.INT64, []))
    return m


def chunks(layers: Sequence[Layer], nbytes: Dict[str, int], budget: int) -> List[List[Layer]]:
    """Pack layers (in graph order) into chunks whose exposed bytes per batch fit ``budget``: the reference,
    quantized and own copies of each output, plus the boundary tensors (each counted once per chunk). A layer
    over the budget gets a chunk of its own."""
    out: List[List[Layer]] = []
    cur: List[Layer] = []
    cur_bounds: Set[str] = set()
    used = 0
    for l in layers:
        cost = 3 * nbytes.get(l.output, 0) + sum(nbytes.get(b, 0) for b in l.boundaries if b not in cur_bounds)
        if cur and used + cost > budget:
            out.append(cur)
            cur, cur_bounds, used = [], set(), 0
            cost = 3 * nbytes.get(l.output, 0) + sum(nbytes.get(b, 0) for b in l.boundaries)
        cur.append(l)
        cur_bounds.update(l.boundaries)
        used += cost
    if cur:
        out.append(cur)
    return out


# -- running ------------------------------------------------------------------------------------------
@dataclass
class LayerRun:
    results: List[LayerResult]
    skipped: List[Dict[str, str]] = field(default_factory=list)
    chunks: int = 0
    passes: int = 0
    bytes_per_batch: int = 0  # largest exposed bytes per (micro-)batch of any chunk
    micro_batch: int = 0  # samples per onnxruntime run of the layer passes


def micro_batches(batches: Iterable[Dict[str, np.ndarray]], m: int) -> Iterable[Dict[str, np.ndarray]]:
    """The batches cut along each input's batch axis into pieces of at most ``m`` samples (views, no copies)."""
    for batch in batches:
        n = batch_size(batch)
        if n <= m:
            yield batch
            continue
        for start in range(0, n, m):
            yield take_samples(batch, start + m, start)


def release_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``; nothing elsewhere). onnxruntime's
    arena shrinkage and numpy free large blocks between batches, but glibc keeps them once its mmap threshold
    has risen, and the heap fragments: measured on the 12-layer transformer check (256 samples), peak RSS 149 MB
    with a trim per batch vs 153-207 MB (varying run to run) without."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def shrinking_run_options():
    """onnxruntime RunOptions that hand the CPU arena's free memory back after each run: the check keeps two or
    three sessions alive, and without this each arena keeps its own high-water mark, so their peaks add up."""
    import onnxruntime as ort

    ro = ort.RunOptions()
    ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return ro


@dataclass
class Layout:
    """How the layer passes cut the data: value types, the micro-batch size and the exposed bytes per
    tensor at that size, under the memory budget (bytes)."""

    types: Dict[str, int]
    micro_batch: int
    nbytes: Dict[str, int]
    budget: int


def layout(fp32: onnx.ModelProto, quant: onnx.ModelProto, layers: Sequence[Layer], data, *,
           max_memory_mb: float = 32, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0,
           copies: float = 3) -> Layout:
    """Sizes per sample of every compared and boundary tensor (from a pass over one sample that fetches only
    ``Size`` scalars of ``quant``) and the micro-batch that lets as many layers as possible share one streamed
    pass within ``max_memory_mb``: each layer output counts ``copies`` times (reference, quantized, own)."""
    fp32_inputs = {i.name for i in fp32.graph.input} - {t.name for t in fp32.graph.initializer}
    static = any(getattr(s, "static_batch", None) for s in getattr(data, "specs", {}).values())
    first = next(iter(data.batches()))
    if not static:  # one sample is enough: every wanted tensor stays alive until its Size runs
        first = take_samples(first, 1)
    # element counts per sample (per batch for a static batch), from Size scalars of the quantized model
    wanted = sorted({l.output for l in layers} | {b for l in layers for b in l.boundaries if b not in fp32_inputs})
    size_sess = make_session(_size_model(quant, wanted), level="basic", providers=providers, threads=threads)
    sizes = dict(zip(wanted, (int(v) for v in size_sess.run([t + SIZE_SUFFIX for t in wanted], first))))
    del size_sess
    for name, arr in first.items():
        sizes[name] = int(np.asarray(arr).size)
    types = _value_types(fp32)
    for name, arr in first.items():
        types.setdefault(name, helper.np_dtype_to_tensor_dtype(np.asarray(arr).dtype))
    n0 = max(1, batch_size(first))
    del first
    release_memory()
    if not max_memory_mb > 0:
        raise ConfigError(f"the memory budget for exposed tensors must be > 0 MB, got {max_memory_mb}")
    budget = int(max_memory_mb * 2**20)
    # bytes per sample; the batches are cut into micro-batches of m samples so that as many layers as possible
    # fit one pass: one pass over the data at batch m costs far less than several at the full batch
    per_sample = {t: n * _itemsize(types.get(t, onnx.TensorProto.FLOAT)) / n0 for t, n in sizes.items()}
    total = sum(copies * per_sample.get(l.output, 0) for l in layers) + sum(
        per_sample.get(b, 0) for b in {b for l in layers for b in l.boundaries})
    full = max(n0, int(getattr(data, "batch_size", n0) or n0))
    m = n0 if static else max(1, min(full, int(budget // max(total, 1))))
    nbytes = {t: int(math.ceil(v * m)) for t, v in per_sample.items()}
    return Layout(types, m, nbytes, budget)


def compare_layers(fp32: onnx.ModelProto, quant: onnx.ModelProto, data, *, max_memory_mb: float = 32,
                   providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0,
                   progress: Optional[Callable[[str], None]] = None) -> LayerRun:
    """Cumulative and own error of every quantized layer of ``quant`` against ``fp32`` over ``data`` (a
    CalibrationData: re-iterable batches). Results are sorted worst own SQNR first."""
    layers, skipped = find_layers(fp32, quant)
    run = LayerRun([], skipped)
    if not layers:
        return run
    fp32_inputs = {i.name for i in fp32.graph.input} - {t.name for t in fp32.graph.initializer}
    lay = layout(fp32, quant, layers, data, max_memory_mb=max_memory_mb, providers=providers, threads=threads)
    types, m, nbytes = lay.types, lay.micro_batch, lay.nbytes
    run.micro_batch = m
    groups = chunks(layers, nbytes, lay.budget)
    run.chunks = len(groups)
    opts = shrinking_run_options()
    cum = {l.node: ErrorStats() for l in layers}
    own = {l.node: ErrorStats() for l in layers}
    total = None
    if progress:
        from onnxfp8.progress import count_samples

        total = count_samples(data)
    for gi, group in enumerate(groups):
        where = f"layers: chunk {gi + 1}/{len(groups)} ({len(group)} layer(s))"
        if progress:
            progress(f"{where}, creating the sessions")
        outs = [l.output for l in group]
        bounds = sorted({b for l in group for b in l.boundaries})
        run.bytes_per_batch = max(run.bytes_per_batch, sum(3 * nbytes.get(o, 0) for o in outs)
                                  + sum(nbytes.get(b, 0) for b in bounds))
        ref_fetch = list(dict.fromkeys(outs + [b for b in bounds if b not in fp32_inputs]))
        fp32_sess = make_session(expose(fp32, ref_fetch, types), level="basic", providers=providers, threads=threads)
        q_sess = make_session(expose(quant, outs, types), level="basic", providers=providers, threads=threads)
        own_sess = make_session(own_model(quant, group, types), level="basic", providers=providers, threads=threads)
        own_outs = [LOCAL_PREFIX + o for o in outs]
        seen = 0
        for batch in micro_batches(data.batches(), m):
            ref = dict(zip(ref_fetch, fp32_sess.run(ref_fetch, batch, opts)))
            feed = {b: (batch[b] if b in batch else ref[b]) for b in bounds}
            mine = own_sess.run(own_outs, feed, opts)
            del feed
            for l, v in zip(group, mine):
                own[l.node].update(ref[l.output], v)
            del mine
            got = q_sess.run(outs, batch, opts)
            for l, v in zip(group, got):
                cum[l.node].update(ref[l.output], v)
            del got, ref
            release_memory()
            if progress:
                seen += batch_size(batch)
                progress(f"{where}, {seen}{f'/{total}' if total else ''} sample(s)")
        del fp32_sess, q_sess, own_sess
        run.passes += 1
    run.results = sorted((LayerResult(l.node, l.op_type, l.output, l.quantized_inputs, cum[l.node], own[l.node])
                          for l in layers), key=LayerResult.sort_key)
    return run


def _itemsize(elem_type: int) -> int:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except Exception:
        return 4
