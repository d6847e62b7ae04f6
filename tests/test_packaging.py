"""The front door: what pyproject.toml declares against what the code imports, .gitignore, the
flags that errors name, and the test markers."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "digitlens"

#: Imported by the package only inside a function that says what to install when it is missing
#: (report/browser.py: the screenshot of a report needs Playwright's Chromium); declared in ``test``.
OPTIONAL_IN_PACKAGE = {"playwright"}

#: The files of this branch whose error messages name command-line flags (tests/test_explain.py
#: checks those of the explain stage).
FILES_NAMING_FLAGS = ("train.py", "distributed.py", "data.py", "userdata.py", "preprocess.py", "models.py",
                      "external.py", "seeds.py", "device.py", "predict.py", "cli.py", "demo.py", "serve/app.py")


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _names(requirements: list[str]) -> set[str]:
    """Distribution names of requirement strings, normalised (``scikit-learn>=1.3`` -> ``scikit-learn``)."""
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def third_party_imports(folder: Path) -> dict[str, str]:
    """Top-level names of every module imported by a file under ``folder`` that is neither the
    standard library nor digitlens nor a module of ``folder`` itself -> the first file importing it."""
    local = {p.stem for p in folder.rglob("*.py")} | {p.name for p in folder.iterdir() if p.is_dir()}
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "digitlens" and top not in local:
                    found.setdefault(top, os.path.relpath(path, ROOT))
    return found


def _distributions(module: str) -> set[str]:
    return {d.lower().replace("_", "-") for d in importlib.metadata.packages_distributions().get(module, [])}


@pytest.mark.slow
def test_every_third_party_import_is_declared_in_pyproject():
    project = _pyproject()["project"]
    runtime = _names(project["dependencies"])
    test_extra = _names(project["optional-dependencies"]["test"])
    missing = []
    for folder, allowed in ((SRC, runtime), (ROOT / "tests", runtime | test_extra)):
        for module, first_file in third_party_imports(folder).items():
            if folder == SRC and module in OPTIONAL_IN_PACKAGE:
                allowed_here = runtime | test_extra
            else:
                allowed_here = allowed
            dists = _distributions(module)
            assert dists, f"{module} (imported by {first_file}) is not installed"
            if not dists & allowed_here:
                missing.append(f"{first_file} imports {module} (distribution {sorted(dists)[0]})")
    assert not missing, "not declared in pyproject.toml:\n" + "\n".join(missing)


def test_the_declaration_check_finds_an_undeclared_import(tmp_path):
    (tmp_path / "mod.py").write_text("import os\nimport numpy\nfrom scipy import stats\nfrom . import x\nimport mod\n")
    assert set(third_party_imports(tmp_path)) == {"numpy", "scipy"}


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
@pytest.mark.parametrize("path", [".venv/bin/python", ".venv-ci/bin/python", "src/digitlens.egg-info/PKG-INFO",
                                  "runs/demo/model.safetensors", ".pytest_cache/v"])
def test_local_environments_and_outputs_are_ignored_by_git(path):
    inside = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--is-inside-work-tree"], capture_output=True, text=True)
    if inside.returncode != 0:
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", path])
    assert ignored.returncode == 0, f"{path} is not ignored by .gitignore"


def _cli_flags() -> set[str]:
    text = (SRC / "cli.py").read_text(encoding="utf-8")
    return set(re.findall(r'"(--[a-z][a-z0-9-]*)', text)) | {f"--{m}" for m in re.findall(r'/--([a-z][a-z0-9-]*)"', text)}


def flags_in_errors(path: Path) -> list[tuple[int, str]]:
    """(line, flag) of every ``--flag`` inside the message of a ``raise DigitlensError(...)`` in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and \
                getattr(node.exc.func, "id", None) == "DigitlensError":
            for part in ast.walk(node.exc):
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    found += [(node.lineno, flag) for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", part.value)]
    return found


@pytest.mark.slow
def test_every_flag_an_error_of_this_branch_names_exists_in_the_cli():
    flags = _cli_flags()
    assert {"--val-fraction", "--optimizer", "--schedule", "--batch-size", "--out"} <= flags
    unknown = [f"{name}:{line} names {flag}" for name in FILES_NAMING_FLAGS
               for line, flag in flags_in_errors(SRC / name) if flag not in flags]
    assert not unknown, "errors name flags the CLI does not have:\n" + "\n".join(unknown)


def test_the_flag_scan_sees_flags_inside_f_strings(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('def f(x):\n    raise DigitlensError(f"--learning-rate {x}: must be positive")\n')
    assert flags_in_errors(bad) == [(2, "--learning-rate")]


def test_slow_marker_is_registered():
    markers = _pyproject()["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("slow:") for m in markers)
