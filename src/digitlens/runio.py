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
        # Writers that re-create the file (safetensors, PEFT) make it 0600: give it the umask mode
        # again, and put its bytes on disk before the rename makes it visible.
        os.chmod(tmp_path, 0o666 & ~umask)
        _fsync_path(tmp_path)
        os.replace(tmp_path, path)
        _fsync_path(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def finish_files(folder: str | os.PathLike) -> None:
    """Give every file under ``folder`` the umask-derived mode and fsync it: for folders a library
    wrote in place (PEFT's ``save_pretrained``) before :func:`staged_dir` swaps them in."""
    umask = os.umask(0)
    os.umask(umask)
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)
            _fsync_path(path)
    _fsync_path(Path(folder))


def _fsync_path(path: Path) -> None:
    """fsync a file or folder (the folder: so a rename in it survives a power cut); best effort
    where the file system does not support it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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


def require_run_dir(run_dir: str | os.PathLike) -> Path:
    """Return ``run_dir`` as a Path, or raise if it is not a digitlens run (no ``config.json``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DigitlensError(f"{run_dir}: run folder not found")
    if not (run_dir / "config.json").is_file():
        raise DigitlensError(f"{run_dir}: not a digitlens run (no config.json; run `digitlens train` first)")
    return run_dir


# --------------------------------------------------------------------------------------------
# One writer per run folder; whole-stage outputs
# --------------------------------------------------------------------------------------------

#: The lock file every writing stage holds in the run folder (see :func:`run_lock`).
LOCK_NAME = ".digitlens.lock"

#: Run folders this process holds the lock of: resolved path -> [file descriptor, depth].
_HELD_LOCKS: dict[str, list] = {}


def _lock_holder(lock_path: Path) -> str:
    """What the lock file says about its holder ("PID 123, train"), or "PID unknown"."""
    try:
        pid, _, stage = lock_path.read_text().strip().partition(" ")
        return f"PID {int(pid)}, {stage or 'a digitlens stage'}"
    except (OSError, ValueError):
        return "PID unknown"


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike, stage: str, *, create: bool = False) -> Iterator[Path]:
    """Hold the exclusive writer lock of run folder ``folder`` while the block runs; yield the folder.

    The lock is an ``fcntl.flock`` on ``folder/.digitlens.lock`` holding this process's PID and
    ``stage``, removed when the block ends: the kernel releases the lock when the process ends,
    however it ends, so the file a killed process left is never in the way (it is taken over). A second writer gets a one-line
    DigitlensError naming the holder's PID. Re-entrant within a process (``adapt`` runs the
    subspace analysis in the folder it holds). With ``create=True`` a missing folder is made, and
    removed again on exit if nothing but the lock was written into it. On taking the lock,
    leftovers of killed writers are cleaned up (:func:`clean_orphans`).
    """
    import fcntl

    folder = Path(folder)
    key = str(folder.resolve())
    held = next((str(p) for p in (Path(key), *Path(key).parents) if str(p) in _HELD_LOCKS), None)
    if held is not None:  # this process already writes this folder, or a run folder around it
        key = held
        _HELD_LOCKS[key][1] += 1
        try:
            yield folder
        finally:
            _HELD_LOCKS[key][1] -= 1
        return
    if folder.exists() and not folder.is_dir():
        raise DigitlensError(f"{folder}: is a file, not a folder")
    created = False
    if not folder.is_dir():
        if not create:
            raise DigitlensError(f"{folder}: run folder not found")
        folder.mkdir(parents=True)
        created = True
    lock_path = folder / LOCK_NAME
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DigitlensError(f"{folder}: another digitlens process ({_lock_holder(lock_path)}) is writing this "
                                 "run folder; wait for it to finish, or use another folder") from None
        try:  # the file may have been removed (by a writer cleaning up) between open and flock
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {stage}\n".encode(), 0)
    _HELD_LOCKS[key] = [fd, 1]
    try:
        if not created:
            clean_orphans(folder)
        yield folder
    finally:
        del _HELD_LOCKS[key]
        try:
            # Removed while still held: a writer that opened the old file re-checks its inode.
            lock_path.unlink(missing_ok=True)
            if created and not any(folder.iterdir()):
                folder.rmdir()
        finally:
            os.close(fd)


def has_content(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds anything besides a writer's lock file (see :func:`run_lock`):
    what "is this folder empty?" checks must ask, since the lock is taken before they run."""
    folder = Path(folder)
    return folder.is_dir() and any(p.name != LOCK_NAME for p in folder.iterdir())


def clean_orphans(folder: str | os.PathLike) -> list[Path]:
    """Remove what killed writers left in ``folder`` (recursively): temporary files and folders
    named ``.NAME.*.tmp`` (from :func:`atomic_path`, :func:`staged_dir` and :func:`staged_files`); a
    ``.NAME.*.old`` folder is put back as NAME when a swap was cut between its two renames, else
    removed; a ``.staged.*.swap`` folder (a set of files :func:`staged_files` committed) is moved in. Call
    only while holding the folder's :func:`run_lock`. Returns the paths removed or restored."""
    import shutil

    folder = Path(folder)
    touched = []
    for path in sorted(folder.rglob(".*.old"), key=lambda p: len(p.parts)):
        if not path.is_dir():  # staged_dir's are folders; leave anything else alone
            continue
        target = path.with_name(path.name[1:].rsplit(".", 2)[0])  # .NAME.XXXX.old -> NAME
        if not target.exists():
            os.replace(path, target)
        else:
            shutil.rmtree(path, ignore_errors=True)
        touched.append(path)
    for path in sorted(folder.rglob(".staged.*.swap"), key=lambda p: len(p.parts)):
        if path.is_dir():  # staged_files committed this set: finish moving it in
            _finish_swap(path, path.parent)
            touched.append(path)
    for path in sorted(folder.rglob(".*.tmp"), key=lambda p: len(p.parts)):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink(missing_ok=True)
        touched.append(path)
    return touched


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling folder ``.NAME.XXXX.tmp`` of ``final``; when the block
    succeeds it replaces ``final`` as a whole (old folder renamed aside, new one renamed in, old
    one removed), so a reader finds either the old output or the new one, never a mix. On an
    exception (or a kill) the temporary folder is dropped and ``final`` is left as it was."""
    import shutil

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700 folders
    try:
        yield tmp
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.replace(final, old)  # an empty folder is replaced by rename
        os.replace(tmp, final)
        _fsync_path(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


#: The file in a :func:`staged_files` folder that lists the names to remove from the target.
_REMOVE_LIST = ".remove.json"


@contextlib.contextmanager
def staged_files(folder: str | os.PathLike, replaces: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder ``folder/.staged.XXXX.tmp`` to write a stage's files (and
    sub-folders) into; when the block succeeds each of them replaces the entry of the same name in
    ``folder``, and each name in ``replaces`` the block did not write is removed from ``folder``:
    the stage's outputs are replaced as a whole, beside files the stage does not own (the run's
    config.json, weights, other stages' folders).

    The commit point is one rename (``.tmp`` -> ``.swap``): a kill before it leaves the old set
    (the ``.tmp`` folder is an orphan :func:`clean_orphans` removes), a kill after it is rolled
    forward by :func:`clean_orphans`, which the next writer of the folder runs on taking its lock.
    On an exception the temporary folder is dropped and ``folder`` is left as it was."""
    import shutil

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".staged.", suffix=".tmp", dir=folder))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700 folders
    try:
        yield tmp
        written = {p.name for p in tmp.iterdir()}
        write_json(tmp / _REMOVE_LIST, sorted(name for name in replaces if name not in written))
        for sub in tmp.iterdir():
            if sub.is_dir():
                _fsync_path(sub)
        _fsync_path(tmp)
        swap = tmp.with_suffix(".swap")
        os.replace(tmp, swap)
        _fsync_path(folder)
        _finish_swap(swap, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _finish_swap(swap: Path, folder: Path) -> None:
    """Move the entries of a committed :func:`staged_files` folder ``swap`` into ``folder`` (old
    folders of the same name go into ``swap`` and are removed with it), remove the names its
    remove list holds, then ``swap`` itself. Idempotent: a kill part-way is finished by running it
    again."""
    import shutil

    trash = swap / ".replaced"
    trash.mkdir(exist_ok=True)

    def discard(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            aside = trash / path.name
            if aside.exists():
                shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
        elif path.exists() or path.is_symlink():
            path.unlink()

    remove = swap / _REMOVE_LIST
    names = read_json(remove) if remove.is_file() else []
    for name in names:
        discard(folder / name)
    for entry in sorted(swap.iterdir()):
        if entry.name.startswith("."):
            continue
        target = folder / entry.name
        if target.is_dir() and not target.is_symlink():
            discard(target)  # os.replace cannot put a folder onto a non-empty one
        os.replace(entry, target)
    _fsync_path(folder)
    shutil.rmtree(swap, ignore_errors=True)


def writes_folders(stage: str, folders):
    """Decorator: ``func(*args, **kwargs)`` runs holding :func:`run_lock` of every folder that
    ``folders(*args, **kwargs)`` lists as ``(path, kind)`` pairs (None entries skipped): kind
    ``"run"`` is an existing run folder (checked with :func:`require_run_dir` first, so no lock
    file lands in a folder that is not a run), ``"out"`` an output folder made if missing."""
    import functools

    def decorate(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            with contextlib.ExitStack() as stack:
                for entry in folders(*args, **kwargs):
                    if entry is None or entry[0] is None:
                        continue
                    path, kind = entry
                    if kind == "run":
                        require_run_dir(path)
                    stack.enter_context(run_lock(path, stage, create=kind == "out"))
                return func(*args, **kwargs)

        return wrapper

    return decorate
