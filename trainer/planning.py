"""The driver's planning step for a run: the method's DimensionPlan, at the widths its arch takes.

`embshard plan` and `embshard train` both plan through `planning_step`, so a plan saved by either
records the same `uniform_width` and workers rebuild the same embedding module from it."""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np

from embshard.config import JobConfig, MdeConfig, ModelConfig
from embshard.datasets.schema import SPEC_FILE, DatasetSpec
from embshard.errors import ConfigError, DataError
from embshard.planner.decisions import load_decisions
from embshard.planner.pipeline import Decide, check_plan_holds, decided
from embshard.planner.policies import with_mlet
from embshard.planner.types import DimensionPlan, TablePlan
from embshard.trainer.method import get_method, is_builtin, method_name
from embshard.trainer.models import ModelArch, get_arch
from embshard.trainer.reference import users_code
from embshard.typed_config import to_dict


def planning_step(cfg: JobConfig, method: str | None = None) -> Decide:
    """Check the config against the method (default: the one cfg names) and the arch (ConfigError
    before any data is read beyond the dataset spec), and return the planning step `plan_with`
    runs. Its plan records the method and config it was made for (`DimensionPlan.made_with`)."""
    name = method or method_name(cfg)
    embedding_method = get_method(name)
    with users_code(f"method {name!r}: check_config()"):
        embedding_method.check_config(cfg)
    arch = get_arch(cfg.model)
    spec = DatasetSpec.load(cfg.data.path)
    with users_code(f"model.arch {arch.name!r}: check()"):
        arch.check(cfg, spec)
    # Per-feature widths only where both sides have them: PEP's and AutoDim's search modules
    # give every feature the base dim whatever the arch takes. A module that unifies the widths of
    # its plan's tables itself (AutoDim's search) keeps its plan's word: its tables unprojected.
    uniform = arch.uniform_width or not embedding_method.mixed_widths
    unread = unread_settings(cfg, arch, spec)
    if not isinstance(embedding_method.serves, bool):  # "no" would read as True
        raise ConfigError(f"method {name!r}: serves must be True or False, got {embedding_method.serves!r}")
    # `serves` too: an export reads it from the plan where the method cannot be imported.
    decisions = decisions_sha256(cfg)
    made_with = {"method": name, "config": to_dict(cfg), "serves": embedding_method.serves,
                 **({"decisions_sha256": decisions} if decisions else {})}

    def decide(spec: DatasetSpec, counts: Mapping[str, np.ndarray], out_dir: Path) -> DimensionPlan:
        # A plan of the user's that the plan's own checks refuse names the method: "table 't_C1'
        # block 0: dim must be positive" said nothing of where the 0 came from.
        with users_code(f"method {name!r}: dimension_plan()", refusals_too=not is_builtin(name)):
            plan = embedding_method.dimension_plan(cfg, spec, counts, out_dir)
        if not isinstance(plan, DimensionPlan):
            raise ConfigError(f"method {name!r}: dimension_plan() returned {type(plan).__name__}, not a DimensionPlan")
        # What `train` refuses in a plan, `plan` refuses too: it was saved as good before.
        check_plan_holds(plan, {f.name: f.cardinality for f in spec.sparse}, f"method {name!r}: dimension_plan()",
                         "every feature of the data needs a table with a row for each of its ids")
        plan = with_mlet(plan, cfg.embeddings)
        uniform_width = plan.uniform_width if embedding_method.unifies_widths else uniform
        return replace(plan, uniform_width=uniform_width, notes=[*unread, *policy_unread(cfg, plan, name), *plan.notes],
                       made_with={**made_with, "dataset_id": spec.id, "dataset_inputs": spec.inputs_sha256()})

    return decide


def check_method_plans_as_then(decide: Decide, cfg: JobConfig, name: str, plan: DimensionPlan, where: str) -> None:
    """ConfigError when `name`, a method of the user's own, asked again plans other widths than
    `plan` (the one `where` trained) on the same config and data: a resume trains the checkpoint's
    plan, and a method whose code had changed since (another width) was silently not what trained.
    Not asked: built-in methods, which plan the same from the same config and data, and a method
    that says its plans differ from run to run (`EmbeddingMethod.replans_alike`)."""
    if is_builtin(name) or not get_method(name).replans_alike:
        return
    with tempfile.TemporaryDirectory(prefix="embshard-replan-") as scratch:  # its remaps are not kept
        now = decided(decide, cfg.data.path, Path(scratch))
    differs = _first_layout_difference(plan, now)
    if differs:
        raise ConfigError(f"method {name!r} now plans other widths than {where} was trained with ({differs}): its "
                          "code, or what else it plans from, has changed since; resume with the method as it was, "
                          "train the new plan into a new output_dir, or, for a method whose plans differ from run "
                          "to run, set replans_alike = False on it")


def _first_layout_difference(then: DimensionPlan, now: DimensionPlan) -> str | None:
    """Where two plans' tables and blocks differ (rows, widths, MLET widths, row order), as a
    phrase; None where they agree."""
    tables_then, tables_now = {t.name: t for t in then.tables}, {t.name: t for t in now.tables}
    if tables_then.keys() != tables_now.keys():
        return f"tables {sorted(tables_then)} there, {sorted(tables_now)} now"
    for name, t in tables_then.items():
        u = tables_now[name]
        if t.row_order != u.row_order:
            return f"table {name!r}: rows ordered by {t.row_order} there, {u.row_order} now"
        if _layout(t) != _layout(u):
            return f"table {name!r}: {_layout(t)} there, {_layout(u)} now"
    return None


def _layout(table: TablePlan) -> str:
    return ", ".join(f"rows {b.start}-{b.end} at {b.dim}" + (f" (MLET {b.mlet_width})" if b.mlet_width else "")
                     for b in table.blocks)


def check_same_data(plan: DimensionPlan, spec: DatasetSpec, data_path: str, where: str) -> None:
    """DataError when `data_path` holds another writing of the dataset than the one `plan` was
    made from (written again since, say with --overwrite, between planning and the workers'
    start, before a worker-group restart or a resume): its rows would train under a plan of the
    other one's counts and id remaps. Plans and datasets from before ids were recorded pass."""
    planned = plan.made_with.get("dataset_id")
    if planned and spec.id and planned != spec.id:
        raise DataError(f"{data_path}: not the dataset {where} was made from (dataset id {spec.id[:8]}, the plan's "
                        f"{str(planned)[:8]}: another dataset, or this one written again since); plan and train it "
                        "into a new output_dir")
    check_same_inputs(plan, spec, f"{data_path}: its {SPEC_FILE}", f"since {where} was made")


def check_same_inputs(plan: DimensionPlan, spec: DatasetSpec, what: str, since: str) -> None:
    """DataError when `spec` (its label, dense and sparse features) is not what `plan`'s model was
    built for, though its id is: a dataset.json edited in place. A resume fed the dense features
    in another order, and an export told its clients so. Plans from before the hash pass."""
    planned = plan.made_with.get("dataset_inputs")
    if planned and planned != spec.inputs_sha256():
        raise DataError(f"{what} was edited {since} (its label, dense features, their order, or its sparse "
                        "features' cardinalities or kinds are not those the model was built for); put it back as "
                        "it was, or write the dataset again and train on it")


def decisions_sha256(cfg: JobConfig) -> str | None:
    """The hash of the decisions a plan of policy decisions is made from, as read (the file
    written out again, another layout, is the same decisions); None for another policy, or where
    there is no file."""
    path = Path(cfg.embeddings.decisions or "")
    if cfg.embeddings.policy != "decisions" or not path.is_file():
        return None
    decisions = json.dumps(load_decisions(path).to_json(), sort_keys=True)
    return hashlib.sha256(decisions.encode()).hexdigest()


def check_same_decisions(plan: DimensionPlan, cfg: JobConfig, where: str) -> None:
    """ConfigError when embeddings.decisions holds other decisions than `plan` was made from: the
    run trains the plan's widths (a resume's, a plan file's), and the config that names the file
    is what every checkpoint records. A file that is not here (a plan made on another machine)
    is not read, and plans from before the hash was recorded pass."""
    planned, now = plan.made_with.get("decisions_sha256"), decisions_sha256(cfg)
    if planned and now and now != planned:
        raise ConfigError(f"embeddings.decisions {cfg.embeddings.decisions}: not the decisions {where} was made "
                          "from (another file, or this one written again since); train them into a new output_dir")


def policy_unread(cfg: JobConfig, plan: DimensionPlan, method: str) -> list[str]:
    """A note where the config sets `embeddings.policy` and the method's plan follows another
    (a method of its own, AutoDim's search): MDE's budget, say, would be read as met."""
    configured, planned = cfg.embeddings.policy, plan.policy.get("policy")
    if configured == "uniform" or planned == configured:
        return []
    return [f"embeddings.policy {configured} is not what method {method!r} plans by (its plan's policy is "
            f"{planned or 'not recorded'}): embeddings.policy and its settings change nothing in this run"]


def unread_settings(cfg: JobConfig, arch: ModelArch, spec: DatasetSpec) -> list[str]:
    """Settings the config changes from their defaults, and columns of the dataset `spec`
    describes, that nothing in this run reads. Said, not refused: presets and sweeps keep them for
    the trials and archs that do read them."""
    notes = []
    if spec.dense and not arch.reads_dense:
        # Read and checked every batch, and never a part of the model, without a word.
        notes.append(f"the dataset's {len(spec.dense)} dense feature(s) ({', '.join(spec.dense[:3])}"
                     f"{', ...' if len(spec.dense) > 3 else ''}) are not read by model.arch {arch.name!r}: they "
                     "change nothing in this run")
    if not arch.reads_layers:
        defaults = ModelConfig()
        for name in ("dense_arch", "over_arch"):
            if getattr(cfg.model, name) != getattr(defaults, name):
                notes.append(f"model.{name} {getattr(cfg.model, name)} is not read by model.arch {arch.name!r}: "
                             "it changes nothing in this run")
    mde = cfg.embeddings.mde
    if cfg.embeddings.policy != "mde" and mde != MdeConfig():
        notes.append(f"embeddings.mde is read by policy mde only (policy is {cfg.embeddings.policy}): "
                     "it changes nothing in this run")
    elif mde.mode == "across" and mde.blocks != MdeConfig().blocks:
        notes.append(f"embeddings.mde.blocks {mde.blocks} is read in mode within only (mode is across: one block per "
                     "table): it changes nothing in this run")
    return notes
