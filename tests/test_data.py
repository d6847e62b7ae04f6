"""Data loading: MNIST IDX files (gzipped and plain) from DIGITLENS_DATA, the bundled digits,
deterministic validation splits, one-line errors for every kind of bad file, and the download
path against a local HTTP server on 127.0.0.1 (checksums, mirror fallback)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import os
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from digitlens import data
from digitlens.errors import DigitlensError

REAL_MNIST = os.environ.get("DIGITLENS_DATA")
needs_mnist = pytest.mark.skipif(not REAL_MNIST, reason="DIGITLENS_DATA is not set (folder with the MNIST .gz files)")


# --- small synthetic MNIST-format files ----------------------------------------------------

def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file: magic 2049 (1-d) or 2051 (3-d), the dimensions, the data."""
    magic = {1: 2049, 3: 2051}[array.ndim]
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def fake_raw(*, n_train: int = 40, n_test: int = 20, seed: int = 0) -> dict:
    """Bytes of the four files ({stem: raw IDX bytes}); labels cycle 0..9, pixels random by seed."""
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (n_train, 28, 28))),
        "train-labels-idx1-ubyte": idx_bytes(np.arange(n_train) % 10),
        "t10k-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (n_test, 28, 28))),
        "t10k-labels-idx1-ubyte": idx_bytes(np.arange(n_test) % 10),
    }


def make_fake_mnist(folder: Path, *, gz: bool = True, seed: int = 0) -> dict:
    """Write the four files of :func:`fake_raw` into ``folder`` (gzipped or plain); return the raw bytes."""
    raw = fake_raw(seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, content in raw.items():
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(content))
        else:
            (folder / stem).write_bytes(content)
    return raw


@pytest.fixture
def fake_hashes(monkeypatch):
    """Point data.MNIST_FILES at the SHA-256 of the seed-0 synthetic files; return their bytes."""
    raw = fake_raw(seed=0)
    monkeypatch.setattr(data, "MNIST_FILES", {stem: hashlib.sha256(b).hexdigest() for stem, b in raw.items()})
    return raw


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


# --- loading -------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
def test_mnist_from_the_environment_variable(tmp_path, monkeypatch, gz):
    raw = make_fake_mnist(tmp_path / "mnist", gz=gz)
    monkeypatch.setenv("DIGITLENS_DATA", str(tmp_path / "mnist"))
    splits = data.load_splits("mnist", val_fraction=0.25, seed=0, download=False)
    assert splits.train.images.shape == (30, 1, 28, 28) and splits.val.images.shape == (10, 1, 28, 28)
    assert splits.test.images.shape == (20, 1, 28, 28) and splits.test.images.dtype == torch.float32
    assert splits.train.labels.dtype == torch.int64
    pixels = np.frombuffer(raw["t10k-images-idx3-ubyte"], np.uint8, offset=16).reshape(20, 28, 28)
    np.testing.assert_allclose(splits.test.images[:, 0].numpy(), pixels / 255.0, atol=1e-7)
    np.testing.assert_array_equal(splits.test.labels.numpy(), np.arange(20) % 10)
    # stratified: every digit keeps 3 training images and 1 validation image
    assert np.bincount(splits.val.labels.numpy(), minlength=10).tolist() == [1] * 10


def test_data_dir_wins_over_the_environment_variable(tmp_path, monkeypatch):
    make_fake_mnist(tmp_path / "a", seed=1)
    make_fake_mnist(tmp_path / "b", seed=2)
    monkeypatch.setenv("DIGITLENS_DATA", str(tmp_path / "a"))
    from_b = data.load_splits("mnist", data_dir=tmp_path / "b", val_fraction=0.25, download=False).test.images
    from_env = data.load_splits("mnist", val_fraction=0.25, download=False).test.images
    assert not torch.equal(from_b, from_env)
    assert torch.equal(from_b, data.load_mnist_split(tmp_path / "b", "test").images)


@needs_mnist
def test_real_mnist_gzipped_and_plain_with_checksums(tmp_path):
    folder = Path(REAL_MNIST)
    test = data.load_mnist_split(folder, "test", verify=True)
    assert test.images.shape == (10000, 1, 28, 28)
    assert np.bincount(test.labels.numpy()).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert float(test.images.min()) == 0.0 and float(test.images.max()) == 1.0
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(folder / f"{stem}.gz") as src, open(tmp_path / stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    plain = data.load_mnist_split(tmp_path, "test", verify=True)
    assert torch.equal(plain.images, test.images) and torch.equal(plain.labels, test.labels)


def test_digits_dataset_shapes_and_resize():
    from sklearn.datasets import load_digits

    raw = load_digits()
    small = data.load_digits_dataset(size=8)
    assert small.images.shape == (1797, 1, 8, 8)
    np.testing.assert_allclose(small.images[:, 0].numpy(), raw.images / 16.0)
    big = data.load_digits_dataset(size=28)
    assert big.images.shape == (1797, 1, 28, 28)
    assert float(big.images.min()) >= 0.0 and float(big.images.max()) <= 1.0
    # resizing keeps the mean ink of each image close to the original
    np.testing.assert_allclose(big.images.mean(dim=(1, 2, 3)).numpy(), raw.images.mean(axis=(1, 2)) / 16.0, atol=0.03)
    np.testing.assert_array_equal(big.labels.numpy(), raw.target)


def test_validation_split_is_deterministic_by_seed_and_disjoint():
    a = data.load_splits("digits", val_fraction=0.1, seed=3)
    b = data.load_splits("digits", val_fraction=0.1, seed=3)
    c = data.load_splits("digits", val_fraction=0.1, seed=4)
    assert len(a.test) == 450 and len(a.train) + len(a.val) == 1347 and len(a.val) == 135
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.labels, b.train.labels)
    assert not torch.equal(a.val.images, c.val.images)
    assert torch.equal(a.test.images, c.test.images)  # the test split never depends on the seed
    train_rows = {row.numpy().tobytes() for row in a.train.images}
    assert not any(row.numpy().tobytes() in train_rows for row in a.val.images)


def test_unknown_dataset_and_bad_fraction():
    with pytest.raises(DigitlensError, match="--dataset 'fashion': unknown dataset"):
        data.load_splits("fashion")
    with pytest.raises(DigitlensError, match="split fraction 1.5"):
        data.load_splits("digits", val_fraction=1.5)


# --- bad files: one line naming the file and the problem ------------------------------------

def test_missing_file(tmp_path):
    make_fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DigitlensError) as err:
        data.load_mnist_split(tmp_path, "test")
    assert "t10k-labels-idx1-ubyte: file not found" in _one_line(err) and str(tmp_path) in str(err.value)
    with pytest.raises(DigitlensError) as err:
        data.load_splits("mnist", data_dir=tmp_path, download=False)
    assert "missing MNIST file t10k-labels-idx1-ubyte" in _one_line(err)
    with pytest.raises(DigitlensError, match="folder not found"):
        data.load_splits("mnist", data_dir=tmp_path / "nope", download=False)


def test_truncated_gzip(tmp_path):
    make_fake_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(DigitlensError) as err:
        data.load_mnist_split(tmp_path, "test")
    assert _one_line(err).startswith(f"{path}: corrupt or truncated gzip")


def test_wrong_idx_magic(tmp_path):
    raw = make_fake_mnist(tmp_path, gz=False)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(struct.pack(">I", 2051) + raw["t10k-labels-idx1-ubyte"][4:])
    with pytest.raises(DigitlensError) as err:
        data.load_mnist_split(tmp_path, "test")
    assert _one_line(err).startswith(f"{path}: wrong IDX magic number 2051 (expected 2049")


def test_truncated_idx_data(tmp_path):
    raw = make_fake_mnist(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(raw["t10k-images-idx3-ubyte"][:-100])
    with pytest.raises(DigitlensError) as err:
        data.load_mnist_split(tmp_path, "test")
    assert _one_line(err).startswith(f"{path}: truncated IDX data")


def test_image_label_count_mismatch(tmp_path):
    make_fake_mnist(tmp_path, gz=False)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(np.arange(19) % 10))
    with pytest.raises(DigitlensError) as err:
        data.load_mnist_split(tmp_path, "test")
    assert _one_line(err) == f"{path}: 19 labels for 20 images in t10k-images-idx3-ubyte"


def test_wrong_checksum(tmp_path, fake_hashes):
    make_fake_mnist(tmp_path)
    assert len(data.load_mnist_split(tmp_path, "test", verify=True)) == 20  # right hashes pass
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    other = bytearray(fake_hashes["t10k-images-idx3-ubyte"])
    other[-1] ^= 0xFF  # one pixel changed: still a valid IDX file, wrong content
    path.write_bytes(gzip.compress(bytes(other)))
    assert len(data.load_mnist_split(tmp_path, "test")) == 20  # readable without verification
    with pytest.raises(DigitlensError) as err:
        data.load_mnist_split(tmp_path, "test", verify=True)
    assert _one_line(err).startswith(f"{path}: wrong SHA-256")


# --- download against a local HTTP server ----------------------------------------------------

class _Server:
    """A static file server on 127.0.0.1 (random port, own thread) that records requested paths."""

    def __init__(self, root: Path):
        requests = self.requests = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                requests.append(self.path)
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def test_download_verifies_and_falls_back_to_the_next_mirror(tmp_path, fake_hashes):
    make_fake_mnist(tmp_path / "www" / "good", seed=0)
    cache = tmp_path / "cache"
    with _Server(tmp_path / "www") as server:
        folder = data.download_mnist(cache, mirrors=(server.url + "missing/", server.url + "good/"), timeout=10)
        assert folder == cache
        assert sorted(p.name for p in cache.iterdir()) == sorted(f"{s}.gz" for s in data.MNIST_FILES)
        for stem, content in fake_hashes.items():
            assert gzip.decompress((cache / f"{stem}.gz").read_bytes()) == content
        assert sum(r.startswith("/missing/") for r in server.requests) == 4  # each file tried there first
        assert len(data.load_mnist_split(cache, "train", verify=True)) == 40
        # a second call finds verified files and downloads nothing
        before = len(server.requests)
        data.download_mnist(cache, mirrors=(server.url + "good/",), timeout=10)
        assert len(server.requests) == before


def test_download_with_wrong_checksum_leaves_no_file(tmp_path, fake_hashes):
    make_fake_mnist(tmp_path / "www" / "bad", seed=99)  # valid files, different content
    cache = tmp_path / "cache"
    with _Server(tmp_path / "www") as server:
        with pytest.raises(DigitlensError) as err:
            data.download_mnist(cache, mirrors=(server.url + "bad/", server.url + "missing/"), timeout=10)
    message = _one_line(err)
    assert message.startswith("could not download train-images-idx3-ubyte.gz from any mirror")
    assert "wrong SHA-256" in message and "bad/train-images-idx3-ubyte.gz" in message
    assert "missing/train-images-idx3-ubyte.gz" in message
    assert list(cache.iterdir()) == []  # nothing half-written or unverified left behind


@needs_mnist
def test_download_of_the_real_files_from_a_local_mirror(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    for stem in data.MNIST_FILES:
        shutil.copy(Path(REAL_MNIST) / f"{stem}.gz", www / f"{stem}.gz")
    cache = tmp_path / "cache"
    with _Server(www) as server:
        data.download_mnist(cache, mirrors=(server.url,), timeout=30)
    for stem, sha in data.MNIST_FILES.items():
        with gzip.open(cache / f"{stem}.gz") as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == sha


def test_locate_mnist_downloads_into_the_cache_when_nothing_else_is_there(tmp_path, monkeypatch, fake_hashes):
    make_fake_mnist(tmp_path / "www", seed=0)
    monkeypatch.delenv("DIGITLENS_DATA", raising=False)
    monkeypatch.setenv("DIGITLENS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DigitlensError, match="MNIST not found in .*pass --data-dir or set DIGITLENS_DATA"):
        data.locate_mnist(download=False)
    with _Server(tmp_path / "www") as server:
        monkeypatch.setattr(data, "MNIST_MIRRORS", (server.url,))
        folder = data.locate_mnist()
    assert folder == tmp_path / "cache" / "mnist"
    assert len(data.load_mnist_split(folder, "test", verify=True)) == 20
