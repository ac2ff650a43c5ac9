"""A sweep's report from its points: the frontier per method, the claim, the planted comparison.

Pure functions of the points (`cluster/sweep_trial.py`), so they are tested on hand-made ones.

The metric is the points' own (the arch's primary test metric: AUC, or MSE for `mf`), and
"better" follows its direction (`lower_is_better` in each point). The claim is stated only when
the uniform curve improves with width: its best mean beats the narrowest uniform's by more than
the tolerance (the larger of `min_tolerance` and the best uniform's seed std) and by more than the
narrowest's own seed std. Then the smallest
plan of each method whose mean comes within the tolerance of the best uniform mean (for a
lower-is-better metric: not above best + tolerance) is named, with how many times fewer serving
bytes it has than the smallest uniform that does. Otherwise the report says width does not
matter on this data, and names no ratio (it would mean nothing).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
import typing
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embshard.cluster.sweep_methods import FP32_BYTES, SWEEP_BASES
from embshard.cluster.sweep_plan import (
    KNOB_PATHS,
    SPEC_FILE,
    UNCOMPARED,
    Knobs,
    config_difference,
    knob_text,
    method_knobs,
)
from embshard.config import JobConfig, current_schema
from embshard.datasets.storage import NAME_MAX
from embshard.errors import ConfigError, DataError
from embshard.planner.rounding import MAX_DIM
from embshard.typed_config import from_dict

MIN_TOLERANCE = 0.001  # in the metric's units: below this no difference between plans is claimed


@dataclass(frozen=True)
class Config:
    """One method at one budget, over its seeds."""

    method: str  # the points' `curve`: with a variant where a merge holds the method at other knobs
    budget: float
    mean: float
    std: float
    seeds: int
    serving_bytes: float  # mean over seeds (a PEP mask's size differs by seed)
    serving_params: float  # mean over seeds
    widths: dict[str, float]  # per feature, mean over seeds
    # Seeds reported at their last step; None where a point does not record its steps. With
    # `train.report_at: best_valid` such a seed was still improving when training stopped.
    at_last_step: int | None = None


@dataclass(frozen=True)
class Claim:
    rises: bool | None  # None: fewer than two uniform widths, nothing to compare
    statement: str
    tolerance: float | None = None
    best_uniform: float | None = None
    smallest: dict[str, dict[str, Any]] = field(default_factory=dict)  # per method: budget, bytes, mean, ratio
    # Per method its best config and how far its mean falls short of the best uniform's (negative:
    # ahead of it): where a method has no plan within the tolerance, how close it came.
    best: dict[str, dict[str, Any]] = field(default_factory=dict)


def curve(point: dict[str, Any]) -> str:
    """The curve a point belongs to: its method, and its `variant` where it has one."""
    return f"{point['method']} ({point['variant']})" if point.get("variant") else point["method"]


def aggregate(points: list[dict[str, Any]]) -> tuple[list[Config], list[dict[str, Any]]]:
    """Configs with at least one trained seed (by method, then bytes), and the error points."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    errors = []
    for p in points:
        if "error" in p:
            errors.append(p)
        else:
            groups.setdefault((curve(p), p["budget"]), []).append(p)
    configs = []
    for (method, budget), ps in groups.items():
        values = [p["value"] for p in ps]
        features = sorted({f for p in ps for f in p["widths"]})
        recorded = all("steps" in p and "selected_step" in p for p in ps)
        configs.append(Config(
            method, budget, statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0,
            len(values), statistics.fmean(p["serving_bytes"] for p in ps),
            statistics.fmean(p["serving_params"] for p in ps),
            {f: statistics.fmean(p["widths"][f] for p in ps if f in p["widths"]) for f in features},
            sum(p["selected_step"] == p["steps"] for p in ps) if recorded else None))
    return sorted(configs, key=lambda c: (c.method, c.serving_bytes)), errors


def claim(configs: list[Config], min_tolerance: float = MIN_TOLERANCE, metric: str = "auc",
          lower_is_better: bool = False) -> Claim:
    label = metric_label(metric)
    sign = -1.0 if lower_is_better else 1.0  # sign * mean: larger is better either way
    # One config a width, the best of its budgets: two budgets of one width (a merge's, rounded
    # alike) are one width, and the rise between them was claimed as width's.
    by_width: dict[float, list[Config]] = {}
    for c in configs:
        if c.method == "uniform":
            by_width.setdefault(c.serving_bytes, []).append(c)
    uniform = sorted((max(cs, key=lambda c: sign * c.mean) for cs in by_width.values()), key=lambda c: c.serving_bytes)
    if len(uniform) < 2:
        return Claim(None, "no claim: the sweep needs uniform at two or more widths (budgets of other serving "
                           "bytes) to tell whether width matters")
    best = max(uniform, key=lambda c: sign * c.mean)
    tol = max(min_tolerance, best.std)
    narrowest = uniform[0]
    gain = sign * (best.mean - narrowest.mean) + 0.0  # how much the best width improves on it (+0.0: no "-0.0000")
    # Beyond the narrowest's seed spread too: a rise within it is noise, and the ratio then named
    # rested on it.
    rise = max(tol, narrowest.std)
    if gain <= rise:
        # Said, where "does not matter" alone hid a wider width that did worse beyond the tolerance.
        wider = [c for c in uniform if c.serving_bytes > best.serving_bytes]
        worst = min(wider, key=lambda c: sign * c.mean) if wider else best
        drop = sign * (best.mean - worst.mean)
        hurts = (f" (wider is worse here: {drop:.4f} below the best at {_mb(worst.serving_bytes)})"
                 if drop > max(tol, worst.std) else "")
        return Claim(False, f"width does not matter on this data: uniform from {_mb(uniform[0].serving_bytes)} to "
                            f"{_mb(uniform[-1].serving_bytes)} improves test {label} by {gain:.4f} at most, within "
                            f"the tolerance {rise:.4f}{hurts}; no plan is claimed smaller", rise, best.mean)

    def within(c: Config) -> bool:
        return sign * (best.mean - c.mean) <= tol

    smallest_uniform = min(c.serving_bytes for c in uniform if within(c))
    smallest: dict[str, dict[str, Any]] = {}
    bests: dict[str, dict[str, Any]] = {}
    for method in sorted({c.method for c in configs}):
        top = max((c for c in configs if c.method == method), key=lambda c: sign * c.mean)
        bests[method] = {"budget": top.budget, "serving_bytes": top.serving_bytes, "mean": top.mean,
                         "behind": sign * (best.mean - top.mean)}
        ok = [c for c in configs if c.method == method and within(c)]
        if ok:
            c = min(ok, key=lambda c: c.serving_bytes)
            smallest[method] = {"budget": c.budget, "serving_bytes": c.serving_bytes, "mean": c.mean,
                                "ratio_vs_uniform": smallest_uniform / c.serving_bytes}
    winner_method, winner = min(smallest.items(), key=lambda kv: kv[1]["serving_bytes"])
    statement = (f"uniform improves with width (best test {label} {best.mean:.4f} at budget {best.budget:g}, "
                 f"{gain:.4f} better than the narrowest); the smallest plan within {tol:.4f} of it is "
                 f"{winner_method} at budget {winner['budget']:g}: {_mb(winner['serving_bytes'])}, "
                 f"{_fewer(winner['ratio_vs_uniform'])} serving bytes than the smallest uniform within the tolerance")
    return Claim(True, statement, tol, best.mean, smallest, bests)


@dataclass(frozen=True)
class PlantedTruth:
    """What a planted dataset's generator knows and no method reads: the Bayes AUC of the test
    split and each table's planted rank (its most popular rows')."""

    bayes_auc: float
    ranks: dict[str, int]
    # The generator's embedding parameters: each popularity block's rows x its rank, and its
    # rank x latent_dim map into the shared latent space. None where the blocks are not recorded.
    params: int | None = None

    @classmethod
    def of_dataset(cls, planted: dict[str, Any], split: str = "test") -> PlantedTruth:
        """From dataset.json's `planted`."""
        bayes = planted.get("bayes_auc", {}).get(split)
        if bayes is None:
            raise DataError(f"dataset.json: planted.bayes_auc.{split} is missing; cannot compare with the Bayes AUC")
        tables, latent = planted["ranks"].values(), planted.get("latent_dim")
        params = (sum((b["end"] - b["start"] + latent) * b["rank"] for r in tables for b in r["blocks"])
                  if latent and all(r.get("blocks") for r in tables) else None)
        return cls(bayes, {f: r["rank"] for f, r in planted["ranks"].items()}, params)

    @classmethod
    def of_report(cls, planted: dict[str, Any]) -> PlantedTruth:
        """From a report's `planted` section (what planted_comparison wrote)."""
        return cls(planted["bayes_auc"], dict(planted["ranks"]), planted.get("params"))


def planted_comparison(configs: list[Config], truth: PlantedTruth, grid: list[int]) -> dict[str, Any]:
    """Per table the planted rank against each config's chosen width, the share of tables whose
    width is within one step of `grid` (AutoDim's candidate widths) of the planted rank, each
    config's distance to the Bayes AUC, and per method its best config with at most twice the
    planted parameters (None: the method has none that small)."""
    configs_out = []
    for c in configs:
        widths = {f: c.widths.get(f) for f in truth.ranks}
        configs_out.append({"method": c.method, "budget": c.budget, "distance_to_bayes": truth.bayes_auc - c.mean,
                            "widths": widths, "within_one_step": within_one_step(widths, truth.ranks, grid),
                            "rank_correlation": rank_correlation(widths, truth.ranks)})
    out = {"bayes_auc": truth.bayes_auc, "ranks": truth.ranks, "grid": sorted(grid), "configs": configs_out}
    if truth.params is not None:
        at_twice: dict[str, dict[str, Any] | None] = {}
        for method in sorted({c.method for c in configs}):
            small = [c for c in configs if c.method == method and c.serving_params <= 2 * truth.params]
            top = max(small, key=lambda c: c.mean) if small else None
            at_twice[method] = None if top is None else {
                "budget": top.budget, "serving_params": top.serving_params, "mean": top.mean,
                "distance_to_bayes": truth.bayes_auc - top.mean}
        out |= {"params": truth.params, "at_twice_params": at_twice}
    return out


def within_one_step(widths: Mapping[str, float | None], ranks: Mapping[str, int], grid: list[int]) -> float:
    """The share of tables whose width is within one step of `grid` of the planted rank, each
    counted at the smallest grid width that holds it."""
    grid = sorted(grid)

    def step(width: float) -> int:
        return next((i for i, g in enumerate(grid) if g >= width), len(grid) - 1)

    return sum(abs(step(w) - step(ranks[f])) <= 1 for f, w in widths.items() if w is not None) / len(ranks)


def rank_correlation(widths: Mapping[str, float | None], ranks: Mapping[str, int]) -> float | None:
    """Spearman's rho between the chosen widths and the planted ranks across tables: whether a plan
    follows the ranks, which `within_one_step` cannot say (one width near the common ranks scores
    high there). None where either side is constant: a single width follows nothing."""
    pairs = [(w, ranks[f]) for f, w in widths.items() if w is not None]
    if len(pairs) < 2:
        return None
    a, b = (np.asarray(x, dtype=np.float64) for x in zip(*pairs, strict=True))
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(np.corrcoef(_average_ranks(a), _average_ranks(b))[0, 1])


def _average_ranks(x: np.ndarray) -> np.ndarray:
    # Tied values share the mean of the positions they hold, as Spearman's rho needs.
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2)[inverse]


def metric_of(points: list[dict[str, Any]]) -> tuple[str, bool]:
    """(the points' metric, whether lower is better); points written before the direction was
    recorded are AUC's, higher is better."""
    found = {(p.get("metric", "auc"), bool(p.get("lower_is_better", False))) for p in points if "error" not in p}
    if len(found) > 1:
        raise DataError(f"sweep points: mixed metrics {sorted(found)}; one sweep compares one metric")
    return found.pop() if found else ("auc", False)


def report(points: list[dict[str, Any]], planted: PlantedTruth | None, grid: list[int],
           min_tolerance: float = MIN_TOLERANCE) -> dict[str, Any]:
    """`grid`: the widths a planted comparison counts steps on (the sweep's AutoDim candidates)."""
    configs, errors = aggregate(points)
    metric, lower = metric_of(points)
    out: dict[str, Any] = {"metric": f"test_{metric}", "lower_is_better": lower,
                           "configs": [asdict(c) for c in configs], "errors": errors,
                           "claim": asdict(claim(configs, min_tolerance, metric, lower))}
    if planted:
        out["planted"] = planted_comparison(configs, planted, grid)
    return out


UNRECORDED = "knobs unrecorded"
REPORT_SUFFIXES = ("json", "md", "png")  # a report's files: sweep-<dataset>.json, .md, .png


def report_file(dataset: str, suffix: str) -> str:
    """The name of a report's file of `suffix`: sweep-<dataset>.<suffix>, but sweep-spec-report.<suffix>
    for a dataset named `spec`, whose report was written over the sweep's own spec (SPEC_FILE):
    --resume then said "not a sweep spec", and sweep-merge found no report. Compared case-blind,
    as some file systems compare names."""
    stem = f"sweep-{dataset}"
    if f"{stem}.json".casefold() == SPEC_FILE.casefold():
        stem += "-report"
    return f"{stem}.{suffix}"


def staged_file(name: str) -> str:
    """The name a file `name` is written under before it is renamed into place (sweep_cli.write_files)."""
    return f".{Path(name).stem}.partial{Path(name).suffix}"


# The most bytes of a dataset's name: its report's files are written under their staged names
# first, the longest `.sweep-<dataset>.partial.json`, which a file system takes up to NAME_MAX
# (300 characters were "File name too long" once the report was written, after the work).
LONGEST_NAME = NAME_MAX - max(len(staged_file(report_file("", suffix))) for suffix in REPORT_SUFFIXES)


def check_report(rep: Any, where: str) -> None:
    """DataError unless `rep` has a sweep report's shape: a merge reads its points as measured,
    and a negative size or a NaN would go into the claim, or fail as a KeyError in it."""
    if not isinstance(rep, dict) or not isinstance(rep.get("dataset"), str) or not isinstance(rep.get("points"), list):
        raise DataError(f"{where}: not a sweep report (it has no dataset or points)")
    # The dataset's name becomes the merged report's file names (sweep-<dataset>.md).
    top = {"dataset": rep["dataset"] not in ("", ".", "..") and "/" not in rep["dataset"]
           and rep["dataset"].isprintable(),
           **{key: test(rep[key]) for key, test in _OPTIONAL_TOP.items() if key in rep}}
    bad_top = [key for key, ok in top.items() if not ok]
    if bad_top:
        raise DataError(f"{where}: not a sweep report ({bad_top[0]}: {rep[bad_top[0]]!r})")
    if len(rep["dataset"].encode()) > LONGEST_NAME:
        raise DataError(f"{where}: not a sweep report (dataset: a name of {len(rep['dataset'].encode())} bytes; its "
                        f"report's files take one of at most {LONGEST_NAME})")
    # Anywhere else (a knob, a setting, the config): copied into the merged report, which JSON
    # readers other than Python's refused.
    unwritable = _non_finite(rep, "")
    if unwritable is not None:
        raise DataError(f"{where}: not a sweep report ({unwritable})")
    for i, p in enumerate(rep["points"]):
        if not isinstance(p, dict):
            raise DataError(f"{where}: not a sweep report (points[{i}] is no object)")
        metric = str(p.get("metric", "auc"))
        checks = {"method": isinstance(p.get("method"), str) and p["method"] != "",
                  "budget": _finite(p.get("budget")) and 0 < p["budget"] <= 1,
                  "seed": _whole(p.get("seed")) and p["seed"] >= 0}
        checks["method"] = checks["method"] and _sweep_method(p["method"])
        if "error" in p:  # a trial's budget it could not train (PEP at budget 1, a target not reached)
            # With a value too, it was read as an error and its value dropped without a word.
            checks["error"] = isinstance(p["error"], str) and "value" not in p
        else:
            # A value its metric cannot take (an AUC of 5, edited in) went into the claim.
            # Sizes and widths the claim reads: missing, each was a KeyError traceback; 10**400 an
            # OverflowError.
            checks.update(value=_measured(metric, p.get("value")),
                          serving_bytes=_size(p.get("serving_bytes")), serving_params=_size(p.get("serving_params")),
                          widths=_OPTIONAL["widths"](p.get("widths")))
        # What a point may have besides: `knobs: 3` was a TypeError in the merge.
        checks.update({key: test(p[key]) for key, test in _OPTIONAL.items() if key in p})
        # None: a run without an evaluation. A NaN went into the merged report, which JSON readers refused.
        if "valid_value" in p:
            checks["valid_value"] = p["valid_value"] is None or _measured(metric, p["valid_value"])
        # What contradicts the rest of the point, edited in, went into the report as it was: an MSE
        # ranked higher-better named the worst as the best, a size beside other parameters printed.
        lower = _known_direction(metric)
        if lower is not None:
            checks["lower_is_better"] = checks.get("lower_is_better", True) and p.get("lower_is_better", False) == lower
        if checks.get("serving_bytes") and checks.get("serving_params"):
            checks["serving_bytes"] = p["serving_bytes"] == p["serving_params"] * FP32_BYTES
        if "steps" in p and p.get("selected_step") is not None and checks["steps"] and checks["selected_step"]:
            checks["selected_step"] = p["selected_step"] <= p["steps"]
        bad = [key for key, ok in checks.items() if not ok]
        if bad:
            raise DataError(f"{where}: not a sweep report (points[{i}].{bad[0]}: {p.get(bad[0])!r})")


def _sweep_method(name: str) -> bool:
    """Whether `name` is a sweep method's name (a merge looks the built-in ones up: one that is
    none was "method 'uniform ': 'uniform ' is not package.module:attr", naming no report). A
    user's is not imported, where a merge may lack its code: its name has the form."""
    base = "uniform" if name == "mlet" else name.removesuffix("+mlet")
    module, _, attr = base.partition(":")
    return base in SWEEP_BASES or all(part.isidentifier() for part in (*module.split("."), *attr.split(".")))


def _measured(metric: str, value: Any) -> bool:
    return _finite(value) and _possible(metric, value)


def _possible(metric: str, value: float) -> bool:
    """Whether `metric` can take `value`: AUC, recall and NDCG lie in [0, 1], errors and losses are
    at least 0; a metric not named here can take any finite value."""
    lower = _known_direction(metric)
    if lower is False:
        return 0 <= value <= 1
    if lower is True:
        return value >= 0
    return True


def _known_direction(metric: str) -> bool | None:
    """Whether lower is better for a metric of embshard's own arches (AUC, recall and NDCG: no;
    errors and losses: yes); None for another, taken as its points say."""
    if metric == "auc" or metric.startswith(("recall@", "ndcg@")):
        return False
    if metric in ("mse", "rmse", "mae", "logloss"):
        return True
    return None


def _json_value(x: Any) -> bool:
    return x is None or isinstance(x, (str, int, float, bool, list, dict))


def _named(x: Any, value: Callable[[Any], bool]) -> bool:
    return isinstance(x, dict) and all(isinstance(k, str) and value(v) for k, v in x.items())


_OPTIONAL: dict[str, Callable[[Any], bool]] = {
    # None: a report written before sweeps recorded the knobs.
    "knobs": lambda x: x is None or _named(x, _json_value),
    "setting": lambda x: _named(x, _json_value),
    "widths": lambda x: _named(x, lambda w: _whole(w) and 0 <= w <= MAX_DIM),
    "serving_params": lambda x: _size(x),
    "steps": lambda x: _whole(x) and x >= 0,
    "selected_step": lambda x: x is None or (_whole(x) and x >= 0),
    "variant": lambda x: isinstance(x, str),
    "metric": lambda x: isinstance(x, str),
    # "no" is true: the merge then named mixed metrics, and not the file.
    "lower_is_better": lambda x: isinstance(x, bool),
}


# A job config's sections (the keys whose values are mappings), as a report records it.
_SECTIONS = frozenset(name for name, hint in typing.get_type_hints(JobConfig).items()
                      if any(dataclasses.is_dataclass(a) for a in (hint, *typing.get_args(hint))))

# What a report may have besides its dataset and points, as the merge reads it.
_OPTIONAL_TOP: dict[str, Callable[[Any], bool]] = {
    "dataset_sha256": lambda x: x is None or isinstance(x, str),
    # A job config: sections are mappings (`train: 5` was an AttributeError in the merge).
    "config": lambda x: x is None or (isinstance(x, dict) and all(
        v is None or isinstance(v, dict) for k, v in x.items() if k in _SECTIONS)),
    "configs_checked": lambda x: isinstance(x, bool),
    "datasets_checked": lambda x: isinstance(x, bool),
    # Ranks and a grid to compare them on: none of either was a ZeroDivisionError, or every width
    # "within one step" of its rank.
    "planted": lambda x: isinstance(x, dict) and bool(x.get("ranks")) and _named(x["ranks"], lambda r: _whole(r)
                                                                                 and r > 0)
    and isinstance(x.get("grid"), list) and bool(x["grid"]) and all(_whole(w) and w > 0 for w in x["grid"])
    and _finite(x.get("bayes_auc")) and (x.get("params") is None or _size(x["params"])),
}


def _size(x: Any) -> bool:
    """A count of bytes or parameters: positive, and within what any plan has."""
    return _whole(x) and 0 < x < 1 << 62


def _non_finite(value: Any, path: str) -> str | None:
    """`path: value` of the first NaN or infinity in `value`, else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{path or '<root>'}: {value}"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite(item, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key)
        if found is not None:
            return found
    return None


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _whole(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def merge_reports(reports: Mapping[str, dict[str, Any]], assume_same_config: bool = False,
                  replace: bool = False, assume_same_data: bool = False) -> dict[str, Any]:
    """One report of several sweeps' points on one dataset (e.g. a method swept after the
    others), keyed by where each came from. A method swept at other knobs in two sweeps (MLET at
    k = 4d and 8d) gives two curves, each point's `variant` naming its knobs where they differ.
    Refused, since the merged claim would compare unlike runs: two datasets, two planted truths,
    a point of one curve, budget and seed in two sweeps, job configs that differ beyond
    UNCOMPARED and the methods' knobs, and, unless `assume_same_config`, a report that records no
    config (written before sweeps recorded it), and, unless `assume_same_data`, reports whose
    dataset hashes differ (reports written before the hash rounded the dataset's numbers differ
    for one dataset generated on two machines); such a report's points have unknown knobs, a
    curve of their own where the method also has recorded ones. With `replace`, the points of a curve (a method
    at its knobs) at a budget that a later report also holds are dropped from the earlier ones, all
    their seeds (a method measured again after a fix), and the merged report names what was dropped
    under `replaced`."""
    names = {rep["dataset"] for rep in reports.values()}
    if len(names) > 1:
        raise DataError(f"sweep reports of different datasets ({', '.join(sorted(names))}): a merged claim "
                        "would compare unlike runs")
    config = same_config(reports, assume_same_config)
    by_source = {source: with_knobs(rep) for source, rep in reports.items()}
    replaced = _replaced_by_later(by_source) if replace else {}
    sourced = [(source, p) for source, pts in by_source.items() for p in pts
               if _at_budget(p) not in replaced.get(source, {})]
    points = with_variants([p for _, p in sourced])
    seen: dict[tuple[str, float, int], str] = {}
    for (source, _), p in zip(sourced, points, strict=True):
        key = (curve(p), p["budget"], p["seed"])
        if key in seen:
            raise DataError(f"{source}: {key[0]} at budget {p['budget']:g}, seed {p['seed']} is also in "
                            f"{seen[key]}; merge sweeps of different methods, knobs, budgets or seeds, or pass "
                            "--replace to let the later sweep's curves replace the earlier's")
        seen[key] = source
    shas = {r["dataset_sha256"] for r in reports.values() if r.get("dataset_sha256")}
    unhashed = [src for src, r in reports.items() if not r.get("dataset_sha256")]
    if unhashed and len(reports) > 1 and not assume_same_data:
        # Its points were merged as of this data, unsaid, whatever data they were of.
        raise DataError(f"{unhashed[0]}: the report records no dataset hash (a sweep from before reports recorded "
                        "it, or an edited one), so whether the sweeps are of one dataset cannot be checked; pass "
                        "--assume-same-data to merge it unchecked")
    if len(shas) > 1 and not assume_same_data:
        raise DataError(f"sweep reports of different data: their datasets' dataset.json differ (converted again "
                        f"with other settings, or another dataset in a folder of the same name {next(iter(names))!r}); "
                        "pass --assume-same-data only if you know they are one dataset")
    # What must agree for two planted sweeps to be of one dataset. Not the grid the "at rank" share
    # is read on, AutoDim's candidates: a knob two sweeps may differ in (refused as "not one
    # dataset", whatever --assume-same-data said); the merge reads every point on the first's.
    planted = [rep["planted"] for rep in reports.values() if "planted" in rep]
    truths = [rounded({k: p[k] for k in ("bayes_auc", "ranks")}) for p in planted]
    if truths and (len(truths) < len(reports) or any(t != truths[0] for t in truths)):
        raise DataError("sweep reports with different planted truths (Bayes AUC or ranks): not one dataset")
    # Planted parameters are recorded only by reports written since; those that record them agree.
    params = {r["planted"]["params"] for r in reports.values() if r.get("planted", {}).get("params")}
    if len(params) > 1:
        raise DataError(f"sweep reports with different planted parameter counts {sorted(params)}: not one dataset")
    truth = PlantedTruth.of_report({**truths[0], "params": next(iter(params), None)}) if truths else None
    rep = report(points, truth, planted[0]["grid"] if planted else [])
    # Each source's sweep spec, or for a merged report, what it was merged from.
    sources = {src: r.get("merged_from", r.get("sweep")) for src, r in reports.items()}
    checked = all(r.get("config") is not None and r.get("configs_checked", True) for r in reports.values())
    # A report without a hash (written before reports recorded it) may be of other data than one with.
    data_checked = len(shas) <= 1 and all(r.get("datasets_checked", True) and (r.get("dataset_sha256") or not shas)
                                          for r in reports.values())
    # `config` is the first sweep's: the shared keys are every sweep's, the methods' knobs are per point.
    dropped = {src: sorted(set(curves.values())) for src, curves in replaced.items() if curves}
    return {"dataset": names.pop(), "dataset_sha256": shas.pop() if len(shas) == 1 else None,
            "merged_from": sources, "config": config, "configs_checked": checked,
            **({} if data_checked else {"datasets_checked": False}), "points": points,
            **({"replaced": dropped} if dropped else {}), **rep}


def _at_budget(point: dict[str, Any]) -> tuple[str, str, float]:
    """A point's curve (its method at its knobs) and budget: what a later sweep's point replaces."""
    return point["method"], json.dumps(point["knobs"], sort_keys=True), point["budget"]


def _replaced_by_later(by_source: Mapping[str, list[dict[str, Any]]]) -> dict[str, dict[tuple[str, str, float], str]]:
    """Per source, its curves at budgets that a later source also holds, each named to report it.
    A point of unrecorded knobs is replaced by a later one of its method at its budget, whatever
    that one's knobs: which of them it was is not known, and the later sweep was asked to stand."""
    out: dict[str, dict[tuple[str, str, float], str]] = {}
    exact: set[tuple[str, str, float]] = set()  # what the sources after this one hold
    any_knobs: set[tuple[str, float]] = set()
    for source in reversed(list(by_source)):
        keyed = [(_at_budget(p), p) for p in by_source[source]]
        out[source] = {key: f"{p['method']} at {p['budget']:g}" for key, p in keyed
                       if key in exact or (p["knobs"] is None and (p["method"], p["budget"]) in any_knobs)}
        exact |= {key for key, _ in keyed}
        any_knobs |= {(p["method"], p["budget"]) for _, p in keyed}
    return {source: out[source] for source in by_source}


def with_knobs(rep: dict[str, Any]) -> list[dict[str, Any]]:
    """A report's points, each with its method's knobs: as the point records them, else from the
    report's config (a sweep from before points recorded them), else None: unknown (no config, or
    an unchecked merge's, which need not be every point's), except for a method that has none."""
    cfg = None
    if rep.get("config") is not None and rep.get("configs_checked", True):
        try:
            cfg = from_dict(JobConfig, current_schema(rep["config"]))
        except ConfigError:
            cfg = None
    # A method that reads no knobs (uniform) has none to be unknown, config or not.
    of_config = {m: method_knobs(cfg, m) if cfg else (None if method_knobs(JobConfig(), m) else {})
                 for m in {p["method"] for p in rep["points"]}}
    return [{**p, "knobs": p["knobs"] if "knobs" in p else of_config[p["method"]]} for p in rep["points"]]


def by_setting(points: list[dict[str, Any]], order: list[Knobs]) -> list[tuple[Knobs, list[dict[str, Any]]]]:
    """A sweep's points by the setting each was trained at (`()`: a sweep that varies none), in
    `order` (the sweep's: a resumed sweep gets its trials back in another); each setting's are
    one report."""
    def text(setting: Knobs) -> str:
        return json.dumps(dict(setting), sort_keys=True)

    groups: dict[str, list[dict[str, Any]]] = {text(setting): [] for setting in order}
    for p in points:
        setting = text(tuple(p.get("setting", {}).items()))
        if setting not in groups:
            raise DataError(f"a point of the setting {setting}, which this sweep does not vary; its settings: "
                            + ", ".join(groups))
        groups[setting].append(p)
    return [(setting, groups[text(setting)]) for setting in order]


def with_variants(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`points`, each with a `variant` where its method comes at several knob settings: the knobs
    that differ between them (`mlet.ratio=8`), or UNRECORDED for points whose knobs are unknown."""
    kinds: dict[str, list[dict[str, Any] | None]] = {}
    for p in points:
        if p["knobs"] not in kinds.setdefault(p["method"], []):
            kinds[p["method"]].append(p["knobs"])
    out = []
    for p in points:
        p = {k: v for k, v in p.items() if k != "variant"}
        recorded = [k for k in kinds[p["method"]] if k is not None]
        if len(kinds[p["method"]]) > 1:
            p["variant"] = _variant(p["knobs"], recorded, p["method"])
        out.append(p)
    return out


def _variant(knobs: dict[str, Any] | None, recorded: list[dict[str, Any]], method: str) -> str:
    """The knobs of a method's points that set them apart from its other recorded settings, or,
    beside points of unknown knobs only, from today's defaults."""
    if knobs is None:
        return UNRECORDED
    others = recorded if len(recorded) > 1 else [knobs, method_knobs(JobConfig(), method)]
    keys = sorted({k for o in others for k in o} - {k for k in knobs if all(o.get(k) == knobs[k] for o in others)})
    shown = [k for k in keys if knobs.get(k) is not None] or keys  # unset ones only when all are
    return ", ".join(f"{k}={knob_text(knobs.get(k))}" for k in shown) or "default knobs"


def dataset_sha256(spec: dict[str, Any]) -> str:
    """A dataset's identity for merging its sweeps: the hash of its dataset.json's content (names,
    cardinalities, rows per split, source, planted truth), not of where it lies, with its numbers
    at 12 significant digits: the same data generated on another machine sums its Bayes AUC in
    another order, which moves the last digits. Not its `id`, which names one writing of it."""
    content = {k: v for k, v in spec.items() if k != "id"}
    return hashlib.sha256(json.dumps(rounded(content), sort_keys=True).encode()).hexdigest()


def rounded(value: Any, digits: int = 12) -> Any:
    """`value` with every float, however deep in dicts and lists, at `digits` significant digits."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v, digits) for v in value]
    return value


def same_config(reports: Mapping[str, dict[str, Any]], assume_same: bool) -> dict[str, Any] | None:
    """The job config the reports share (the first one's), or a DataError naming the first key
    where two differ beyond UNCOMPARED and the methods' knobs; None when none records one."""
    recorded = {src: r["config"] for src, r in reports.items() if r.get("config") is not None}
    missing = [src for src in reports if src not in recorded]
    if missing and not assume_same:
        raise DataError(f"{missing[0]}: the report records no job config (a sweep from before sweeps recorded "
                        "it), so whether the sweeps trained alike cannot be checked; pass --assume-same-config "
                        "to merge it unchecked")
    if not recorded:
        return None
    (first, config), *others = recorded.items()
    for src, other in others:
        differs = config_difference(current_schema(config), current_schema(other),
                                    UNCOMPARED | KNOB_PATHS)
        if differs:
            key, mine, theirs = differs
            raise DataError(f"{src}: {key} is {theirs!r}, {first} has {mine!r}: the sweeps did not train alike")
    return config


def markdown(rep: dict[str, Any], title: str) -> str:
    label = report_label(rep)
    # Under report_at: last every run is reported at its last step, which says nothing; points
    # that do not record their steps say nothing either.
    rising = ((rep.get("config") or {}).get("train", {}).get("report_at") == "best_valid"
              and any(c.get("at_last_step") is not None for c in rep["configs"]))
    # The column's header, rule and cells, or nothing at all.
    col = (lambda cell: f" {cell} |") if rising else (lambda cell: "")
    lines = [f"# {title}", "", f"| method | budget | serving bytes | test {label} (mean ± std) | seeds |"
             + col("still rising"), "| --- | ---: | ---: | --- | ---: |" + col("---:")]
    for c in rep["configs"]:
        lines.append(f"| {c['method']} | {c['budget']:g} | {c['serving_bytes']:,.0f} | "
                     f"{c['mean']:.4f} ± {c['std']:.4f} | {c['seeds']} |" + col(_rising(c)))
    for e in rep["errors"]:
        lines.append(f"| {curve(e)} | {e['budget']:g} | — | {e['error']} | seed {e['seed']} |" + col(""))
    if rising:
        lines += ["", "'still rising': the seeds whose best validation was their last evaluation, so training "
                      "stopped while they still improved; more epochs may raise them."]
    lines += ["", f"**Claim**: {rep['claim']['statement']}."]
    unchecked = [what for what, key in (("job configs", "configs_checked"), ("datasets", "datasets_checked"))
                 if rep.get(key) is False]
    if unchecked:  # said in the JSON alone, a reader of the table took the merge as checked
        lines += ["", f"**Merged unchecked** (`--assume-same-*`): the sweeps' {' and '.join(unchecked)} were not "
                      "compared."]
    for src, methods in rep.get("replaced", {}).items():
        lines += ["", f"Replaced by a later sweep (`--replace`): {', '.join(methods)} of {src}."]
    claimed = rep["claim"]
    if claimed["rises"]:
        lines += ["", f"**Per method**, its smallest plan within {claimed['tolerance']:.4f} of the best uniform, "
                      "else how far its best plan falls short: " + "; ".join(
                          _per_method(m, claimed["smallest"].get(m), b) for m, b in sorted(claimed["best"].items()))
                  + "."]
    knobs = {curve(p): p["knobs"] for p in rep.get("points", []) if p.get("knobs")}
    if knobs:
        lines += ["", "**Knobs** (what each method trained with, unset ones left out): " + "; ".join(
            f"{name}: " + ", ".join(f"{k}={knob_text(v)}" for k, v in sorted(ks.items()) if v is not None)
            for name, ks in sorted(knobs.items())) + "."]
    planted = rep.get("planted")
    if planted:
        features = list(planted["ranks"])
        grid = ", ".join(str(g) for g in planted["grid"])
        lines += ["", f"Planted data: Bayes test AUC {planted['bayes_auc']:.4f}. Chosen width (widest block, "
                      "mean over seeds) per table against the planted rank; 'at rank' is the share of tables "
                      f"whose width is within one step of the planted rank on the grid {grid}; 'rank ρ' is "
                      "Spearman's correlation of the widths with the planted ranks across tables (— for one "
                      "width everywhere, which follows no rank):", "",
                  "| method | budget | distance to Bayes AUC | at rank | rank ρ | " + " | ".join(features) + " |",
                  "| --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in features) + " |",
                  "| planted rank | | | | | " + " | ".join(str(planted["ranks"][f]) for f in features) + " |"]
        for c in planted["configs"]:
            lines.append(f"| {c['method']} | {c['budget']:g} | {c['distance_to_bayes']:.4f} | "
                         f"{c['within_one_step']:.0%} | {_rho(c)} | "
                         + " | ".join(_width(c["widths"][f]) for f in features) + " |")
        if planted.get("params") is not None:
            lines += ["", _at_twice_planted(planted, rep["configs"])]
    return "\n".join(lines) + "\n"


def settings_markdown(title: str, reports: list[tuple[str, dict[str, Any]]]) -> str:
    """A sweep's reports of several settings (label, report) side by side: per setting and method
    its best plan and its smallest within the tolerance of that setting's best uniform; then each
    setting's claim. Each setting is compared with its own uniform: the claims are not merged."""
    lines = [f"# {title}", "", "| setting | method | best test metric (budget) | smallest plan within the "
                               "tolerance of this setting's best uniform |", "| --- | --- | --- | --- |"]
    for setting, rep in reports:
        sign = -1.0 if rep.get("lower_is_better") else 1.0
        claimed = rep["claim"]
        label = report_label(rep)  # each its own: a setting may be another arch, with another metric
        link = f"[{setting}](<{setting}/{report_file(rep['dataset'], 'md')}>)"
        for method in sorted({c["method"] for c in rep["configs"]}, key=lambda m: (m != "uniform", m)):
            best = max((c for c in rep["configs"] if c["method"] == method), key=lambda c: sign * c["mean"])
            smallest = claimed["smallest"].get(method)
            within = ("—" if not claimed["rises"] else "none" if smallest is None else
                      f"budget {smallest['budget']:g}, {_fewer(smallest['ratio_vs_uniform'])} bytes than uniform")
            lines.append(f"| {link} | {method} | {label} {best['mean']:.4f} ± {best['std']:.4f} ({best['budget']:g}) "
                         f"| {within} |")
    lines += ["", "**Claims**, each over its own setting's points:", ""]
    lines += [f"- {setting}: {rep['claim']['statement']}." for setting, rep in reports]
    return "\n".join(lines) + "\n"


def _fewer(ratio: float) -> str:
    # A ratio that rounds to 1.00 (uniform itself, or a plan as large) saves nothing worth a figure.
    return f"{ratio:.2f}x fewer" if round(ratio, 2) > 1 else "no fewer"


def _per_method(method: str, smallest: dict[str, Any] | None, best: dict[str, Any]) -> str:
    if smallest:
        return f"{method} at budget {smallest['budget']:g}, {_fewer(smallest['ratio_vs_uniform'])} bytes than uniform"
    return f"{method} none, its best (budget {best['budget']:g}, {best['mean']:.4f}) {best['behind']:.4f} short"


def _at_twice_planted(planted: dict[str, Any], configs: list[dict[str, Any]]) -> str:
    """The best plan of each method with at most twice the planted parameters, and for methods
    without one, the largest budget that would have one (from the base model's size)."""
    twice = 2 * planted["params"]
    found = {m: c for m, c in planted["at_twice_params"].items() if c}
    text = (f"Planted parameters: {planted['params']:,} (the generator's: each popularity block's rows and its "
            f"map into the latent space, times its rank). Best plan "
            f"per method with at most twice that ({twice:,} serving parameters), its distance to the Bayes AUC: "
            + ("; ".join(f"{m} at budget {c['budget']:g} ({c['serving_params']:,.0f} parameters) "
                         f"{c['mean']:.4f}, {c['distance_to_bayes']:.4f} below" for m, c in found.items())
               or "none"))
    missing = sorted(m for m, c in planted["at_twice_params"].items() if not c)
    if missing:
        base = next((c["serving_params"] for c in configs if c["method"] == "uniform" and c["budget"] == 1.0), None)
        hint = f" (that small is a budget of at most {twice / base:.3g} of this base model)" if base else ""
        text += f". No plan that small for {', '.join(missing)}{hint}"
    return text + "."


def plot(rep: dict[str, Any], title: str, path: Path) -> None:
    """The test metric against serving bytes (log x), error bars over seeds, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in sorted({c["method"] for c in rep["configs"]}):
        cs = sorted((c for c in rep["configs"] if c["method"] == method), key=lambda c: c["serving_bytes"])
        ax.errorbar([c["serving_bytes"] for c in cs], [c["mean"] for c in cs], yerr=[c["std"] for c in cs],
                    marker="o", capsize=3, label=method, linewidth=2 if method == "uniform" else 1)
    claimed = rep["claim"]
    lower = rep.get("lower_is_better", False)
    if claimed["rises"]:
        ax.axhline(claimed["best_uniform"] + (1 if lower else -1) * claimed["tolerance"], color="grey",
                   linestyle=":", label=f"best uniform {'+' if lower else '-'} tolerance")
    if "planted" in rep:
        ax.axhline(rep["planted"]["bayes_auc"], color="black", linestyle="--", label="Bayes AUC")
    ax.set_xscale("log")
    ax.set_xlabel("serving embedding bytes (fp32; PEP lottery: non-zeros)")
    ax.set_ylabel(f"test {report_label(rep)} (mean ± std over seeds)"
                  + (", lower is better" if lower else ""))
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if rep["configs"] or "planted" in rep:  # nothing measured (no PEP target reached): no legend to warn of
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no plan trained: see the report's errors", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def metric_label(metric: str) -> str:
    return "AUC" if metric == "auc" else metric.upper() if metric in ("mse", "rmse") else metric


def report_label(rep: dict[str, Any]) -> str:
    return metric_label(rep.get("metric", "test_auc").removeprefix("test_"))


def _mb(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def _rising(config: dict[str, Any]) -> str:
    """'k of n' seeds reported at their last step; blank where the points do not say."""
    k = config.get("at_last_step")
    return "" if k is None else f"{k} of {config['seeds']}"


def _rho(config: dict[str, Any]) -> str:
    if "rank_correlation" not in config:  # a report written before it was measured: blank, not "—"
        return ""
    rho = config["rank_correlation"]
    return "—" if rho is None else f"{rho:+.2f}"


def _width(w: float | None) -> str:
    return "—" if w is None else f"{w:g}" if w == int(w) else f"{w:.1f}"
