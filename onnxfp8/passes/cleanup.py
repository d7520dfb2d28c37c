"""cleanup: remove what the edits left unused and sort the graph topologically."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxfp8.pipeline import Pass, PassContext, PassResult


class Cleanup(Pass):
    name = "cleanup"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        before = len(graph.nodes)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        removed = before - len(graph.nodes)
        return PassResult(removed > 0, [f"removed {removed} unused node(s)"] if removed else [])
