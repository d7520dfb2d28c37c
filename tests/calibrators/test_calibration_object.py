"""Calibration as one object (calibrators/calibration.py) and its steps: the plan of tensors and methods, the
statistics the calibrate pass hands on unchanged, the collector's observers (output capture, progress), the
BatchNorm moments, and assign_formats never running a session."""
import numpy as np
import onnx
import pytest

import onnxfp8
from onnxfp8.calibrators import collector
from onnxfp8.calibrators.cache import StatsStore
from onnxfp8.calibrators.calibration import Calibration
from onnxfp8.calibrators.capture import OutputCapture
from onnxfp8.calibrators.data import as_data
from onnxfp8.calibrators.max import MaxCalibrator
from onnxfp8.calibrators.moments import free_batch, pooled_moments, training_mode_model
from onnxfp8.config import QuantConfig
from onnxfp8.modelio import make_session, prepare_model, to_graph, to_model
from onnxfp8.progress import ProgressObserver

PASSES = ["canonicalize", "fold_batchnorm", "select_ops", "calibrate"]


def test_plan_gives_each_tensor_its_method_and_the_histograms_it_needs():
    cfg = QuantConfig(calibration="max", overrides={"b": {"calibration": "percentile", "percentile": 99.0},
                                                    "c": {"calibration": "mse", "format": "e5m2"}})
    plan = Calibration(cfg).plan(["a", "b", "c", "a"])
    assert plan.tensors == ["a", "b", "c"]
    assert plan.methods == {"a": ("max", 99.99), "b": ("percentile", 99.0), "c": ("mse", 99.99)}
    assert plan.formats == {"c": "e5m2"} and plan.histograms == ["b", "c"] == plan.by_histogram
    assert plan.counts() == {"max": 1, "percentile": 1, "mse": 1}
    # format auto and a saved cache want every tensor's histogram
    assert Calibration(cfg.replace(format="auto")).plan(["a", "b"]).histograms == ["a", "b"]
    store = StatsStore(save="/tmp/never-written.json")
    assert Calibration(cfg, store=store).plan(["a", "b"]).histograms == ["a", "b"]


@pytest.mark.parametrize("method", ["max", "mse"])
def test_the_pass_hands_on_the_objects_statistics(example_models, run_passes, method):
    ex = example_models["mlp"]
    model = onnx.load(ex["model"])
    cfg = QuantConfig(calibration=method, batch_size=8)
    graph, ctx, res = run_passes(model, PASSES[:-1], config=cfg, calib=str(ex["calib"]))
    from onnxfp8.passes.calibrate import activation_tensors

    data = as_data(str(ex["calib"]), to_model(graph.copy()), batch_size=8)
    direct = Calibration(cfg, data).ranges(graph, activation_tensors(graph, ctx))
    _, ctx2, res2 = run_passes(model, PASSES, config=cfg, calib=str(ex["calib"]))
    assert direct.stats == ctx2.stats and direct.stats
    assert direct.info.samples == 32 and direct.info.passes == (1 if method == "max" else 2)
    strip = lambda notes: [n.rsplit(",", 1)[0] for n in notes]  # noqa: E731  (the seconds differ)
    assert strip(res2["calibrate"].notes) == strip(direct.notes)
    assert direct.captured.samples == ctx2.captured.samples == 32  # capture_samples 64 > the 32 samples
    assert (direct.histograms is None) == (method == "max")


def test_observers_see_every_batch_and_the_capture_takes_the_first_samples(example_models):
    ex = example_models["mlp"]
    model = prepare_model(onnx.load(ex["model"]), opset=19)
    data = as_data(str(ex["calib"]), model, batch_size=8)
    seen = []

    class Spy:
        def passes(self, n):
            seen.append(("passes", n))

        def batch(self, pass_no, done, batch, outputs):
            seen.append((pass_no, done, outputs is not None))

    cap = OutputCapture.for_model(12, model, data)
    ticks = []
    res = collector.collect(model, [model.graph.node[0].output[0]], data, MaxCalibrator(), observers=[cap, Spy()],
                            progress=lambda done, pass_no: ticks.append((done, pass_no)))
    assert seen == [(1, 8, True), (1, 16, True), (1, 24, True), (1, 32, True)]
    assert ticks == [(8, 1), (16, 1), (24, 1), (32, 1)] and res.samples == 32
    assert cap.full and cap.captured.samples == 12 and [len(next(iter(b.values()))) for b in cap.captured.inputs] == [8, 4]
    ref = make_session(model, level="all").run(None, dict(cap.captured.inputs[1]))
    np.testing.assert_array_equal(ref[0], cap.captured.outputs[1][model.graph.output[0].name])
    # no observer wants outputs and nothing to reduce: no pass at all
    assert collector.collect(model, [], data, MaxCalibrator(), observers=[Spy()]).passes == 1  # not tensors: outputs
    obs = ProgressObserver(lambda done, pass_no: ticks.append((done, pass_no)))
    obs.passes(3)  # a plain callable has no set_passes: ignored
    obs.batch(2, 5)
    assert ticks[-1] == (5, 2)


def test_batchnorm_moments_are_the_numpy_moments(example_models):
    ex = example_models["cnn"]
    proto = prepare_model(onnx.load(ex["model"]), opset=19)
    graph = to_graph(proto)
    bns = [n for n in graph.nodes if n.op == "BatchNormalization"]
    assert bns, "the example cnn has BatchNormalization"
    bn = bns[0]
    model = training_mode_model(graph, [bn.name])
    free_batch(model)
    data = as_data(str(ex["calib"]), model, batch_size=32)
    res = pooled_moments([model], {bn.name: int(np.size(bn.inputs[3].values))}, data)
    # the BN's input over all samples, from the plain model (the first BN sees FP32 upstream values)
    plain = to_model(graph.copy())
    plain.graph.output.append(onnx.ValueInfoProto(name=bn.inputs[0].name))
    x = np.concatenate([make_session(plain, level="disable").run([bn.inputs[0].name], b)[0] for b in data.batches()])
    axes = (0,) + tuple(range(2, x.ndim))
    acc = res.pooled[0][bn.name]
    assert res.samples == 32 and res.batches == 1
    np.testing.assert_allclose(acc.mean, x.astype(np.float64).mean(axes), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(acc.var, x.astype(np.float64).var(axes), rtol=1e-3, atol=1e-5)
    # the same through the calibration object
    again = Calibration(QuantConfig(), data).moments([model], {bn.name: acc.mean.size})
    np.testing.assert_array_equal(again.pooled[0][bn.name].mean, acc.mean)


@pytest.mark.parametrize("fmt", ["e4m3", "auto"])
def test_assign_formats_reads_statistics_and_never_runs_a_session(example_models, monkeypatch, fmt):
    import onnxfp8.modelio as modelio
    from onnxfp8.passes.assign_formats import AssignFormats

    ex = example_models["mlp"]
    real = AssignFormats.run

    def guarded(self, graph, ctx):
        def refuse(*a, **k):
            raise AssertionError("assign_formats ran an onnxruntime session")

        with monkeypatch.context() as m:
            m.setattr(modelio, "make_session", refuse)
            m.setattr(collector, "make_session", refuse)
            m.setattr(collector, "collect", refuse)
            return real(self, graph, ctx)

    monkeypatch.setattr(AssignFormats, "run", guarded)
    res = onnxfp8.quantize(str(ex["model"]), str(ex["calib"]), config=QuantConfig(format=fmt, calibration="mse"))
    assert res.plan.activations()
