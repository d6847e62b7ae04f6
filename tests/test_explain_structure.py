"""The explain side of the layer order (issue #12): map I/O and pooling in the floor module
``explain.maps``, figures (``plots``) that import only the floor, no function-local imports of
digitlens modules, one implementation of the per-group maps, and method names dashed or not."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from digitlens.errors import DigitlensError
from test_layers import LAYERS

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "digitlens"
#: The floor of issue #12: modules every layer may import.
#: The floor of the package docstring's layer table (the one place it is written).
FLOOR = {f"digitlens.{name}" for name, layer in LAYERS.items() if layer == 0 and name}
EXPLAIN_FILES = sorted((PACKAGE / "explain").glob("*.py"))
PLOT_FILES = [PACKAGE / "plots" / f"{name}.py" for name in ("heatmaps", "faithfulness", "overlays", "filters")]


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _digitlens_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported digitlens module, imported inside a function) for each import in ``path``; a
    ``from digitlens.x import y`` counts as ``digitlens.x.y`` when that is a module, else ``digitlens.x``."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function) for a in child.names if a.name.startswith("digitlens"))
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and (child.module or "").startswith("digitlens"):
                for alias in child.names:
                    sub = f"{child.module}.{alias.name}"
                    is_module = (SRC / Path(*sub.split("."))).with_suffix(".py").is_file()
                    found.append((sub if is_module else child.module, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


@pytest.mark.parametrize("path", EXPLAIN_FILES + PLOT_FILES, ids=lambda p: p.name if p.parent.name == "plots" else f"explain/{p.name}")
def test_no_function_local_imports_of_digitlens_modules(path):
    local = sorted({name for name, in_function in _digitlens_imports(path) if in_function})
    assert not local, f"{path.relative_to(SRC)} imports {local} inside functions"


def test_the_maps_module_is_floor_and_the_figures_import_only_the_floor():
    maps = {name for name, _ in _digitlens_imports(PACKAGE / "explain" / "maps.py")}
    assert maps <= {"digitlens.errors", "digitlens.runio"}, maps
    for path in PLOT_FILES:
        names = {name for name, _ in _digitlens_imports(path)}
        upward = sorted(n for n in names if n not in FLOOR and not n.startswith("digitlens.plots"))
        assert not upward, f"{path.relative_to(SRC)} imports {upward}, above the floor"


def test_the_explain_modules_import_each_other_without_a_cycle():
    graph = {_module_name(p): {n for n, _ in _digitlens_imports(p) if n.startswith("digitlens.explain.")}
             for p in EXPLAIN_FILES if p.name != "__init__.py"}
    done, stack = set(), []

    def visit(node):
        if node in stack:
            raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(node):] + [node])}")
        if node in done:
            return
        stack.append(node)
        for child in graph.get(node, ()):
            visit(child)
        stack.pop()
        done.add(node)

    for node in graph:
        visit(node)


def test_the_figures_and_the_floor_load_without_the_explain_stage():
    code = ("import sys, digitlens.plots.heatmaps, digitlens.explain.maps; "
            "print(sorted(m for m in sys.modules if m.startswith('digitlens.explain.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(SRC), "MPLBACKEND": "Agg"})
    assert out.stdout.strip() == "['digitlens.explain.maps']", out.stdout + out.stderr


def test_per_digit_maps_display_uses_the_one_grouped_maps_implementation():
    from digitlens.explain.aggregate import PerDigitMaps
    from digitlens.explain.methods import attribute
    from digitlens.plots.heatmaps import PerDigitMapsDisplay

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)).eval()
    images = torch.rand(50, 1, 28, 28)
    labels = torch.arange(50) % 7  # digits 7, 8, 9 have no images
    maps = PerDigitMaps(model, "saliency").attribute(images, labels, batch_size=16)
    attributions = attribute(model, images, labels, "saliency").numpy()
    display = PerDigitMapsDisplay.from_attributions(attributions, labels.numpy())
    np.testing.assert_allclose(display.maps, maps, rtol=1e-12, equal_nan=True)
    # oracle: a plain loop over the groups and the 4x4 patches
    expected = np.full((10, 7, 7), np.nan)
    for digit in range(7):
        mean = np.abs(attributions[labels.numpy() == digit].astype(np.float64)).sum(1).mean(0)
        pooled = mean.reshape(7, 4, 7, 4).sum(axis=(1, 3))
        expected[digit] = pooled / pooled.sum()
    np.testing.assert_allclose(display.maps, expected, rtol=1e-9, equal_nan=True)
    assert display.counts.tolist() == [8, 7, 7, 7, 7, 7, 7, 0, 0, 0]


def test_method_names_take_dashes_everywhere_and_errors_list_the_dashed_names():
    from digitlens.explain.aggregate import PerDigitMaps
    from digitlens.explain.methods import attribute
    from digitlens.explain.scoring import faithfulness_report
    from digitlens.explain.methods import parse_methods

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)).eval()
    x, y = torch.rand(6, 1, 28, 28), torch.arange(6)
    torch.testing.assert_close(attribute(model, x, y, "input-x-gradient"), attribute(model, x, y, "input_x_gradient"))
    assert PerDigitMaps(model, "integrated-gradients").method == "integrated_gradients"
    report = faithfulness_report(model, x, y.numpy(), ["input-x-gradient"], sanity_size=0)
    assert "input_x_gradient" in report["methods"]
    with pytest.raises(DigitlensError) as err:
        parse_methods("saliency,integrated_gradient", model)
    message = str(err.value)
    assert "'integrated-gradient'" in message and "integrated-gradients" in message and "input-x-gradient" in message
    assert "integrated_gradients" not in message
    with pytest.raises(DigitlensError, match="choose from saliency, input-x-gradient"):
        attribute(model, x, y, "no-such-method")


def _error_flags(path: Path) -> set[str]:
    """Every ``--flag`` written anywhere in the message of a ``DigitlensError(...)`` in ``path``."""
    flags = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "DigitlensError":
            for part in ast.walk(node):
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    flags |= set(re.findall(r"(?<![\w-])--[a-z][a-z-]*[a-z]", part.value))
    return flags


def test_every_flag_an_explain_error_names_exists():
    from typer.testing import CliRunner

    from digitlens.cli import app

    named = set().union(*(_error_flags(p) for p in EXPLAIN_FILES + PLOT_FILES))
    assert {"--methods", "--image-index", "--compare-methods", "--input-scale"} <= named  # the scan finds them
    runner = CliRunner()
    helps = {cmd: runner.invoke(app, [cmd, "--help"], env={"COLUMNS": "250"}).output
             for cmd in ("explain", "evaluate", "train", "predict")}
    missing = sorted(flag for flag in named if not any(re.search(rf"{flag}(?![\w-])", h) for h in helps.values()))
    assert not missing, f"explain's errors name flags no command has: {missing}"
