"""Recipe files: YAML read into THE schema (config.py), KEY=VALUE overrides applied first, and the shipped recipes.

`nlpkit finetune RECIPE key=value ...` applies the overrides to the parsed YAML *before* validation, so an override is
checked exactly like a key written in the file.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from nlpkit.config import Recipe, validate_recipe
from nlpkit.errors import NlpkitError


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply dotted KEY=VALUE overrides, validate everything, return the typed config."""
    path = Path(path)
    if not path.is_file():
        shipped = sorted(p.stem for p in recipes_dir().glob("*.yaml")) if recipes_dir().is_dir() else []
        hint = f"; shipped recipes: {', '.join(shipped)}" if shipped else ""
        raise NlpkitError(f"recipe {path}: no such file{hint}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise NlpkitError(f"recipe {path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise NlpkitError(f"recipe {path}: must be a mapping of sections (stage:, model:, data:, train:)")
    for override in overrides or []:
        apply_override(raw, override)
    return validate_recipe(raw, source=str(path))


def apply_override(raw: dict, override: str) -> None:
    """Set `a.b.c=value` in the raw recipe dict; the value is parsed as a YAML scalar (3e-5, true, null, [a, b])."""
    key, sep, text = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise NlpkitError(f"override {override!r}: expected KEY=VALUE with a dotted key, e.g. train.learning_rate=3e-5")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise NlpkitError(f"override {override!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def recipes_dir() -> Path:
    """The shipped recipes/ folder of a source checkout (installs with `pip install -e .` keep it)."""
    return Path(__file__).resolve().parents[2] / "recipes"


def shipped() -> dict[str, str]:
    """The shipped recipes: path (relative to the working directory where it can be) -> its first comment line."""
    folder, listed = recipes_dir(), {}
    for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        first = next((line for line in path.read_text().splitlines() if line.startswith("#")), "#")
        listed[str(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path)] = first[1:].strip()
    return listed
