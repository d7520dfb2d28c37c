"""The Pipeline's own guarantees: a failing pass is named with the passes before it, duplicate names are
caught right after the pass that made them, and plans/reports are strict JSON."""
import json
import math

import numpy as np
import onnx_graphsurgeon as gs
import pytest

import onnxfp8
from onnxfp8.errors import PassError
from onnxfp8.passes import standard_pipeline
from onnxfp8.pipeline import Pass, PassResult
from onnxfp8.plan import QuantPlan, QuantSpec


class DuplicateName(Pass):
    """Adds a second tensor named like an existing one (what a name clash in an emitter does)."""
    name = "duplicate_name"

    def run(self, graph, ctx):
        node = graph.nodes[0]
        clash = gs.Variable(node.outputs[0].name, dtype=np.float32)
        graph.nodes.append(gs.Node("Identity", "clash", inputs=[node.inputs[0]], outputs=[clash]))
        return PassResult(True)


def test_duplicate_tensor_name_fails_in_the_pass_that_made_it(example_models):
    pipe = standard_pipeline().insert_after("select_ops", DuplicateName())
    with pytest.raises(PassError, match=r"pass 'duplicate_name' of pipeline 'standard' failed: two distinct "
                                        r"tensors are named '.+' \(passes run before it: canonicalize, "
                                        r"fold_batchnorm, select_ops\)"):
        onnxfp8.quantize(str(example_models["mlp"]["model"]), str(example_models["mlp"]["calib"]), pipeline=pipe)


def test_plan_json_is_strict_and_round_trips_infinite_errors():
    plan = QuantPlan()
    plan.tensors["x"] = QuantSpec("x", "activation", "e4m3", scale=0.5, amax=np.float32(224.0),
                                  candidates={"e4m3": math.inf, "int8": 30.5})
    text = plan.to_json()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    back = QuantPlan.from_json(text)
    assert back.tensors["x"].candidates == {"e4m3": math.inf, "int8": 30.5}
    assert back.tensors["x"].amax == 224.0
