"""Build the model zoo (real architectures exported in code, seeded weights, nothing downloaded).

    python benchmarks/zoo.py list [--smoke] [--only a,b]          # name, family, tags, description
    python benchmarks/zoo.py build --out zoo/ [--only a,b] [--smoke] [--seed 0] [--force]

``build`` writes ``<out>/<name>/model.onnx``, ``calib/*.npz``, ``val/*.npz`` (and ``val_labels.npy`` where the
model has labels) for every selected model, skipping those already built with the same seed from the same
builder source (``<out>/<name>/build.json`` records both). Each model is built into a temporary folder beside
its target and renamed into place when complete, so a failed or interrupted build leaves no partial model.
A failing model is reported on stderr with its reason and the others are still built; the exit code is 1
then. Needs ``pip install .[zoo]`` (torch, transformers, scikit-learn, scikit-image).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional, Sequence

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from zoo_models import ZooModel, all_models  # noqa: E402


def select(only: Optional[str] = None, smoke: bool = False) -> List[ZooModel]:
    """The zoo models named in ``only`` (comma-separated, in zoo order) and/or tagged ``smoke``. An unknown
    name is a ValueError naming it and the known ones."""
    models = all_models()
    if only:
        names = [n.strip() for n in only.split(",") if n.strip()]
        known = {m.name for m in models}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown zoo model(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        models = [m for m in models if m.name in names]
    if smoke:
        models = [m for m in models if "smoke" in m.tags]
    return models


def source_digest(model: ZooModel) -> str:
    """A digest of the code that builds ``model``: its family module, the shared helpers and the registry."""
    h = hashlib.sha256()
    files = [HERE / "zoo_models" / f"{model.family}.py", HERE / "zoo_models" / "common.py",
             HERE / "zoo_models" / "__init__.py"]
    for f in files:
        if f.exists():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _stamp(model: ZooModel, seed: int) -> dict:
    return {"name": model.name, "family": model.family, "seed": seed, "source": source_digest(model)}


def up_to_date(model: ZooModel, folder: Path, seed: int) -> bool:
    try:
        got = json.loads((folder / "build.json").read_text())
    except (OSError, ValueError):
        return False
    want = _stamp(model, seed)
    return all(got.get(k) == v for k, v in want.items()) and (folder / "model.onnx").exists()


def build_one(model: ZooModel, out: Path, seed: int, force: bool = False) -> str:
    """Build ``model`` into ``out/<name>``; returns "built" or "up to date"."""
    folder = out / model.name
    if not force and up_to_date(model, folder, seed):
        return "up to date"
    tmp = out / f".{model.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        start = time.perf_counter()
        model.build(tmp, seed)
        if not (tmp / "model.onnx").exists():
            raise RuntimeError("the builder wrote no model.onnx")
        stamp = _stamp(model, seed)
        stamp["seconds"] = round(time.perf_counter() - start, 2)
        (tmp / "build.json").write_text(json.dumps(stamp, indent=1) + "\n")
        old = out / f".{model.name}.old-{os.getpid()}"
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return "built"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="zoo.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("list", "build"):
        p = sub.add_parser(name)
        p.add_argument("--only", help="comma-separated model names")
        p.add_argument("--smoke", action="store_true", help="only the models tagged smoke (CI's subset)")
        if name == "build":
            p.add_argument("--out", default="zoo", help="output folder (default zoo/)")
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--force", action="store_true", help="rebuild models that are up to date")
    args = ap.parse_args(argv)
    try:
        models = select(args.only, args.smoke)
    except ValueError as e:
        print(f"zoo.py: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"zoo.py: {e} (install the zoo extra: pip install '.[zoo]')", file=sys.stderr)
        return 2
    if args.cmd == "list":
        w = max([len(m.name) for m in models] + [4])
        for m in models:
            print(f"{m.name:<{w}}  {m.family:<11}  {','.join(sorted(m.tags)):<32}  {m.description}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for m in models:
        start = time.perf_counter()
        try:
            what = build_one(m, out, args.seed, args.force)
        except Exception as e:  # a failing builder is reported, the others still build
            failed += 1
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            print(f"{m.name}: FAILED ({type(e).__name__}: {msg})", file=sys.stderr)
            if os.environ.get("ZOO_TRACEBACK"):
                traceback.print_exc()
            continue
        print(f"{m.name}: {what} ({time.perf_counter() - start:.1f} s) -> {out / m.name}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
