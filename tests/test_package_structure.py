"""The import graph of `finevit_vl`, read from the source with `ast`: no cycles between modules, nor between the
sub-packages and top-level modules (train, data, eval depend on the model package and the shared top-level modules,
never the reverse). Every import counts, also one inside a function: a cycle hidden by a lazy import is still one."""

import ast
from pathlib import Path

import finevit_vl


PACKAGE_DIR = Path(finevit_vl.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    """`{"finevit_vl.train.export": path}`, packages under their own name (`finevit_vl.train` -> its `__init__.py`)."""
    modules = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = ("finevit_vl", *path.relative_to(PACKAGE_DIR).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """`{module: modules of finevit_vl it imports}`; `from .pkg import name` is `pkg.name` when that is a module."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    module = alias.name
                    while module and module not in modules:  # `import finevit_vl.x.f` names a module and an attribute
                        module = module.rpartition(".")[0]
                    targets.add(module)
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = (base + (f".{node.module}" if node.module else "")) if node.level else (node.module or "")
                for alias in node.names:
                    targets.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source)
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def unit_of(module: str) -> str:
    """`finevit_vl.train.export` -> `finevit_vl.train`; a top-level module (`finevit_vl.model_card`) is its own unit."""
    return ".".join(module.split(".")[:2])


def unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    units: dict[str, set[str]] = {}
    for module, targets in graph.items():
        units.setdefault(unit_of(module), set()).update(unit_of(t) for t in targets if unit_of(t) != unit_of(module))
    return units


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as `[a, b, ..., a]`, or `None` (iterative depth-first search)."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path, children = [start], [iter(sorted(graph[start]))]
        while path:
            child = next(children[-1], None)
            if child is None:
                done.add(path.pop())
                children.pop()
            elif child in path:
                return path[path.index(child):] + [child]
            elif child not in done:
                path.append(child)
                children.append(iter(sorted(graph.get(child, ()))))
    return None


def test_cycle_finder_and_graph_see_what_they_must():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    graph = import_graph()
    # Known edges, top-level and inside a function, so an empty or partial graph cannot pass the tests below.
    assert "finevit_vl.model_card" in graph["finevit_vl.train.export"]
    assert "finevit_vl.train.checkpoint" in graph["finevit_vl.train.export"]  # imported inside export_checkpoint
    assert "finevit_vl.parameters" in graph["finevit_vl.train.freeze"]
    assert {"finevit_vl.models", "finevit_vl.registration"} <= graph["finevit_vl"]
    assert {"finevit_vl", "finevit_vl.model_card"} <= unit_graph(graph)["finevit_vl.train"]


def test_no_import_cycle_between_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_between_subpackages_and_top_level_modules():
    cycle = find_cycle(unit_graph(import_graph()))
    assert cycle is None, "import cycle between parts of finevit_vl: " + " -> ".join(cycle)
