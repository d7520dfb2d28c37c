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
        converted = rewired = 0
        graph_outputs = {id(t) for t in graph.outputs}
        names = set(graph.tensors())
        for node in list(graph.nodes):
            value = node.attrs.get("value") if node.op == "Constant" and len(node.outputs) == 1 else None
            if not isinstance(value, gs.Constant):
                continue
            out = node.outputs[0]
            if id(out) in graph_outputs:
                # a graph output that is a constant keeps its node; its readers get an initializer of another
                # name (one of the same name would be a second tensor named like the output)
                if out.outputs:
                    name, k = f"{out.name}.value", 1
                    while name in names:
                        name, k = f"{out.name}.value_{k}", k + 1
                    names.add(name)
                    const = gs.Constant(name, value.values)
                    for consumer in list(out.outputs):
                        for i, t in enumerate(consumer.inputs):
                            if t is out:
                                consumer.inputs[i] = const
                    rewired += 1
                continue
            node.outputs.clear()
            out.to_constant(value.values)  # in place: every reader now reads the constant
            converted += 1
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        unnamed = [n for n in graph.nodes if not n.name]
        for i, n in enumerate(unnamed):
            n.name = f"{n.op}_unnamed_{i}"
        notes = []
        if converted:
            notes.append(f"{converted} Constant node(s) turned into initializers")
        return PassResult(bool(converted or rewired or unnamed), notes)
