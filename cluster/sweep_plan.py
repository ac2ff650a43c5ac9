"""What `embshard sweep` runs: methods x budgets x seeds as trials, and the knobs they read.

How each method meets a budget (a fraction of the base model's serving parameters) and which
runs a trial of it makes: `cluster/sweep_methods.py`.

A trial is one method at one budget and seed; a PEP trial holds every budget of its seed (one
prune run gives every target). `--vary KEY=V1,V2` adds an axis. A method's **knob** (a key of its own
section, `embeddings.mde.alpha`: mde, mde+mlet) runs each method that reads it at every value and
the others once: one report, a curve per value. A **setting** (any other key that changes what
trains: `train.epochs`, `model.options.l2`) runs every method at every value: a report per value,
each as a sweep with that `--set` would have written it, since a claim compares methods trained
alike. Torch-free: the driver checks every trial's configs before Ray starts.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from embshard.cluster.sweep_methods import (
    MLET_KNOBS,
    SWEEP_BASES,
    KnobSection,
    PlannedMethod,
    SweepMethod,
    mlet_config,
    sweep_method_named,
)
from embshard.config import SWEEP_METHODS, JobConfig, budget_name, check_budgets, check_methods
from embshard.datasets.storage import NAME_MAX, fitted_name
from embshard.errors import ConfigError
from embshard.typed_config import flatten, from_dict, parse_yaml, parse_yaml_value, set_dotted, to_dict, under

# Every section of knobs a sweep method reads: each base method's own, and MLET's.
KNOB_SECTIONS: tuple[KnobSection, ...] = (*(m.knobs for m in SWEEP_BASES.values() if m.knobs), MLET_KNOBS)
KNOB_PATHS = frozenset(s.path for s in KNOB_SECTIONS)

# Job config keys a sweep's results do not depend on: where things go, how progress is shown, how
# a run survives failures. Merged sweeps that differ in any other key did not train alike, except
# in a method's own knobs (KNOB_PATHS), which only that method's points are compared on.
NOT_RESULTS = frozenset({"name", "output_dir", "data.path", "data.prefetch", "data.validate", "sharding.plan_file",
                         "train.log_every", "train.progress", "metrics", "cluster.address", "cluster.max_failures",
                         "cluster.storage", "checkpoint", "sweep"})
# What each trial's configs set themselves (TrialRuns.run, each method's first_run): not a setting to vary.
PER_TRIAL = frozenset({"seed", "embeddings.policy", "embeddings.method", "embeddings.decisions", "train.test"})
# Keys two sweeps (or a sweep and its resume) may differ in and still have trained alike: the
# per-trial ones are set by each trial over whatever the config says (a sweep run with seed 5
# was refused as one "that did not train alike").
UNCOMPARED = NOT_RESULTS | PER_TRIAL
# What the sweep sizes its Ray cluster and --parallel by: the config's, one for every trial.
SWEEP_WIDE = frozenset({"cluster.workers", "cluster.cpus_per_worker"})
UNSET = "(unset)"
# A sweep's spec, job config and data, recorded in its folder (sweep_run); no report may take its name.
SPEC_FILE = "sweep-spec.json"


# (dotted job config key, value) pairs a trial sets over the sweep's config: its --vary values.
Knobs = tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Trial:
    method: str
    seed: int
    budget: float | None = None  # None: a PEP trial, which covers every budget of the sweep
    knobs: Knobs = ()

    @property
    def key(self) -> str:
        at = "" if self.budget is None else f"-b{budget_name(self.budget)}"
        # The name of its run folder, and within Ray's of its runs (`sweep-KEY-retrain-0.5-pep`):
        # a long --vary value's failed the trial.
        return fitted_name("-".join([f"{self.method}{at}-s{self.seed}", *self._varied]), NAME_MAX - 64)

    @property
    def label(self) -> str:
        """The method and its --vary values, named as the report names its curves (`mde (mde.alpha=1)`)."""
        return f"{self.method} ({', '.join(self._varied)})" if self.knobs else self.method

    @property
    def _varied(self) -> list[str]:
        return [f"{knob_name(k)}={knob_text(v)}" for k, v in self.knobs]

    @property
    def settings(self) -> Knobs:
        """The --vary values that are settings, not its method's knobs: what its report is one of."""
        return tuple((k, v) for k, v in self.knobs if is_setting(k))

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "seed": self.seed, "budget": self.budget,
                "knobs": [[k, v] for k, v in self.knobs]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Trial:
        # `knobs` absent: a trial of a sweep started before --vary, resumed.
        return cls(data["method"], data["seed"], data.get("budget"), tuple((k, v) for k, v in data.get("knobs", [])))

    @property
    def sweep_method(self) -> SweepMethod:
        """The base method that trains it: `mde` for mde+mlet, uniform for mlet, a user's for
        `package.module:attr`."""
        method = sweep_method_named(self.base_name)
        if self.with_mlet and self.users and not isinstance(method, PlannedMethod):
            # Its own runs would have to carry `runs.mlet`; unchecked, they trained plain tables.
            raise ConfigError(f"method {self.method!r}: +mlet is for a PlannedMethod of yours (whose one run "
                              "carries MLET); a method of more runs trains MLET in its own runs")
        return method

    @property
    def base_name(self) -> str:
        return "uniform" if self.method == "mlet" else self.method.removesuffix("+mlet")

    @property
    def users(self) -> bool:
        """Whether its method is a user's, named as package.module:attr."""
        return ":" in self.base_name

    @property
    def with_mlet(self) -> bool:
        return self.method.endswith("+mlet") or self.method == "mlet"

    @property
    def knob_sections(self) -> list[KnobSection]:
        """The knobs its method reads: its base method's own, and MLET's for X+mlet. A user's
        method has none of its own (`sweep_method_named`): not imported here, where a merged
        report names it on a machine that may lack its code."""
        own = None if self.users else self.sweep_method.knobs
        return ([own] if own else []) + ([MLET_KNOBS] if self.with_mlet else [])


# More trials than a cluster gets through in months: `--seeds 1000000000` listed its trials until
# the driver's memory ran out.
MAX_TRIALS = 10_000


@dataclass(frozen=True)
class SweepSpec:
    methods: list[str]
    budgets: list[float]
    seeds: int
    # Seeds first_seed..first_seed+seeds-1: a later seed of an expensive sweep runs on its own and
    # merges (`sweep-merge`) with the earlier ones.
    first_seed: int = 0
    # Knobs and settings to sweep (`embeddings.mde.alpha` -> [0.3, 1.0]): a method runs at every
    # combination of the values of the knobs it reads and of every setting.
    vary: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        count = sum(math.prod(len(self.vary[k]) for k in self._varied(m)) * self.seeds
                    * (1 if Trial(m, 0).sweep_method.every_budget_at_once else len(self.budgets))
                    for m in self.methods)
        if count > MAX_TRIALS:
            axes = ", ".join(f"{k} {len(v)}" for k, v in self.vary.items())
            raise ConfigError(
                f"a sweep of {count:,} trials ({len(self.methods)} method(s), {len(self.budgets)} budget(s), "
                f"{self.seeds:,} seed(s){', ' + axes if axes else ''}); one sweep runs at most {MAX_TRIALS:,}: "
                "fewer of them, or seeds in several sweeps (--first-seed) joined by `sweep-merge`")

    def _varied(self, method: str) -> list[str]:
        return [k for k in self.vary if is_setting(k) or reads_knob(method, k)]

    def trials(self) -> list[Trial]:
        out = []
        for method in self.methods:
            for knobs in self._combinations(self._varied(method)):
                for seed in range(self.first_seed, self.first_seed + self.seeds):
                    if Trial(method, seed).sweep_method.every_budget_at_once:
                        out.append(Trial(method, seed, knobs=knobs))
                    else:
                        out.extend(Trial(method, seed, b, knobs) for b in self.budgets)
        return out

    def settings(self) -> list[Knobs]:
        """Every combination of the varied settings' values, in the order given: one report each."""
        return self._combinations([k for k in self.vary if is_setting(k)])

    def _combinations(self, keys: list[str]) -> list[Knobs]:
        """Every combination of the values of these varied keys (`[()]`: no keys)."""
        return [tuple(zip(keys, combo, strict=True)) for combo in itertools.product(*(self.vary[k] for k in keys))]

    def to_json(self) -> dict[str, object]:
        spec: dict[str, object] = {"methods": self.methods, "budgets": self.budgets, "seeds": self.seeds}
        # Left out when unused, so a sweep folder written before the option resumes as the same sweep.
        return spec | ({"first_seed": self.first_seed} if self.first_seed else {}) | (
            {"vary": self.vary} if self.vary else {})


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    check_methods(methods, "--methods")
    return methods


def parse_budgets(text: str) -> list[float]:
    try:
        budgets = [float(p.strip()) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"--budgets: expected comma-separated fractions, got {text!r}") from None
    check_budgets(budgets, "--budgets")
    return sorted(budgets)


def parse_vary(items: list[str]) -> dict[str, list[Any]]:
    """`--vary KEY=V1,V2` (repeatable) -> {KEY: [V1, V2]}, each value read as YAML; a YAML list
    gives values that hold commas themselves (`autodim.candidates=[[2,8,32],[4,16,32]]`)."""
    vary: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = (part.strip() for part in item.partition("="))
        if not sep or not key or not raw:
            raise ConfigError(f"--vary {item!r}: expected KEY=V1,V2,... (e.g. embeddings.mde.alpha=0.3,1.0)")
        if key in vary:
            raise ConfigError(f"--vary {key}: given twice; list every value once, comma-separated")
        vary[key] = _values(key, raw)
    return vary


def _values(key: str, raw: str) -> list[Any]:
    """`V1,V2`: a YAML list as it is, or the values it lists once bracketed (`[64,32],[32,16]`
    are two lists), or, failing both, each comma-separated value on its own."""
    for text in (raw, f"[{raw}]"):
        try:
            parsed = parse_yaml(text)
        except yaml.YAMLError:
            continue
        if isinstance(parsed, list):
            return parsed
    return [parse_yaml_value(v, f"--vary {key}={v}") for v in raw.split(",")]


def check_vary(cfg: JobConfig, vary: dict[str, list[Any]], methods: list[str], where: str) -> None:
    """Each varied key a knob of one of `methods` or a setting, with distinct values, each valid
    in `cfg` on its own (how the values combine, the trials' check). `where`: `--vary` or `sweep.vary`."""
    keys = [*flatten(to_dict(cfg)), *KNOB_PATHS]
    for key, values in vary.items():
        if key == "data.path":
            raise ConfigError(f"{where} data.path: a sweep is of one dataset; sweep each dataset on its own")
        inner = [k for k in keys if k.startswith(f"{key}.")]
        if key in KNOB_PATHS or inner:
            example = next((k for k in inner if _variable(k)), None)
            raise ConfigError(f"{where} {key}: a section; vary its keys one by one"
                              + (f" (e.g. {example})" if example else ", of which a sweep varies none"))
        if key in SWEEP_WIDE:
            raise ConfigError(f"{where} {key}: one for the whole sweep, which sizes its Ray cluster and --parallel "
                              "by it; set it with --set or --workers")
        if not _variable(key):
            raise ConfigError(f"{where} {key}: not for a sweep to vary: each trial sets it (its method, budget, "
                              "seed or output), or it does not change what trains")
        readers = [m for m in SWEEP_METHODS if reads_knob(m, key)]
        if not is_setting(key) and not any(reads_knob(m, key) for m in methods):
            raise ConfigError(f"{where} {key}: read by {', '.join(readers)}, none of this sweep's methods")
        # Distinct as the trial folders name them: 0 and 0.0 would be two trials in one folder.
        texts = [knob_text(v) for v in values]
        if not values or len(set(texts)) != len(texts):
            raise ConfigError(f"{where} {key}: expected distinct values, got {values}")
        if any("/" in t for t in texts):
            raise ConfigError(f"{where} {key}: a value with '/' would name a folder inside the trial's; got {values}")
        for value in values:
            with_knobs(cfg, ((key, value),), where)


def _variable(key: str) -> bool:
    """Whether a sweep may vary `key`: a setting, or a knob some method reads, that no trial sets."""
    if under(key, UNCOMPARED):
        return False
    return is_setting(key) or any(reads_knob(m, key) for m in SWEEP_METHODS)


def with_knobs(cfg: JobConfig, knobs: Knobs, where: str = "--vary") -> JobConfig:
    """`cfg` with a trial's --vary values set, checked as a config is (the error names the key)."""
    if not knobs:
        return cfg
    if any(MLET_KNOBS.reads(key) for key, _ in knobs):  # varied from the sweep's MLET default, not from nothing
        cfg = replace(cfg, embeddings=replace(cfg.embeddings, mlet=mlet_config(cfg)))
    data = to_dict(cfg)
    for key, value in knobs:
        set_dotted(data, key, to_dict(value), where)
    try:
        return from_dict(JobConfig, data)
    except ConfigError as e:  # it names the key: `embeddings.mde.alpha: must be in [0, 1], got 2.0`
        raise ConfigError(f"{where} {e}") from None


def knob_name(key: str) -> str:
    """A knob's job config key as the points record it: `embeddings.mde.alpha` -> `mde.alpha`."""
    for section in KNOB_SECTIONS:
        if key.startswith(f"{section.path}."):
            return f"{section.name}.{key.removeprefix(f'{section.path}.')}"
    return key


def knob_text(value: Any) -> str:
    """A knob's value as trial folders, console lines and the report's curve names show it."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def config_difference(mine: dict[str, Any], theirs: dict[str, Any],
                      skip: frozenset[str] | set[str]) -> tuple[str, Any, Any] | None:
    """The first dotted key where two job configs (as dicts) differ outside `skip`, with each
    one's value (UNSET where it has none); None where they agree."""
    a, b = ({k: v for k, v in flatten(c).items() if not under(k, skip)} for c in (mine, theirs))
    return next(((k, a.get(k, UNSET), b.get(k, UNSET)) for k in sorted(a.keys() | b.keys())
                 if a.get(k, UNSET) != b.get(k, UNSET)), None)


def is_setting(key: str) -> bool:
    """Whether a varied key is a setting (every method reads it) rather than a method's knob."""
    return not under(key, KNOB_PATHS)


def setting_label(settings: Knobs) -> str:
    """A report's setting as its folder in the sweep's names it: `train.epochs=12-model.options.l2=0.03`."""
    return fitted_name("-".join(f"{k}={knob_text(v)}" for k, v in settings))


def reads_knob(method: str, key: str) -> bool:
    """Whether `method`'s trials read the job config key `key` as one of their knobs."""
    return any(section.reads(key) for section in Trial(method, 0).knob_sections)


def method_knobs(cfg: JobConfig, method: str) -> dict[str, Any]:
    """The knobs a sweep method's trials read from `cfg` and other methods' do not, at the values
    they train with (defaults filled in), as dotted keys under KNOB_SECTIONS' names (`mlet.ratio`):
    what two sweeps of one method must share for their points to be one curve."""
    return {f"{section.name}.{key}": value for section in Trial(method, 0).knob_sections
            for key, value in flatten(to_dict(section.of(cfg))).items() if key not in section.not_knobs}
