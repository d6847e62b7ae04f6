"""Reading and writing the files of a run folder (``runs/NAME/``) safely.

Every writer goes through a temporary file in the same folder and an ``os.replace``, so a
crash or a Ctrl-C never leaves a half-written file behind and never destroys what was there.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from digitlens.errors import DigitlensError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; give the result the usual umask-derived mode instead.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (numpy scalars and arrays allowed) atomically; return the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default, allow_nan=False) + "\n")
    return path


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, raising a one-line :class:`DigitlensError` when missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise DigitlensError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DigitlensError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` atomically; return the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """Write arrays to a compressed ``.npz`` atomically; return the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    return path


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read every array of an ``.npz`` file (never with pickle) into a dict."""
    path = Path(path)
    if not path.is_file():
        raise DigitlensError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (ValueError, OSError) as exc:
        raise DigitlensError(f"{path}: not a readable .npz file ({exc})") from None


def save_figure(fig, path_stem: str | os.PathLike, formats: tuple[str, ...] = ("png", "svg"), dpi: int = 150) -> list[Path]:
    """Save a matplotlib figure as ``<path_stem>.png`` and ``.svg`` atomically; return the paths."""
    stem = Path(path_stem)
    written = []
    for fmt in formats:
        target = stem.with_suffix(f".{fmt}")
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
        written.append(target)
    return written


def require_run_dir(run_dir: str | os.PathLike) -> Path:
    """Return ``run_dir`` as a Path, or raise if it is not a digitlens run (no ``config.json``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DigitlensError(f"{run_dir}: run folder not found")
    if not (run_dir / "config.json").is_file():
        raise DigitlensError(f"{run_dir}: not a digitlens run (no config.json; run `digitlens train` first)")
    return run_dir
