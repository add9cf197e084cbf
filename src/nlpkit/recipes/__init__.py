"""Recipe files: YAML read into THE schema (config.py), KEY=VALUE overrides applied first, and the shipped recipes.

The shipped recipes are the YAML files beside this module: package data, so a wheel install has them too.
`nlpkit finetune classify-sst2` (a bare name) finds one; `nlpkit recipes --copy NAME` writes one out to edit (as
torchtune's `tune cp`). In a source checkout, the top-level `recipes` is a symlink to this folder, so the paths the
docs used (`recipes/classify-sst2.yaml`) still work.

`nlpkit finetune RECIPE key=value ...` applies the overrides to the parsed YAML *before* validation, so an override is
checked exactly like a key written in the file.
"""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

import yaml

from nlpkit.config import Recipe, validate_recipe
from nlpkit.errors import NlpkitError


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply dotted KEY=VALUE overrides, validate everything, return the typed config."""
    path = find_recipe(path)
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
    """The shipped recipes: this package's folder (in a source checkout and in a wheel install alike)."""
    return Path(__file__).resolve().parent


def shipped() -> dict[str, str]:
    """The shipped recipes: name (what `nlpkit finetune NAME` takes) -> its first comment line."""
    listed = {}
    for path in sorted(recipes_dir().glob("*.yaml")):
        first = next((line for line in path.read_text().splitlines() if line.startswith("#")), "#")
        listed[path.stem] = first[1:].strip()
    return listed


def find_recipe(reference: str | Path) -> Path:
    """A recipe file: the path as given where it exists, else the shipped recipe of that name (`classify-sst2`)."""
    path = Path(reference).expanduser()
    if path.is_file():
        return path
    name = path.name.removesuffix(".yaml")
    if path.parent == Path(".") and (recipes_dir() / f"{name}.yaml").is_file():
        return recipes_dir() / f"{name}.yaml"
    raise NlpkitError(f"recipe {reference}: no such file, and no shipped recipe of that name; {_closest(name)} "
                      "(`nlpkit recipes` lists them)")


def copy_recipe(name: str, destination: Path | None = None) -> Path:
    """Write a shipped recipe out to edit: into DESTINATION (a folder, default the working directory) as NAME.yaml,
    or to DESTINATION itself where it ends in .yaml. Never overwrites."""
    name = name.removesuffix(".yaml")
    if name not in shipped():
        raise NlpkitError(f"recipes --copy {name}: not a shipped recipe; {_closest(name)}")
    destination = Path(destination or ".").expanduser()
    target = destination if destination.suffix in (".yaml", ".yml") else destination / f"{name}.yaml"
    if target.exists():
        raise NlpkitError(f"recipes --copy {name}: {target} already exists; remove it or name another folder or file")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(recipes_dir() / f"{name}.yaml", target)
    return target


def _closest(name: str) -> str:
    close = difflib.get_close_matches(name, list(shipped()), n=1)
    return f"did you mean {close[0]!r}?" if close else f"shipped recipes: {', '.join(shipped())}"
