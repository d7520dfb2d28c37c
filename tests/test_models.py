"""Tests for onnxfp8/examples/build.py: the example models build, check, run, and their data files are usable."""

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxfp8.examples import build
from onnxfp8.modelio import make_session

NUM_CLASSES = {"cnn": 10, "mlp": 10, "transformer": 10}


@pytest.fixture(scope="module")
def examples():
    return {name: fn() for name, fn in build.EXAMPLES.items()}


def _session(model, optimize=True):
    return make_session(model, level="all" if optimize else "disable")


def _run_with_intermediates(model, feeds, names):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in names:
        m.graph.output.append(onnx.ValueInfoProto(name=n))
    outs = _session(m).run(None, feeds)
    return dict(zip([o.name for o in m.graph.output], outs))


def test_examples_registry():
    assert set(build.EXAMPLES) == {"cnn", "mlp", "transformer"}


@pytest.mark.parametrize("name", sorted(NUM_CLASSES))
def test_example_is_valid_onnx(examples, name):
    model = examples[name]
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    node_names = [n.name for n in model.graph.node]
    assert all(node_names) and len(set(node_names)) == len(node_names)
    outputs = [o for n in model.graph.node for o in n.output]
    assert all(outputs) and len(set(outputs)) == len(outputs)
    assert all(t.name for t in model.graph.initializer)
    assert [o.name for o in model.graph.output] == ["logits"]
    for vi in model.graph.input:
        assert vi.type.tensor_type.shape.dim[0].dim_param == "batch"


@pytest.mark.parametrize("name", sorted(NUM_CLASSES))
@pytest.mark.parametrize("batch", [1, 8])
def test_example_runs_with_dynamic_batch(examples, name, batch):
    model = examples[name]
    feeds = build.make_inputs(model, batch, seed=3)
    assert set(feeds) == {i.name for i in model.graph.input}
    (logits,) = _session(model).run(["logits"], feeds)
    assert logits.shape == (batch, NUM_CLASSES[name])
    assert logits.dtype == np.float32 and np.isfinite(logits).all()


@pytest.mark.parametrize("name", sorted(NUM_CLASSES))
def test_example_small_weight_dominated_and_deterministic(examples, name):
    model = examples[name]
    size = model.ByteSize()
    assert size < 2_000_000
    weight_bytes = sum(t.ByteSize() for t in model.graph.initializer)
    assert weight_bytes > 0.95 * size
    assert build.EXAMPLES[name]().SerializeToString() == model.SerializeToString()
    assert build.EXAMPLES[name](seed=1).SerializeToString() != model.SerializeToString()


@pytest.mark.parametrize("name", sorted(NUM_CLASSES))
def test_logits_have_order_one_spread(examples, name):
    model = examples[name]
    (logits,) = _session(model).run(["logits"], build.make_inputs(model, 64, seed=2))
    assert 0.3 < float(logits.std()) < 5.0


def test_cnn_structure(examples):
    ops = build.model_summary(examples["cnn"])["ops"]
    assert ops == {"Add": 1, "BatchNormalization": 5, "Conv": 5, "Flatten": 1, "Gemm": 1,
                   "GlobalAveragePool": 1, "MaxPool": 1, "Relu": 5}
    gemm = next(n for n in examples["cnn"].graph.node if n.op_type == "Gemm")
    assert {a.name: a.i for a in gemm.attribute}["transB"] == 1


def test_cnn_batchnorm_is_nontrivial_and_matches_data(examples):
    """Running stats are not identity (folding matters) and equal the data statistics (as if trained)."""
    model = examples["cnn"]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    outs = _run_with_intermediates(model, build.make_inputs(model, 64, seed=2), [n.input[0] for n in bns])
    for bn in bns:
        mean, var = inits[bn.input[3]], inits[bn.input[4]]
        assert not np.allclose(var, 1.0) and np.abs(mean).mean() > 0.05
        assert 0.3 < float(np.median(var)) < 3.0
        x = outs[bn.input[0]]
        data_var = x.var(axis=(0, 2, 3))
        assert np.median(np.abs(np.log(data_var / var))) < 0.2, bn.name


def test_mlp_structure(examples):
    model = examples["mlp"]
    assert [n.op_type for n in model.graph.node] == ["Gemm", "Relu", "MatMul", "Add", "Relu", "Gemm"]
    trans_b = [{a.name: a.i for a in n.attribute}.get("transB", 0) for n in model.graph.node if n.op_type == "Gemm"]
    assert trans_b == [1, 0]


def test_transformer_structure(examples):
    model = examples["transformer"]
    ops = build.model_summary(model)["ops"]
    assert ops["LayerNormalization"] == 3 and ops["Erf"] == 1 and ops["Softmax"] == 1
    assert ops["MatMul"] == 8  # q, k, v, scores, context, out_proj, fc1, fc2
    names = {n.name for n in model.graph.node}
    assert {"layer0/attn/q_proj", "layer0/attn/k_proj", "layer0/attn/v_proj", "layer0/attn/out_proj",
            "layer0/ffn/fc1", "layer0/ffn/fc2", "classifier"} <= names
    ins = {i.name: i for i in model.graph.input}
    assert ins["input_ids"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [d.dim_param for d in ins["attention_mask"].type.tensor_type.shape.dim] == ["batch", "sequence"]


def test_transformer_accepts_shorter_sequences(examples):
    model = examples["transformer"]
    feeds = build.make_inputs(model, 4, seed=0)
    feeds = {k: v[:, :11] for k, v in feeds.items()}
    (logits,) = _session(model).run(["logits"], feeds)
    assert logits.shape == (4, 10) and np.isfinite(logits).all()


def test_transformer_has_activation_outliers(examples):
    """Two fixed channels of every LayerNorm output are ~10-20x larger than the rest."""
    model = examples["transformer"]
    meta = {p.key: p.value for p in model.metadata_props}
    outlier = [int(c) for c in meta["onnxfp8.outlier_channels"].split(",")]
    assert len(outlier) == 2
    lns = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    outs = _run_with_intermediates(model, build.make_inputs(model, 16, seed=2), [n.output[0] for n in lns])
    for ln in lns:
        y = outs[ln.output[0]]
        rms = np.sqrt((y.reshape(-1, y.shape[-1]) ** 2).mean(0))
        normal = np.delete(rms, outlier)
        ratio = rms[outlier] / normal.mean()
        assert (ratio > 6).all() and (ratio < 40).all(), (ln.name, ratio)
        assert 0.5 < normal.mean() < 2.0
    # weights: std in [0.02, 0.05] with heavier than Gaussian tails
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "layer0/ffn/fc1.weight"))
    assert 0.015 < w.std() < 0.06
    assert np.abs(w).max() / w.std() > 5.0


def test_decomposed_layernorm_matches_fused():
    fused = build.build_transformer(seed=0)
    dec = build.build_transformer(seed=0, decomposed_layernorm=True)
    onnx.checker.check_model(dec, full_check=True)
    ops = build.model_summary(dec)["ops"]
    assert "LayerNormalization" not in ops
    assert ops["ReduceMean"] == 6 and ops["Sqrt"] == 3 and ops["Pow"] == 3
    assert {t.name for t in fused.graph.initializer} <= {t.name for t in dec.graph.initializer}
    feeds = build.make_inputs(fused, 8, seed=5)
    # optimizations off: onnxruntime would otherwise fuse the decomposed pattern back into LayerNormalization
    (a,) = _session(fused, optimize=False).run(["logits"], feeds)
    (b,) = _session(dec, optimize=False).run(["logits"], feeds)
    np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)
    (c,) = _session(dec).run(["logits"], feeds)
    np.testing.assert_allclose(c, a, atol=1e-4, rtol=0)


def test_make_inputs_transformer_padding(examples):
    model = examples["transformer"]
    x = build.make_inputs(model, 64, seed=1)
    ids, mask = x["input_ids"], x["attention_mask"]
    assert ids.shape == mask.shape == (64, 32) and ids.dtype == np.int64 and mask.dtype == np.float32
    assert set(np.unique(mask)) == {0.0, 1.0}
    assert ((ids == 0) == (mask == 0)).all()          # padding is exactly where the mask is 0
    assert (ids < 1000).all() and (ids >= 0).all()
    assert (mask[:, 0] == 1).all()
    assert (np.diff(mask, axis=1) <= 0).all()          # padding only at the end
    padded_rows = (mask == 0).any(axis=1).sum()
    assert 10 < padded_rows < 54
    again = build.make_inputs(model, 64, seed=1)
    assert all(np.array_equal(x[k], again[k]) for k in x)


def test_make_inputs_images(examples):
    x = build.make_inputs(examples["cnn"], 16, seed=0)["input"]
    assert x.shape == (16, 3, 32, 32) and x.dtype == np.float32
    assert abs(float(x.mean())) < 0.3 and 0.7 < float(x.std()) < 1.3
    # smooth: neighbouring pixels are strongly correlated
    corr = np.corrcoef(x[..., :-1].ravel(), x[..., 1:].ravel())[0, 1]
    assert corr > 0.5


def test_write_data_one_sample_per_file(tmp_path, examples):
    model = examples["transformer"]
    paths = build.write_data(model, tmp_path / "d", 5, seed=1)
    assert [p.name for p in paths] == [f"{i:05d}.npz" for i in range(5)]
    ref = build.make_inputs(model, 5, seed=1)
    for i, p in enumerate(paths):
        with np.load(p) as z:
            assert sorted(z.files) == ["attention_mask", "input_ids"]
            assert z["input_ids"].shape == (1, 32)
            np.testing.assert_array_equal(z["input_ids"][0], ref["input_ids"][i])


def test_write_data_batches_and_stale_files(tmp_path, examples):
    model = examples["mlp"]
    folder = tmp_path / "d"
    build.write_data(model, folder, 10, seed=1)
    (folder / "notes.txt").write_text("kept")
    paths = build.write_data(model, folder, 10, seed=1, per_file=4)
    assert sorted(p.name for p in folder.glob("*.npz")) == [p.name for p in paths]
    assert (folder / "notes.txt").exists()
    shapes = [np.load(p)["input"].shape for p in paths]
    assert shapes == [(4, 64), (4, 64), (2, 64)]


def test_build_all(tmp_path):
    out = tmp_path / "models"
    res = build.build_all(out, calib=4, val=3)
    assert set(res) == set(build.EXAMPLES)
    for name, r in res.items():
        assert r["model"] == out / f"{name}.onnx" and r["model"].exists()
        model = onnx.load(r["model"])
        onnx.checker.check_model(model, full_check=True)
        input_names = {i.name for i in model.graph.input}
        assert r["calib"] == out / "data" / name / "calib" and r["val"] == out / "data" / name / "val"
        assert len(list(r["calib"].glob("*.npz"))) == 4 and len(list(r["val"].glob("*.npz"))) == 3
        for p in r["calib_files"] + r["val_files"]:
            with np.load(p) as z:
                assert set(z.files) == input_names
                assert all(z[k].shape[0] == 1 for k in z.files)
        calib0, val0 = np.load(r["calib_files"][0]), np.load(r["val_files"][0])
        assert any(not np.array_equal(calib0[k], val0[k]) for k in input_names)  # seeds 1 and 2 differ
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    res2 = build.build_all(out, calib=2, val=3, only=["mlp"])
    assert set(res2) == {"mlp"}
    assert len(list((out / "data" / "mlp" / "calib").glob("*.npz"))) == 2   # stale files removed
    assert (out / "mlp.onnx").read_bytes() == before[out / "mlp.onnx"]
    for p in res2["mlp"]["val_files"]:
        assert p.read_bytes() == before[p]
    with pytest.raises(ValueError):
        build.build_all(out, only=["nope"])


def test_script_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "onnxfp8.examples.build", "--out", str(tmp_path),
                           "--only", "mlp", "--calib", "2", "--val", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "logits_std" in proc.stdout
    assert (tmp_path / "mlp.onnx").exists() and not (tmp_path / "cnn.onnx").exists()


def test_tiny_resnet_like():
    model = build.build_resnet_like(size=32, widths=(8, 16, 16, 16), blocks=(1, 1, 1, 1), num_classes=7)
    ops = build.model_summary(model)["ops"]
    assert ops["Conv"] == 1 + 4 * 4 and ops["BatchNormalization"] == ops["Conv"] and ops["Add"] == 4
    (logits,) = _session(model).run(["logits"], build.make_inputs(model, 2, seed=0))
    assert logits.shape == (2, 7) and np.isfinite(logits).all()


def test_tiny_bert_like():
    model = build.build_bert_like(num_layers=2, hidden=32, heads=2, ffn=64, seq=16, vocab=100)
    assert build.model_summary(model)["ops"]["LayerNormalization"] == 5
    feeds = build.make_inputs(model, 3, seed=0)
    assert feeds["input_ids"].shape == (3, 16) and feeds["input_ids"].max() < 100
    (logits,) = _session(model).run(["logits"], feeds)
    assert logits.shape == (3, 2) and np.isfinite(logits).all()
