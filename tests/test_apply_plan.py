"""apply_plan / quantize --apply-plan: a saved plan rebuilds the quantized model without calibration data.

- every mode and scheme: the plan's JSON, read back, gives the byte-identical model (formats incl. auto,
  qdq / emulate, standard / extended, dynamic per tensor / per token, BatchNorm recalibration with and
  without range re-measurement, target tensorrt);
- the CLI: quantize --plan then quantize --apply-plan (no --calib) writes the same file;
- edits: a format change requantizes that tensor only (exact values against formats.py), keep_fp32 leaves a
  node reading FP32 values, a scale edit lands in the graph; bad edits fail with one line naming the plan;
- a Prepared model serves many plans in memory and is left unchanged.
"""
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import onnxfp8
from onnxfp8.cli import cli
from onnxfp8.config import QuantConfig
from onnxfp8.errors import ConfigError
from onnxfp8.formats import get_format
from onnxfp8.plan import QuantPlan

CASES = [
    ("cnn", {}),
    ("cnn", {"format": "e5m2", "style": "emulate"}),
    ("cnn", {"format": "e3m4"}),
    ("cnn", {"format": "int8", "per_channel": False, "keep_first_last": True}),
    ("cnn", {"format": "auto"}),
    ("cnn", {"format": "auto", "style": "emulate", "calibration": "mse"}),
    ("cnn", {"scheme": "extended", "calibration": "percentile"}),
    ("cnn", {"target": "tensorrt"}),  # (scheme extended with target tensorrt is refused: it cannot lint clean)
    ("cnn", {"bn_recalibrate": True}),
    ("cnn", {"bn_recalibrate": True, "bn_mode": "replace", "bn_guard": False, "bn_ranges": True, "format": "int8"}),
    ("cnn", {"bn_recalibrate": True, "bn_guard": False, "style": "emulate", "format": "e3m4", "scheme": "extended"}),
    ("transformer", {"scheme": "extended"}),
    ("transformer", {"dynamic": True}),
    ("transformer", {"dynamic": True, "dynamic_granularity": "token", "scheme": "extended"}),
    ("transformer", {"format": "auto", "scheme": "extended", "style": "emulate"}),
    ("mlp", {"dynamic": True, "dynamic_granularity": "token", "format": "int8"}),
]


def _ids(case):
    name, cfg = case
    return name + "-" + "-".join(f"{k}={v}" for k, v in cfg.items()) if cfg else name


@pytest.mark.parametrize("name,cfg", CASES, ids=[_ids(c) for c in CASES])
def test_saved_plan_rebuilds_the_identical_model(example_models, name, cfg):
    ex = example_models[name]
    res = onnxfp8.quantize(str(ex["model"]), str(ex["calib"]), config=QuantConfig(**cfg))
    plan = QuantPlan.from_json(res.plan.to_json())
    again = onnxfp8.apply_plan(str(ex["model"]), plan)
    assert again.model.SerializeToString() == res.model.SerializeToString()
    assert again.plan.to_json() == res.plan.to_json()  # the applied plan is the plan (nothing re-decided)
    assert again.report.calibration is None and not again.report.outputs  # no data was read
    if cfg.get("bn_recalibrate") and res.report.batchnorm.applied:
        assert set(res.plan.batchnorm) == set(res.report.batchnorm.layers)
    if cfg.get("dynamic"):
        dyn = [s for s in res.plan.activations() if s.dynamic is not None]
        assert dyn and all(s.scale is None for s in dyn)
        if cfg.get("dynamic_granularity") == "token":
            assert any(s.dynamic.granularity == "token" and s.dynamic.axis in (-1, -2) for s in dyn)


def test_cli_apply_plan_writes_the_same_file(example_models, tmp_path):
    ex = example_models["cnn"]
    runner = CliRunner()
    first, second, plan = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "plan.json"
    r = runner.invoke(cli, ["quantize", str(ex["model"]), "-c", str(ex["calib"]), "-o", str(first), "--plan",
                            str(plan), "--format", "auto", "--bn-recalibrate", "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["quantize", str(ex["model"]), "--apply-plan", str(plan), "-o", str(second)])
    assert r.exit_code == 0, r.output
    assert first.read_bytes() == second.read_bytes()
    assert "use_plan" in r.output and f"wrote {second}" in r.output
    # --style may change: the same decisions written as emulation
    emu = tmp_path / "emu.onnx"
    r = runner.invoke(cli, ["quantize", str(ex["model"]), "--apply-plan", str(plan), "-o", str(emu), "--style",
                            "emulate", "-q"])
    assert r.exit_code == 0, r.output
    assert not any(n.op_type == "QuantizeLinear" for n in onnx.load(str(emu)).graph.node)


def test_apply_plan_neither_reads_nor_writes_the_plans_statistics_file(example_models, tmp_path):
    """A plan made with --save-stats (a tuned plan names the tuner's temporary file, gone after tuning) applies
    without that file: applying a plan calibrates nothing."""
    ex = example_models["cnn"]
    runner = CliRunner()
    first, second, plan, stats = (tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "plan.json",
                                  tmp_path / "tmp" / "stats.json")
    stats.parent.mkdir()
    r = runner.invoke(cli, ["quantize", str(ex["model"]), "-c", str(ex["calib"]), "-o", str(first), "--plan",
                            str(plan), "--save-stats", str(stats), "-q"])
    assert r.exit_code == 0, r.output
    stats.unlink()
    stats.parent.rmdir()
    r = runner.invoke(cli, ["quantize", str(ex["model"]), "--apply-plan", str(plan), "-o", str(second), "-q"])
    assert r.exit_code == 0, r.output
    assert first.read_bytes() == second.read_bytes()
    assert not stats.parent.exists()


@pytest.mark.parametrize("args,needle", [
    (["--format", "e5m2"], "--format: the plan"),
    (["-c", "CALIB"], "--calib:"),
])
def test_cli_apply_plan_refuses_decision_options(example_models, tmp_path, args, needle):
    ex = example_models["mlp"]
    plan = tmp_path / "plan.json"
    plan.write_text(onnxfp8.quantize(str(ex["model"]), str(ex["calib"])).plan.to_json())
    args = [str(ex["calib"]) if a == "CALIB" else a for a in args]
    r = CliRunner().invoke(cli, ["quantize", str(ex["model"]), "--apply-plan", str(plan), "-o",
                                 str(tmp_path / "o.onnx")] + args)
    assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_edited_plan_format_scale_and_fp32_node(example_models):
    ex = example_models["mlp"]  # no BatchNorm folded into its weights: the file's weights are the FP32 reference
    res = onnxfp8.quantize(str(ex["model"]), str(ex["calib"]))
    prepared = onnxfp8.prepare(str(ex["model"]))
    w = next(s for s in res.plan.weights() if s.axis is not None)
    act = res.plan.activations()[0]
    plan = res.plan.copy()
    plan.set_format(w.tensor, "e5m2")
    plan.set_scale(act.tensor, 0.125)
    node = next(d for d in plan.quantized_nodes() if any(r == "weight" for r in d.inputs.values())
                and d.node not in w.consumers)
    wname = next(s.tensor for s in plan.weights() if node.node in s.consumers)
    plan.keep_fp32(node.node, "kept FP32 in review")
    edited = onnxfp8.apply_plan(prepared, plan)
    assert res.plan.tensors[w.tensor].format == "e4m3"  # the source plan is not touched
    inits = _inits(edited.model)
    e5m2 = get_format("e5m2")
    fp32 = _inits(onnx.load(str(ex["model"])))
    scale = e5m2.scale_for(np.asarray(res.plan.tensors[w.tensor].amax, np.float32))
    np.testing.assert_array_equal(inits[f"{w.tensor}.scale"], scale)
    got = inits[f"{w.tensor}.quantized"]
    assert got.dtype == e5m2.storage_dtype
    np.testing.assert_array_equal(got.astype(np.float32), e5m2.quantize(fp32[w.tensor], scale, w.axis).astype(np.float32))
    assert inits[f"{act.tensor}.scale"] == np.float32(0.125)
    # the node kept FP32 reads its FP32 weight and the plan says why
    n = next(n for n in edited.model.graph.node if n.name == node.node)
    assert wname in n.input and wname in inits and f"{wname}.quantized" not in inits
    np.testing.assert_array_equal(inits[wname], fp32[wname])
    assert edited.plan.nodes[node.node].reason == "kept FP32 in review" and wname not in edited.plan.tensors
    # the prepared model is unchanged: the unedited plan still gives the original bytes
    assert onnxfp8.apply_plan(prepared, res.plan).model.SerializeToString() == res.model.SerializeToString()


def test_edited_json_quantized_false_reads_fp32(example_models, tmp_path):
    ex = example_models["mlp"]
    res = onnxfp8.quantize(str(ex["model"]), str(ex["calib"]))
    data = json.loads(res.plan.to_json())
    first = next(d for d in data["nodes"] if d["quantized"])
    first["quantized"], first["reason"] = False, "hand edit"
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    out = onnxfp8.apply_plan(str(ex["model"]), str(path))
    assert first["node"] not in {c for s in out.plan.tensors.values() for c in s.consumers}
    node = next(n for n in out.model.graph.node if n.name == first["node"])
    producers = {o: n.op_type for n in out.model.graph.node for o in n.output}
    assert all(producers.get(i) != "DequantizeLinear" for i in node.input)


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d["tensors"][0].update(scale=-1.0), "scale -1.0 is not a finite number > 0"),
    (lambda d: d["tensors"][0].update(tensor="nope"), "tensor 'nope' is not in the model"),
    (lambda d: d["tensors"][0].update(format="e9m9"), "tensor"),
    (lambda d: d["tensors"][0].update(colour="red"), "unknown key(s) colour"),
    (lambda d: d["nodes"][0].update(node="ghost"), "node 'ghost' is not in the model"),
])
def test_bad_plan_edits_fail_with_one_line_naming_the_plan(example_models, tmp_path, edit, needle):
    ex = example_models["mlp"]
    data = json.loads(onnxfp8.quantize(str(ex["model"]), str(ex["calib"])).plan.to_json())
    edit(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as e:
        onnxfp8.apply_plan(str(ex["model"]), str(path))
    assert str(e.value).startswith(str(path)) and needle in str(e.value) and "\n" not in str(e.value)
    r = CliRunner().invoke(cli, ["quantize", str(ex["model"]), "--apply-plan", str(path), "-o",
                                 str(tmp_path / "o.onnx")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and not (tmp_path / "o.onnx").exists()
