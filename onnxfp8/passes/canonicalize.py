"""canonicalize: bring the working graph into the shape later passes rely on.

Constant nodes become graph constants (so weights are recognisable as such), the graph is topologically
sorted, and the opset precondition is checked. Loading (opset upgrade, naming, shape inference) already
happened in modelio at the edge."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxfp8.errors import ModelError
from onnxfp8.pipeline import Pass, PassContext, PassResult


class Canonicalize(Pass):
    name = "canonicalize"

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        if graph.opset < 19:
            raise ModelError(f"{ctx.source}: opset {graph.opset} < 19; load the model through onnxfp8.modelio.prepare_model")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        converted = 0
        for node in list(graph.nodes):
            if node.op == "Constant" and len(node.outputs) == 1 and "value" in node.attrs:
                value = node.attrs["value"]
                if isinstance(value, gs.Constant):
                    out = node.outputs[0]
                    const = gs.Constant(out.name, value.values)
                    for consumer in list(out.outputs):
                        for i, t in enumerate(consumer.inputs):
                            if t is out:
                                consumer.inputs[i] = const
                    for i, t in enumerate(graph.outputs):
                        if t is out:  # a graph output that is a constant: keep the node
                            break
                    else:
                        node.outputs.clear()
                        converted += 1
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        unnamed = [n for n in graph.nodes if not n.name]
        for i, n in enumerate(unnamed):
            n.name = f"{n.op}_unnamed_{i}"
        notes = []
        if converted:
            notes.append(f"{converted} Constant node(s) turned into initializers")
        return PassResult(bool(converted or unnamed), notes)
