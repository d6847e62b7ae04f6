"""Saving a stage's figures and listing them in the stage's figure manifest, ``figures.json``.

Each stage that draws figures makes one :class:`FigureWriter` for the folder it writes and calls
:meth:`FigureWriter.save` once per figure, saying what the figure is (``kind``), where it belongs
in the report (``section``) and what it shows (the method, rank, module, task or run). When the
``with`` block ends, every file is on disk and ``figures.json`` lists them; the report is built
from these manifests (:func:`read_figure_manifest`), never from file names.

``figures.json``::

    {"stage": "evaluate",
     "figures": [{"path": "confusion_matrix.png", "files": ["confusion_matrix.png", "confusion_matrix.svg"],
                  "kind": "confusion_matrix", "section": "evaluation", "title": "Confusion matrix",
                  ...what it shows, e.g. "method": "saliency", "rank": 4, "module": "blocks.0.attn.qkv"}]}

Paths are relative to the folder that holds ``figures.json`` (so a stage may build its folder
under a temporary name and rename it into place).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import pickle
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path, PurePosixPath
from typing import Any

from digitlens.errors import DigitlensError
from digitlens.pyplot import pyplot
from digitlens.runio import atomic_path, read_json, write_json

MANIFEST_NAME = "figures.json"
FIGURE_FORMATS = ("png", "svg")
WORKERS_ENV = "DIGITLENS_FIGURE_WORKERS"

# Keys every manifest entry has; anything else in an entry says what the figure shows.
ENTRY_KEYS = ("path", "files", "kind", "section", "title")


def figure_workers() -> int:
    """Worker processes that draw figures, from ``DIGITLENS_FIGURE_WORKERS``: unset, 0 or 1 draws
    in this process (the default of the Python API), N >= 2 uses N workers. The ``digitlens``
    command sets it to :func:`default_figure_workers`."""
    value = os.environ.get(WORKERS_ENV, "")
    if not value.strip():
        return 0
    try:
        return max(0, int(value))
    except ValueError:
        raise DigitlensError(f"{WORKERS_ENV}={value!r}: expected a whole number") from None


def default_figure_workers() -> int:
    """One figure worker per CPU core, at most 4."""
    return min(4, os.cpu_count() or 1)


def save_figure_files(fig, stem: Path, formats: tuple[str, ...] = FIGURE_FORMATS, dpi: int = 150) -> list[Path]:
    """Save ``fig`` as ``stem.<fmt>`` for each format, atomically, in this process; return the paths.
    The layout engine runs once and is then frozen: ``savefig`` would otherwise lay the figure out
    again for every format."""
    stem = Path(stem)
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
    """Worker side of :class:`FigureWriter`: rebuild a figure the parent pickled and save it."""
    plt = pyplot()  # in the worker: Agg unless $MPLBACKEND says otherwise

    fig = pickle.loads(blob)  # our own figure, pickled a moment ago by the parent process
    try:
        return [str(p) for p in save_figure_files(fig, Path(stem), formats, dpi)]
    finally:
        plt.close(fig)


def _exit_with_parent(parent_pid: int) -> None:
    """Worker initialiser: end this worker once its parent is gone (a killed ``digitlens`` would
    otherwise leave its idle workers behind)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


class _WorkerPool:
    """The worker processes that draw figures: started on first use (spawn: never fork a process
    whose torch thread pools are running) and kept until the interpreter exits, so the stages of
    one ``digitlens demo`` share them instead of paying the start-up of matplotlib each time."""

    def __init__(self) -> None:
        self._executor: ProcessPoolExecutor | None = None
        self._workers = 0

    def get(self, workers: int) -> ProcessPoolExecutor:
        if self._executor is None or self._workers != workers:
            if self._executor is not None:
                self._executor.shutdown()
            self._executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_exit_with_parent, initargs=(os.getpid(),))
            self._workers = workers
            atexit.register(self._executor.shutdown)  # before interpreter teardown, which it does not survive quietly
        return self._executor

    def drop(self) -> None:
        """Forget a broken pool (a worker was killed): the next figure starts fresh workers."""
        self._executor = None


_POOL = _WorkerPool()


def _clean_show(shows: dict[str, Any]) -> dict[str, Any]:
    clean = {}
    for key, value in shows.items():
        if key in ENTRY_KEYS:
            raise ValueError(f"{key!r} is a manifest field, not something a figure shows")
        if value is None:
            continue
        if hasattr(value, "item"):  # a numpy scalar
            value = value.item()
        if not isinstance(value, (str, int, float, bool, list)):
            value = str(value)
        clean[key] = value
    return clean


class FigureWriter:
    """Writes one stage's figures into ``folder`` and lists them in ``folder/figures.json``.

    Use it as a context manager; ``figures.json`` is written (atomically) when the block ends
    without an error, after every figure file is on disk. With ``workers`` >= 2 (default: the
    ``DIGITLENS_FIGURE_WORKERS`` setting) figures are drawn by worker processes while the stage
    goes on; from Python, guard such a script with ``if __name__ == "__main__":``.
    """

    def __init__(self, folder: str | os.PathLike, stage: str, *, workers: int | None = None,
                 formats: tuple[str, ...] = FIGURE_FORMATS, dpi: int = 150) -> None:
        self.folder = Path(folder)
        self.stage = stage
        self.workers = figure_workers() if workers is None else workers
        self.formats = tuple(formats)
        self.dpi = dpi
        self.entries: list[dict[str, Any]] = []
        self._pending: list[Future] = []

    def __enter__(self) -> "FigureWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.wait(raise_errors=exc_type is None)
        if exc_type is None:
            self.write_manifest()

    def save(self, fig, name: str, *, kind: str, section: str, title: str | None = None, **shows: Any) -> list[Path]:
        """Save ``fig`` as ``folder/name.<fmt>`` (``name`` may hold sub-folders, no suffix) and list
        it in the manifest; return the paths (they exist once the ``with`` block ends). ``shows``
        says what the figure shows (``method=``, ``rank=``, ``module=``, ``task=``, ``run=``, ...).
        The caller may close ``fig`` at once."""
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.name:
            raise ValueError(f"figure name {name!r} must be a relative path inside the stage folder")
        if rel.suffix:
            raise ValueError(f"figure name {name!r} must not have a suffix; the formats add it")
        files = [str(rel.with_suffix(f".{fmt}")) for fmt in self.formats]
        if any(entry["files"] == files for entry in self.entries):
            raise ValueError(f"figure {name!r} is saved twice by the {self.stage} stage")
        stem = self.folder / rel
        stem.parent.mkdir(parents=True, exist_ok=True)
        if title is None and fig.get_suptitle():
            title = fig.get_suptitle()
        if title is None and fig.axes and fig.axes[0].get_title():
            title = fig.axes[0].get_title()
        entry = {"path": files[0], "files": files, "kind": kind, "section": section, "title": title or ""}
        entry.update(_clean_show(shows))
        self.entries.append(entry)
        if self.workers >= 2:
            try:
                blob = pickle.dumps(fig)
            except (pickle.PicklingError, AttributeError, TypeError):
                blob = None  # e.g. a lambda tick formatter: draw it here instead
            if blob is not None:
                future = _POOL.get(self.workers).submit(_render_pickled_figure, blob, str(stem), self.formats, self.dpi)
                self._pending.append(future)
                return [stem.with_suffix(f".{fmt}") for fmt in self.formats]
        return save_figure_files(fig, stem, self.formats, self.dpi)

    def wait(self, raise_errors: bool = True) -> None:
        """Block until every figure handed to a worker is written; raise the first error."""
        pending, self._pending = self._pending, []
        errors = []
        for future in pending:
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001  re-raised below, after every file is settled
                errors.append(exc)
        if any(isinstance(exc, BrokenProcessPool) for exc in errors):
            _POOL.drop()
        if errors and raise_errors:
            raise errors[0]

    def paths(self) -> list[Path]:
        """Every file written so far (all formats), as absolute paths under ``folder``."""
        return [self.folder / f for entry in self.entries for f in entry["files"]]

    def write_manifest(self) -> Path:
        """Write ``folder/figures.json`` listing the figures saved so far; return its path."""
        return write_json(self.folder / MANIFEST_NAME, {"stage": self.stage, "figures": self.entries})


def read_figure_manifest(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The entries of ``folder/figures.json`` whose PNG exists, each with ``path`` made absolute;
    ``[]`` when the folder has no manifest. A manifest that is not one, or that points outside its
    folder, is a one-line DigitlensError naming the file."""
    folder = Path(folder)
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        return []
    data = read_json(manifest)
    if not isinstance(data, dict) or not isinstance(data.get("figures"), list):
        raise DigitlensError(f"{manifest}: not a figure manifest (expected an object with a 'figures' list)")
    entries = []
    root = folder.resolve()
    for i, entry in enumerate(data["figures"]):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("path", "kind", "section")):
            raise DigitlensError(f"{manifest}: figure {i} lacks a path, kind or section")
        path = (folder / entry["path"]).resolve()
        if not path.is_relative_to(root):
            raise DigitlensError(f"{manifest}: figure {i} points outside its folder ({entry['path']!r})")
        if path.is_file():
            entries.append({**entry, "path": path})
    return entries
