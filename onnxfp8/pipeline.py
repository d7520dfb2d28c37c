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
from onnxfp8.errors import OnnxFp8Error, PassError
from onnxfp8.plan import QuantPlan


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
    """The explicit state passes share. No globals."""

    config: QuantConfig = field(default_factory=QuantConfig)
    calib: Any = None  # onnxfp8.calibrators.data.CalibrationData
    stats: Dict[str, Any] = field(default_factory=dict)  # tensor -> calibrated statistics (amax, min, max, ...)
    plan: QuantPlan = field(default_factory=QuantPlan)
    records: List[PassRecord] = field(default_factory=list)
    source: str = "model"  # the model's file name, for messages
    extras: Dict[str, Any] = field(default_factory=dict)  # results passes hand on (e.g. captured FP32 outputs)


class Pass:
    """Base class: subclasses set ``name`` and implement ``run``."""

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
    """An ordered, named list of passes."""

    def __init__(self, name: str, passes: Iterable[Pass]):
        self.name = name
        self.passes: List[Pass] = list(passes)

    def insert_after(self, after: str, new: Pass) -> "Pipeline":
        idx = [p.name for p in self.passes].index(after)
        self.passes.insert(idx + 1, new)
        return self

    def insert_before(self, before: str, new: Pass) -> "Pipeline":
        idx = [p.name for p in self.passes].index(before)
        self.passes.insert(idx, new)
        return self

    def remove(self, name: str) -> "Pipeline":
        self.passes = [p for p in self.passes if p.name != name]
        return self

    def names(self) -> List[str]:
        return [p.name for p in self.passes]

    def run(self, graph: gs.Graph, ctx: PassContext) -> gs.Graph:
        done: List[str] = []
        for p in self.passes:
            start = time.perf_counter()
            try:
                p.requires(graph, ctx)
                result = p.run(graph, ctx) or PassResult()
                p.ensures(graph, ctx)
                if result.modified:
                    _check_names(graph)
            except (OnnxFp8Error, MemoryError):
                raise
            except Exception as e:
                before = ", ".join(done) if done else "none"
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise PassError(f"{ctx.source}: pass '{p.name}' of pipeline '{self.name}' failed: {first} "
                                f"(passes run before it: {before})") from e
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
