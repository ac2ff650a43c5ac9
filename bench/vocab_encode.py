"""Time to encode one converter chunk of raw categorical values into ids, against the vocabulary's
size: `Vocabulary.encode` (a hash table of the vocabulary built once) beside Arrow's `index_in`
(which builds that table from the whole vocabulary at every call), measured in the same run.

    .venv/bin/python bench/vocab_encode.py [--chunk 65536] [--sizes 250000,1000000,4000000]

A converter encodes every chunk of every feature (16 MB of input a chunk): with `index_in` a
Criteo feature of millions of values cost seconds a chunk, so a file's encoding pass grew with
its size times its vocabulary's.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from common import bench_main

from embshard.cluster.cli_args import positive
from embshard.datasets.vocabulary import Vocabulary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk", type=positive, default=65536, help="values per chunk")
    parser.add_argument("--sizes", type=lambda text: [positive(s) for s in text.split(",")],
                        default="250000,1000000,4000000", help="vocabulary sizes")
    parser.add_argument("--repeats", type=positive, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'vocabulary':>12} {'encode ms/chunk':>16} {'index_in ms/chunk':>18} {'ratio':>7}")
    for size in args.sizes:
        # Criteo's categorical values: 8-digit hex strings; a tenth of the chunk unseen in training.
        values = pa.array(np.char.mod("%08x", rng.choice(2**32, size, replace=False)))
        picks = rng.integers(0, size + size // 10, args.chunk)
        chunk = pa.array(np.where(picks < size, values.to_numpy(zero_copy_only=False)[np.minimum(picks, size - 1)],
                                  "ffffffffff"))
        vocab = Vocabulary(values, np.ones(size, dtype=np.int64))
        vocab.encode(chunk)  # its table is built at the first chunk, once per feature
        ours, ids = _best(vocab.encode, (chunk,), args.repeats)
        arrow, found = _best(_index_in, (chunk, values), args.repeats)
        assert np.array_equal(ids, found)
        print(f"{size:>12,} {ours * 1e3:>16.0f} {arrow * 1e3:>18.0f} {arrow / ours:>6.1f}x")


def _index_in(chunk: pa.Array, values: pa.Array) -> np.ndarray:
    return pc.fill_null(pc.index_in(chunk, value_set=values), -1).to_numpy() + 1


def _best(fn: Callable[..., np.ndarray], args: tuple, repeats: int) -> tuple[float, np.ndarray]:
    """The fastest of `repeats` calls, and what it returned."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - start)
    return min(times), out


if __name__ == "__main__":
    bench_main(main)
