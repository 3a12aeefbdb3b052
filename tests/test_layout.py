"""The code's layout: no import cycles (function-local imports included), no pipeline reaching into another's
private names, no source file over 500 lines."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"rayalign": "rayalign", "actors": "rayalign.actors", "pipelines": "rayalign.pipelines",
            "cluster": "rayalign.cluster"}


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(REPO / folder).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every absolute import in the file, wherever it stands."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {}
    for name, path in mods.items():
        targets = {t for module, names in imports(path) for t in [module, *(f"{module}.{n}" for n in names)]}
        graph[name] = {t for t in targets if t in mods and t != name and not name.startswith(t + ".")}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or None (depth-first search for an edge back into the current path)."""
    done, path = set(), []

    def visit(node):
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for nxt in sorted(graph[node]):
            if found := visit(nxt):
                return found
        path.pop()
        done.add(node)
        return None

    return next((found for node in sorted(graph) if (found := visit(node))), None)


def test_the_cycle_finder_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_function_local_imports_included():
    assert cycle(import_graph()) is None


def test_no_pipeline_imports_another_pipelines_private_names():
    for name, path in modules().items():
        if name.startswith("rayalign.pipelines."):
            private = [(m, n) for m, names in imports(path) if m.startswith("rayalign.pipelines.") and m != name
                       for n in names if n.startswith("_")]
            assert not private, f"{path.name} imports {private}"


def test_no_source_file_is_over_500_lines():
    long = {str(p.relative_to(REPO)): n for p in modules().values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert not long
