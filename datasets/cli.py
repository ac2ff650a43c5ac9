"""`embshard data ...`: synthesize, convert and profile datasets.

The top-level CLI calls `register(subparsers)`; every leaf parser sets `func(args) -> int`.
Datasets are written with their profile (the planner needs it) into a staging folder that replaces
--out only once complete; a non-empty --out needs --overwrite.
"""

from __future__ import annotations

import argparse

from embshard.arg_types import nonempty_path, written_path
from embshard.datasets.convert import DEFAULT_MIN_COUNT, KINDS, SPLIT_KINDS, convert
from embshard.datasets.planted import DEFAULT_RANK_RANGE, synthesize_planted
from embshard.datasets.profile import Profile, load_profile, write_profile
from embshard.datasets.schema import TARGETS
from embshard.datasets.synth import DEFAULT_MAX_CARDINALITY, MLPERF_MULTI_HOT_SIZES, synthesize
from embshard.errors import DataError


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser(
        "data", help="create, convert and profile datasets",
        description="Create (synth), convert (criteo/avazu/movielens) and profile Parquet datasets.")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    synth = commands.add_parser(
        "synth", help="write a synthetic Criteo-shaped dataset (and its profile)",
        description="Write a Criteo-shaped dataset whose labels follow a hidden seeded model: "
                    "13 dense + 26 Zipf-skewed sparse features, split 80/10/10; --multi-hot gives every "
                    "row bags of ids, --planted plants known embedding ranks.")
    synth.add_argument("--out", type=written_path, required=True, metavar="DIR",
                       help="output dataset directory, or an object-store URI such as s3://bucket/prefix")
    synth.add_argument("--rows", type=int, default=100_000, help="total rows (default %(default)s)")
    synth.add_argument("--seed", type=_seed, default=0, help="random seed (default %(default)s)")
    synth.add_argument("--max-cardinality", type=int, default=DEFAULT_MAX_CARDINALITY, metavar="C",
                       help="cap on each feature's cardinality (default %(default)s)")
    kind = synth.add_mutually_exclusive_group()
    kind.add_argument("--multi-hot", type=_bag_sizes, nargs="?", const=MLPERF_MULTI_HOT_SIZES,
                      metavar="SIZES",
                      help="make every sparse feature multi-hot with a fixed number of ids per row: "
                           "comma-separated, one per feature C1..C26 (default: MLPerf DLRMv2's "
                           + ",".join(map(str, MLPERF_MULTI_HOT_SIZES)) + ")")
    kind.add_argument("--planted", action="store_true",
                      help="plant embedding ranks: per table a latent rank from --rank-range, falling "
                           "with row popularity; labels from field-pair dot products of the latent "
                           "vectors plus per-id biases. dataset.json records the ranks and each "
                           "split's Bayes AUC under 'planted' (for benchmarks; no method reads it)")
    synth.add_argument("--rank-range", type=_rank_range, metavar="LO:HI",
                       help=f"with --planted: range of the per-table latent ranks; HI is also the "
                            f"latent dimension (default {DEFAULT_RANK_RANGE[0]}:{DEFAULT_RANK_RANGE[1]})")
    synth.add_argument("--aligned", action="store_true",
                       help="with --planted: each table's subspace is its first `rank` latent "
                            "coordinates, not a random one, so its vectors are sparse in one basis "
                            "(what PEP's element-wise pruning can find)")
    _overwrite_flag(synth)
    synth.set_defaults(func=_synth)

    conv = commands.add_parser(
        "convert", help="convert a Criteo / Avazu / MovieLens download (and profile it)",
        description="Convert raw public data to the Parquet layout. Categorical values get ids by "
                    "train-split frequency; id 0 (the OOV id) is shared by rare, missing and unseen "
                    "values. Prints the share of OOV ids per split and feature (cold start shows there).")
    conv.add_argument("kind", choices=KINDS, help="input format")
    conv.add_argument("src", type=nonempty_path, nargs="+", metavar="SRC",
                      help="criteo: train.txt; avazu: train csv (either may be gzipped, not a tar "
                           "archive; several files or folders of them are read in order as one log); "
                           "movielens: the unpacked release folder")
    conv.add_argument("--out", type=written_path, required=True, metavar="DIR",
                      help="output dataset directory, or an object-store URI such as s3://bucket/prefix")
    conv.add_argument("--min-count", type=int, default=DEFAULT_MIN_COUNT, metavar="N",
                      help="values seen fewer than N times in train map to the OOV id 0, which then "
                           "trains on them (default %(default)s; 1 leaves the OOV row untrained)")
    conv.add_argument("--split", choices=SPLIT_KINDS, default="time", metavar="KIND",
                      help="time (80/10/10 by time or line order, default), random (seeded 80/10/10), "
                           "leave-last (per user: last rating test, the one before valid; movielens), "
                           "u1..u5, ua, ub (ML-100K's own base/test files; valid = latest tenth of base)")
    conv.add_argument("--seed", type=_seed, default=0, help="seed of --split random (default %(default)s)")
    conv.add_argument("--target", choices=TARGETS, default="click",
                      help="click (default): 0/1 labels; rating (movielens): every rating, 3s included, "
                           "is the label, and only userId and movieId are kept (matrix factorisation, "
                           "model.arch mf)")
    conv.add_argument("--dedup-key", metavar="COLUMN",
                      help="criteo/avazu: keep only the first row of each value of COLUMN (e.g. avazu's "
                           "id, when input files overlap)")
    conv.add_argument("--strict", action="store_true",
                      help="fail on the first malformed line instead of skipping it")
    _overwrite_flag(conv)
    conv.set_defaults(func=_convert)

    profile = commands.add_parser(
        "profile", help="(re)compute the id-frequency profile of a dataset",
        description="Count each sparse feature's ids over the train split into DIR/profile/.")
    profile.add_argument("dir", type=written_path, metavar="DIR", help="dataset directory or object-store URI")
    profile.set_defaults(func=_profile)


def _overwrite_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the dataset in a non-empty --out (only once the new one is complete)")


def _seed(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if seed < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return seed


def _bag_sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 3,2,1, got {text!r}") from None


def _rank_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    try:
        if sep:
            return int(lo), int(hi)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected LO:HI with integers, e.g. 2:32, got {text!r}")


def _synth(args: argparse.Namespace) -> int:
    common = dict(rows=args.rows, seed=args.seed, max_cardinality=args.max_cardinality,
                  overwrite=args.overwrite)
    for given, flag in ((args.rank_range is not None, "--rank-range"), (args.aligned, "--aligned")):
        if given and not args.planted:
            raise DataError(f"synth: {flag} needs --planted")
    if args.planted:
        spec = synthesize_planted(args.out, rank_range=args.rank_range or DEFAULT_RANK_RANGE,
                                  aligned=args.aligned, **common)
    else:
        spec = synthesize(args.out, bag_sizes=args.multi_hot, **common)
    print(f"synth -> {args.out}: " + ", ".join(f"{s} {n:,}" for s, n in spec.rows.items()) + " rows")
    if spec.planted:
        aucs = spec.planted["bayes_auc"].items()
        print("planted Bayes AUC: " + ", ".join(f"{s} {a:.4f}" for s, a in aucs if a is not None))
    _report(load_profile(args.out))
    return 0


def _convert(args: argparse.Namespace) -> int:
    convert(args.kind, args.src, args.out, min_count=args.min_count, split=args.split, seed=args.seed,
            dedup_key=args.dedup_key, strict=args.strict, overwrite=args.overwrite, target=args.target)
    _report(load_profile(args.out))
    return 0


def _profile(args: argparse.Namespace) -> int:
    _report(write_profile(args.dir))
    return 0


def _report(profile: Profile) -> None:
    distinct = sum(s.distinct_ids for s in profile.stats.values())
    print(f"profile -> {profile.directory}: {len(profile.features)} features, "
          f"{distinct:,} distinct train ids")
