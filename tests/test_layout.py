"""The shape of the package, as docs/architecture.md describes it: layers, no import loop, commands that use a
finished run never import training code, and no module large enough to hide a concept without a home."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "nlpkit"

# Lowest first. A module may import from its own layer or below, never from above (docs/architecture.md).
LAYERS = [
    ["errors", "ppo.core", "rewards"],
    ["config", "distributed", "models", "recipes", "data", "data.sources", "data.formats", "data.preference"],
    ["runs"],
    ["report"],
    ["adapters", "training"],
    ["scoring", "ppo", "ppo.rollout", "ppo.update", "ppo.checkpoint"],
    ["evaluate", "data.check", "embed", "chat", "batching", "plan", "sample", "heldout"],
    ["stages", "stages.classify", "stages.sft", "stages.reward", "stages.ppo", "stages.grpo", "stages.dpo", "quantize",
     "serve", "export"],
    ["cli.common"],
    ["cli.train", "cli.use"],
    ["cli", "__main__"],
]
LAYER = {name: level for level, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(tree: ast.AST, known: set[str]) -> set[str]:
    """nlpkit modules imported anywhere in the tree, inside functions too (lazy imports are arrows all the same)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nlpkit"):
            base = node.module.removeprefix("nlpkit").lstrip(".")
            found |= {t for t in [base] + [f"{base}.{a.name}".lstrip(".") for a in node.names] if t in known}
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("nlpkit.") for a in node.names if a.name.removeprefix("nlpkit.") in known}
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in SRC.rglob("*.py") if module_name(p)}
    return {name: imports(ast.parse(path.read_text()), set(files)) - {name} for name, path in files.items()}


def test_every_module_has_a_layer_and_imports_only_its_own_layer_or_below():
    edges = graph()
    assert set(edges) == set(LAYER), "place new modules in LAYERS (and docs/architecture.md)"
    upward = [f"{a} -> {b}" for a, targets in edges.items() for b in targets if LAYER[b] > LAYER[a]]
    assert upward == []


def test_no_import_loop():
    edges, done, path = graph(), set(), []

    def visit(name):
        if name in path:
            pytest.fail("import loop: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        path.append(name)
        for target in sorted(edges[name]):
            visit(target)
        path.pop()
        done.add(name)

    for name in sorted(edges):
        visit(name)


def reachable(start: set[str], edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += edges.get(name, ())
    return seen


@pytest.mark.parametrize("command", ["eval_", "sample", "chat", "serve", "quantize", "merge", "embed", "export"])
def test_commands_on_a_finished_run_never_import_training_stages(command):
    """eval, sample, chat, serve, quantize, merge, export (and embed) load runs through runs.py; nothing they reach,
    directly or through the modules they import, is under stages/."""
    edges = graph()
    cli = ast.parse((SRC / "cli" / "use.py").read_text())
    body = next(node for node in cli.body if isinstance(node, ast.FunctionDef) and node.name == command)
    direct = imports(body, set(edges))
    assert direct, f"cli.use.{command} imports no nlpkit module: has it moved?"
    assert not [name for name in reachable(direct, edges) if name.startswith("stages")]


def test_no_source_file_over_400_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}
