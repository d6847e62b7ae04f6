"""The IDX reader against mutated MNIST files: every outcome must be digitlens' one-line error or
the data the header promised (issue 14's benchmark: 5,000 mutations, 0 other exceptions, peak
memory under 300 MB).

Mutates the real ``t10k-labels-idx1-ubyte.gz`` and the first 1,000 images of
``t10k-images-idx3-ubyte`` (plain and gzipped): random byte flips in the header, in the data
and in the compressed stream, truncations, appended bytes, and gzip bombs (a true header
followed by 64-256 MiB of zeros). Prints the counts per outcome, the seconds and the peak
resident memory of the process.

    python benchmarks/idx_fuzz.py [--data-dir DIR] [--n 5000] [--seed 0]
"""

from __future__ import annotations

import argparse
import gzip
import os
import resource
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np


def bomb(raw: bytes, zeros: int) -> bytes:
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(1 << 20)
    parts = [comp.compress(raw)] + [comp.compress(chunk) for _ in range(zeros >> 20)] + [comp.flush()]
    return b"".join(parts)


def main() -> None:
    from digitlens import data
    from digitlens.errors import DigitlensError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("DIGITLENS_DATA"))
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = Path(args.data_dir)
    labels = gzip.decompress((folder / "t10k-labels-idx1-ubyte.gz").read_bytes())
    images = gzip.decompress((folder / "t10k-images-idx3-ubyte.gz").read_bytes())
    images = images[:4] + (1000).to_bytes(4, "big") + images[8:16 + 1000 * 784]
    sources = {1: labels, 3: images}
    bombs = {nd: bomb(raw, 64 << 20) for nd, raw in sources.items()}  # built once, mutated below
    rng = np.random.default_rng(args.seed)
    outcomes: Counter = Counter()
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz"
        for _ in range(args.n):
            ndim = int(rng.choice([1, 3]))
            raw = bytearray(sources[ndim])
            kind = str(rng.choice(["header", "data", "truncate", "append", "gz-flip", "bomb"]))
            if kind == "header":
                raw[int(rng.integers(0, 4 + 4 * ndim))] = int(rng.integers(0, 256))
            elif kind == "data":
                for i in rng.integers(0, len(raw), int(rng.integers(1, 16))):
                    raw[i] = int(rng.integers(0, 256))
            elif kind == "truncate":
                raw = raw[: int(rng.integers(0, len(raw)))]
            elif kind == "append":
                raw += bytes(rng.integers(0, 256, int(rng.integers(1, 100)), dtype=np.uint8))
            if kind == "bomb":
                blob = bytearray(bombs[ndim])
                if rng.random() < 0.5:  # a lying header in the bomb as well
                    blob = bytearray(bomb(bytes(raw[:4]) + bytes(rng.integers(0, 256, 4 * ndim, dtype=np.uint8)),
                                          int(rng.integers(1, 4)) << 20))
            elif kind == "gz-flip" or rng.random() < 0.5:
                blob = bytearray(gzip.compress(bytes(raw), compresslevel=1))
                if kind == "gz-flip":
                    for i in rng.integers(0, len(blob), int(rng.integers(1, 6))):
                        blob[i] = int(rng.integers(0, 256))
            else:
                blob = raw
            path.write_bytes(bytes(blob))
            try:
                data.read_idx(path, ndim)
                outcomes["accepted"] += 1
            except DigitlensError as exc:
                outcomes["one-line error" if "\n" not in str(exc) else "multi-line error"] += 1
            except Exception as exc:  # noqa: BLE001  what the benchmark counts
                outcomes[f"other: {type(exc).__name__}"] += 1
    seconds = time.perf_counter() - tic
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.n} mutated files in {seconds:.1f} s; peak RSS {peak_mb:.0f} MB")
    for outcome, count in sorted(outcomes.items()):
        print(f"  {outcome}: {count}")
    sys.exit(1 if any(k.startswith(("other", "multi")) for k in outcomes) else 0)


if __name__ == "__main__":
    main()
