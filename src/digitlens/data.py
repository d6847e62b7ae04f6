"""Datasets by name, as float tensors of shape (N, 1, 28, 28) in [0, 1] with int64 labels.

- ``mnist``: the four canonical IDX files (gzipped or not), found in ``data_dir``, the
  ``DIGITLENS_DATA`` environment variable, or the cache folder (``DIGITLENS_CACHE`` or
  ``~/.cache/digitlens/mnist``); when absent they are downloaded from public mirrors into the
  cache and the SHA-256 of each decompressed file is checked.
- ``digits``: scikit-learn's bundled 8x8 ``load_digits`` (no download), resized to 28x28 by
  default so the same models apply.
- a path: an image folder (``root/0/*.png ... root/9/*.png``) or a Kaggle Digit Recognizer CSV,
  whose whole content is the test split (see :mod:`digitlens.userdata`).

Images are not normalised here: models carry their own normalisation, so attributions and
galleries work in pixel space.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import shutil
import struct
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from digitlens import userdata
from digitlens.dataset_types import DATASETS, DigitDataset, Splits  # noqa: F401 (DATASETS, Splits: re-exported)
from digitlens.errors import DigitlensError
from digitlens.runio import atomic_path, write_json

#: SHA-256 of each decompressed MNIST file (from the dataset's canonical distribution).
MNIST_FILES = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

#: Public mirrors tried in order; each serves ``<mirror><file>.gz``.
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

_IDX_MAGIC = {3: 2051, 1: 2049}  # ndim -> magic number of unsigned-byte IDX files


def default_cache_dir() -> Path:
    """The folder downloads go to: ``$DIGITLENS_CACHE/mnist`` or ``~/.cache/digitlens/mnist``."""
    root = os.environ.get("DIGITLENS_CACHE")
    return Path(root) / "mnist" if root else Path.home() / ".cache" / "digitlens" / "mnist"


def _find_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


#: The most data bytes an IDX file may promise: 8x MNIST's largest file (47 MB). A header that
#: promises more is refused before anything is read, so a gzip bomb cannot take the memory.
MAX_IDX_BYTES = 400 * 1024 * 1024

_CHUNK = 1 << 20


def _open_maybe_gzip(path: Path):
    """``path`` opened for reading: through gzip when it starts with the gzip magic bytes."""
    fh = open(path, "rb")
    if fh.read(2) == b"\x1f\x8b":
        fh.close()
        return gzip.open(path, "rb")
    fh.seek(0)
    return fh


def _read_exactly(fh, n: int) -> bytearray:
    """Up to ``n`` bytes of ``fh``, read in chunks (a stream shorter than ``n`` gives fewer bytes):
    memory grows with the bytes actually there, never with what a header promises."""
    buf = bytearray()
    while len(buf) < n:
        chunk = fh.read(min(_CHUNK, n - len(buf)))
        if not chunk:
            break
        buf += chunk
    return buf


def read_idx_with_digest(path: str | os.PathLike, expected_ndim: int, *, max_bytes: int = MAX_IDX_BYTES,
                         digest: bool = True) -> tuple[np.ndarray, str | None]:
    """Read an unsigned-byte IDX file (gzipped or not); return (uint8 array of the header's shape,
    SHA-256 hex digest of the whole decompressed file, or None with ``digest=False``).

    Reads the header first, then exactly the bytes it promises, and fails if more follow: a
    gzip bomb or a lying header costs at most ``max_bytes``. Every bad file (corrupt deflate
    stream, wrong magic, truncation, trailing data, a promise over ``max_bytes``) raises a
    one-line DigitlensError naming the file.
    """
    path = Path(path)
    header_len = 4 + 4 * expected_ndim
    try:
        with _open_maybe_gzip(path) as fh:
            header = bytes(_read_exactly(fh, header_len))
            if len(header) < header_len:
                raise DigitlensError(f"{path}: file too short for an IDX header ({len(header)} bytes)")
            (magic,) = struct.unpack(">I", header[:4])
            if magic != _IDX_MAGIC[expected_ndim]:
                raise DigitlensError(
                    f"{path}: wrong IDX magic number {magic} (expected {_IDX_MAGIC[expected_ndim]} "
                    f"for a {expected_ndim}-d unsigned-byte file)"
                )
            dims = struct.unpack(f">{expected_ndim}I", header[4:])
            expected = math.prod(dims)  # Python ints: no overflow
            if expected > max_bytes:
                raise DigitlensError(f"{path}: IDX header promises {'x'.join(map(str, dims))} = {expected} bytes, "
                                     f"more than the {max_bytes} allowed")
            body = _read_exactly(fh, expected)
            if len(body) != expected:
                raise DigitlensError(
                    f"{path}: truncated IDX data ({len(body)} bytes of data, header says {expected})")
            if fh.read(1):
                raise DigitlensError(f"{path}: more data after the {expected} bytes the IDX header promises")
    except FileNotFoundError:
        raise DigitlensError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DigitlensError(f"{path}: a folder, not an IDX file") from None
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError, ValueError) as exc:
        raise DigitlensError(f"{path}: corrupt or truncated gzip ({exc})") from None
    sha = None
    if digest:
        hasher = hashlib.sha256(header)
        hasher.update(body)
        sha = hasher.hexdigest()
    return np.frombuffer(body, dtype=np.uint8).reshape(dims), sha


def read_idx(path: str | os.PathLike, expected_ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (gzipped or not) into a uint8 array of the header's shape.

    Raises a one-line DigitlensError naming the file on a corrupt or truncated gzip, a wrong magic
    number, a size that does not match the header, or data after it (see :func:`read_idx_with_digest`).
    """
    return read_idx_with_digest(path, expected_ndim)[0]


def _sha256_of_decompressed(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        # Decide by the gzip magic bytes, not the suffix: a download is checked under a temporary name.
        with open(path, "rb") as fh:
            is_gzip = fh.read(2) == b"\x1f\x8b"
        opener = gzip.open if is_gzip else open
        with opener(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise DigitlensError(f"{path}: corrupt or truncated gzip ({exc})") from None
    return digest.hexdigest()


def download_mnist(cache_dir: str | os.PathLike | None = None, mirrors: tuple[str, ...] | None = None,
                   timeout: float = 60.0) -> Path:
    """Download the four MNIST files into ``cache_dir`` (verified by SHA-256); return the folder.

    Files already present with the right checksum are kept. Each file is written to a temporary
    name and renamed only once its checksum matched, so a failed download leaves nothing behind.
    """
    mirrors = MNIST_MIRRORS if mirrors is None else mirrors
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    for stem, sha in MNIST_FILES.items():
        target = cache / f"{stem}.gz"
        if target.is_file() and _sha256_of_decompressed(target) == sha:
            continue
        errors = []
        for mirror in mirrors:
            url = f"{mirror.rstrip('/')}/{stem}.gz"
            try:
                with atomic_path(target) as tmp:
                    with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
                        shutil.copyfileobj(resp, out)
                    got = _sha256_of_decompressed(tmp)
                    if got != sha:
                        raise DigitlensError(f"{url}: wrong SHA-256 {got[:12]}… (expected {sha[:12]}…)")
                break
            except (urllib.error.URLError, OSError, DigitlensError) as exc:
                errors.append(f"{url}: {getattr(exc, 'reason', exc)}")
        else:
            raise DigitlensError(f"could not download {stem}.gz from any mirror: " + "; ".join(errors))
    return cache


def _missing_mnist_files(folder: Path) -> list[str]:
    """The MNIST file stems found in ``folder`` neither plain nor gzipped."""
    return [stem for stem in MNIST_FILES if _find_file(folder, stem) is None]


def locate_mnist(data_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Return the folder holding the four MNIST files: ``data_dir``, ``$DIGITLENS_DATA``, the cache,
    or (with ``download=True``) a fresh download into the cache."""
    if data_dir is not None:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise DigitlensError(f"--data-dir {folder}: folder not found")
        missing = _missing_mnist_files(folder)
        if missing:
            raise DigitlensError(f"--data-dir {folder}: missing MNIST file {missing[0]}(.gz)")
        return folder
    env = os.environ.get("DIGITLENS_DATA")
    if env:
        missing = _missing_mnist_files(Path(env))
        if missing:
            raise DigitlensError(f"DIGITLENS_DATA={env}: missing MNIST file {missing[0]}(.gz)")
        return Path(env)
    cache = default_cache_dir()
    if not _missing_mnist_files(cache):
        return cache
    if not download:
        raise DigitlensError(f"MNIST not found in {cache}; pass --data-dir or set DIGITLENS_DATA")
    return download_mnist(cache)


def verified_cache_path() -> Path:
    """The JSON file remembering which MNIST files were verified: ``verified.json`` beside the
    download folder (``$DIGITLENS_CACHE/verified.json`` or ``~/.cache/digitlens/verified.json``)."""
    return default_cache_dir().parent / "verified.json"


def _file_stamp(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _verified_before(path: Path, sha: str) -> bool:
    """True when ``path`` was verified against ``sha`` and its size and mtime have not changed since."""
    try:
        entries = json.loads(verified_cache_path().read_text())
        entry = entries.get(str(path.resolve()))
        return isinstance(entry, dict) and entry == {**_file_stamp(path), "sha256": sha}
    except (OSError, ValueError, AttributeError):
        return False  # no cache, or an unreadable one: verify again


def _remember_verified(path: Path, sha: str) -> None:
    """Record that ``path`` (at its current size and mtime) has SHA-256 ``sha``; best effort: a
    read-only cache folder only means verifying again next time."""
    cache = verified_cache_path()
    try:
        entries = json.loads(cache.read_text()) if cache.is_file() else {}
        if not isinstance(entries, dict):
            entries = {}
    except (OSError, ValueError):
        entries = {}
    entries[str(path.resolve())] = {**_file_stamp(path), "sha256": sha}
    try:
        write_json(cache, entries)
    except OSError:
        pass


def load_mnist_split(folder: str | os.PathLike, split: str, verify: bool = True) -> DigitDataset:
    """Read the ``train`` (60,000) or ``test`` (10,000) split from ``folder``.

    With ``verify=True`` (the default) each file must be the canonical MNIST file: the SHA-256
    of its decompressed content is checked once and then remembered with the file's size and
    mtime (:func:`verified_cache_path`), so swapped, cut or relabelled files are refused. With
    ``verify=False`` (``--no-verify``, a deliberate variant) any IDX files of 28x28 images with
    digit labels 0-9 and matching counts are accepted.
    """
    folder = Path(folder)
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DigitlensError(f"split {split!r}: expected 'train' or 'test'")
    arrays = {}
    paths = {}
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        stem = f"{prefix}-{kind}"
        paths[kind] = _find_file(folder, stem)
        if paths[kind] is None:
            raise DigitlensError(f"{folder / stem}: file not found (also tried {stem}.gz)")
    digests, checked = {}, {}
    for kind, ndim in (("images-idx3-ubyte", 3), ("labels-idx1-ubyte", 1)):
        stem = f"{prefix}-{kind}"
        checked[kind] = verify and not _verified_before(paths[kind], MNIST_FILES[stem])
        arrays[kind], digests[kind] = read_idx_with_digest(paths[kind], ndim, digest=checked[kind])
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):  # checksums after both files read as IDX
        stem = f"{prefix}-{kind}"
        if checked[kind]:
            if digests[kind] != MNIST_FILES[stem]:
                raise DigitlensError(f"{paths[kind]}: not the canonical MNIST file (SHA-256 {digests[kind][:12]}…, "
                                     f"expected {MNIST_FILES[stem][:12]}…); pass --no-verify to use a variant on purpose")
            _remember_verified(paths[kind], digests[kind])
    images, labels = arrays["images-idx3-ubyte"], arrays["labels-idx1-ubyte"]
    image_path, label_path = paths["images-idx3-ubyte"], paths["labels-idx1-ubyte"]
    if images.shape[1:] != (28, 28):
        raise DigitlensError(f"{image_path}: images of {images.shape[1]}x{images.shape[2]} pixels, expected 28x28")
    if images.shape[0] == 0:
        raise DigitlensError(f"{image_path}: no images")
    if images.shape[0] != labels.shape[0]:
        raise DigitlensError(f"{label_path}: {labels.shape[0]} labels for {images.shape[0]} images in {image_path.name}")
    if labels.max() > 9:
        raise DigitlensError(f"{label_path}: label {int(labels.max())} is not a digit 0-9")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return DigitDataset("mnist", split, x, y)


def load_digits_dataset(size: int = 28) -> DigitDataset:
    """scikit-learn's 1,797 bundled 8x8 digits, scaled to [0, 1] and resized to ``size`` x ``size``
    (bilinear, antialiased) unless ``size == 8``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    if size != 8:
        # torchvision's Resize is not usable beside this torch build; F.interpolate is what it calls.
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp_(0.0, 1.0)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    return DigitDataset("digits", "all", x, y)


def split_dataset(ds: DigitDataset, fraction: float, seed: int, names: tuple[str, str]) -> tuple[DigitDataset, DigitDataset]:
    """Split ``ds`` into two parts, the second holding ``fraction`` of the samples, stratified by
    label and deterministic by ``seed``."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < fraction < 1.0:
        raise DigitlensError(f"split fraction {fraction}: must be between 0 and 1")
    idx = np.arange(len(ds))
    try:
        keep, held = train_test_split(idx, test_size=fraction, random_state=seed, stratify=ds.labels.numpy())
    except ValueError as exc:  # too few images for a stratified split (a digit with one image, ...)
        raise DigitlensError(f"split fraction {fraction} of {len(ds)} {ds.name} images: cannot hold out a share "
                             f"of every digit ({exc})") from None
    keep, held = np.sort(keep), np.sort(held)
    return (
        DigitDataset(ds.name, names[0], ds.images[keep], ds.labels[keep]),
        DigitDataset(ds.name, names[1], ds.images[held], ds.labels[held]),
    )


def load_splits(name: str, *, data_dir: str | os.PathLike | None = None, val_fraction: float = 0.1,
                seed: int = 0, size: int = 28, download: bool = True, verify: bool = True) -> Splits:
    """Load dataset ``name`` as train / validation / test splits.

    The validation split is held out of the training set, stratified and deterministic by
    ``seed``. For ``digits`` (no official test split) 25% is held out as test with a fixed seed 0,
    so every run on ``digits`` is tested on the same images. A path (an image folder or a Kaggle
    CSV, see :mod:`digitlens.userdata`) is all test split: its train and validation splits are empty.
    ``verify=False`` accepts MNIST files that are not the canonical ones (see :func:`load_mnist_split`).
    """
    if userdata.is_path_dataset(name):
        test = userdata.load_path_dataset(name)
        empty = DigitDataset(test.name, "train", test.images[:0], torch.zeros(0, dtype=torch.int64))
        return Splits(empty, DigitDataset(test.name, "val", empty.images, empty.labels), test)
    if name == "mnist":
        folder = locate_mnist(data_dir, download=download)
        full_train = load_mnist_split(folder, "train", verify=verify)
        test = load_mnist_split(folder, "test", verify=verify)
    elif name == "digits":
        everything = load_digits_dataset(size=size)
        full_train, test = split_dataset(everything, 0.25, 0, ("train", "test"))
    else:
        raise DigitlensError(f"--dataset {name!r}: unknown dataset (choose from {', '.join(DATASETS)}, "
                             f"an image folder root/0..9/ or a Kaggle .csv file)")
    if val_fraction > 0:
        train, val = split_dataset(full_train, val_fraction, seed, ("train", "val"))
    else:
        train, val = full_train, DigitDataset(full_train.name, "val", full_train.images[:0], full_train.labels[:0])
    return Splits(train, val, test)


def load_splits_for_run(config: dict, data_dir: str | os.PathLike | None = None) -> Splits:
    """The splits a run was trained on, from its ``config.json`` dict (keys ``dataset``, ``seed``,
    ``val_fraction``, ``verify``; ``data_dir`` overrides the one recorded in the config)."""
    return load_splits(
        config["dataset"],
        data_dir=data_dir if data_dir is not None else config.get("data_dir"),
        val_fraction=config.get("val_fraction", 0.1),
        seed=config.get("seed", 0),
        size=config.get("image_size", 28),
        verify=bool(config.get("verify", True)),
    )
