"""Run every example of README.md as written, against the onnxfp8 on PATH / importable (CI: the installed wheel).

    python .ci/readme_examples.py README.md --work DIR

What runs, in README order, in DIR (outside the source tree):
* every line of every ```bash block (a command; `\\` continues a line), through bash as written, comments
  included. A `pip install ...` at the head of a `&&` chain is dropped (CI installed the wheel already); a line
  that is then only `python -m pytest` is CI's test step, not repeated here;
* the ```python block, with the names it leaves to the reader bound first (model_proto: cnn.onnx, batches:
  its images, my_calibration_data_reader over model.onnx's data, MyPass: a pass that does nothing; PREAMBLE);
* the ```yaml GitHub Actions job: each step's `run:` in a fresh folder of its own (its `pip install .` dropped).

The README's commands name files a reader has (model.onnx, data/, val/, labels.npy, bert.onnx, cnn.onnx...);
DIR is first filled with them from the bundled examples (FIXTURES): the transformer example as model.onnx and
bert.onnx, the digits CNN (trained, with BatchNorm) as cnn.onnx, the README's TOML block as my.toml. Every
command must exit 0, or the code its comment announces (`# expect exit 1: ...`, for an example that shows a
gate failing): a README example that does not run as written fails CI. Prints one line per command with
its exit code and time, and `N passed, N failed` at the end.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Tuple

# placeholder -> what it is made from (see make_fixtures)
FIXTURES = {
    "model.onnx / bert.onnx": "onnxfp8 example transformer (2 inputs, logits [N, 10], node names layer0/attn/...)",
    "data/ calib/": "the transformer's calibration data",
    "val/": "the transformer's validation data",
    "labels.npy": "the FP32 transformer's top-1 class on val/ (one label per sample, in file order)",
    "cnn.onnx": "onnxfp8 example digits (a BatchNorm CNN trained on scikit-learn's digits)",
    "images/ train/": "the digits calibration data",
    "my.toml": "the README's ```toml block",
}

PREAMBLE = '''
import glob
import numpy as np, onnx
from onnxfp8.pipeline import Pass, PassResult
model_proto = onnx.load("cnn.onnx")  # a single-input model (input "input"), as the block's list assumes
batches = [np.load(f)["input"] for f in sorted(glob.glob("images/*.npz"))[:64]]
class _Reader:  # an onnxruntime CalibrationDataReader over model.onnx's data: get_next() until None, rewind()
    def __init__(self):
        self.feeds, self.i = [dict(np.load(f)) for f in sorted(glob.glob("data/*.npz"))[:16]], 0
    def get_next(self):
        self.i += 1
        return self.feeds[self.i - 1] if self.i <= len(self.feeds) else None
    def rewind(self):
        self.i = 0
my_calibration_data_reader = _Reader()
class MyPass(Pass):
    name = "my_pass"
    def run(self, graph, ctx):
        return PassResult()
'''


def blocks(readme: str) -> List[Tuple[str, str]]:
    """(info string, body) of every fenced block."""
    return [(m.group(1).strip(), m.group(2)) for m in re.finditer(r"^```([^\n]*)\n(.*?)^```", readme, re.M | re.S)]


def commands(body: str) -> List[str]:
    out, cur = [], ""
    for line in body.splitlines():
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        cur += line
        if cur.strip():
            out.append(cur.strip())
        cur = ""
    return out


def without_install(cmd: str) -> str:
    """Drop `pip install ... &&` heads (the wheel is installed); '' when nothing is left to run."""
    parts = [p.strip() for p in cmd.split("&&")]
    while parts and re.match(r"^(python -m )?pip install\b", parts[0]):
        parts.pop(0)
    return " && ".join(parts)


def yaml_runs(body: str) -> List[str]:
    """The `run:` commands of a GitHub Actions job (`run: x`, `run: |` literal lines, `run: >` folded)."""
    lines = body.splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^(\s*)(?:- )?run:\s*(.*)$", lines[i])
        if not m:
            i += 1
            continue
        indent, rest = len(m.group(1)), m.group(2)
        rest = re.sub(r"\s+#.*$", "", rest)
        if rest in ("|", ">"):
            body_lines = []
            i += 1
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                if lines[i].strip():
                    body_lines.append(lines[i].strip())
                i += 1
            out.extend(body_lines if rest == "|" else [" ".join(body_lines)])
            continue
        out.append(rest)
        i += 1
    return out


def run(cmd: str, cwd: Path, results: list, shown: str = "") -> None:
    t = time.perf_counter()
    p = subprocess.run(["bash", "-c", cmd], cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    took = time.perf_counter() - t
    m = re.search(r"#\s*expect exit (\d+)", cmd)
    ok = p.returncode == (int(m.group(1)) if m else 0)
    results.append(ok)
    print(f"{'ok  ' if ok else 'FAIL'} exit {p.returncode} {took:6.1f} s  {shown or cmd}", flush=True)
    if not ok:
        for stream in (p.stdout, p.stderr):
            tail = stream.strip().splitlines()[-15:]
            if tail:
                print("      | " + "\n      | ".join(tail), flush=True)


def make_fixtures(work: Path, toml: str) -> None:
    import numpy as np
    import onnxruntime as ort

    subprocess.run(["onnxfp8", "example", "transformer", "digits", "--out", "fixtures", "-q"], cwd=work, check=True)
    fx = work / "fixtures"
    shutil.copy(fx / "transformer.onnx", work / "model.onnx")
    shutil.copy(fx / "transformer.onnx", work / "bert.onnx")
    shutil.copy(fx / "digits.onnx", work / "cnn.onnx")
    for name, src in (("data", "transformer/calib"), ("calib", "transformer/calib"), ("val", "transformer/val"),
                      ("images", "digits/calib"), ("train", "digits/calib")):
        shutil.copytree(fx / "data" / src, work / name)
    sess = ort.InferenceSession(str(work / "model.onnx"), providers=["CPUExecutionProvider"])
    labels = []
    for f in sorted((work / "val").glob("*.npz")):
        feed = dict(np.load(f))
        labels.extend(np.argmax(sess.run(None, feed)[0], axis=-1).reshape(-1).tolist())
    np.save(work / "labels.npy", np.asarray(labels, dtype=np.int64))
    (work / "my.toml").write_text(toml)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("readme")
    ap.add_argument("--work", required=True, help="an empty folder to run in (created)")
    args = ap.parse_args(argv)
    text = Path(args.readme).read_text(encoding="utf-8")
    work = Path(args.work).resolve()
    if work.exists() and any(work.iterdir()):
        print(f"error: {work} is not empty", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    found = blocks(text)
    tomls = [b for info, b in found if info == "toml"]
    make_fixtures(work, tomls[0] if tomls else "")
    print(f"fixtures in {work}: " + "; ".join(f"{k}: {v}" for k, v in FIXTURES.items()), flush=True)
    results: list = []
    skipped = []
    for info, body in found:
        if info == "bash":
            for cmd in commands(body):
                todo = without_install(cmd)
                if not todo:
                    skipped.append(cmd)
                elif re.match(r"^python -m pytest\b", todo):
                    skipped.append(f"{cmd}  (CI's step 'tests against the installed wheel' runs it)")
                else:
                    run(todo, work, results, shown=cmd)
        elif info == "python":
            script = work / "readme_python.py"
            script.write_text(PREAMBLE + "\n# --- the README's block, as written\n" + body)
            run(f"{sys.executable} readme_python.py", work, results, shown="the README's python block")
        elif info == "yaml":
            job = work / "gha"
            job.mkdir()
            for cmd in yaml_runs(body):
                todo = without_install(cmd)
                if todo:
                    run(todo, job, results, shown=f"[yaml job] {cmd}")
                else:
                    skipped.append(f"[yaml job] {cmd}")
    for s in skipped:
        print(f"skip              {s}")
    failed = results.count(False)
    print(f"{results.count(True)} passed, {failed} failed")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
