"""The import graph of ``src/digitlens``, read with ``ast`` (no third-party tool): no cycles, no
upward import across the layers of the package docstring (``src/digitlens/__init__.py``), no
function-local imports of digitlens modules.

Every ``import`` statement counts, at module level and inside functions; ``from . import x`` is
resolved against the importing module; ``from digitlens.plots import x`` imports the package
``digitlens.plots`` and, when ``x`` is a submodule, ``digitlens.plots.x`` as well.

:data:`KNOWN_VIOLATIONS` lists imports that are still wrong in files owned by other branches of
issue #12 (each is being fixed there); the lead empties it after merging. A listed pair that no
longer exists fails :func:`test_known_violations_are_still_real`, so the list cannot go stale.
"""

from __future__ import annotations

import ast
import functools
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "digitlens"

LAYER_LINE = re.compile(r"^(\d+) [\w ]+: (.+)$")


def layers_from_docstring(init_file: Path) -> dict[str, int]:
    """The layer table of a package docstring: lines ``N name: module module ...`` (module names
    relative to the package; a package entry such as ``plots`` covers its submodules unless one is
    named itself, like ``explain.maps``) -> {module: N}; the package itself is layer 0."""
    doc = ast.get_docstring(ast.parse(init_file.read_text(encoding="utf-8"))) or ""
    layers = {"": 0}
    for line in doc.splitlines():
        match = LAYER_LINE.match(line)
        if match:
            for module in match.group(2).split():
                assert module not in layers, f"{module} is in two layers of the package docstring"
                layers[module] = int(match.group(1))
    return layers


#: The layers, lowest first, as the package docstring states them (the one place they are written):
#: a module may import its own layer or a lower one.
LAYERS: dict[str, int] = layers_from_docstring(SRC / PACKAGE / "__init__.py")

#: (importer, imported) pairs still wrong in files this branch does not own; see the module docstring.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    local: bool  # inside a function or class body


def module_names(src: Path, package: str) -> dict[str, Path]:
    """Every module of ``package`` under ``src``: dotted name -> file (a package is its __init__.py)."""
    names = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _resolve_from(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module name of ``from <node.module> import ...`` written in ``importer``."""
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, known: set[str], package: str) -> list[Import]:
    """The imports of digitlens modules (names in ``known``) that module ``name`` makes."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def add(target: str, node: ast.AST, local: bool) -> None:
        # `import digitlens.a.b` names digitlens.a.b; a name that is not a module (a function) drops to its module
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target != package and name.startswith(target + "."):
            return  # a module's own package: already being imported when the module runs
        if target and target.split(".")[0] == package:
            found.append(Import(name, target, node.lineno, local))
            # Importing digitlens.a.b runs the package digitlens.a first (its __init__ and what that
            # imports), unless the importer lives inside digitlens.a, which is then already imported.
            parent = target.rpartition(".")[0]
            while parent and parent != package and not name.startswith(parent + ".") and name != parent:
                if Import(name, parent, node.lineno, local) not in found:
                    found.append(Import(name, parent, node.lineno, local))
                parent = parent.rpartition(".")[0]

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, child, local)
            elif isinstance(child, ast.ImportFrom):
                module = _resolve_from(name, is_package, child)
                if module.split(".")[0] != package:
                    continue
                add(module, child, local)
                for alias in child.names:  # `from digitlens.plots import heatmaps` imports the submodule too
                    if f"{module}.{alias.name}" in known:
                        add(f"{module}.{alias.name}", child, local)
            visit(child, inner)

    visit(tree, False)
    return [imp for imp in found if imp.imported != name]


@functools.lru_cache(maxsize=None)
def import_graph(src: Path = SRC, package: str = PACKAGE) -> list[Import]:
    """Every import between modules of ``package`` under ``src`` (parsed once per test session)."""
    names = module_names(src, package)
    return [imp for name, path in names.items() for imp in imports_of(name, path, set(names), package)]


def layer_of(module: str, layers: dict[str, int] = LAYERS, package: str = PACKAGE) -> int:
    """The layer of ``module``: its own entry, else that of its closest listed package."""
    relative = module[len(package) + 1:] if module != package else ""
    while relative not in layers:
        if not relative:
            raise KeyError(f"{module}: in no layer; add it to LAYERS and to the package docstring")
        relative = relative.rpartition(".")[0]
    return layers[relative]


def find_cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return cycles


def problems(imports: list[Import], layers: dict[str, int] = LAYERS, package: str = PACKAGE,
             known: set[tuple[str, str]] = frozenset()) -> dict[str, list[str]]:
    """{"cycles", "upward", "local"}: one line per violation not in ``known``."""
    kept = [imp for imp in imports if (imp.importer, imp.imported) not in known]
    upward = [f"{imp.importer}:{imp.line} imports {imp.imported} (layer {layer_of(imp.importer, layers, package)} "
              f"-> {layer_of(imp.imported, layers, package)})"
              for imp in kept if layer_of(imp.imported, layers, package) > layer_of(imp.importer, layers, package)]
    local = [f"{imp.importer}:{imp.line} imports {imp.imported} inside a function" for imp in kept if imp.local]
    cycles = [" <-> ".join(c) for c in find_cycles({(imp.importer, imp.imported) for imp in kept})]
    return {"cycles": cycles, "upward": upward, "local": local}


# --------------------------------------------------------------------------- the package itself


def test_every_module_has_a_layer():
    for name in module_names(SRC, PACKAGE):
        layer_of(name)  # raises for a module in no layer


@pytest.mark.parametrize("kind", ["cycles", "upward", "local"])
def test_package_import_graph(kind):
    found = problems(import_graph(), known=KNOWN_VIOLATIONS)[kind]
    assert not found, f"{len(found)} {kind} import(s):\n" + "\n".join(found)


def test_known_violations_are_still_real():
    edges = {(imp.importer, imp.imported) for imp in import_graph()}
    stale = sorted(KNOWN_VIOLATIONS - edges)
    assert not stale, f"fixed since: remove from KNOWN_VIOLATIONS: {stale}"


def test_package_docstring_states_the_layers():
    """The table is there, in order, with the floor under the figures and the report above the stages."""
    assert LAYERS["errors"] == LAYERS["runio"] == LAYERS["figure_writer"] == 0
    assert LAYERS["data"] < LAYERS["models"] < LAYERS["plots"] < LAYERS["train"] < LAYERS["report"] < LAYERS["cli"]
    assert LAYERS["explain.maps"] == LAYERS["explain"] == 0 < LAYERS["explain.run"]
    assert LAYERS["subspace.measures"] == LAYERS["subspace"] == 0 < LAYERS["subspace.run"]


# --------------------------------------------------------------------------- the checker on planted faults


def _fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = tmp_path / "fake" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path


FAKE_LAYERS = {"": 0, "floor": 0, "stage": 1, "plots": 1, "app": 2}


def test_checker_finds_a_planted_cycle_through_relative_and_package_imports(tmp_path):
    src = _fake_package(tmp_path, {
        "__init__.py": "",
        "floor.py": "from .plots import bars\n",          # floor -> plots and plots.bars (upward, and cycle)
        "plots/__init__.py": "",
        "plots/bars.py": "from fake import floor\n",      # plots.bars -> floor
        "stage.py": "import fake.floor\n",
    })
    imports = import_graph(src, "fake")
    edges = {(imp.importer, imp.imported) for imp in imports}
    assert {("fake.floor", "fake.plots"), ("fake.floor", "fake.plots.bars"), ("fake.plots.bars", "fake.floor"),
            ("fake.stage", "fake.floor")} <= edges
    found = problems(imports, FAKE_LAYERS, "fake")
    assert found["cycles"] == ["fake.floor <-> fake.plots.bars"]
    assert len(found["upward"]) == 2 and all(line.startswith("fake.floor:1 imports fake.plots") for line in found["upward"])
    assert found["local"] == []


def test_checker_finds_a_function_local_import_and_honours_known(tmp_path):
    src = _fake_package(tmp_path, {
        "__init__.py": "",
        "floor.py": "import os\n",
        "stage.py": """\
            from fake.floor import os

            def run():
                from . import app
                return app
            """,
        "app.py": "from fake.stage import run\n",
    })
    imports = import_graph(src, "fake")
    found = problems(imports, FAKE_LAYERS, "fake")
    assert found["local"] == ["fake.stage:4 imports fake inside a function",
                              "fake.stage:4 imports fake.app inside a function"]
    assert found["upward"] == ["fake.stage:4 imports fake.app (layer 1 -> 2)"]
    assert found["cycles"] == ["fake.app <-> fake.stage"]
    assert problems(imports, FAKE_LAYERS, "fake", known={("fake.stage", "fake.app"), ("fake.stage", "fake")}) == \
        {"cycles": [], "upward": [], "local": []}


def test_checker_passes_a_clean_package(tmp_path):
    src = _fake_package(tmp_path, {
        "__init__.py": "from fake.floor import VALUE\n",
        "floor.py": "VALUE = 1\n",
        "stage.py": "from . import floor\nfrom .floor import VALUE\n",
        "app.py": "import fake.stage as stage\n",
    })
    assert problems(import_graph(src, "fake"), FAKE_LAYERS, "fake") == {"cycles": [], "upward": [], "local": []}


def test_checker_counts_the_package_that_an_import_of_its_submodule_runs(tmp_path):
    """``from fake.stagepkg.floor import x`` runs ``fake/stagepkg/__init__.py`` first: a package
    __init__ that imports its stage closes a cycle with a figure that imports the package's floor."""
    src = _fake_package(tmp_path, {
        "__init__.py": "",
        "stagepkg/__init__.py": "from fake.stagepkg.stage import run\n",
        "stagepkg/floor.py": "",
        "stagepkg/stage.py": "from fake.plots import bars\n",
        "plots/__init__.py": "",
        "plots/bars.py": "from fake.stagepkg.floor import x\n",
    })
    layers = {"": 0, "stagepkg": 0, "stagepkg.floor": 0, "stagepkg.stage": 1, "plots": 1}
    imports = import_graph(src, "fake")
    edges = {(imp.importer, imp.imported) for imp in imports}
    assert ("fake.plots.bars", "fake.stagepkg") in edges
    assert ("fake.stagepkg.stage", "fake.stagepkg") not in edges  # its own package is already running
    found = problems(imports, layers, "fake")
    assert found["cycles"] == ["fake.plots.bars <-> fake.stagepkg <-> fake.stagepkg.stage"]
    assert any("fake.stagepkg:1 imports fake.stagepkg.stage" in line for line in found["upward"])
