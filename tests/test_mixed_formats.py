"""Mixed formats in one graph: by role (--weights-format / --activations-format) and by data (--format auto)."""
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import onnxfp8
from onnxfp8 import QuantConfig
from onnxfp8.errors import ConfigError
from onnxfp8.formats import get_format
from onnxfp8.modelio import make_session
from onnxfp8.verify.compare import sqnr_db

F = TensorProto.FLOAT


def gemm_model(k=32, n=16, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal([n, k]) * 0.1).astype(np.float32)
    b = (rng.standard_normal(n) * 0.1).astype(np.float32)
    g = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, name="fc")], "g",
                          [helper.make_tensor_value_info("x", F, ["n", k])], [helper.make_tensor_value_info("y", F, None)],
                          [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b, "b")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]), w, b


def _x(n, k=32, seed=1):
    return {"x": np.random.default_rng(seed).standard_normal([n, k]).astype(np.float32)}


@pytest.mark.parametrize("wf,af", [("e3m4", "e4m3"), ("e4m3", "e3m4"), ("e5m2", "int8"), ("int8", "e4m3")])
@pytest.mark.parametrize("style", ["qdq", "emulate"])
def test_by_role_is_exact(wf, af, style):
    model, w, b = gemm_model()
    calib, val = [_x(16)], _x(8, seed=2)
    res = onnxfp8.quantize(model, calib, config=QuantConfig(weights_format=wf, activations_format=af, style=style))
    assert res.plan.tensors["w"].format == wf and res.plan.tensors["x"].format == af
    W, A = get_format(wf), get_format(af)
    ws = W.scale_for(np.abs(w).max(axis=1))
    xs = A.scale_for(np.abs(calib[0]["x"]).max())
    want = A.fake_quant(val["x"], xs) @ W.fake_quant(w, ws, axis=0).T + b
    got = make_session(res.model, level="basic").run(None, val)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ReferenceEvaluator(res.model).run(None, val)[0], got, rtol=1e-5, atol=1e-6)
    if style == "qdq" and not A.emulated:  # the activation's Q/DQ carries the activation format's type
        q = next(n for n in res.model.graph.node if n.op_type == "QuantizeLinear")
        zp = next(i for i in res.model.graph.initializer if i.name == q.input[2])
        assert zp.data_type == A.onnx_dtype


def three_input_model():
    """y = xo @ W1 + xu @ W2 + xg @ W3: one activation with rare huge outliers, one uniform, one heavy-tailed."""
    rng = np.random.default_rng(3)
    ws = [rng.standard_normal([24, 8]).astype(np.float32) * 0.2,
          rng.uniform(-1, 1, [24, 8]).astype(np.float32),  # uniform weight: INT8's grid fits it best
          rng.standard_normal([24, 8]).astype(np.float32) * 0.2]
    nodes = [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"mm{i}") for i, x in enumerate(["xo", "xu", "xg"])]
    nodes += [helper.make_node("Add", ["m0", "m1"], ["s"], name="add0"), helper.make_node("Add", ["s", "m2"], ["y"], name="add1")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(x, F, ["n", 24]) for x in ["xo", "xu", "xg"]],
                          [helper.make_tensor_value_info("y", F, None)],
                          [onnx.numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])


def three_inputs(n, seed):
    rng = np.random.default_rng(seed)
    xo = rng.standard_normal([n, 24]).astype(np.float32)
    xo[rng.random([n, 24]) < 0.002] = 300.0  # rare outliers at ~300 sigma
    xo[0, 0] = 300.0
    return {"xo": xo, "xu": rng.uniform(-2, 2, [n, 24]).astype(np.float32),
            "xg": rng.standard_t(3, [n, 24]).astype(np.float32)}  # heavy tails (max/rms ~15)


def test_auto_picks_per_tensor_and_says_why():
    model = three_input_model()
    calib = [three_inputs(256, s) for s in range(4)]
    res = onnxfp8.quantize(model, calib, config=QuantConfig(format="auto", formats=("e4m3", "e3m4", "e5m2", "int8")))
    t = res.plan.tensors
    assert t["xo"].format == "e4m3" and "outliers" in t["xo"].notes[-1] and "E4M3 beats" in t["xo"].notes[-1]
    assert t["xu"].format == "int8" and "INT8 wins this tensor" in t["xu"].notes[-1]
    # the reason is a field of the spec (the summary prints it, no note is parsed), the note its prose
    assert t["xo"].auto_reason.startswith("this tensor has outliers") and t["xo"].notes[-1] == "format auto: " + t["xo"].auto_reason
    assert f"  xo (activation): {t['xo'].auto_reason}" in res.report.summary().splitlines()
    assert onnxfp8.QuantPlan.from_json(res.plan.to_json()).tensors["xo"].auto_reason == t["xo"].auto_reason
    assert t["xg"].format == "e3m4"
    assert t["w1"].format == "int8"
    for name in ("xo", "xu", "xg", "w0", "w1", "w2"):
        assert set(t[name].candidates) == {"e4m3", "e3m4", "e5m2", "int8"}
        assert t[name].format == max(t[name].candidates, key=t[name].candidates.get)
    # the histogram estimate of each candidate's error tracks the real error on the calibration data
    for name in ("xo", "xu", "xg"):
        x = np.concatenate([c[name] for c in calib])
        amax = float(np.abs(x).max())
        for f, est in t[name].candidates.items():
            fmt = get_format(f)
            real = sqnr_db(x, fmt.fake_quant(x, fmt.scale_for(np.float32(amax))))
            assert abs(real - est) < 0.3, (name, f, real, est)
    # weights: the recorded error is the exact SQNR of the per-channel fake quantization
    w = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w1"))
    for f, est in t["w1"].candidates.items():
        fmt = get_format(f)
        assert est == pytest.approx(sqnr_db(w, fmt.fake_quant(w, fmt.scale_for(np.abs(w).max(axis=0)), axis=1)), abs=1e-3)
    note = next(p.notes for p in res.report.passes if p.name == "assign_formats")[-1]
    assert "int8 chosen" in note and "INT8 wins" in note
    # mixed formats in one graph, and auto is at least as good as every single format on held-out data
    val = three_inputs(512, 99)
    ref = make_session(model, level="basic").run(None, val)[0]
    auto = sqnr_db(ref, make_session(res.model, level="basic").run(None, val)[0])
    singles = {f: sqnr_db(ref, make_session(onnxfp8.quantize(model, calib, config=QuantConfig(format=f)).model,
                                          level="basic").run(None, val)[0]) for f in ("e4m3", "e3m4", "e5m2", "int8")}
    assert auto >= max(singles.values()) - 0.5, (auto, singles)
    np.testing.assert_allclose(ReferenceEvaluator(res.model).run(None, val)[0],
                               make_session(res.model, level="basic").run(None, val)[0], rtol=1e-5, atol=1e-5)


def test_auto_default_candidates_are_runtime_formats():
    """-f auto's default candidates are formats a runtime executes: E3M4 (emulated, no ONNX type) is opt-in, and
    a result that uses E3M4 says it is emulation-only."""
    assert QuantConfig().formats == ("e4m3", "e5m2", "int8")
    model = three_input_model()
    calib = [three_inputs(256, s) for s in range(2)]
    res = onnxfp8.quantize(model, calib, config=QuantConfig(format="auto"))
    assert {f for s in res.plan.tensors.values() for f in s.candidates} == {"e4m3", "e5m2", "int8"}
    assert "emulation-only" not in res.report.summary()
    res = onnxfp8.quantize(model, calib, config=QuantConfig(format="auto", formats=("e4m3", "e3m4", "int8")))
    n = sum(s.format == "e3m4" for s in res.plan.tensors.values())
    assert n >= 1  # xg, heavy-tailed, goes to E3M4 when allowed
    assert f"emulation-only: {n} tensor(s) in E3M4" in res.report.summary()
    res = onnxfp8.quantize(model, calib, config=QuantConfig(format="e3m4"))
    assert f"emulation-only: {len(res.plan.tensors)} tensor(s) in E3M4" in res.report.summary()


def test_auto_candidates_and_mse_ranges():
    model = three_input_model()
    calib = [three_inputs(256, s) for s in range(2)]
    res = onnxfp8.quantize(model, calib, config=QuantConfig(format="auto", formats=("e3m4", "e5m2"), calibration="mse"))
    for s in res.plan.tensors.values():
        assert set(s.candidates) == {"e3m4", "e5m2"}
    xo = np.concatenate([c["xo"] for c in calib])
    assert 0 < res.plan.tensors["xo"].amax <= float(np.abs(xo).max())
    # only activations auto: weights keep the given format
    res = onnxfp8.quantize(model, calib, config=QuantConfig(weights_format="e4m3", activations_format="auto"))
    assert {s.format for s in res.plan.weights()} == {"e4m3"} and not res.plan.tensors["w0"].candidates
    assert res.plan.tensors["xu"].candidates


def test_auto_config_errors():
    with pytest.raises(ConfigError, match="formats: unknown format 'e6m1'"):
        QuantConfig(format="auto", formats=("e4m3", "e6m1"))
    with pytest.raises(ConfigError, match="dynamic"):
        QuantConfig(format="auto", dynamic=True)
    c = QuantConfig(format="AUTO", formats="e3m4, int8")
    assert c.format == "auto" and c.formats == ("e3m4", "int8") and c.activation_format == "e3m4"
    assert QuantConfig.from_dict(c.to_dict()) == c


def test_cli_format_auto(tmp_path):
    from onnxfp8.cli import cli

    model = three_input_model()
    mpath = tmp_path / "m.onnx"
    onnx.save(model, mpath)
    data = tmp_path / "calib"
    data.mkdir()
    np.savez(data / "a.npz", **three_inputs(128, 0))
    plan = tmp_path / "plan.json"
    r = CliRunner().invoke(cli, ["quantize", str(mpath), "--calib", str(data), "-f", "auto", "--formats", "e4m3,int8",
                                 "--plan", str(plan), "-o", str(tmp_path / "q.onnx")])
    assert r.exit_code == 0, r.output
    tensors = json.loads(plan.read_text())["tensors"]
    assert all(set(t["candidates"]) == {"e4m3", "int8"} for t in tensors)
    # the summary says in words what won where: xo (rare huge outliers) goes to E4M3, the uniform xu to INT8
    lines = r.output.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("format auto"))
    assert "INT8 wins" in lines[head]
    xo = next(line for line in lines[head:] if line.startswith("  xo (activation): "))
    assert "this tensor has outliers" in xo and "E4M3 beats INT8 by" in xo
    assert any(line.startswith("  xu (activation): ") and "INT8 wins this tensor" in line for line in lines[head:])
    r = CliRunner().invoke(cli, ["quantize", str(mpath), "--calib", str(data), "-f", "auto", "--formats", "e4m3,fp4"])
    assert r.exit_code == 2 and "unknown format 'fp4'" in r.output


@pytest.mark.parametrize("scheme", ["standard", "extended"])
def test_auto_is_never_worse_than_the_best_single_format_on_the_transformer(example_models, load_feeds, scheme):
    """The issue's bound: on the transformer example, format auto is at most 0.5 dB below the best single
    format (measured on the 32 held-out samples: standard scheme auto 33.58 dB, best single e3m4 31.51; extended
    auto 27.77 dB, best single e3m4 26.70)."""
    ex = example_models["transformer"]
    model = onnx.load(str(ex["model"]))
    val = load_feeds(ex["val"])
    ref = make_session(model, level="basic").run(["logits"], val)[0]

    def sq(**cfg):
        q = onnxfp8.quantize(model, str(ex["calib"]), config=QuantConfig(scheme=scheme, **cfg), check_model=False).model
        return sqnr_db(ref, make_session(q, level="basic").run(["logits"], val)[0])

    singles = {f: sq(format=f) for f in QuantConfig().formats}  # auto's default candidates
    auto = sq(format="auto")
    assert auto >= max(singles.values()) - 0.5, (auto, singles)
