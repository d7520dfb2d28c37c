"""Shared fixtures: the example models and their data, built once per test session into a temporary folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import onnxfp8

# The tests import onnxfp8 as installed (``pip install .`` or a wheel): nothing here puts the source tree on
# sys.path, so a file the wheel leaves out (a recipe, the example data) fails a test. Run from the source root,
# ``python -m pytest`` imports the tree itself (Python puts the working directory first); CI copies tests/
# elsewhere and sets ONNXFP8_TEST_INSTALLED=1, which refuses to run against a source tree.


def pytest_report_header(config):
    return f"onnxfp8 {getattr(onnxfp8, '__version__', '?')} from {os.path.dirname(onnxfp8.__file__)}"


def pytest_configure(config):
    if os.environ.get("ONNXFP8_TEST_INSTALLED") == "1":
        where = Path(onnxfp8.__file__).resolve().parent
        if "site-packages" not in where.parts and "dist-packages" not in where.parts:
            raise pytest.UsageError(f"ONNXFP8_TEST_INSTALLED=1 but onnxfp8 is imported from {where}, "
                                    "not from an installed package")


EXAMPLE_NAMES = ("cnn", "mlp", "transformer")


@pytest.fixture(scope="session")
def example_models(tmp_path_factory):
    """``{name: {"model": Path, "calib": Path (dir), "val": Path (dir), ...}}`` for cnn, mlp, transformer,
    with 32 calibration and 32 validation samples each (one sample per .npz file)."""
    from onnxfp8.examples.build import build_all

    out = tmp_path_factory.mktemp("examples")
    return build_all(out_dir=out, calib=32, val=32)


@pytest.fixture(scope="session")
def load_feeds():
    """``load_feeds(folder, n=None)``: the .npz files of a data folder stacked into one batch per input."""
    import numpy as np

    def load(folder, n=None):
        files = sorted(Path(folder).glob("*.npz"))[:n]
        parts = [dict(np.load(f)) for f in files]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    return load


@pytest.fixture(scope="session")
def run_passes():
    """``run_passes(model, names, config=None, calib=None)``: prepare ``model`` (a ModelProto) like quantize()
    does and run the standard pipeline's passes named in ``names`` (in pipeline order). Returns
    ``(graph, ctx, results)`` with ``results[name]`` the PassResult of each pass."""
    from onnxfp8.calibrators.data import as_data
    from onnxfp8.config import QuantConfig
    from onnxfp8.modelio import prepare_model, to_graph
    from onnxfp8.passes import standard_pipeline
    from onnxfp8.pipeline import PassContext

    def run(model, names, config=None, calib=None):
        config = config or QuantConfig()
        proto = prepare_model(model, opset=config.opset)
        graph = to_graph(proto)
        ctx = PassContext(config=config, source="test.onnx")
        if calib is not None:
            ctx.calib = as_data(calib, proto, batch_size=config.batch_size, limit=config.calib_samples)
        results = {}
        for p in standard_pipeline(config).passes:
            if p.name in names:
                p.requires(graph, ctx)
                results[p.name] = p.run(graph, ctx)
                p.ensures(graph, ctx)
        return graph, ctx, results

    return run


@pytest.fixture(scope="session")
def ort_run():
    """``ort_run(model, feeds, level="disable")``: run a ModelProto in onnxruntime (CPU) at an optimization
    level (through onnxfp8.modelio.make_session); returns the list of outputs."""
    from onnxfp8.modelio import make_session

    def run(model, feeds, level="disable"):
        return make_session(model, level=level).run(None, feeds)

    return run


@pytest.fixture()
def runner():
    """A click CliRunner that keeps stderr apart from stdout (errors go to stderr)."""
    from click.testing import CliRunner

    try:
        return CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 keeps stderr apart by default
        return CliRunner()
