"""How `embshard sweep` trains each method at a budget: one `SweepMethod` per base method.

A budget b is a fraction of the serving parameters of the uniform model at the config's
`embeddings.dim` (the base model), in (0, 1]. Each method meets it with its own knob:

    uniform   tables of width w(b) = b x embeddings.dim, rounded by embeddings.rounding
    mde       embeddings.mde (mode, alpha, blocks) with budget_params = b x the base model's
    pep       one prune run per seed at the base dim with targets = the budgets, then the paper's
              lottery-ticket retrain of every target reached; its size is the mask's non-zeros
    autodim   a search over autodim.candidates scaled so the largest is w(b), then a retrain on
              its decisions

`X+mlet` is X's plan (PEP's and AutoDim's through their decisions files) trained with MLET at
k = embeddings.mlet's ratio or width (default 4 w(b)) and served collapsed; `mlet` is
uniform+mlet. MLET changes how a plan trains, not what it decides, so it is a `KnobSection` every
method can carry (`MLET_KNOBS`), not a method.

Each method says where its knobs live (`knobs`), its first run (what the driver checks before Ray
starts, `first_run`) and the runs that give its points (`points`, in the trial), both of one
trial's `TrialRuns`. The trials ask the method, never its name; the report compares every method
with uniform's curve. Torch-free but for PEP's masks, read in the trial.
"""

from __future__ import annotations

import hashlib
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from embshard.config import AutodimConfig, EmbeddingsConfig, JobConfig, MletConfig, PepConfig
from embshard.datasets.schema import DatasetSpec
from embshard.datasets.storage import NAME_MAX, fitted_name
from embshard.errors import ConfigError, PlanError, TrainingDiverged
from embshard.planner.policies import plan_dimensions
from embshard.planner.policies.uniform import uniform_plan
from embshard.planner.rounding import round_width
from embshard.planner.types import DimensionPlan
from embshard.trainer.reference import import_reference, instance_of, users_code

if TYPE_CHECKING:
    from embshard.cluster.sweep_plan import Trial

DEFAULT_MLET_RATIO = 4.0  # k = 4 d unless the config's embeddings.mlet says otherwise
FP32_BYTES = 4

Point = dict[str, Any]
# Trains one run (its config, and the method it is trained as; None: the one its config names):
# -> its dimension plan and summary. The trial's, through the same driver steps as `embshard train`.
Train = Callable[[JobConfig, str | None], tuple[DimensionPlan, dict[str, Any]]]


@dataclass(frozen=True)
class KnobSection:
    """Where a method's own knobs live in a job config. A sweep reads them only for trials of
    that method; the fields each trial sets itself (a budget, a target, an output path) or that
    do not change what trains are not knobs."""

    name: str  # as points record its knobs: `mde` in `mde.alpha`
    path: str  # its section in a job config: `embeddings.mde`
    not_knobs: frozenset[str]
    of: Callable[[JobConfig], Any]  # the section at the values trials train with (defaults filled in)

    def reads(self, key: str) -> bool:
        """Whether the job config key `key` is one of this section's knobs."""
        return key.startswith(f"{self.path}.") and key.removeprefix(f"{self.path}.").split(".")[0] not in self.not_knobs


def mlet_config(cfg: JobConfig) -> MletConfig:
    return cfg.embeddings.mlet or MletConfig(ratio=DEFAULT_MLET_RATIO)


MLET_KNOBS = KnobSection("mlet", "embeddings.mlet", frozenset({"exact_resume"}), mlet_config)


@dataclass(frozen=True)
class TrialRuns:
    """One trial's runs: the sweep's config with the trial's --vary values set (`base`), the
    dataset it describes, the sweep's budgets and the folder the trial's runs live in."""

    base: JobConfig
    spec: DatasetSpec
    trial: Trial
    budgets: list[float]
    folder: Path

    def first_run(self) -> tuple[JobConfig, str | None]:
        with self._users_code("first_run"):
            return self.trial.sweep_method.first_run(self)

    def points(self, train: Train) -> list[Point]:
        """The method's points; a finding of a run that every point rests on (a prune or search
        that diverged) is each of them with its error: as a failed trial, it failed again on every
        resume, and no report was ever written."""
        try:
            with self._users_code("points"):
                return self.trial.sweep_method.points(self, train)
        except FINDINGS as e:
            budgets = self.budgets if self.trial.sweep_method.every_budget_at_once else [self.budget]
            return [point(self.trial, b, error=str(e)) for b in budgets]

    def _users_code(self, hook: str) -> AbstractContextManager[None]:
        """A user's method failing in its own code: one line naming it and where (an error of
        embshard's, training included, says its own); a built-in's bug stays a crash."""
        if not self.trial.users:
            return nullcontext()
        # first_run makes the run's config, which embshard then checks; points trains, whose
        # errors (a dataset's) say their own.
        return users_code(f"method {self.trial.method!r}: its {hook}", refusals_too=hook == "first_run")

    @property
    def budget(self) -> float:
        """The trial's budget (every method's but PEP's, whose trial covers them all)."""
        assert self.trial.budget is not None, f"trial {self.trial.key} is of every budget"
        return self.trial.budget

    @property
    def mlet(self) -> MletConfig | None:
        """MLET for an X+mlet trial's plan, else None."""
        return mlet_config(self.base) if self.trial.with_mlet else None

    def run(self, name: str) -> JobConfig:
        """`base` as the trial's run `name`: its own output folder, seed and plan (a config's plan
        file is one method's at one budget), the test split evaluated, no progress bar (trials
        run side by side)."""
        base, out = self.base, self.folder / name
        job = f"sweep-{self.trial.key}-{name}"
        # Runs side by side must not share one file-SD file; each has its own beside the one the
        # config names, in the folder Prometheus reads (in the run's folder, none was scraped).
        listed = base.metrics.file_sd
        file_sd = None
        if listed:  # named for its sweep too: two sweeps of one config list the same jobs
            suffix = Path(listed).suffix or ".json"
            sweep = hashlib.sha256(str(self.folder.resolve()).encode()).hexdigest()[:8]
            file_sd = str(Path(listed).parent / (fitted_name(f"{job}-{sweep}", NAME_MAX - len(suffix)) + suffix))
        return replace(base, seed=self.trial.seed, name=job, output_dir=str(out),
                       sharding=replace(base.sharding, plan_file=None),
                       train=replace(base.train, test=True, progress=False),
                       checkpoint=replace(base.checkpoint, dir=None, resume=None),
                       metrics=replace(base.metrics, file_sd=file_sd))


class SweepMethod(ABC):
    """One base method as a sweep trains it: its knobs, its first run and its points."""

    name: ClassVar[str]
    knobs: ClassVar[KnobSection | None] = None
    # One trial per seed gives every budget (PEP: one prune run reaches every target).
    every_budget_at_once: ClassVar[bool] = False

    @abstractmethod
    def first_run(self, runs: TrialRuns) -> tuple[JobConfig, str | None]:
        """The trial's first run, and the method it is trained as (None: the one its config names)."""

    @abstractmethod
    def points(self, runs: TrialRuns, train: Train) -> list[Point]:
        """The trial's runs, trained by `train`, as one point per budget it covers."""


class PlannedMethod(SweepMethod):
    """One run on the plan a policy makes at the budget."""

    @abstractmethod
    def embeddings_at(self, base: JobConfig, spec: DatasetSpec, budget: float) -> EmbeddingsConfig:
        """The base model's embeddings config as this method's at `budget`, without MLET."""

    def first_run(self, runs: TrialRuns) -> tuple[JobConfig, str | None]:
        made = self.embeddings_at(runs.base, runs.spec, runs.budget)
        if not isinstance(made, EmbeddingsConfig):
            # Found by dataclasses.replace, whose file was named as where to look.
            raise ConfigError(f"embeddings_at() returned {type(made).__name__}, not an EmbeddingsConfig")
        return replace(runs.run("train"), embeddings=replace(made, mlet=runs.mlet)), None

    def points(self, runs: TrialRuns, train: Train) -> list[Point]:
        cfg, _ = self.first_run(runs)
        return [trained_point(runs.trial, runs.budget, cfg, train)]


class Uniform(PlannedMethod):
    name = "uniform"

    def embeddings_at(self, base: JobConfig, spec: DatasetSpec, budget: float) -> EmbeddingsConfig:
        return replace(_plain(base), policy="uniform", dim=uniform_width(base.embeddings, budget))


class Mde(PlannedMethod):
    name = "mde"
    knobs = KnobSection("mde", "embeddings.mde", frozenset({"budget_params", "budget_bytes"}),
                        lambda cfg: cfg.embeddings.mde)

    def embeddings_at(self, base: JobConfig, spec: DatasetSpec, budget: float) -> EmbeddingsConfig:
        emb = _plain(base)
        base_count = base_params(base, spec)
        params = round(budget * base_count)
        if params < 1:  # was "budget_params: must be positive, got 0", of a field the user never set
            raise ConfigError(f"--budgets {budget:g}: {budget:g} x the base model's {base_count:,} "
                              f"embedding parameters is no parameter for mde")
        return replace(emb, policy="mde", mde=replace(emb.mde, budget_params=params, budget_bytes=None))


class Pep(SweepMethod):
    """A prune run to every budget below 1, then a retrain of each target reached: the lottery
    ticket (pep), or its decisions file as a mixed-width plan (pep+mlet)."""

    name = "pep"
    knobs = KnobSection("pep", "pep", frozenset({"targets", "out", "retrain_target", "retrain_from"}),
                        lambda cfg: cfg.pep or PepConfig())
    every_budget_at_once = True

    def first_run(self, runs: TrialRuns) -> tuple[JobConfig, str | None]:
        # The base model itself needs no pruning.
        targets = sorted((b for b in runs.budgets if b < 1), reverse=True)
        if not targets:
            raise ConfigError("--budgets: PEP prunes to budgets below 1; this sweep has none")
        pep = replace(runs.base.pep or PepConfig(), targets=targets, out=None, retrain_target=None,
                      retrain_from=None)
        return replace(runs.run("prune"), embeddings=_plain(runs.base), pep=pep), "pep"

    def points(self, runs: TrialRuns, train: Train) -> list[Point]:
        from embshard.cluster.pep_cli import same_mask_as, tell_apart

        prune, method = self.first_run(runs)
        _, pruned = train(prune, method)
        reached = pruned["pep"]["reached"]
        # Targets one count passed share its mask: each but the widest was the same plan retrained
        # under another budget's name, a point of its own on the curve.
        same_as = same_mask_as(reached)
        points = []
        for budget in runs.budgets:
            if budget >= 1:
                points.append(point(runs.trial, budget, error="PEP prunes below the base model; budget 1 is uniform's"))
            elif f"{budget:g}" not in reached:
                kept = pruned["pep"]["kept_fraction"]
                points.append(point(runs.trial, budget, error=f"target {budget:g} not reached in {pruned['steps']} "
                                                              f"prune steps (kept {kept:.3f})"))
            elif f"{budget:g}" in same_as:
                wider, hit = same_as[f"{budget:g}"]
                points.append(point(runs.trial, budget, error=(
                    f"target {budget:g} was passed by the count that passed {wider} (step {hit['step']}, "
                    f"{hit['nonzero']:,} non-zero): the same mask, trained as {wider}'s point; "
                    f"{tell_apart(prune.pep.count_every if prune.pep else None)}")))
            else:
                try:
                    points.append(self._retrained(runs, prune, budget, train))
                except FINDINGS as e:  # one target's retrain: the others' points stand
                    points.append(point(runs.trial, budget, error=str(e)))
        return points

    def _retrained(self, runs: TrialRuns, prune: JobConfig, target: float, train: Train) -> Point:
        cfg = runs.run(f"retrain-{target:g}")
        decisions = prune.pep_dir.resolve() / f"target-{target:g}" / "decisions.json"
        if runs.mlet is not None:
            emb = replace(_plain(runs.base), policy="decisions", decisions=str(decisions), mlet=runs.mlet)
            return trained_point(runs.trial, target, replace(cfg, embeddings=emb, pep=None), train)
        from embshard.trainer.pep import LotteryTicket  # torch: the trial's, not the driver's

        assert prune.pep is not None
        pep = replace(prune.pep, out=None, retrain_target=target, retrain_from=str(prune.pep_dir.resolve()))
        _, summary = train(replace(cfg, embeddings=prune.embeddings, pep=pep), None)
        # The lottery ticket trains dense base-dim tables; what it keeps is the mask's non-zeros,
        # and the widths are those of the target's decisions file (survivors per row).
        ticket = LotteryTicket.load(prune.pep_dir, target)
        return point(runs.trial, target, summary, ticket.nonzero, _decisions_plan(prune, runs.spec, decisions))


class Autodim(SweepMethod):
    """AutoDim's search at the budget (the candidates scaled so the largest is the uniform
    width), then a retrain on its decisions."""

    name = "autodim"
    knobs = KnobSection("autodim", "autodim", frozenset({"decisions", "history_every"}),
                        lambda cfg: cfg.autodim or AutodimConfig())

    def first_run(self, runs: TrialRuns) -> tuple[JobConfig, str | None]:
        search = runs.base.autodim or AutodimConfig()
        width = uniform_width(runs.base.embeddings, runs.budget)
        scaled = sorted({max(1, round(c * width / search.max_dim)) for c in search.candidates} | {width})
        if len(scaled) < 2:
            raise ConfigError(f"--budgets: at {runs.budget:g} AutoDim's candidates {search.candidates} scale to "
                              f"{scaled}, one width: nothing to search")
        cfg = runs.run("search")
        decisions = (Path(cfg.output_dir) / "decisions.json").resolve()
        return replace(cfg, embeddings=replace(_plain(runs.base), dim=width),
                       autodim=replace(search, candidates=scaled, decisions=str(decisions))), "autodim"

    def points(self, runs: TrialRuns, train: Train) -> list[Point]:
        search, method = self.first_run(runs)
        _, searched = train(search, method)
        assert search.autodim is not None and search.autodim.decisions is not None
        if "no_decisions" in searched:  # a point of its own, not a retrain's "no decisions file"
            return [point(runs.trial, runs.budget, error=searched["no_decisions"])]
        emb = replace(search.embeddings, policy="decisions", decisions=search.autodim.decisions, mlet=runs.mlet)
        return [trained_point(runs.trial, runs.budget, replace(runs.run("retrain"), embeddings=emb, autodim=None),
                              train)]


SWEEP_BASES: dict[str, SweepMethod] = {m.name: m for m in (Uniform(), Mde(), Pep(), Autodim())}


@cache
def sweep_method_named(name: str) -> SweepMethod:
    """A built-in base method, or a user's SweepMethod (class or instance) named as
    "package.module:attr": imported on the driver and again in every Tune trial, so it must be on
    their Python path, as a method named in a config is."""
    if name in SWEEP_BASES:
        return SWEEP_BASES[name]
    key = f"method {name!r}"
    found = instance_of(import_reference(name, key), key)
    if not isinstance(found, SweepMethod):
        raise ConfigError(f"{key}: a {type(found).__name__}, not a SweepMethod (embshard.cluster.sweep_methods: "
                          "PlannedMethod for one run on a plan at the budget)")
    built_in = next((m.name for m in SWEEP_BASES.values() if type(m) is type(found)), None)
    if built_in:
        # Under a second name it trained as a second curve of the same method.
        raise ConfigError(f"{key}: the built-in {built_in!r}; name it so")
    if found.knobs is not None:
        # Its section would be read as a setting every method trains at (`is_setting`).
        raise ConfigError(f"{key}: a method of yours has no knob section of its own (set knobs = None; a subclass "
                          "of a built-in inherits the built-in's)")
    return found


def _plain(base: JobConfig) -> EmbeddingsConfig:
    """The base model's embeddings as a uniform plan of no method: what each method starts from."""
    return replace(base.embeddings, policy="uniform", method=None, decisions=None, mlet=None)


def uniform_width(emb: EmbeddingsConfig, budget: float) -> int:
    """The uniform width at `budget`: on the rounding grid, within [min_dim, dim]."""
    return round_width(budget * emb.dim, emb.rounding, emb.min_dim, emb.dim).value


def base_params(cfg: JobConfig, spec: DatasetSpec) -> int:
    """Serving parameters of the uniform base model: what budgets are fractions of."""
    return uniform_plan(replace(cfg.embeddings, policy="uniform", mlet=None), spec).serve_params()


# What a run's setting, not its environment, brings about: a budget the method's plan cannot meet
# (an MDE budget below its floor), learning rates that diverge. Each is a result at that point;
# a failed trial failed the same way on every resume.
FINDINGS = (PlanError, TrainingDiverged)


def trained_point(trial: Trial, budget: float, cfg: JobConfig, train: Train) -> Point:
    """The point of one run at `budget`; a finding of its run is a point with its error, not a
    failed trial."""
    try:
        plan, summary = train(cfg, None)
    except FINDINGS as e:
        return point(trial, budget, error=str(e))
    return point(trial, budget, summary, plan.serve_params(), plan)


def _decisions_plan(prune: JobConfig, spec: DatasetSpec, decisions: Path) -> DimensionPlan:
    emb = replace(prune.embeddings, policy="decisions", decisions=str(decisions))
    with tempfile.TemporaryDirectory() as remaps:
        return plan_dimensions(emb, spec, None, Path(remaps))


def point(trial: Trial, budget: float, summary: dict[str, Any] | None = None, params: int | None = None,
          plan: DimensionPlan | None = None, error: str | None = None) -> Point:
    """A trial's result at one budget: method, budget, seed, the arch's primary test metric
    (`metric`, `value`, and `lower_is_better`: MSE is, AUC is not) and its validation value,
    serving parameters and bytes (fp32), per sparse feature the width the plan gave its most
    popular rows (`widths`), the steps trained and the one reported (`selected_step`); or an
    `error` saying why there is none (an MDE budget below its floor, a PEP target the prune run
    never reached). The trial adds its knobs and setting (`sweep_trial.trial_points`)."""
    out: Point = {"method": trial.method, "budget": budget, "seed": trial.seed}
    if error is not None:
        return {**out, "error": error}
    assert summary is not None and params is not None and plan is not None
    metric = summary["test_primary"]
    return {**out, "metric": metric, "lower_is_better": summary["test_lower_is_better"],
            "value": summary[f"test_{metric}"], "valid_value": summary[f"valid_{metric}"],
            "serving_params": params, "serving_bytes": params * FP32_BYTES, "widths": widths(plan),
            "steps": summary["steps"], "selected_step": summary["selected_step"]}


def widths(plan: DimensionPlan) -> dict[str, int]:
    """Per sparse feature, the serving width of its table's most popular rows (its widest block)."""
    return {f: max(b.dim for b in t.blocks) for t in plan.tables for f in t.features}
