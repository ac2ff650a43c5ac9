"""MovieLens ratings as click-style data, for ml-100k, ml-1m (and ml-10m) and ml-20m/25m layouts.

Target `click` (default): label rating >= 4 -> 1, rating <= 2 -> 0; ratings in between (3, and
2.5/3.5 in half-star releases) are dropped as neutral. Target `rating`: every rating, 3s included,
is the label itself (a regression target), and the only features are userId and movieId: the
rating matrix of matrix factorisation (MDE's own MovieLens setting). Either way the raw rating
stays in the `rating` extra column. Rows are
sorted by timestamp (stable) and split by `split_plan`. Features, where the release has them: userId,
movieId, gender, age, occupation, zip, year (from the title or release date) and genres (multi-hot).
Ids by train frequency, unknown id 0 (see vocab.py); a rating whose movie has no genres gets an
empty genre list.

For retrieval models the user features are marked `role: query` and the movie features (movieId,
year, genres) `role: item`; the item catalog `items/` holds one row per movieId id with the
movie's year and genres, and every row carries `item_frequency` (see schema.ITEM_FREQUENCY).
"""

from __future__ import annotations

import codecs
import csv
import io
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from tqdm import tqdm

from embshard.datasets.convert.stream import drop_invalid
from embshard.datasets.convert.text import (
    AN_INTEGER,
    INTEGER,
    Malformed,
    as_text,
    blank_lines,
    emptied,
    line_blocks,
    line_bounds,
    open_input,
    without_stray_returns,
)
from embshard.datasets.convert.vocab import VocabularyBuilder
from embshard.datasets.schema import ITEM_FREQUENCY, OOV_ID, DatasetSpec, ItemCatalog, SparseFeature
from embshard.datasets.vocabulary import Vocabulary
from embshard.datasets.writer import TEST, TRAIN, VALID, DatasetWriter, SplitPlan
from embshard.errors import DataError
from embshard.progress import progress_bar

# ML-100k's u.item ends with one 0/1 flag per genre, in this order.
ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
]
USER_FEATURES = ["gender", "age", "occupation", "zip"]
ITEM_ID = "movieId"
MOVIE_FEATURES = ["year", "genres"]
ROLES = {"userId": "query", **{f: "query" for f in USER_FEATURES},
         ITEM_ID: "item", **{f: "item" for f in MOVIE_FEATURES}}
_YEAR_IN_TITLE = r"\((?P<year>\d{4})\)\s*$"
_YEAR_AT_END = r"(?P<year>\d{4})$"
# Every release rates from 0.5 (half-star releases) or 1 to 5 stars.
MIN_RATING, MAX_RATING = 0.5, 5.0
_RATING = r"^[0-9]{1,2}(\.[0-9]{1,6})?$"
RATINGS = {"userId": "integer", "movieId": "integer", "rating": "rating", "timestamp": "time"}
# ML-100K ships five 80/20 cross-validation splits (u1..u5) and two with exactly 10 test ratings
# per user (ua, ub), as <name>.base / <name>.test files beside u.data.
OFFICIAL_SPLITS = ("u1", "u2", "u3", "u4", "u5", "ua", "ub")
# Official splits have no valid file: the latest tenth of the base file's ratings becomes valid.
VALID_SHARE_OF_BASE = 10
SPLITS_DESCRIBED = {
    "time": "split by timestamp 80/10/10",
    "random": "split at random 80/10/10",
    "leave-last": "split per user: last rating test, the one before valid",
}


@dataclass
class Release:
    name: str
    ratings: pa.Table  # userId, movieId, rating, timestamp (+ `official`: 1 for a test-file row)
    movies: pa.Table  # movieId, year, genres (list<string>)
    users: pa.Table | None  # userId, gender, age, occupation, zip
    movies_file: str  # what the two tables were read from, for messages
    users_file: str = "users.dat"
    repeated: int = 0  # ratings dropped as exact repeats of an earlier one (not malformed: each line parsed)


def convert_movielens(src: Path, out_dir: str | Path, *, min_count: int, split: str, seed: int,
                      strict: bool, overwrite: bool, target: str = "click") -> tuple[DatasetSpec, str]:
    malformed = Malformed(src, strict)
    release = load_release(src, malformed, official=split if split in OFFICIAL_SPLITS else None)
    if target != "rating":  # a rating model reads the ids alone
        _say_unlisted(release, src, strict)
    table = _labelled(release, target)
    n = table.num_rows
    if n == 0:
        raise DataError(f"{src}: no ratings" + ("" if target == "rating" else " left after dropping neutral ones"))
    plan = split_plan(table, split, seed)
    train = plan.codes(np.arange(n)) == TRAIN
    encoded, vocabs = _encoded_features(release, table, target, train, min_count)
    sparse = [SparseFeature(name, vocabs[name].cardinality, pa.types.is_list(ids.type), ROLES.get(name, ""))
              for name, ids in encoded.items()]
    movie_features = [f for f in MOVIE_FEATURES if f in encoded]
    labelled = "label = the rating (all ratings)" if target == "rating" else "rating>=4 positive, <=2 negative"
    described = SPLITS_DESCRIBED.get(split, f"split by {split}.base/{split}.test, valid = the latest "
                                            f"1/{VALID_SHARE_OF_BASE} of {split}.base")
    if split == "random":
        described += f", seed {seed}"
    spec = DatasetSpec(
        name=release.name,
        dense=[],
        sparse=sparse,
        extra=["rating", ITEM_FREQUENCY],
        source=f"movielens:{src} ({release.name}, min_count={min_count}, {labelled}, {described})",
        split=split,
        catalog=ItemCatalog(ITEM_ID, movie_features, vocabs[ITEM_ID].cardinality),
        target=target,
    )
    schema = spec.arrow_schema().append(pa.field("rating", pa.float32())).append(
        pa.field(ITEM_FREQUENCY, pa.float32()))
    positives = (table["rating"].to_numpy() >= 4) & train
    frequency = _item_frequency(encoded[ITEM_ID].to_numpy(), positives, vocabs[ITEM_ID].cardinality)
    out = pa.table({spec.label: table["label"], **encoded, "rating": table["rating"], ITEM_FREQUENCY: frequency})
    with DatasetWriter(out_dir, schema, overwrite=overwrite, total_rows=n,
                       desc=f"{release.name}: writing", oov_features=spec.sparse_names) as writer:
        writer.write_ordered(out, np.arange(n), plan)
        writer.write_catalog(_catalog(release.movies, vocabs, movie_features), spec.catalog_arrow_schema())
        writer.write_vocabularies({name: vocabs[name] for name in spec.sparse_names})
        # Said as the repeats are: a quarter of ML-1M's ratings are 3s, gone without a count.
        neutral = release.ratings.num_rows - n  # the repeats are gone from it already
        dropped = "; ".join(part for part in (
            f"dropped {release.repeated:,} ratings repeating an earlier one" if release.repeated else "",
            f"dropped {neutral:,} neutral ratings (above 2 and below 4)" if neutral else "") if part)
        spec = writer.finish(spec, source=str(src), skipped=malformed.count, dropped=dropped)
    return spec, writer.summary(f"{release.name} -> {out_dir}", skipped=malformed.count, target=target,
                                dropped=dropped)


def _encode(vocab: Vocabulary, values: pa.Array) -> pa.Array:
    if not pa.types.is_list(values.type):
        return pa.array(vocab.encode(values))
    offsets = np.concatenate([[0], np.cumsum(pc.list_value_length(values).fill_null(0).to_numpy())])
    ids = vocab.encode(pc.list_flatten(values))
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(ids))


def _item_frequency(items: np.ndarray, positives: np.ndarray, cardinality: int) -> pa.Array:
    counts = np.bincount(items[positives], minlength=cardinality)
    share = counts / max(int(positives.sum()), 1)
    return pa.array(share[items].astype(np.float32))


def _catalog(movies: pa.Table, vocabs: dict[str, Vocabulary], features: list[str]) -> pa.Table:
    """One row per movieId id, in id order. Id 0 stands for every movie too rare or unseen in
    train, so it gets no year or genres of any one of them: unknown year, no genres."""
    cardinality = vocabs[ITEM_ID].cardinality
    ids = vocabs[ITEM_ID].encode(movies[ITEM_ID])
    movies = _with_unknown_row(movies)
    # Each id > 0 is exactly one movie; one rated but missing from movies.dat gets the unknown row.
    row_of = np.full(cardinality, movies.num_rows - 1, dtype=np.int64)
    known = np.flatnonzero(ids != OOV_ID)
    row_of[ids[known]] = known
    picked = movies.take(pa.array(row_of))
    columns = {ITEM_ID: pa.array(np.arange(cardinality, dtype=np.int64))}
    columns.update({name: _encode(vocabs[name], _array(picked[name])) for name in features})
    return pa.table(columns)


def split_plan(table: pa.Table, split: str, seed: int) -> SplitPlan:
    """The plan for `table`'s rows, which are in time order."""
    n = table.num_rows
    if split == "time":
        return SplitPlan(n)
    if split == "random":
        return SplitPlan.random(n, seed)
    codes = np.full(n, TRAIN, dtype=np.int8)
    if split == "leave-last":
        users = table["userId"].to_numpy(zero_copy_only=False)
        order = np.argsort(users, kind="stable")  # by user; time order kept within each user
        grouped = users[order]
        last = np.r_[grouped[1:] != grouped[:-1], True]
        before_last = np.r_[last[1:], False] & ~last  # a user with one rating has none
        codes[order[before_last]] = VALID
        codes[order[last]] = TEST
    else:
        official = table["official"].to_numpy(zero_copy_only=False)
        codes[official == 1] = TEST
        base = np.flatnonzero(official == 0)
        codes[base[len(base) - len(base) // VALID_SHARE_OF_BASE:]] = VALID
    return SplitPlan(n, codes, split)


def load_release(src: Path, malformed: Malformed, official: str | None = None) -> Release:
    """official: an OFFICIAL_SPLITS name, whose base/test files then replace u.data."""
    if not src.is_dir():
        raise DataError(f"{src}: not a directory (give the unpacked MovieLens folder)")
    split_files = [f"{official}.{part}" for part in ("base", "test")] if official is not None else []
    for name in (*_RELEASE_FILES, *split_files):
        # Else taken for a file the release lacks: "no u.data, ratings.dat or ratings.csv: not a
        # MovieLens release folder" of a folder whose ratings.dat was a broken link.
        if os.path.lexists(src / name) and not (src / name).is_file():
            raise DataError(f"{src / name}: not a regular file (a folder, a pipe or a broken link); MovieLens reads "
                            "it as one")
    ratings = [name for name in _RATINGS_FILES if (src / name).is_file()]
    if len(ratings) > 1:
        # Each marks a release of its own: one was converted, the other left out unsaid.
        raise DataError(f"{src}: holds the ratings of {len(ratings)} MovieLens releases ({', '.join(ratings)}); "
                        "give a folder of one release")
    if official is not None and not (src / "u.data").is_file():
        raise DataError(f"{src}: split {official!r} needs MovieLens-100K's {official}.base and "
                        f"{official}.test; this folder has no u.data, so it is no ML-100K release")
    if (src / "u.data").is_file():
        release = _ml100k(src, malformed, official)
    elif (src / "ratings.dat").is_file():
        release = _ml1m(src, malformed)
    elif (src / "ratings.csv").is_file():
        release = _ml_csv(src, malformed)
    else:
        raise DataError(f"{src}: no u.data, ratings.dat or ratings.csv: not a MovieLens release folder")
    ratings = _first_rating_per_pair(release.ratings, src, malformed.strict)
    return replace(release, ratings=ratings, repeated=release.ratings.num_rows - ratings.num_rows)


# The files of the releases this converter reads (ML-100K, ML-1M, ML-10M, the csv ones).
_RELEASE_FILES = ("u.data", "u.user", "u.item", "ratings.dat", "users.dat", "movies.dat", "tags.dat", "ratings.csv",
                  "movies.csv")
_RATINGS_FILES = ("u.data", "ratings.dat", "ratings.csv")  # one per release: ML-100K's, ML-1M/10M's, the csv ones


def _say_unlisted(release: Release, src: Path, strict: bool) -> None:
    """A warning (with strict, DataError) for ratings of users or movies the release's own file
    does not list, a movie whose line was malformed among them: their features are unknown, which
    was said of none of them."""
    owners = [(release.movies, ITEM_ID, "movie", release.movies_file, MOVIE_FEATURES)]
    if release.users is not None:
        owners.append((release.users, "userId", "user", release.users_file, USER_FEATURES))
    for owner, key, what, file, features in owners:
        unlisted = pc.invert(pc.is_in(release.ratings[key], value_set=owner[key]))
        count = pc.sum(unlisted).as_py()
        if not count:
            continue
        ids = pc.unique(release.ratings[key].filter(unlisted))
        message = (f"{src}: {count:,} ratings ({count / release.ratings.num_rows:.1%}) are of {len(ids):,} "
                   f"{what}(s) that {file} does not list (e.g. {key} {ids[0]}), whose {', '.join(features)} "
                   "are unknown")
        if strict:
            raise DataError(message)
        tqdm.write(f"warning: {message}", file=sys.stderr)


def _first_rating_per_pair(ratings: pa.Table, src: Path, strict: bool) -> pa.Table:
    """`ratings` without rows repeating an earlier one whole (user, movie, rating and time; an
    official split's base comes before its test): a file given twice put a rating in train and
    its copy in test. A pair rated again at another time is a rating of its own, and stays."""
    import pandas as pd

    users, movies = (pc.cast(ratings[c], pa.int64()).to_numpy() for c in ("userId", "movieId"))
    # Releases rate no pair twice: one sort of the pairs as one int64 each says so (at 10M ratings
    # 0.8 s and 160 MB; hashing them took 7 s and 450 MB), and only the rows of pairs rated again
    # are compared whole.
    span = int(movies.max()) - int(movies.min()) + 1
    if int(users.max()) - int(users.min()) < (1 << 62) // span:
        pair = (users - users.min()) * span + (movies - movies.min())
        ordered = np.sort(pair)
        again = np.flatnonzero(np.isin(pair, ordered[1:][ordered[1:] == ordered[:-1]]))
    else:  # ids too far apart for one int64 a pair
        again = np.flatnonzero(pd.MultiIndex.from_arrays([users, movies]).duplicated(keep=False))
    if not again.size:
        return ratings
    rows = pd.DataFrame({c: ratings[c].take(pa.array(again)).to_numpy()
                         for c in ("userId", "movieId", "rating", "timestamp")})
    repeated = again[rows.duplicated(keep="first").to_numpy()]
    if not repeated.size:
        return ratings
    message = f"{src}: {repeated.size:,} ratings repeat an earlier one (user, movie, rating and time)"
    if strict:
        raise DataError(message)
    tqdm.write(f"warning: {message}; only the first of each kept", file=sys.stderr)
    keep = np.ones(ratings.num_rows, dtype=bool)
    keep[repeated] = False
    return ratings.filter(pa.array(keep))


def _ml100k(src: Path, malformed: Malformed, official: str | None) -> Release:
    columns = ["userId", "movieId", "rating", "timestamp"]
    if official is None:
        ratings = _read(src / "u.data", columns, "\t", malformed, kinds=RATINGS)
    else:
        parts = [_read(src / f"{official}.{part}", columns, "\t", malformed, kinds=RATINGS)
                 for part in ("base", "test")]
        ratings = pa.concat_tables([
            p.append_column("official", pa.array(np.full(p.num_rows, i, dtype=np.int8)))
            for i, p in enumerate(parts)])
    users = _one_row_each(_read(src / "u.user", ["userId", "age", "gender", "occupation", "zip"], "|", malformed,
                                kinds={"userId": "integer", "age": "integer"}), "userId", src / "u.user")
    flags = [f"g{i}" for i in range(len(ML100K_GENRES))]
    item_columns = ["movieId", "title", "release", "video_release", "url", *flags]
    items = _one_row_each(_read(src / "u.item", item_columns, "|", malformed, latin1=True,
                                kinds={"movieId": "integer", **{f: "flag" for f in flags}}), "movieId", src / "u.item")
    matrix = np.column_stack([items[f].to_numpy() for f in flags]) > 0
    offsets = np.concatenate([[0], np.cumsum(matrix.sum(axis=1))]).astype(np.int32)
    names = pa.array(ML100K_GENRES).take(np.nonzero(matrix)[1])  # row-major: each movie's genres in order
    year = _year(items["release"], _YEAR_AT_END)
    movies = pa.table({
        "movieId": items["movieId"],
        "year": pc.coalesce(year, _year(items["title"], _YEAR_IN_TITLE)),
        "genres": pa.ListArray.from_arrays(pa.array(offsets), names),
    })
    return Release("ml-100k", ratings, movies, users, "u.item", "u.user")


def _ml1m(src: Path, malformed: Malformed) -> Release:
    ratings = _read(src / "ratings.dat", list(RATINGS), "::", malformed, kinds=RATINGS)
    users_path = src / "users.dat"
    # ml-10m ships the same layout without users.dat, and with tags.dat.
    if not users_path.is_file() and not (src / "tags.dat").is_file():
        # Read as ml-10m, an ml-1m folder lost its users' features without a word.
        raise DataError(f"{src}: no users.dat, which ML-1M ships (its users' gender, age, occupation and zip), "
                        "nor ML-10M's tags.dat; put back the file of the release this is")
    # age and occupation are numeric codes (the release's README), served as the integers they are.
    users = (_one_row_each(_read(users_path, ["userId", "gender", "age", "occupation", "zip"], "::", malformed,
                                 kinds={"userId": "integer", "age": "integer", "occupation": "integer"}),
                           "userId", users_path) if users_path.is_file() else None)
    movies = _movies(_one_row_each(_read(src / "movies.dat", ["movieId", "title", "genres"], "::", malformed,
                                         latin1=True, kinds={"movieId": "integer"}), "movieId", src / "movies.dat"))
    name = "ml-1m" if users is not None else "ml-10m"
    return Release(name, ratings, movies, users, "movies.dat")


def _ml_csv(src: Path, malformed: Malformed) -> Release:
    ratings = _read(src / "ratings.csv", None, ",", malformed, kinds=RATINGS)
    movies = _movies(_one_row_each(_read(src / "movies.csv", None, ",", malformed,
                                         kinds={"movieId": "integer", "title": "text", "genres": "text"}),
                                   "movieId", src / "movies.csv"))
    name = src.name if src.name.startswith("ml-") else "ml-csv"
    return Release(name, ratings.select(["userId", "movieId", "rating", "timestamp"]), movies, None, "movies.csv")


def _one_row_each(table: pa.Table, key: str, path: Path) -> pa.Table:
    """`table`, once each of its users or movies is on one line only: ratings took a repeated
    movie's first genres and the item catalog its last, without a word."""
    ids = table[key].to_numpy()
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        first = int(np.argmax(counts > 1))
        raise DataError(f"{path}: {key} {int(unique[first])} is on {int(counts[first])} lines; "
                        "each user or movie needs one")
    return table


def _movies(raw: pa.Table) -> pa.Table:
    return pa.table({
        "movieId": raw["movieId"],
        "year": _year(raw["title"], _YEAR_IN_TITLE),
        "genres": _genres(raw["genres"]),
    })


# What the csv releases (ML-20M, 25M) write for a movie without genres.
_NO_GENRES = "(no genres listed)"


def _genres(text: pa.ChunkedArray) -> pa.ListArray:
    """Each movie's genres, "a|b", as a list: without the csv releases' marker of none (which was
    a genre of its own) or the empty names of "a||b" (an id shared by every such movie)."""
    lists = pc.split_pattern(text, "|").combine_chunks()
    names = lists.flatten()
    keep = pc.and_(pc.not_equal(names, ""), pc.not_equal(names, _NO_GENRES))
    kept = np.bincount(pc.list_parent_indices(lists).filter(keep).to_numpy(), minlength=len(lists))
    return pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(kept)]), pa.int32()), names.filter(keep))


def _year(text: pa.ChunkedArray, pattern: str) -> pa.Array:
    match = pc.extract_regex(pc.utf8_trim_whitespace(text), pattern).combine_chunks()
    year = match.field("year")
    return pc.if_else(match.is_valid(), year, pa.scalar(None, pa.string()))


def _read(path: Path, names: list[str] | None, delimiter: str, malformed: Malformed, *,
          kinds: dict[str, str], latin1: bool = False) -> pa.Table:
    """A MovieLens file, read block by block: a ratings file of the 25M release is 650 MB of text,
    read whole it peaked at 4x its typed size. names=None means the file has a header (the csv
    releases), which must name every column in `kinds`. kinds[column] is what its fields must hold
    (a kind of _KINDS, or "text": any); a line with a field that does not is malformed: reported
    with its file and line, and skipped (or fatal with --strict). Columns not in `kinds` stay text."""
    if not path.is_file():
        raise DataError(f"{path}: missing from the MovieLens folder")
    file_malformed = Malformed(path, malformed.strict)
    # pyarrow only splits on one byte; a tab never occurs inside the `::` files' fields.
    split_on = delimiter if len(delimiter) == 1 else "\t"
    columns, parts, seen_record = names, [], False
    with open_input(path) as (f, raw), progress_bar(total=path.stat().st_size, desc=f"{path.name}: reading", unit="B",
                                             unit_scale=True, leave=False) as bar:
        for data, line in line_blocks(f):
            bar.update(raw.tell() - bar.n)
            if line == 0 and data.startswith(codecs.BOM_UTF8):
                # Saved again as UTF-8 (a spreadsheet, an editor): read as Latin-1, the mark became
                # part of the first movie's id, and that movie was skipped as malformed.
                latin1 = False
            if latin1:
                data = data.decode("latin-1").encode("utf-8")
            if split_on != delimiter:
                data = data.replace(delimiter.encode(), split_on.encode())
            if columns is None or not seen_record:  # until the first record (the header, if any)
                records = _record_lines(data)
                seen_record = bool(records.size)
                if columns is None and seen_record:
                    columns, data, line = _header(path, data, line, int(records[0]), split_on, kinds)
            if columns is not None and data:
                parts.append(_typed_block(data, line, columns, split_on, quoted=names is None,
                                          kinds=kinds, malformed=file_malformed))
                file_malformed.settle()
    if not seen_record:
        raise DataError(f"{path}: empty")
    malformed.count += file_malformed.count
    if not any(part.num_rows for part in parts):
        skipped = f" ({file_malformed.count:,} malformed lines skipped)" if file_malformed.count else ""
        raise DataError(f"{path}: no well-formed lines{skipped}")
    return pa.concat_tables(parts)


def _header(path: Path, data: bytes, line: int, record: int, delimiter: str,
            kinds: dict[str, str]) -> tuple[list[str], bytes, int]:
    """(columns, the rest of `data`, its first line) for the header on `data`'s `record`-th line."""
    pieces = data.split(b"\n", record + 1)
    text = pieces[record].decode("utf-8-sig", errors="replace").rstrip("\r")
    columns = [name.strip('"') for name in text.split(delimiter)]
    twice = [c for i, c in enumerate(columns) if c in columns[:i]]
    if twice:
        raise DataError(f"{path}:{line + record + 1}: the header names column {twice[0]!r} twice")
    missing = [c for c in kinds if c not in columns]
    if missing:
        raise DataError(f"{path}:{line + record + 1}: the header has no column {missing[0]!r} "
                        f"(it has {', '.join(columns)})")
    rest = pieces[record + 1] if len(pieces) > record + 1 else b""
    return columns, rest, line + record + 1


def _typed_block(data: bytes, first_line: int, columns: list[str], delimiter: str, *, quoted: bool,
                 kinds: dict[str, str], malformed: Malformed) -> pa.Table:
    """The well-formed rows of `data` (whole lines from physical line `first_line`), typed."""
    data = without_stray_returns(data, first_line, malformed)
    if quoted:
        data = _without_unclosed_quotes(data, first_line, malformed)
    records = first_line + _record_lines(data)
    invalid: list[int] = []

    def skip(row: pacsv.InvalidRow) -> str:
        record = (row.number or 1) - 1  # pyarrow numbers the records (non-blank lines) from 1
        invalid.append(record)
        malformed.report(records[[record]], lambda _: f"expected {row.expected_columns} fields, "
                                                      f"found {row.actual_columns}")
        return "skip"

    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            # One block whatever its size: pyarrow's default (1 MiB) failed the whole file on a
            # longer line ("straddling object straddles two block boundaries").
            read_options=pacsv.ReadOptions(column_names=columns, use_threads=False, block_size=len(data) + 1),
            # Only the csv releases (the files with a header) quote titles.
            parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if quoted else False,
                                             invalid_row_handler=skip),
            # Bytes first, as text.py does: one field that is not UTF-8 is one malformed line.
            convert_options=pacsv.ConvertOptions(column_types={n: pa.binary() for n in columns},
                                                 null_values=[""], strings_can_be_null=True),
        )
    except pa.ArrowInvalid as e:
        raise DataError(f"{malformed.path}: {str(e).splitlines()[0]}") from None
    chunk = as_text(table, np.delete(records, np.array(invalid, dtype=np.int64)), malformed)
    checked = {c: _KINDS[k] for c, k in kinds.items() if k in _KINDS}
    if checked:
        ok = {c: pc.fill_null(test(chunk.table[c]), False).to_numpy(zero_copy_only=False)
              for c, (test, _, _) in checked.items()}
        chunk = drop_invalid(chunk, ok, {c: what for c, (_, what, _) in checked.items()}, malformed)
    return pa.table({c: pc.cast(values, checked[c][2]) if c in checked else values
                     for c, values in zip(chunk.table.column_names, chunk.table.columns, strict=True)})


def _is_rating(values: pa.ChunkedArray) -> pa.ChunkedArray:
    number = pc.match_substring_regex(values, _RATING)
    rating = pc.cast(pc.if_else(number, values, pa.scalar("0")), pa.float32())
    return pc.and_(number, pc.and_(pc.greater_equal(rating, MIN_RATING), pc.less_equal(rating, MAX_RATING)))


# Seconds to 2100-01-01. A time past it (or before 1970) sorted its rating last (first) in the
# time split, into test (train), without a word.
_LAST_TIME = 4_102_444_800


def _is_time(values: pa.ChunkedArray) -> pa.ChunkedArray:
    number = pc.match_substring_regex(values, r"^[0-9]{1,10}$")
    seconds = pc.cast(pc.if_else(number, values, pa.scalar("0")), pa.int64())
    return pc.and_(number, pc.less(seconds, _LAST_TIME))


# kind -> (test of a field, what it must be, its type once checked)
_KINDS = {
    "time": (_is_time, "an integer Unix time from 1970 to 2100", pa.int64()),
    "integer": (lambda v: pc.match_substring_regex(v, INTEGER), AN_INTEGER, pa.int64()),
    "rating": (_is_rating, f"a rating from {MIN_RATING} to {MAX_RATING:g}", pa.float32()),
    "flag": (lambda v: pc.is_in(v, value_set=pa.array(["0", "1"])), "0 or 1", pa.int8()),
}


def _without_unclosed_quotes(data: bytes, first_line: int, malformed: Malformed) -> bytes:
    """`data` with each line that opens a quote it does not close reported and emptied (a blank
    line is no record, and line numbers stay as they were). No MovieLens field spans lines, and
    the csv parser read on from a stray quote to the next one, taking the ratings between into
    one malformed record: a thousand lines lost, one reported."""
    buf = np.frombuffer(data, dtype=np.uint8)
    starts, ends = line_bounds(buf)
    quotes = np.flatnonzero(buf == ord('"'))
    line_of_quote = np.searchsorted(ends, quotes)
    odd = np.flatnonzero(np.bincount(line_of_quote, minlength=len(ends)) % 2)
    # A quote opens a quoted field only at a field's start (elsewhere it is a character): a line
    # with an even count, `2"x,"4.0`, still left one open, which ran on to the file's end.
    opens = (quotes == starts[line_of_quote]) | (buf[np.maximum(quotes - 1, 0)] == ord(","))
    opening = np.setdiff1d(np.unique(line_of_quote[opens]), odd)
    unclosed = np.array([i for i in opening if not _closes_its_quotes(data[starts[i]:ends[i]])], dtype=np.int64)
    bad = np.union1d(odd, unclosed).astype(np.int64)
    if not bad.size:
        return data
    malformed.report(first_line + bad, lambda k: "a quote (\") it does not close" if bad[k] in odd else
                     "a quote (\") that opens a field it does not close")
    return emptied(data, starts, ends, bad)


def _closes_its_quotes(line: bytes) -> bool:
    """Whether every quoted field of the csv `line` closes on it, as the csv parser reads quotes."""
    try:
        next(csv.reader([line.decode("utf-8", "replace").rstrip("\r")], strict=True))
    except csv.Error:
        return False
    return True


def _record_lines(data: bytes) -> np.ndarray:
    """The 0-based physical line of each record: each line that is not empty (pyarrow skips those)."""
    buf = np.frombuffer(data, dtype=np.uint8)
    starts, ends = line_bounds(buf)
    return np.flatnonzero(~blank_lines(buf, starts, ends))


def _labelled(release: Release, target: str) -> pa.Table:
    r = release.ratings
    rating = pc.cast(r["rating"], pa.float32()).to_numpy()
    keep = np.ones(len(rating), bool) if target == "rating" else (rating >= 4) | (rating <= 2)
    timestamp = pc.cast(r["timestamp"], pa.int64()).to_numpy()[keep]
    order = np.flatnonzero(keep)[np.argsort(timestamp, kind="stable")]
    columns = {
        "userId": r["userId"].take(order),
        "movieId": r["movieId"].take(order),
        "rating": pa.array(rating[order]),
        "label": pa.array(rating[order] if target == "rating" else (rating[order] >= 4).astype(np.float32)),
    }
    if "official" in r.column_names:
        columns["official"] = r["official"].take(order)
    return pa.table(columns)


def _encoded_features(release: Release, table: pa.Table, target: str, train: np.ndarray,
                      min_count: int) -> tuple[dict[str, pa.Array], dict[str, Vocabulary]]:
    """Every row's ids of each feature, and the feature's train vocabulary. A user's or movie's own
    features are counted and encoded once per user or movie, weighted by its train ratings, and only
    their ids taken for each rating: taking their text for each rating first held a 25M release's
    genres as 25M lists of strings. The vocabularies are the same as counting rating by rating."""
    encoded: dict[str, pa.Array] = {}
    vocabs: dict[str, Vocabulary] = {}
    for key in ("userId", ITEM_ID):
        values = _array(table[key])
        builder = VocabularyBuilder()
        builder.add(values.filter(pa.array(train)))
        vocabs[key] = builder.build(min_count)
        encoded[key] = _encode(vocabs[key], values)
    if target == "rating":
        return encoded, vocabs
    owners = [(release.users, "userId", USER_FEATURES)] if release.users is not None else []
    for owner, key, names in [*owners, (release.movies, ITEM_ID, MOVIE_FEATURES)]:
        # Each rating's row of `owner`; a rating of a user or movie it lacks gets the unknown row.
        at = pc.fill_null(pc.index_in(table[key], value_set=owner[key]), owner.num_rows).to_numpy()
        weights = np.bincount(at[train], minlength=owner.num_rows + 1)
        rows, first = np.unique(at[train], return_index=True)
        # Owners in the order of their first train rating, so that values appear first in the
        # order the ratings show them: the vocabulary's tie-break.
        ranked = rows[np.argsort(first, kind="stable")]
        padded = _with_unknown_row(owner)
        for name in names:
            values = _array(padded[name])
            taken = values.take(pa.array(ranked))
            builder = VocabularyBuilder()
            if pa.types.is_list(values.type):
                lengths = pc.list_value_length(taken).fill_null(0).to_numpy()
                builder.add(pc.list_flatten(taken), np.repeat(weights[ranked], lengths))
            else:
                builder.add(taken, weights[ranked])
            vocabs[name] = builder.build(min_count)
            encoded[name] = _encode(vocabs[name], values).take(pa.array(at))
    return encoded, vocabs


def _with_unknown_row(table: pa.Table) -> pa.Table:
    """`table` and one row of nothing after it: no value, or an empty list."""
    unknown = pa.table({f.name: pa.array([[] if pa.types.is_list(f.type) else None], f.type) for f in table.schema})
    return pa.concat_tables([table, unknown])


def _array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
