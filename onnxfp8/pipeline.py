"""The pass infrastructure: Pass, PassResult, PassContext and Pipeline.

A pass has one job: ``run(graph, ctx) -> PassResult``. ``requires`` / ``ensures`` check its pre- and
postconditions. A Pipeline runs passes in order, records what each did and how long it took, and when one
fails raises a PassError naming it and the passes that ran before it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional

import onnx_graphsurgeon as gs

from onnxfp8.config import QuantConfig
from onnxfp8.errors import OnnxFp8Error, PassError, PostconditionError, PreconditionError
from onnxfp8.plan import QuantPlan
from onnxfp8.state import BatchNormReport, CalibrationInfo, Captured, PatternMatch


@dataclass
class PassResult:
    modified: bool = False
    notes: List[str] = field(default_factory=list)


@dataclass
class PassRecord:
    name: str
    seconds: float
    modified: bool
    notes: List[str]

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "seconds": round(self.seconds, 4), "modified": self.modified, "notes": self.notes}


@dataclass
class PassContext:
    """The explicit state passes share, one typed field per kind. No globals, no grab-bag dict."""

    config: QuantConfig = field(default_factory=QuantConfig)
    calib: Any = None  # the calibration data: a calibrators.data.DataSource (CalibrationData, ...)
    stats: Dict[str, Any] = field(default_factory=dict)  # tensor -> calibrated statistics (amax, min, max, method)
    plan: QuantPlan = field(default_factory=QuantPlan)
    records: List[PassRecord] = field(default_factory=list)
    source: str = "model"  # the model's file name, for messages
    outputs: Any = None  # outputs.Outputs: files a pass writes (calibrate --save-stats) are staged there
    progress: Any = None  # a progress sink (onnxfp8.progress): begin(what, total), update(n), close()
    calibration: Optional[CalibrationInfo] = None  # what calibration did (the report's calibration section)
    captured: Captured = field(default_factory=Captured)  # first samples' inputs + FP32 outputs (summary, BN guard)
    histograms: Any = None  # the HistogramCalibrator calibrate filled (format auto reads it)
    patterns: List[PatternMatch] = field(default_factory=list)  # what each node-name pattern matched (select_ops)
    fp32_weights: Dict[str, Any] = field(default_factory=dict)  # BN recalibration: FP32 weights feeding a BN
    fp32_graph: Optional[gs.Graph] = None  # BN recalibration (mode shift): the FP32 reference graph
    bn_recalibration: Optional[BatchNormReport] = None  # what BN recalibration changed
    twin_of: str = ""  # "bfloat16": the graph is a bfloat16 model's float32 twin (bfloat16.py): scales bf16-exact


class Pass:
    """Base class: subclasses set a unique ``name`` and implement ``run``, which returns a PassResult.

    ``requires`` / ``ensures`` state the pass's pre- and postconditions: they raise (any exception, with a
    message) when the graph or the context is not in the state the pass needs or promises; the pipeline turns
    that into a PreconditionError / PostconditionError naming the pass."""

    name: str = "pass"

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        """Raise (with a message) when the graph is not in the state this pass needs."""

    def ensures(self, graph: gs.Graph, ctx: PassContext) -> None:
        """Raise (with a message) when the pass left the graph in a wrong state."""

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


class Pipeline:
    """An ordered, named list of passes with unique names; edited by name (insert_before / insert_after /
    replace / remove), never by position."""

    def __init__(self, name: str, passes: Iterable[Pass]):
        self.name = name
        self.passes: List[Pass] = []
        for p in passes:
            self._add(len(self.passes), p)

    def _index(self, name: str) -> int:
        names = self.names()
        if name not in names:
            raise ValueError(f"pipeline '{self.name}' has no pass '{name}' (passes: {', '.join(names)})")
        return names.index(name)

    def _add(self, idx: int, new: Pass) -> None:
        if not isinstance(new, Pass):
            raise TypeError(f"pipeline '{self.name}': {new!r} is not a Pass")
        if new.name in self.names():
            raise ValueError(f"pipeline '{self.name}' already has a pass named '{new.name}'")
        self.passes.insert(idx, new)

    def insert_after(self, after: str, new: Pass) -> "Pipeline":
        self._add(self._index(after) + 1, new)
        return self

    def insert_before(self, before: str, new: Pass) -> "Pipeline":
        self._add(self._index(before), new)
        return self

    def replace(self, name: str, new: Pass) -> "Pipeline":
        """Put ``new`` in the place of the pass named ``name`` (its name may differ but must stay unique)."""
        idx = self._index(name)
        old = self.passes.pop(idx)
        try:
            self._add(idx, new)
        except (TypeError, ValueError):
            self.passes.insert(idx, old)
            raise
        return self

    def remove(self, name: str) -> "Pipeline":
        self.passes = [p for p in self.passes if p.name != name]
        return self

    def get(self, name: str) -> Optional[Pass]:
        return next((p for p in self.passes if p.name == name), None)

    def names(self) -> List[str]:
        return [p.name for p in self.passes]

    def copy(self) -> "Pipeline":
        """A pipeline of the same pass objects that can be edited without changing this one."""
        return Pipeline(self.name, self.passes)

    def run(self, graph: gs.Graph, ctx: PassContext) -> gs.Graph:
        done: List[str] = []
        for p in self.passes:
            start = time.perf_counter()
            stage = "requires"
            if ctx.progress is not None and hasattr(ctx.progress, "phase"):
                ctx.progress.phase(f"quantizing: {p.name}")  # what runs between bars (progress.ProgressBar)
            try:
                p.requires(graph, ctx)
                stage = "run"
                result = p.run(graph, ctx)
                if not isinstance(result, PassResult):
                    raise PassError(f"{ctx.source}: pass '{p.name}' of pipeline '{self.name}' returned "
                                    f"{type(result).__name__}, not a PassResult (passes run before it: "
                                    f"{', '.join(done) if done else 'none'})", p.name)
                stage = "ensures"
                p.ensures(graph, ctx)
                stage = "names"
                if result.modified:
                    _check_names(graph)
            except (OnnxFp8Error, MemoryError):
                raise
            except Exception as e:
                before = ", ".join(done) if done else "none"
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                kind, what = {"requires": (PreconditionError, "precondition failed"),
                              "ensures": (PostconditionError, "postcondition failed")}.get(stage, (PassError, "failed"))
                raise kind(f"{ctx.source}: pass '{p.name}' of pipeline '{self.name}' {what}: {first} "
                           f"(passes run before it: {before})", p.name) from e
            ctx.records.append(PassRecord(p.name, time.perf_counter() - start, result.modified, result.notes))
            done.append(p.name)
        return graph

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, {self.names()})"


def _check_names(graph: gs.Graph) -> None:
    """Every pass that changed the graph must leave tensor and node names unique: two tensors of one name
    export to one ONNX value, and graphsurgeon's cleanup then drops one producer without a word."""
    tensors = {}
    for node in graph.nodes:
        for t in list(node.inputs) + list(node.outputs):
            if tensors.setdefault(t.name, t) is not t and t.name:
                raise ValueError(f"two distinct tensors are named '{t.name}'")
    seen = set()
    for node in graph.nodes:
        if node.name and node.name in seen:
            raise ValueError(f"two nodes are named '{node.name}'")
        seen.add(node.name)
