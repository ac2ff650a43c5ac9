"""Converters from public click/rating logs to the dataset layout of schema.py.

`convert(kind, src, out_dir)` writes DIR/dataset.json, the three splits and the profile, prints a
one-line summary and returns the spec; DIR is replaced whole or not at all (see outdir.py). Every
converter maps categorical values to ids by descending train-split frequency, with id 0 for
unknown / rare (< min_count) / missing values (the OOV id). Splits: `time` (by time or line order,
80/10/10), `random` (seeded, row-level 80/10/10), `leave-last` (per user; MovieLens) and
ML-100K's official `u1`..`u5`, `ua`, `ub` files.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, TypedDict

from embshard.datasets.convert import avazu, criteo
from embshard.datasets.convert.inputs import resolve_inputs
from embshard.datasets.convert.movielens import OFFICIAL_SPLITS, convert_movielens
from embshard.datasets.convert.oov import oov_report
from embshard.datasets.convert.stream import convert_text
from embshard.datasets.convert.text import inputs_held_still
from embshard.datasets.outdir import check_not_inside, check_output, writing
from embshard.datasets.schema import TARGETS, DatasetSpec
from embshard.datasets.storage import location
from embshard.errors import DataError

Kind = Literal["criteo", "avazu", "movielens"]
KINDS: tuple[str, ...] = ("criteo", "avazu", "movielens")
USER_SPLITS = ("leave-last",)
SPLIT_KINDS: tuple[str, ...] = ("time", "random", *USER_SPLITS, *OFFICIAL_SPLITS)


class _Options(TypedDict):
    """The keyword arguments every converter takes (typed, so each `**options` call is checked)."""

    min_count: int
    split: str
    seed: int
    strict: bool
    overwrite: bool


# 2, not 1: with 1 every train value gets its own row, no train row ever uses the OOV id, and every
# value unseen in train meets an embedding row that never received a gradient. With 2, values seen
# once in train share the OOV row, which then trains on real data.
DEFAULT_MIN_COUNT = 2


def convert(kind: Kind, src: str | Path | Sequence[str | Path], out_dir: str | Path, *,
            min_count: int = DEFAULT_MIN_COUNT, split: str = "time", seed: int = 0,
            dedup_key: str | None = None, strict: bool = False, overwrite: bool = False,
            target: str = "click") -> DatasetSpec:
    """`src`: criteo/avazu take files and folders (read in order as one log, see inputs.py), and
    `dedup_key` keeps only the first row of each value of that column; movielens takes one folder.
    strict=True turns the first malformed input line into a DataError instead of skipping it;
    overwrite=True lets a complete new dataset replace the one in a non-empty `out_dir`. target:
    "click" (0/1 labels) or, for movielens, "rating" (every rating as the label). Prints
    a summary and the share of OOV ids per split and feature (also in dataset.json)."""
    sources = [Path(src)] if isinstance(src, (str, Path)) else [Path(s) for s in src]
    if not sources:
        raise DataError(f"{kind}: no input given")
    if min_count < 1:
        raise DataError(f"min_count must be >= 1, got {min_count}")
    if seed < 0:
        raise DataError(f"seed must be >= 0, got {seed}")
    if split not in SPLIT_KINDS:
        raise DataError(f"unknown split {split!r} (one of {', '.join(SPLIT_KINDS)})")
    if kind != "movielens" and split in (*USER_SPLITS, *OFFICIAL_SPLITS):
        what = "needs a user column" if split in USER_SPLITS else "is MovieLens-100K's own split"
        raise DataError(f"split {split!r} {what}: {kind} has none; use --split time or random")
    if target not in TARGETS:
        raise DataError(f"unknown target {target!r} (one of {', '.join(TARGETS)})")
    if kind != "movielens" and target != "click":
        raise DataError(f"target {target!r}: {kind} logs hold clicks, not ratings; only movielens has it")
    if kind == "movielens" and (len(sources) > 1 or dedup_key is not None):
        raise DataError("movielens: give one release folder (several inputs and --dedup-key are for "
                        "criteo and avazu)")
    files = resolve_inputs(sources, kind) if kind != "movielens" else sources
    # Before reading the input: a full Criteo pass takes minutes, a refusal should not. The files
    # themselves, links followed: one inside --out would go with the folder it replaces.
    out = location(out_dir)
    check_not_inside(out, files)
    options: _Options = {"min_count": min_count, "split": split, "seed": seed, "strict": strict, "overwrite": overwrite}
    with writing(out), inputs_held_still():
        check_output(out, overwrite)
        if kind == "criteo":
            spec, summary = convert_text(criteo.FORMAT, files, out_dir, dedup_key=dedup_key, **options)
        elif kind == "avazu":
            spec, summary = convert_text(avazu.text_format(files), files, out_dir, dedup_key=dedup_key, **options)
        elif kind == "movielens":
            spec, summary = convert_movielens(sources[0], out_dir, target=target, **options)
        else:
            raise DataError(f"unknown dataset kind {kind!r} (one of {', '.join(KINDS)})")
    print(summary)
    print(oov_report(spec))
    only_oov = [f.name for f in spec.sparse if f.cardinality == 1]
    if only_oov:  # else seen only as 100% in the OOV table, and trained on as if it were a feature
        why = (f"no train value of {', '.join(only_oov)} occurs --min-count {min_count} times" if min_count > 1
               else f"the train split holds no value of {', '.join(only_oov)}")
        print(f"warning: {why}: each of its ids is the OOV id, and it tells the model nothing"
              + ("; lower --min-count" if min_count > 1 else ""), file=sys.stderr)
    return spec
