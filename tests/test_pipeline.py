"""The Pipeline's own guarantees: a failing pass is named with the passes before it, duplicate names are
caught right after the pass that made them, and plans/reports are strict JSON."""
import json
import math

import numpy as np
import onnx_graphsurgeon as gs
import pytest

import onnxfp8
from onnxfp8.errors import PassError, PostconditionError, PreconditionError
from onnxfp8.passes import standard_pipeline
from onnxfp8.pipeline import Pass, PassContext, PassResult, Pipeline
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


# -- the pass contract (as onnx-ir's _pass_infra.py): a PassResult, unique names, edits by name, named pre- /
# postcondition errors ------------------------------------------------------------------------------------

class ReturnsNothing(Pass):
    name = "returns_nothing"

    def run(self, graph, ctx):
        graph.name = graph.name  # does its job but forgets the result


class Named(Pass):
    def __init__(self, name, requires=None, ensures=None):
        self.name, self._req, self._ens = name, requires, ensures

    def requires(self, graph, ctx):
        if self._req:
            raise ValueError(self._req)

    def ensures(self, graph, ctx):
        if self._ens:
            raise ValueError(self._ens)

    def run(self, graph, ctx):
        return PassResult(False, [f"{self.name} ran"])


def _graph():
    x = gs.Variable("x", dtype=np.float32, shape=[1])
    y = gs.Variable("y", dtype=np.float32, shape=[1])
    return gs.Graph(nodes=[gs.Node("Relu", "relu", inputs=[x], outputs=[y])], inputs=[x], outputs=[y], opset=19)


def test_a_pass_must_return_a_pass_result():
    with pytest.raises(PassError, match=r"pass 'returns_nothing' of pipeline 't' returned NoneType, not a "
                                        r"PassResult \(passes run before it: a\)") as e:
        Pipeline("t", [Named("a"), ReturnsNothing()]).run(_graph(), PassContext())
    assert e.value.pass_name == "returns_nothing"


def test_pre_and_postcondition_errors_name_the_pass():
    with pytest.raises(PreconditionError, match=r"pass 'b' of pipeline 't' precondition failed: needs x "
                                                r"\(passes run before it: a\)") as e:
        Pipeline("t", [Named("a"), Named("b", requires="needs x")]).run(_graph(), PassContext())
    assert e.value.pass_name == "b"
    with pytest.raises(PostconditionError, match=r"pass 'a' of pipeline 't' postcondition failed: broke y "
                                                 r"\(passes run before it: none\)"):
        Pipeline("t", [Named("a", ensures="broke y")]).run(_graph(), PassContext())


def test_pass_names_are_unique_and_pipelines_are_edited_by_name():
    with pytest.raises(ValueError, match="already has a pass named 'a'"):
        Pipeline("t", [Named("a"), Named("a")])
    pipe = Pipeline("t", [Named("a"), Named("b"), Named("c")])
    with pytest.raises(ValueError, match="already has a pass named 'c'"):
        pipe.replace("b", Named("c"))
    assert pipe.names() == ["a", "b", "c"]  # a refused edit leaves the pipeline as it was
    assert pipe.replace("b", Named("b2")).names() == ["a", "b2", "c"]
    with pytest.raises(ValueError, match="has no pass 'zzz'"):
        pipe.insert_after("zzz", Named("d"))


def test_dynamic_pipeline_replaces_calibrate_by_name():
    from onnxfp8.config import QuantConfig
    from onnxfp8.passes import pipeline_for

    names = pipeline_for(QuantConfig(dynamic=True)).names()
    assert "calibrate_dynamic" in names and "calibrate" not in names
    assert names.index("calibrate_dynamic") == pipeline_for(QuantConfig()).names().index("calibrate")


def test_with_target_leaves_a_shared_select_ops_alone():
    from onnxfp8.config import QuantConfig
    from onnxfp8.passes import with_target
    from onnxfp8.passes.select_ops import SelectOps
    from onnxfp8.rules import TensorRTRule

    shared = SelectOps()
    pipe = with_target(Pipeline("t", [shared]), QuantConfig(target="tensorrt"))
    assert shared.extra_rules == []
    assert isinstance(pipe.get("select_ops").extra_rules[0], TensorRTRule)
    again = with_target(Pipeline("u", [shared]), QuantConfig(target="tensorrt"))
    assert len(again.get("select_ops").extra_rules) == 1


def test_assign_formats_without_statistics_is_a_precondition_error(example_models):
    pipe = standard_pipeline().remove("calibrate")
    with pytest.raises(PreconditionError, match=r"pass 'assign_formats' of pipeline 'standard' precondition "
                                                r"failed: no calibration statistics for \d+ activation"):
        onnxfp8.quantize(str(example_models["mlp"]["model"]), str(example_models["mlp"]["calib"]), pipeline=pipe)


def test_select_ops_ensures_every_node_has_a_reason(example_models):
    class Forget(Pass):
        name = "forget"

        def run(self, graph, ctx):
            next(iter(ctx.plan.nodes.values())).reason = ""
            return PassResult(False)

    from onnxfp8.passes.select_ops import SelectOps

    class Wrapped(SelectOps):
        def run(self, graph, ctx):
            res = super().run(graph, ctx)
            Forget().run(graph, ctx)
            return res

    pipe = standard_pipeline().replace("select_ops", Wrapped())
    with pytest.raises(PostconditionError, match=r"pass 'select_ops' .* postcondition failed: node '.+' is (not )?"
                                                 r"quantized without a reason"):
        onnxfp8.quantize(str(example_models["mlp"]["model"]), str(example_models["mlp"]["calib"]), pipeline=pipe)
