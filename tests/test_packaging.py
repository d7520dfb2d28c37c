"""What an installed onnxfp8 must carry: the tests import the installed package, so these fail on a wheel that
leaves a data file out (the recipes once were)."""
from onnxfp8.cli import cli
from onnxfp8.recipes import builtin_recipes


def test_builtin_recipes_are_installed():
    names = set(builtin_recipes())
    assert {"fp8-bert", "nlp", "cv", "tensorrt"} <= names
    for info in builtin_recipes().values():
        assert info.summary, info.path  # the header line `onnxfp8 recipes` prints
        assert info.settings()  # parses


def test_recipes_command_lists_them(runner):
    res = runner.invoke(cli, ["recipes"])
    assert res.exit_code == 0, res.output
    listed = [line.split()[0] for line in res.output.splitlines() if line.strip()]
    assert {"fp8-bert", "nlp", "cv", "tensorrt"} <= set(listed)



def test_json_outputs_carry_versions(example_models, tmp_path, runner):
    """--plan, --report, --check-json, lint --json and --save-stats name the onnxfp8 and onnxruntime that made
    them, and are created with normal modes (0666 under the umask, not a temporary file's 0600)."""
    import json
    import os

    import onnxruntime

    import onnxfp8

    ex = example_models["mlp"]
    out = {k: tmp_path / f"{k}.json" for k in ("plan", "report", "check", "lint", "stats")}
    q = tmp_path / "q.onnx"
    r = runner.invoke(cli, ["quantize", str(ex["model"]), "--calib", str(ex["calib"]), "-o", str(q), "-q",
                            "--plan", str(out["plan"]), "--report", str(out["report"]), "--save-stats",
                            str(out["stats"]), "--check", "--val", str(ex["val"]), "--check-json", str(out["check"])])
    assert r.exit_code in (0, 1), r.stderr
    r = runner.invoke(cli, ["lint", str(q), "--json", str(out["lint"])])
    assert r.exit_code in (0, 1), r.stderr
    umask = os.umask(0)
    os.umask(umask)
    for name, path in out.items():
        sw = json.loads(path.read_text())["software"]
        assert sw["onnxfp8"] == onnxfp8.__version__ and sw["onnxruntime"] == onnxruntime.__version__, name
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask, name
