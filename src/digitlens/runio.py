"""Reading and writing the files of a run folder (``runs/NAME/``) safely.

Every writer goes through a temporary file in the same folder and an ``os.replace``, so a
crash or a Ctrl-C never leaves a half-written file behind and never destroys what was there.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
import tempfile
from concurrent.futures.process import BrokenProcessPool
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
    except UnicodeDecodeError as exc:
        raise DigitlensError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def read_text(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file, raising a one-line :class:`DigitlensError` when missing or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise DigitlensError(f"{path}: file not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DigitlensError(f"{path}: not UTF-8 text (byte {exc.start})") from None


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
    import zipfile

    if not zipfile.is_zipfile(path):
        raise DigitlensError(f"{path}: not a .npz file (no zip archive)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DigitlensError(f"{path}: not a readable .npz file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _save_figure_now(fig, stem: Path, formats: tuple[str, ...], dpi: int) -> list[Path]:
    """Save ``fig`` in each format here, in this process. The layout engine runs once and is then
    frozen: ``savefig`` would otherwise lay the figure out again for every format."""
    engine = fig.get_layout_engine()
    freeze = engine is not None and len(formats) > 1
    if freeze:
        fig.draw_without_rendering()
        fig.set_layout_engine("none")
    written = []
    try:
        for fmt in formats:
            target = stem.with_suffix(f".{fmt}")
            with atomic_path(target) as tmp:
                fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
            written.append(target)
    finally:
        if freeze:
            fig.set_layout_engine(engine)
    return written


def _render_pickled_figure(blob: bytes, stem: str, formats: tuple[str, ...], dpi: int) -> list[str]:
    """Worker side of :func:`figure_batch`: rebuild a figure this process pickled and save it."""
    import pickle

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = pickle.loads(blob)  # our own figure, pickled a moment ago by the parent process
    try:
        return [str(p) for p in _save_figure_now(fig, Path(stem), formats, dpi)]
    finally:
        plt.close(fig)


#: Figures handed to worker processes inside :func:`figure_batch` (None outside one).
_PENDING_FIGURES: list | None = None
_FIGURE_POOL = None


def _figure_pool():
    """The worker processes that draw figures, started once (spawn: never fork a process whose
    torch thread pools are running) and kept until the interpreter exits."""
    global _FIGURE_POOL
    if _FIGURE_POOL is None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        _FIGURE_POOL = ProcessPoolExecutor(max_workers=figure_workers(),
                                           mp_context=multiprocessing.get_context("spawn"),
                                           initializer=_exit_with_parent, initargs=(os.getpid(),))
        atexit.register(_FIGURE_POOL.shutdown)  # before interpreter teardown, which it does not survive quietly
    return _FIGURE_POOL


def _exit_with_parent(parent_pid: int) -> None:
    """Worker initialiser: end this worker once its parent is gone (a killed ``digitlens`` would
    otherwise leave its idle workers behind)."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def figure_workers() -> int:
    """Worker processes for :func:`figure_batch`, from ``DIGITLENS_FIGURE_WORKERS``: unset, 0 or 1
    draws in this process (the default of the Python API), N >= 2 uses N workers. The
    ``digitlens`` command sets it to :func:`default_figure_workers`."""
    value = os.environ.get("DIGITLENS_FIGURE_WORKERS", "")
    if not value.strip():
        return 0
    try:
        return max(0, int(value))
    except ValueError:
        raise DigitlensError(f"DIGITLENS_FIGURE_WORKERS={value!r}: expected a whole number") from None


def default_figure_workers() -> int:
    """One figure worker per CPU core, at most 4."""
    return min(4, os.cpu_count() or 1)


@contextlib.contextmanager
def figure_batch() -> Iterator[None]:
    """Inside this block :func:`save_figure` hands each figure to a worker process and returns at
    once; the block ends when every file is written (the first error is raised then).

    matplotlib draws on one CPU core, and drawing is most of the time of a stage that writes many
    figures; with one worker per core the figures of a stage are drawn side by side. Workers are
    used only when :func:`figure_workers` is 2 or more (the ``digitlens`` command's default; from
    Python set ``DIGITLENS_FIGURE_WORKERS`` and guard the script with ``if __name__ == "__main__":``,
    as multiprocessing's spawn start method needs). Nested blocks join the outer one.
    """
    global _PENDING_FIGURES, _FIGURE_POOL
    if _PENDING_FIGURES is not None or figure_workers() < 2:
        yield
        return
    _PENDING_FIGURES = []
    try:
        yield
    finally:
        pending, _PENDING_FIGURES = _PENDING_FIGURES, None
        errors = []
        for future in pending:
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001  re-raised below, after every file is settled
                errors.append(exc)
        if any(isinstance(exc, BrokenProcessPool) for exc in errors):
            _FIGURE_POOL = None  # a worker died (e.g. killed): start fresh ones next time
        if errors and sys.exc_info()[0] is None:
            raise errors[0]


def save_figure(fig, path_stem: str | os.PathLike, formats: tuple[str, ...] = ("png", "svg"), dpi: int = 150) -> list[Path]:
    """Save a matplotlib figure as ``<path_stem>.png`` and ``.svg`` atomically; return the paths.

    Inside :func:`figure_batch` the figure is drawn by a worker process and the files exist when
    the batch ends; the caller may close ``fig`` at once.
    """
    stem = Path(path_stem)
    formats = tuple(formats)
    if _PENDING_FIGURES is not None:
        import pickle

        try:
            blob = pickle.dumps(fig)
        except (pickle.PicklingError, AttributeError, TypeError):
            blob = None  # e.g. a lambda tick formatter: draw it here instead
        if blob is not None:
            _PENDING_FIGURES.append(_figure_pool().submit(_render_pickled_figure, blob, str(stem), formats, dpi))
            return [stem.with_suffix(f".{fmt}") for fmt in formats]
    return _save_figure_now(fig, stem, formats, dpi)


def require_run_dir(run_dir: str | os.PathLike) -> Path:
    """Return ``run_dir`` as a Path, or raise if it is not a digitlens run (no ``config.json``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DigitlensError(f"{run_dir}: run folder not found")
    if not (run_dir / "config.json").is_file():
        raise DigitlensError(f"{run_dir}: not a digitlens run (no config.json; run `digitlens train` first)")
    return run_dir
