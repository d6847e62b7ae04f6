"""The report reads files only (issue #12): its modules import digitlens modules at module top,
only from the floor (and each other), with no cycle among them. Checked with ``ast`` on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import digitlens
from test_layers import LAYERS

REPORT = Path(digitlens.__file__).parent / "report"

#: Floor modules the report may import: layer 0 of the package docstring's table (and the package itself).
FLOOR = {"digitlens"} | {f"digitlens.{name}" for name, layer in LAYERS.items() if layer == 0 and name}
#: Imports from above the floor that stay until their code moves down, each with the reason.
KNOWN_EXCEPTIONS = {
    "digitlens.comparison": "compare_predictions (McNemar, paired bootstrap) for --compare: pure computation, a floor "
                            "module in all but name",
    "digitlens.seeds": "is_group / summarise_group(evaluate=False): a seed group's folder and the summary of its "
                       "seed runs' metrics.json files (a stage module; the report evaluates nothing)",
}


def _imports(path: Path) -> tuple[list[str], list[tuple[int, str]]]:
    """(digitlens modules imported at module top, (line, module) of those imported inside a function or class)."""
    tree = ast.parse(path.read_text())
    top, nested = [], []

    def names(node) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # "from digitlens.report import readings" imports the module digitlens.report.readings
            return [f"{node.module}.{a.name}" if f"{node.module}.{a.name}".startswith("digitlens.report.")
                    and (REPORT / f"{a.name}.py").is_file() else node.module for a in node.names]
        return []

    for node in tree.body:
        top += names(node)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            for inner in ast.walk(node):
                nested += [(inner.lineno, n) for n in names(inner)]
    return [n for n in top if n.split(".")[0] == "digitlens"], [(line, n) for line, n in nested
                                                                  if n.split(".")[0] == "digitlens"]


def _report_modules(nested: bool = False) -> dict[str, list[str]]:
    """Module -> the digitlens modules it imports (at module top; with ``nested`` also inside functions)."""
    found = {}
    for p in sorted(REPORT.glob("*.py")):
        top, inner = _imports(p)
        found[f"digitlens.report.{p.stem}" if p.stem != "__init__" else "digitlens.report"] = \
            top + ([n for _, n in inner] if nested else [])
    return found


def test_report_imports_digitlens_modules_only_at_module_top():
    nested = {p.name: _imports(p)[1] for p in sorted(REPORT.glob("*.py"))}
    assert {name: found for name, found in nested.items() if found} == {}


def test_report_imports_only_the_floor_and_itself():
    upward = {(module, imported) for module, imports in _report_modules().items() for imported in imports
              if imported not in FLOOR and not imported.startswith("digitlens.report")
              and imported not in KNOWN_EXCEPTIONS}
    assert upward == set()
    # the exceptions are real (a stale entry would hide nothing, but mislead)
    used = {imported for imports in _report_modules().values() for imported in imports}
    assert set(KNOWN_EXCEPTIONS) <= used


def test_no_import_cycle_among_the_report_modules():
    graph = {m: {i for i in imports if i.startswith("digitlens.report")}
             for m, imports in _report_modules(nested=True).items()}
    # the package __init__ only re-exports; a module importing a sibling goes through it implicitly, not a cycle
    for module in graph:
        graph[module].discard("digitlens.report")
    seen: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        if seen.get(node) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path + [node]))
        if seen.get(node) == 2:
            return
        seen[node] = 1
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, path + [node])
        seen[node] = 2

    for module in sorted(graph):
        visit(module, [])
    assert graph["digitlens.report.build"].isdisjoint({"digitlens.report.group", "digitlens.report.write"})
