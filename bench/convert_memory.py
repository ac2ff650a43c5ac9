"""Peak memory and wall time of the converters whose memory grew with their input: MovieLens (a
csv release's ratings) and Avazu with `--dedup-key id`, each on generated input of a size a user
has, run as `embshard data convert` in a process of its own.

    .venv/bin/python bench/convert_memory.py [--ratings 10000000] [--avazu-rows 5000000] [--work DIR]

The inputs are written once into --work (about 230 MB and 175 MB at the defaults) and reused.
The MovieLens ratings have 160k users and 60k Zipf-popular movies, so about 30% are neutral and
dropped; a tenth of the Avazu rows repeat an earlier row's id. The figures in the README were
measured with this script at the commit named there and at the commit before the change.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_CHUNK = 1_000_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratings", type=int, default=10_000_000, help="MovieLens ratings to generate")
    parser.add_argument("--avazu-rows", type=int, default=5_000_000, help="Avazu rows to generate")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "embshard-convert-memory",
                        help="where the inputs are kept (each dataset is written to a temporary folder in it)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    movielens = _movielens(args.work / f"ml-{args.ratings}", args.ratings, rng)
    avazu = _avazu(args.work / f"avazu-{args.avazu_rows}.csv", args.avazu_rows, rng)
    print(f"{'conversion':<32} {'input MB':>9} {'peak RSS MB':>12} {'seconds':>8}")
    for name, command, size in (
        ("movielens (csv release)", ["movielens", str(movielens)], (movielens / "ratings.csv").stat().st_size),
        ("avazu --dedup-key id", ["avazu", str(avazu), "--dedup-key", "id"], avazu.stat().st_size),
    ):
        # A folder of its own: `--out WORK/out --overwrite` replaced a dataset the user kept there.
        with tempfile.TemporaryDirectory(prefix=".convert-memory-", dir=args.work) as tmp:
            peak, seconds = _measured([sys.executable, "-m", "embshard.cluster.cli", "data", "convert", *command,
                                       "--out", str(Path(tmp) / "out")])
        print(f"{name:<32} {size / 1e6:>9.0f} {peak / 1e6:>12.0f} {seconds:>8.1f}")


def _measured(command: list[str]) -> tuple[int, float]:
    """(peak resident bytes, seconds) of `command`, run in a fresh process: a process's
    RUSAGE_CHILDREN is the largest of the children it has waited for, so one wrapper per run."""
    wrapper = ("import resource, subprocess, sys; "
               "done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
               "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    code, kib = map(int, done.stdout.split())
    if code != 0:
        raise SystemExit(f"{' '.join(command)}: exit {code}")
    return kib * 1024, seconds


def _movielens(folder: Path, n: int, rng: np.random.Generator) -> Path:
    if (folder / "movies.csv").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "ratings.csv", "w") as f:
        f.write("userId,movieId,rating,timestamp\n")
        for start in range(0, n, _CHUNK):
            m = min(_CHUNK, n - start)
            rows = zip(rng.integers(1, 160_000, m), rng.zipf(1.3, m) % 60_000 + 1, rng.integers(1, 11, m) / 2,
                       rng.integers(800_000_000, 1_600_000_000, m), strict=True)
            f.write("".join(f"{u},{i},{r:g},{t}\n" for u, i, r, t in rows))
    # Last: its presence says the folder is complete.
    (folder / "movies.csv").write_text("movieId,title,genres\n" + "".join(
        f'{i},"Movie {i}, The (19{i % 100:02d})",Drama|Comedy\n' for i in range(1, 60_001)))
    return folder


def _avazu(path: Path, n: int, rng: np.random.Generator) -> Path:
    if path.is_file():
        return path
    ids = rng.integers(10**18, 10**19, n, dtype=np.uint64)
    ids[n // 2:n // 2 + n // 10] = ids[:n // 10]  # a tenth repeat an earlier row's id
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as f:
        f.write("id,click,hour,C1\n")
        for start in range(0, n, _CHUNK):
            m = min(_CHUNK, n - start)
            rows = zip(ids[start:start + m], rng.integers(0, 2, m), rng.integers(0, 24, m),
                       rng.integers(0, 1000, m), strict=True)
            f.write("".join(f"{i},{c},141021{h:02d},{v}\n" for i, c, h, v in rows))
    partial.rename(path)
    return path


if __name__ == "__main__":
    main()
