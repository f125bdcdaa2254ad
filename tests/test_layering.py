"""The layering ARCHITECTURE.md states, enforced: CLI > runner > API > kernels, leaf modules below all of
them. A module imports only from its own layer or the layers below; only the API reaches the kernels;
a leaf imports nothing but other leaves. Within the runner, the recipes (run, compare, the Trainer
integration) are not imported by the steps they use, nor by one another. The walk reads every import
of depthfast/**/*.py with ast, at the top of a module and inside functions alike; the package's
top-level imports form no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "depthfast"

LAYERS = ("leaf", "kernels", "API", "runner", "CLI")  # bottom to top
# Longest matching prefix wins (a module "a.b" matches prefix "a.b" and "a").
LAYER_OF = {
    # leaf: imported from every layer, importing no depthfast module but other leaves
    "depthfast": "leaf",  # the package itself: __version__, the source-checkout kernels finder
    "depthfast.errors": "leaf", "depthfast.constants": "leaf", "depthfast.artifacts": "leaf",
    "depthfast.terminal": "leaf",
    # kernels: the compiled extension and the Triton kernels
    "depthfast._C": "kernels", "depthfast._ext": "kernels", "depthfast.kernels": "kernels",
    # API: estimators, the control, layer discovery, pure metrics, and the host side of each kernel
    "depthfast.cka": "API", "depthfast.cka_change": "API", "depthfast.all_pairs": "API", "depthfast.optim": "API",
    "depthfast.layers": "API", "depthfast.metrics": "API", "depthfast.distributed": "API",
    # CLI: the command and the subcommands that drive runs (sweep) or read them (report)
    "depthfast.cli": "CLI", "depthfast.__main__": "CLI", "depthfast.compare.__main__": "CLI",
    "depthfast.sweep": "CLI", "depthfast.report": "CLI",
}
RUNNER = ("depthfast.run", "depthfast.run_metrics", "depthfast.config", "depthfast.compare", "depthfast.integrations",
          "depthfast.models", "depthfast.registry", "depthfast.hub", "depthfast.data", "depthfast.batches",
          "depthfast.train", "depthfast.probe", "depthfast.results", "depthfast.plotting",
          "depthfast.objective_distance", "depthfast.memory", "depthfast.checkpoint", "depthfast.lora",
          "depthfast.adapters", "depthfast.rundir", "depthfast.measure")
LAYER_OF.update({name: "runner" for name in RUNNER})
# The runner's recipes: each puts the steps together; no step imports one, nor does one recipe another.
RECIPES = ("depthfast.run", "depthfast.compare", "depthfast.integrations")


def _match(module: str, table) -> str | None:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in table:
            return prefix
    return None


def layer_of(module: str) -> str:
    key = _match(module, LAYER_OF)
    if key is None:
        raise KeyError(f"{module} has no layer: add it to tests/test_layering.py's LAYER_OF (and ARCHITECTURE.md)")
    return LAYER_OF[key]


def recipe_of(module: str) -> str | None:
    return _match(module, RECIPES)


def wrong_way(edges) -> list[str]:
    """One line per import that goes against the layering, for edges (importer, imported) of depthfast
    modules: "depthfast.X → depthfast.Y: runner imports CLI"."""
    problems = []
    for src, dst in sorted(set(edges)):
        a, b = layer_of(src), layer_of(dst)
        rank_a, rank_b = LAYERS.index(a), LAYERS.index(b)
        why = None
        if b == "leaf":
            pass
        elif a == "leaf":
            why = f"a leaf imports {b}"
        elif rank_b > rank_a:
            why = f"{a} imports {b}"
        elif b == "kernels" and a != "kernels" and a != "API":
            why = f"{a} imports a kernel (only the API reaches the kernels)"
        elif a == b == "runner":
            ra, rb = recipe_of(src), recipe_of(dst)
            if rb is not None and ra != rb:
                why = f"{'recipe ' + ra if ra else 'a step of the runner'} imports the recipe {rb}"
        if why:
            problems.append(f"{src} → {dst}: {why}")
    return problems


def cycles(edges) -> list[list[str]]:
    """The import cycles among ``edges`` (importer, imported): one list of modules per strongly connected
    component of more than one module (or a module importing itself)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):  # Tarjan, recursive: the package has ~80 modules
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(root: Path = PACKAGE) -> list[tuple[str, str, bool]]:
    """(importer, imported, at top level) for every import of a depthfast module under ``root``.
    ``from depthfast.x import y`` counts as an import of depthfast.x.y when that is a module."""
    modules = {module_name(p, root) for p in root.rglob("*.py")} | {"depthfast._C"}
    found = []
    for path in sorted(root.rglob("*.py")):
        src = module_name(path, root)
        tree = ast.parse(path.read_text(), filename=str(path))
        top = {id(node) for node in tree.body}
        for node in tree.body:  # an `if __name__ == "__main__":` block's imports run at import of __main__
            if isinstance(node, ast.If):
                top.update(id(n) for n in node.body)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = src.split(".") if path.name == "__init__.py" else src.split(".")[:-1]
                    package = package[:len(package) - node.level + 1]
                    base = ".".join(package + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                if target == "depthfast" or target.startswith("depthfast."):
                    found.append((src, target, id(node) in top))
    return found


def test_imports_follow_the_layering():
    edges = [(a, b) for a, b, _ in imports() if a != b]
    assert len(edges) > 100  # the walk found the package's imports
    problems = wrong_way(edges)
    assert not problems, "imports against ARCHITECTURE.md's layering:\n" + "\n".join(problems)


def test_no_import_cycle():
    edges = [(a, b) for a, b, top in imports() if top and a != b and b != "depthfast"]
    # a package's __init__ importing its own submodules is no cycle with them
    edges = [(a, b) for a, b in edges if not b.startswith(a + ".")]
    found = cycles(edges)
    assert not found, "import cycles among top-level imports: " + "; ".join(" ↔ ".join(c) for c in found)


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path, PACKAGE))


@pytest.mark.parametrize("edge, says", [
    (("depthfast.train", "depthfast.run"), "depthfast.train → depthfast.run: a step of the runner imports the recipe depthfast.run"),
    (("depthfast.compare.results", "depthfast.run"), "depthfast.compare.results → depthfast.run: recipe depthfast.compare imports the recipe depthfast.run"),
    (("depthfast.run", "depthfast.cli"), "depthfast.run → depthfast.cli: runner imports CLI"),
    (("depthfast.layers", "depthfast.config"), "depthfast.layers → depthfast.config: API imports runner"),
    (("depthfast.memory", "depthfast._ext"), "depthfast.memory → depthfast._ext: runner imports a kernel"),
    (("depthfast.artifacts", "depthfast.rundir"), "depthfast.artifacts → depthfast.rundir: a leaf imports runner"),
])
def test_a_planted_wrong_way_edge_is_named(edge, says):
    edges = [(a, b) for a, b, _ in imports() if a != b]
    problems = wrong_way(edges + [edge])
    assert any(p.startswith(says) for p in problems), problems
    assert wrong_way([("depthfast.run", "depthfast.train"), ("depthfast.cli", "depthfast.run"),
                      ("depthfast.cka.engine", "depthfast._ext"), ("depthfast.probe", "depthfast.errors")]) == []


def test_a_planted_import_in_a_copy_of_the_package_fails_the_walk(tmp_path):
    """The walk itself (not only the checker) sees an import inside a function and a relative one."""
    root = tmp_path / "depthfast"
    for path in PACKAGE.rglob("*.py"):
        dest = root / path.relative_to(PACKAGE)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(path.read_text())
    layers = root / "layers.py"
    layers.write_text(layers.read_text() + "\n\ndef _planted():\n    from depthfast.run import run\n")
    (root / "cka" / "stats.py").write_text((root / "cka" / "stats.py").read_text() + "\nfrom ..compare import config\n")
    problems = wrong_way([(a, b) for a, b, _ in imports(root) if a != b])
    assert "depthfast.layers → depthfast.run: API imports runner" in problems
    assert "depthfast.cka.stats → depthfast.compare.config: API imports runner" in problems
    edges = [(a, b) for a, b, top in imports(root) if top]
    assert ("depthfast.cka.stats", "depthfast.compare.config") in edges


def test_a_planted_cycle_is_found():
    assert cycles([("depthfast.results", "depthfast.plotting"), ("depthfast.plotting", "depthfast.results"),
                   ("depthfast.run", "depthfast.results")]) == [["depthfast.plotting", "depthfast.results"]]
    assert cycles([("a", "b"), ("b", "c")]) == []


def test_the_architecture_names_every_top_level_module():
    text = (PACKAGE.parent / "ARCHITECTURE.md").read_text()
    for path in PACKAGE.glob("*.py"):
        if path.name not in ("__init__.py", "_ext.py"):
            assert f"`{path.name}`" in text or f"{path.name}," in text or f" {path.name}" in text, path.name


MAX_FUNCTION_LINES = 80  # issue 20: orchestration reads as short recipes; a longer function is split


def long_functions(root: str, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Every function or method under ``root`` longer than ``limit`` lines (decorators excluded), as
    'path:line name (n lines)'."""
    found = []
    for path in sorted(Path(root).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{path}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_over_80_lines():
    assert long_functions(str(PACKAGE)) == []


def test_long_function_check_catches_a_planted_one(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "m.py").write_text(f"def short():\n    return 1\n\n\ndef planted():\n{body}\n")
    assert [f.split()[-3] for f in long_functions(str(tmp_path))] == ["planted"]
