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


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Each test its own DIGITLENS_CACHE, so verified.json (and downloads) never touch the user's cache."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("DIGITLENS_CACHE", str(cache))
    return cache


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


# --- loading -------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
def test_mnist_from_the_environment_variable(tmp_path, monkeypatch, gz):
    raw = make_fake_mnist(tmp_path / "mnist", gz=gz)
    monkeypatch.setenv("DIGITLENS_DATA", str(tmp_path / "mnist"))
    splits = data.load_splits("mnist", val_fraction=0.25, seed=0, download=False, verify=False)
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
    from_b = data.load_splits("mnist", data_dir=tmp_path / "b", val_fraction=0.25, download=False,
                              verify=False).test.images
    from_env = data.load_splits("mnist", val_fraction=0.25, download=False, verify=False).test.images
    assert not torch.equal(from_b, from_env)
    assert torch.equal(from_b, data.load_mnist_split(tmp_path / "b", "test", verify=False).images)


@pytest.mark.slow
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
        data.load_mnist_split(tmp_path, "test", verify=False)
    assert _one_line(err) == f"{path}: 19 labels for 20 images in t10k-images-idx3-ubyte"


def test_wrong_checksum(tmp_path, fake_hashes):
    make_fake_mnist(tmp_path)
    assert len(data.load_mnist_split(tmp_path, "test", verify=True)) == 20  # right hashes pass
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    other = bytearray(fake_hashes["t10k-images-idx3-ubyte"])
    other[-1] ^= 0xFF  # one pixel changed: still a valid IDX file, wrong content
    path.write_bytes(gzip.compress(bytes(other)))
    assert len(data.load_mnist_split(tmp_path, "test", verify=False)) == 20  # readable without verification
    with pytest.raises(DigitlensError) as err:
        data.load_mnist_split(tmp_path, "test", verify=True)
    assert _one_line(err).startswith(f"{path}: not the canonical MNIST file (SHA-256")
    assert "--no-verify" in str(err.value)


def _gzip_stream(parts, total_zeros: int = 0) -> bytes:
    """gzip of ``parts`` followed by ``total_zeros`` zero bytes, compressed chunk by chunk."""
    import zlib

    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: a gzip container
    out = [comp.compress(b"".join(parts))]
    chunk = bytes(1 << 20)
    for start in range(0, total_zeros, len(chunk)):
        out.append(comp.compress(chunk[: min(len(chunk), total_zeros - start)]))
    out.append(comp.flush())
    return b"".join(out)


def test_gzip_bomb_is_refused_after_the_promised_bytes_with_bounded_memory(tmp_path):
    import tracemalloc

    header = struct.pack(">IIII", 2051, 10, 28, 28)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(_gzip_stream([header, bytes(7840)], total_zeros=64 << 20))  # ~64 KB inflating to 64 MiB
    assert path.stat().st_size < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(DigitlensError) as err:
            data.read_idx(path, 3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert _one_line(err) == f"{path}: more data after the 7840 bytes the IDX header promises"
    assert peak < 8 << 20, f"read_idx peaked at {peak / 2**20:.1f} MiB on a 64 MiB bomb"


def test_header_promising_too_much_is_refused_before_reading(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(struct.pack(">IIII", 2051, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF) + bytes(100))  # product overflows int64
    with pytest.raises(DigitlensError) as err:
        data.read_idx(path, 3)
    assert _one_line(err).startswith(f"{path}: IDX header promises 4294967295x4294967295x4294967295 = ")
    path.write_bytes(struct.pack(">IIII", 2051, 1_000_000, 28, 28) + bytes(100))  # 784 MB: over MAX_IDX_BYTES
    with pytest.raises(DigitlensError, match="more than the .* allowed"):
        data.read_idx(path, 3)


def test_corrupt_deflate_stream_is_one_line(tmp_path):
    raw = fake_raw()["t10k-images-idx3-ubyte"]
    blob = bytearray(gzip.compress(raw))
    blob[10:14] = b"\xff" * 4  # the first deflate block header: zlib.error ("invalid block type"), not BadGzipFile
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(bytes(blob))
    with pytest.raises(DigitlensError) as err:
        data.read_idx(path, 3)
    assert _one_line(err).startswith(f"{path}: ")


def test_trailing_data_in_a_plain_file_is_refused(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(np.arange(20) % 10) + b"\x00")
    with pytest.raises(DigitlensError, match="more data after the 20 bytes"):
        data.read_idx(path, 1)


@pytest.mark.parametrize("case", ["14x14", "no images", "label 10"])
def test_unknown_idx_files_get_shape_and_label_checks(tmp_path, case):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 28, 28))
    labels = np.arange(20) % 10
    if case == "14x14":
        images = images[:, :14, :14]
    elif case == "no images":
        images, labels = images[:0], labels[:0]
    else:
        labels[3] = 10
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    expected = {"14x14": "t10k-images-idx3-ubyte: images of 14x14 pixels, expected 28x28",
                "no images": "t10k-images-idx3-ubyte: no images",
                "label 10": "t10k-labels-idx1-ubyte: label 10 is not a digit 0-9"}[case]
    with pytest.raises(DigitlensError) as err:
        data.load_mnist_split(tmp_path, "test", verify=False)
    assert _one_line(err) == f"{tmp_path}/{expected}"


def test_local_files_are_verified_by_default_and_the_verification_is_remembered(tmp_path, fake_hashes, monkeypatch):
    make_fake_mnist(tmp_path / "ok")
    make_fake_mnist(tmp_path / "swapped", seed=5)  # valid IDX files, not the known ones
    with pytest.raises(DigitlensError) as err:
        data.load_splits("mnist", data_dir=tmp_path / "swapped", download=False)
    assert "not the canonical MNIST file" in _one_line(err) and "--no-verify" in str(err.value)
    assert len(data.load_splits("mnist", data_dir=tmp_path / "swapped", download=False, verify=False,
                                val_fraction=0.25).test) == 20
    assert len(data.load_splits("mnist", data_dir=tmp_path / "ok", download=False, val_fraction=0.25).test) == 20
    cache = data.verified_cache_path().read_text()
    path = tmp_path / "ok" / "t10k-images-idx3-ubyte.gz"
    assert str(path.resolve()) in cache and fake_hashes is not None
    # Remembered: the second load computes no SHA-256 of the four files.
    calls = []
    real = data.read_idx_with_digest
    monkeypatch.setattr(data, "read_idx_with_digest", lambda *a, **k: calls.append(k["digest"]) or real(*a, **k))
    data.load_splits("mnist", data_dir=tmp_path / "ok", download=False, val_fraction=0.25)
    assert calls == [False] * 4
    # A changed file (new mtime) is verified again, and refused.
    swapped = tmp_path / "swapped" / "t10k-images-idx3-ubyte.gz"
    shutil.copy(swapped, path)
    with pytest.raises(DigitlensError, match="not the canonical MNIST file"):
        data.load_mnist_split(tmp_path / "ok", "test")


# --- fuzzing the IDX reader: every outcome is the one-line error or data the header promises --

def _fuzz_check(path: Path, blob: bytes, ndim: int) -> None:
    path.write_bytes(blob)
    try:
        array, sha = data.read_idx_with_digest(path, ndim)
    except DigitlensError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        return
    # Accepted: the decompressed file is exactly header + the promised bytes, and that is what we got.
    plain = gzip.decompress(blob) if blob[:2] == b"\x1f\x8b" else blob
    header_len = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", plain[4:header_len])
    assert array.shape == dims and len(plain) == header_len + array.size
    assert array.tobytes() == plain[header_len:] and sha == hashlib.sha256(plain).hexdigest()


@pytest.mark.slow
def test_fuzzed_idx_files_give_the_one_line_error_or_the_promised_data(tmp_path):
    """Seeded: header and byte mutations, truncations, appended bytes and bombs, plain and gzipped
    (the audit's 5,000-file run is the benchmark; this bounded run takes a few seconds)."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    raws = {3: idx_bytes(np.random.default_rng(0).integers(0, 256, (6, 28, 28))), 1: idx_bytes(np.arange(12) % 10)}

    @settings(max_examples=1500, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(ndim=st.sampled_from([1, 3]), gz=st.booleans(), seed=st.integers(0, 2**32 - 1),
           kind=st.sampled_from(["flip", "header", "truncate", "append", "bomb", "compressed-flip"]))
    def run(ndim, gz, seed, kind):
        rng = np.random.default_rng(seed)
        raw = bytearray(raws[ndim])
        header_len = 4 + 4 * ndim
        if kind == "flip":
            for i in rng.integers(0, len(raw), int(rng.integers(1, 8))):
                raw[i] = int(rng.integers(0, 256))
        elif kind == "header":
            i = int(rng.integers(0, header_len))
            raw[i] = int(rng.integers(0, 256))
        elif kind == "truncate":
            raw = raw[: int(rng.integers(0, len(raw)))]
        elif kind == "append":
            raw += bytes(rng.integers(0, 256, int(rng.integers(1, 50)), dtype=np.uint8))
        blob = bytes(raw)
        if kind == "bomb":
            blob, gz = _gzip_stream([blob], total_zeros=int(rng.integers(1, 4)) << 20), False
        elif gz or kind == "compressed-flip":
            blob = bytearray(gzip.compress(blob))
            if kind == "compressed-flip":
                for i in rng.integers(0, len(blob), int(rng.integers(1, 4))):
                    blob[i] = int(rng.integers(0, 256))
            blob = bytes(blob)
        _fuzz_check(tmp_path / f"fuzz-{ndim}", blob, ndim)

    run()


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


@pytest.mark.slow
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
