"""One home per fact: no module imports another module's private name; the Q/DQ naming contract and the
TensorRT rules are defined once (onnxfp8/names.py, onnxfp8/tensorrt.py)."""
import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "onnxfp8"


def _sources():
    return sorted(p for p in PKG.rglob("*.py"))


def test_no_private_name_is_imported_across_modules():
    bad = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("onnxfp8"):
                bad += [f"{path.relative_to(PKG)}: {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad


def test_naming_contract_and_tensorrt_constants_have_one_home():
    literal = re.compile(r"""["'](\.dq|\.relu_q|__onnxfp8_size)["']|f["'][^"']*\}\.(dq|relu_q|scale|zero_point|quantized)["']""")
    hits = [f"{p.relative_to(PKG)}:{i}" for p in _sources() if p.name != "names.py"
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if literal.search(line)]
    assert not hits, hits
    trt = [f"{p.relative_to(PKG)}" for p in _sources() if p.name != "tensorrt.py"
           and re.search(r"^\s*\w*(CHANNEL_MULTIPLE|MAX_FP8_FILTER)\s*=", p.read_text(encoding="utf-8"), re.M)]
    assert not trt, trt
