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

