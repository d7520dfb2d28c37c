"""check --layers says what it is at: check() reports its progress as text (outputs, then every chunk of layers
per batch), and the CLI draws it on stderr as one status line when stderr is a terminal, never with -q or into
a pipe."""
import onnxfp8
from onnxfp8.cli import cli


def _quantized(example_models, tmp_path, name="mlp"):
    ex = example_models[name]
    out = tmp_path / f"{name}.e4m3.onnx"
    onnxfp8.quantize(str(ex["model"]), str(ex["calib"]), output=str(out))
    return ex, out


def test_check_reports_outputs_then_each_layer_chunk(example_models, tmp_path):
    ex, quant = _quantized(example_models, tmp_path)
    seen = []
    # a small --max-memory splits the layers into several chunks, each a pass over the 32 samples
    rep = onnxfp8.check(str(ex["model"]), str(quant), str(ex["val"]), layers=True, batch_size=8, max_memory_mb=0.002,
                        progress=seen.append)
    assert rep.layer_passes > 1
    assert seen[0] == "outputs: creating the sessions"
    assert seen[1:5] == [f"outputs: {n}/32 sample(s)" for n in (8, 16, 24, 32)]
    chunks = [s for s in seen if s.startswith("layers: chunk ")]
    n = rep.layer_passes
    assert chunks[0].startswith(f"layers: chunk 1/{n} (") and chunks[0].endswith(" layer(s)), creating the sessions")
    assert chunks[-1].startswith(f"layers: chunk {n}/{n} (") and chunks[-1].endswith(", 32/32 sample(s)")
    assert sum(s.endswith("creating the sessions") for s in chunks) == n


def test_cli_draws_the_status_on_a_terminal_only(example_models, tmp_path, runner, monkeypatch):
    ex, quant = _quantized(example_models, tmp_path)
    args = ["check", str(ex["model"]), str(quant), "--data", str(ex["val"]), "--layers", "--max-memory", "1"]
    r = runner.invoke(cli, args)  # stderr is not a terminal here: no status at all
    assert r.exit_code in (0, 1), r.stderr  # the untrained CNN may fail the defaults: a verdict, not the point
    assert r.stderr == "" and "\r" not in r.stdout
    import onnxfp8.progress

    monkeypatch.setattr(onnxfp8.progress, "is_terminal", lambda stream: True)
    monkeypatch.setattr(onnxfp8.progress, "STATUS_INTERVAL", 0.0)  # every report drawn
    monkeypatch.delenv("TERM", raising=False)
    r = runner.invoke(cli, args)
    assert r.exit_code in (0, 1), r.stderr
    assert "\rchecking: outputs: 32/32 sample(s)  0:0" in r.stderr
    assert "\rchecking: layers: chunk 1/1 (3 layer(s)), creating the sessions  0:0" in r.stderr
    assert "\rchecking: layers: chunk 1/1 (3 layer(s)), 32/32 sample(s)  0:0" in r.stderr
    assert r.stderr.endswith("\r")  # cleared: the table follows on stdout
    assert "PASS" in r.stdout or "FAIL" in r.stdout
    q = runner.invoke(cli, args + ["-q"])
    assert q.stderr == "" or q.stderr.startswith("FAIL:")
    assert "\r" not in q.stderr
