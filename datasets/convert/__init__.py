"""Converters from public click/rating logs to the dataset layout of schema.py.

`convert(kind, src, out_dir)` writes DIR/dataset.json, the three splits and the profile, prints a
one-line summary and returns the spec; DIR is replaced whole or not at all (see outdir.py). Every
converter maps categorical values to ids by descending train-split frequency, with id 0 for
unknown / rare (< min_count) / missing values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from embshard.datasets.convert import avazu, criteo
from embshard.datasets.convert.movielens import convert_movielens
from embshard.datasets.convert.stream import convert_text
from embshard.datasets.outdir import check_output
from embshard.datasets.schema import DatasetSpec
from embshard.errors import DataError

Kind = Literal["criteo", "avazu", "movielens"]
KINDS: tuple[str, ...] = ("criteo", "avazu", "movielens")


def convert(kind: Kind, src: str | Path, out_dir: str | Path, *, min_count: int = 1,
            strict: bool = False, overwrite: bool = False) -> DatasetSpec:
    """strict=True turns the first malformed input line into a DataError instead of skipping it;
    overwrite=True lets a complete new dataset replace the one in a non-empty `out_dir`."""
    src = Path(src)
    if min_count < 1:
        raise DataError(f"min_count must be >= 1, got {min_count}")
    # Before reading the input: a full Criteo pass takes minutes, a refusal should not.
    check_output(Path(out_dir), overwrite)
    options = {"min_count": min_count, "strict": strict, "overwrite": overwrite}
    if kind == "criteo":
        spec, summary = convert_text(criteo.FORMAT, src, out_dir, **options)
    elif kind == "avazu":
        spec, summary = convert_text(avazu.text_format(src), src, out_dir, **options)
    elif kind == "movielens":
        spec, summary = convert_movielens(src, out_dir, **options)
    else:
        raise DataError(f"unknown dataset kind {kind!r} (one of {', '.join(KINDS)})")
    print(summary)
    return spec
