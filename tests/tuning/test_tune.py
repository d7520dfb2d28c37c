"""The tuner: calibrate once, search plans until a target holds on validation data, say why for every layer."""
from __future__ import annotations

import math

import numpy as np
import pytest
from click.testing import CliRunner

from onnxfp8.cli import cli
from onnxfp8.config import QuantConfig
from onnxfp8.errors import ConfigError
from onnxfp8.quantize import quantize
from onnxfp8.tuning.evaluate import Evaluator, Target, Workspace
from onnxfp8.tuning.tune import parse_max_fallback, tune
from onnxfp8.verify.check import check


def test_target_validation():
    with pytest.raises(ConfigError, match="unknown metric"):
        Target("psnr", 1.0)
    with pytest.raises(ConfigError, match="cosine must be in"):
        Target("cosine", 1.5)
    with pytest.raises(ConfigError, match="fraction"):
        Target("accuracy_loss", 5.0)
    t = Target("accuracy_loss", 0.01)
    assert t.met(0.0) and t.met(0.01) and not t.met(0.02) and not t.met(None)
    assert Target("sqnr", 20).met(20.0) and not Target("sqnr", 20).met(19.99)


def test_parse_max_fallback():
    assert parse_max_fallback("10%", 25) == 2
    assert parse_max_fallback(None, 54) == 5  # default 10 %
    assert parse_max_fallback("3", 25) == 3
    assert parse_max_fallback("100%", 7) == 7
    for bad in ("x", "-1", "1.5", "120%"):
        with pytest.raises(ConfigError, match="--max-fallback"):
            parse_max_fallback(bad, 10)


def test_evaluator_matches_check(example_models):
    """The tuner's metric is the check's metric: same cosine / SQNR for the same models and data."""
    ex = example_models["cnn"]
    q = quantize(ex["model"], ex["calib"], QuantConfig(format="e4m3"))
    e = Evaluator(ex["model"], ex["val"]).evaluate(q.model)
    rep = check(ex["model"], q.model, ex["val"])
    out = next(iter(rep.outputs.values()))
    assert e.cosine == pytest.approx(out.error.cosine, abs=1e-9)
    assert e.sqnr_db == pytest.approx(out.error.sqnr_db, abs=1e-6)
    assert e.samples == 32


def test_workspace_calibrates_once_and_realizes_like_quantize(example_models):
    ex = example_models["transformer"]

    class Counting(list):
        reads = 0

        def __iter__(self):
            Counting.reads += 1
            return super().__iter__()

    import onnx

    from onnxfp8.examples.build import make_inputs

    proto = onnx.load(str(ex["model"]))
    feeds = make_inputs(proto, 16, seed=1)
    calib = Counting([{k: v[i:i + 1] for k, v in feeds.items()} for i in range(16)])
    with Workspace(ex["model"], calib, QuantConfig()) as ws:
        after_calibration = Counting.reads
        for cfg in (QuantConfig(format="e3m4"), QuantConfig(format="int8", calibration="mse"), QuantConfig(format="auto")):
            got = ws.realize(cfg)
            want = quantize(ex["model"], calib, cfg)
            g, w = got.plan.to_dict(), want.plan.to_dict()
            g.pop("config", None), w.pop("config", None)  # the settings differ by load_stats / summary samples
            assert g == w  # same statistics, same decisions
            Counting.reads = after_calibration  # the direct quantize above reads it; realize must not
        assert Counting.reads == after_calibration


def test_tune_met_at_baseline_stops_there(example_models):
    ex = example_models["transformer"]
    res = tune(ex["model"], ex["calib"], ex["val"], Target("cosine", 0.9), QuantConfig())
    assert res.met and len(res.tuning.steps) == 1 and res.tuning.steps[0].name == "baseline"
    assert res.tuning.sensitivity is None and res.tuning.fallback == []


def test_tune_falls_back_until_the_target_holds(example_models, tmp_path):
    ex = example_models["cnn"]
    target = Target("cosine", 0.9995)
    out = tmp_path / "tuned.onnx"
    res = tune(ex["model"], ex["calib"], ex["val"], target, QuantConfig(), max_fallback=3, output=str(out),
               transforms=())  # equalization meets this target without fallback (test_tune_transforms.py)
    rep = res.tuning
    assert rep.met, rep.summary()
    names = [s.name for s in rep.steps]
    assert names[0] == "baseline" and "formats" in names and "fallback" in names
    assert 1 <= len(rep.fallback) <= 3
    # the reached figure is what check measures on the written model
    chk = check(ex["model"], str(out), ex["val"])
    cos = next(iter(chk.outputs.values())).error.cosine
    assert cos == pytest.approx(rep.reached, abs=1e-9) and cos >= 0.9995
    # every layer says why: fallen-back ones left FP32 by tuning, quantized ones their format from tuning
    for node in rep.fallback:
        d = res.plan.nodes[node]
        prec = rep.fallback_precision[node]
        assert not d.quantized and d.fallback == prec and d.reason.startswith(f"tuning: left in {prec.upper()}")
        assert ("FP16-safe on the calibration data" in d.reason) == (prec == "fp16")
    for d in res.plan.quantized_nodes():
        assert "tuning: " in d.reason
    # the fallback ranking: layers alone in high precision, ordered by what each buys at the output; the first
    # layer to fall back is the one that bought the most
    ranking = [s for s in rep.steps if "ranking the fallback by output gain" in s.tried]
    assert len(ranking) >= 2
    score = {s.tried.rsplit("(", 1)[1].rstrip(")"): (s.screened if s.screened is not None else s.metric)
             for s in ranking}
    if not any(s.met for s in ranking):
        assert rep.fallback[0] == max(score, key=score.get)
    # the fallback chosen is the smallest count that met the target among those tried
    fallbacks = [s for s in rep.steps if s.name == "fallback"]
    assert all(not s.met for s in fallbacks if s.fallback < len(rep.fallback))


def test_tune_not_met_returns_the_best(example_models):
    ex = example_models["mlp"]
    res = tune(ex["model"], ex["calib"], ex["val"], Target("sqnr", 200.0), QuantConfig(), max_fallback=0,
               methods=["mse"])
    rep = res.tuning
    assert not rep.met and "not met" in rep.message and "--target-sqnr" in rep.message
    # screening: every candidate scored on 16 of the 32 samples (none within reach of 200 dB), the best of them
    # then on all 32: that is the figure reached
    kept = rep.steps[rep.best_step]
    assert kept.kept and kept.samples == rep.val_samples == 32 and rep.reached == kept.metric
    assert all(s.screened is not None for s in rep.steps)
    assert kept.screened == max(s.screened for s in rep.steps)
    assert [s.samples for i, s in enumerate(rep.steps) if i != rep.best_step] == [16] * (len(rep.steps) - 1)
    assert rep.timings["evaluations_full"] == 1
    # without screening every candidate is on the whole set and the best of them is reached
    res = tune(ex["model"], ex["calib"], ex["val"], Target("sqnr", 200.0), QuantConfig(), max_fallback=0,
               methods=["mse"], screen_samples=None)
    rep = res.tuning
    assert rep.reached == max(s.metric for s in rep.steps) and all(s.samples == 32 for s in rep.steps)


def test_accuracy_target_needs_labels(example_models):
    ex = example_models["mlp"]
    with pytest.raises(ConfigError, match="needs labels"):
        tune(ex["model"], ex["calib"], ex["val"], Target("accuracy_loss", 0.01))


def test_accuracy_target_with_labels(example_models):
    ex = example_models["mlp"]
    from onnxfp8.modelio import make_session

    feeds = [dict(np.load(f)) for f in ex["val_files"]]
    sess = make_session(str(ex["model"]))
    labels = np.concatenate([np.argmax(sess.run(None, f)[0], axis=1) for f in feeds])  # FP32's own predictions
    res = tune(ex["model"], ex["calib"], ex["val"], Target("accuracy_loss", 0.01), labels=labels)
    assert res.met and res.tuning.reached <= 0.01
    assert res.tuning.steps[res.tuning.best_step].evaluation["accuracy_fp32"] == 1.0


def _args(ex, *more):
    return ["quantize", str(ex["model"]), "--calib", str(ex["calib"]), "--val", str(ex["val"]), *more]


def test_cli_target_met(example_models, tmp_path):
    ex = example_models["cnn"]
    out, report, plan = tmp_path / "q.onnx", tmp_path / "r.json", tmp_path / "p.json"
    r = CliRunner().invoke(cli, _args(ex, "--target-cosine", "0.995", "-o", str(out), "--report", str(report),
                                      "--plan", str(plan)))
    assert r.exit_code == 0, r.output
    assert "target cosine >= 0.995 met" in r.output and out.exists()
    import json

    data = json.loads(report.read_text())
    assert data["tuning"]["met"] is True and data["tuning"]["steps"][0]["step"] == "baseline"
    saved = json.loads(plan.read_text())
    assert saved["nodes"]
    # the plan names no statistics file of the tuner's (its temporary folder is gone after tuning)
    assert saved["config"]["save_stats"] is None and saved["config"]["load_stats"] is None
    again = tmp_path / "again.onnx"
    r = CliRunner().invoke(cli, ["quantize", str(ex["model"]), "--apply-plan", str(plan), "-o", str(again), "-q"])
    assert r.exit_code == 0, r.output
    assert again.read_bytes() == out.read_bytes()


def test_cli_target_not_met_exits_1_and_writes_best(example_models, tmp_path):
    ex = example_models["mlp"]
    out = tmp_path / "q.onnx"
    r = CliRunner().invoke(cli, _args(ex, "--target-sqnr", "200", "--max-fallback", "0", "-o", str(out), "-q"))
    assert r.exit_code == 1
    assert "target sqnr >= 200 dB (--target-sqnr) not met" in r.output and "best reached SQNR" in r.output
    assert out.exists()


@pytest.mark.parametrize("args, message", [
    (["--target-cosine", "0.99"], "needs --val"),
    (["--max-fallback", "2"], "only used when tuning"),
    (["--fallback-precision", "fp32"], "--fallback-precision is only used when tuning"),
    (["--target-cosine", "0.99", "--target-sqnr", "20"], "one tuning target"),
])
def test_cli_tuning_option_errors(example_models, args, message):
    ex = example_models["mlp"]
    r = CliRunner().invoke(cli, ["quantize", str(ex["model"]), "--calib", str(ex["calib"]), *args]
                           + (["--val", str(ex["val"])] if "one tuning" in message else []))
    assert r.exit_code == 2 and message in r.output


def test_cli_bad_max_fallback(example_models, tmp_path):
    ex = example_models["mlp"]
    r = CliRunner().invoke(cli, _args(ex, "--target-cosine", "0.99999", "--max-fallback", "many",
                                      "-o", str(tmp_path / "q.onnx")))
    assert r.exit_code == 2 and "--max-fallback" in r.output
