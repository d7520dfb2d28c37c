"""Built-in recipes: TOML files of QuantConfig settings, each with a comment header saying where it comes from.

``--recipe NAME`` (``fp8-bert``, ``nlp``, ``cv``, ``tensorrt``) loads ``onnxfp8/recipes/NAME.toml``;
``--recipe FILE.toml`` or ``FILE.json`` loads that file. A recipe holds any QuantConfig key (what the CLI flags
can say, plus ``overrides``: per-tensor ``[overrides."tensor"]`` tables of format / scale / axis / amax);
unknown keys are rejected by name (QuantConfig.from_dict). Flags given on the command line win over the recipe.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List

from onnxfp8.errors import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class RecipeInfo:
    name: str
    path: str
    summary: str  # the first header line
    header: str  # the whole comment header

    def settings(self) -> Dict[str, Any]:
        from onnxfp8.config import load_recipe_file

        return load_recipe_file(self.path)


def _header(path: str) -> List[str]:
    lines = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("#"):
                break
            lines.append(line[1:].strip())
    return lines


def builtin_recipes() -> Dict[str, RecipeInfo]:
    """name -> RecipeInfo for every ``*.toml`` in this package, sorted by name."""
    out = {}
    for fn in sorted(os.listdir(HERE)):
        if fn.endswith(".toml"):
            path = os.path.join(HERE, fn)
            head = _header(path)
            summary = head[0].split(":", 1)[-1].strip() if head else ""
            out[fn[:-5]] = RecipeInfo(fn[:-5], path, summary, "\n".join(head))
    return out


def resolve_recipe(recipe: str) -> str:
    """The file of a recipe given by built-in name or by path (a one-line ConfigError otherwise)."""
    if recipe.endswith((".toml", ".json")) or os.sep in recipe or os.path.isfile(recipe):
        if not os.path.isfile(recipe):
            raise ConfigError(f"{recipe}: recipe file not found")
        return recipe
    known = builtin_recipes()
    if recipe not in known:
        raise ConfigError(f"unknown recipe '{recipe}': give a .toml/.json file or one of {', '.join(known)}")
    return known[recipe].path


def load_recipe(recipe: str) -> Dict[str, Any]:
    """The settings of a recipe (built-in name or file) as a dict of QuantConfig keys."""
    from onnxfp8.config import check_overrides, load_recipe_file

    path = resolve_recipe(recipe)
    data = load_recipe_file(path)
    check_overrides(data.get("overrides", {}), source=path)  # a typo in an override table names the file
    return data


def recipe_config(recipe: str, **changes: Any):
    """A QuantConfig from a recipe, with ``changes`` on top; unknown keys are rejected naming the recipe file."""
    from onnxfp8.config import QuantConfig

    path = resolve_recipe(recipe)
    data = load_recipe(path)
    data.update(changes)
    return QuantConfig.from_dict(data, source=path)
