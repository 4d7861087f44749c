"""The layout rules of DESIGN.md and issue 20: the library's imports form no cycle (late
imports inside functions count), it never imports the configs or data_prep, and data_prep
only depends on it one way."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _imports(package: str) -> dict[str, set[str]]:
    """Module -> the modules it imports anywhere in its source (functions included), with the
    packages whose ``__init__`` such an import runs. ``from a.b import c`` imports ``a.b.c`` when
    that is a module, else ``a.b``."""
    paths = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in sorted((ROOT / package).rglob("*.py"))}
    graph = {}
    for module, path in paths.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in paths else node.module
                          for a in node.names}
        parents = {name.rsplit(".", k)[0] for name in found for k in range(1, name.count(".") + 1)}
        graph[module] = found | parents
    return graph


def _project(graph, name):
    return {m for m in graph[name] if m in graph}


def test_the_library_imports_neither_configs_nor_data_prep():
    graph = _imports("labram_jax")
    for module, imported in graph.items():
        bad = {m for m in imported if m.split(".")[0] in ("configs", "labram_jax_configs", "data_prep", "benchmarks")}
        assert not bad, (module, bad)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of imports among the graph's modules, or None. A module reaching its own package
    (``from labram_jax.tasks import stage`` in a task) is not one: the package runs first."""
    state: dict[str, int] = {}

    def visit(module, stack):
        state[module] = 1
        for child in sorted(_project(graph, module)):
            if child == module or module.startswith(child + ".") or state.get(child) == 2:
                continue  # a module's own packages are being imported already when it runs
            if state.get(child) == 1:
                return stack + [child]
            found = visit(child, stack + [child])
            if found:
                return found
        state[module] = 2
        return None

    for module in graph:
        if module not in state:
            found = visit(module, [module])
            if found:
                return found
    return None


def test_the_cycle_finder_finds_one():
    graph = {"p.train": {"p.evaluate"}, "p.evaluate": {"p.steps", "p.train"}, "p.steps": set(),
             "p.tasks": set(), "p.tasks.a": {"p.tasks"}}
    assert find_cycle(graph) == ["p.train", "p.evaluate", "p.train"]
    graph["p.evaluate"] = {"p.steps"}
    assert find_cycle(graph) is None
    graph["p.tasks"] = {"p.tasks.b"}  # a package __init__ importing a module that imports back
    graph["p.tasks.b"] = {"p.steps"}
    graph["p.steps"] = {"p.tasks.a", "p.tasks"}
    assert find_cycle(graph)[-4:] == ["p.steps", "p.tasks", "p.tasks.b", "p.steps"]


def test_no_import_cycle_in_the_library():
    cycle = find_cycle(_imports("labram_jax"))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_data_prep_depends_on_the_library_only_one_way():
    graph = _imports("data_prep")
    assert any(m.startswith("labram_jax") for imported in graph.values() for m in imported)
    library = _imports("labram_jax")
    assert not any(m.startswith("data_prep") for imported in library.values() for m in imported)
