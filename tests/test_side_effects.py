"""Hidden side effects: only :func:`digitlens.pyplot.pyplot` chooses a matplotlib backend, and it
respects ``MPLBACKEND``."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _backend_in_a_fresh_process(env_backend: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", "DISPLAY", "WAYLAND_DISPLAY")}
    if env_backend is not None:
        env["MPLBACKEND"] = env_backend
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    code = "from digitlens.pyplot import pyplot; import matplotlib; pyplot(); print(matplotlib.get_backend())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    return done.stdout.strip().lower()


@pytest.mark.slow
def test_pyplot_uses_agg_unless_mplbackend_names_another():
    assert _backend_in_a_fresh_process(None) == "agg"
    assert _backend_in_a_fresh_process("svg") == "svg"


def test_only_the_pyplot_helper_chooses_a_backend():
    callers = []
    for path in sorted((SRC / "digitlens").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "use" \
                    and getattr(node.func.value, "id", None) == "matplotlib":
                callers.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert callers == ["digitlens/pyplot.py:14"], callers
