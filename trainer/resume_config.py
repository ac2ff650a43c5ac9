"""A resumed run trains what its checkpoint holds: the config keys that decide the model must agree.

Re-running into an output_dir that has checkpoints, or `--resume` from another run, loads the
checkpoint's plan and tensors. A config that asks for another model (dims, policy, MLET, dense
arches, PEP/AutoDim structure) would otherwise be ignored silently, and written beside a model it
does not describe; so the difference is an error naming the keys, or, when asked, the checkpoint's
values replace the config's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from embshard.config import PATH_FIELDS, JobConfig, current_schema
from embshard.datasets.storage import StoragePath
from embshard.errors import ConfigError, PlanError
from embshard.planner.types import DimensionPlan
from embshard.typed_config import flatten, from_dict, to_dict, under, unflatten

# The flag of `embshard train` that continues a checkpoint with its own model config.
ADOPT_FLAG = "--resume-with-checkpoint-config"

# Dotted prefixes of the keys that decide which tensors a checkpoint holds. Learning rates,
# epochs, batch sizes, logging and paths may change between a run and its resumption.
MODEL_DEFINING_KEYS = (
    "embeddings",
    "model",
    "pep.granularity",
    "pep.pooled_lookup",
    "autodim.candidates",
    "autodim.lookup",
    "autodim.unify",
    "autodim.batchnorm",
    # The fused optimizer's state is saved with the tables, in its own shapes: another one was a
    # worker's "Size mismatch" line once the workers were up; the dense one's, "Missing key".
    "train.sparse_optimizer",
    "train.dense_optimizer",
)
# Keys that decide the order its reader trains an epoch's rows in: a checkpoint's reader position
# counts batches of that order. Resumed mid-epoch with another seed, a run trained 561 of 1,024
# rows a second time and never trained as many.
ORDER_DEFINING_KEYS = ("seed", "data.shuffle")
# Inside those, keys that change no tensor a checkpoint holds: MLET's init, and exact_resume,
# whose W1 a checkpoint may lack (the load rebuilds it) or hold unread.
NOT_MODEL_DEFINING_KEYS = ("embeddings.mlet.init_std", "embeddings.mlet.exact_resume")


# Of those, the keys a DimensionPlan is made from (the rest, dense layers and MLET's init, shape
# what trains around it). `embeddings.decisions` is a path, written relative or absolute, on a
# pod or a laptop; what it held is in the plan, and its policy is compared.
PLAN_DEFINING_KEYS = ("embeddings", "model.arch", "pep.granularity", "pep.pooled_lookup", "autodim.candidates",
                      "autodim.lookup")
NOT_PLAN_DEFINING_KEYS = (*NOT_MODEL_DEFINING_KEYS, "embeddings.decisions")


def model_defining(config: dict[str, Any], also: Sequence[str] = ()) -> dict[str, Any]:
    """The model-defining keys of a config dict, the order-defining ones, and those under `also`
    (the method's `resume_keys`), flattened to dotted names."""
    return {k: v for k, v in flatten(config).items()
            if under(k, MODEL_DEFINING_KEYS) and not under(k, NOT_MODEL_DEFINING_KEYS)
            or under(k, (*ORDER_DEFINING_KEYS, *also))}


def config_differences(saved: dict[str, Any], cfg: JobConfig, also: Sequence[str] = ()) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, this config's value) for every model-defining key (and key under
    `also`) that differs. The saved config is read through today's schema where it can be
    (`current_schema`). Paths are not compared: the workers record them absolute, and a file may
    move between runs (what a decisions file held is in the plan, which records its hash:
    `check_same_decisions`)."""
    differences = _differences(model_defining(current_schema(saved), also), model_defining(to_dict(cfg), also))
    return [d for d in differences if d[0] not in PATH_FIELDS]


def reconcile(cfg: JobConfig, saved: dict[str, Any], checkpoint: StoragePath, adopt: bool,
              also: Sequence[str] = ()) -> JobConfig:
    """`cfg` when it agrees with the checkpoint's config (its model-defining keys, and those
    under `also`); with `adopt`, cfg with the checkpoint's values of them; otherwise ConfigError
    naming the differing keys."""
    differences = config_differences(saved, cfg, also)
    if not differences:
        return cfg
    if adopt:
        adopted = model_defining(current_schema(saved), also)
        # Drop this config's model-defining keys, and any key that contains an adopted one or
        # lies inside it (a section this config leaves null that the checkpoint has, or the reverse).
        merged = {k: v for k, v in flatten(to_dict(cfg)).items()
                  if not model_defining({k: v}, also) and not any(under(k, [a]) or under(a, [k]) for a in adopted)}
        merged.update(adopted)
        try:
            return from_dict(JobConfig, unflatten(merged))
        except ConfigError as e:  # the checkpoint's values: said without naming where they came from
            raise ConfigError(f"{checkpoint}: the config it records: {e}") from None
    raise ConfigError(
        f"{checkpoint} was trained with another model config: {shown(differences, 'checkpoint')}; "
        f"continue it as it was with {ADOPT_FLAG}, or train this config into a new output_dir"
    )


def check_plan_made_for(plan: DimensionPlan, cfg: JobConfig, method: str, where: str) -> list[str]:
    """PlanError when a plan file was made for another method or model config than the run's: it
    would train as the plan says and record the config's model in every checkpoint and report.
    -> notes (a plan written before plans recorded what they were made for is not checked)."""
    record = plan.made_with
    if not record:
        return [f"{where} does not record the config it was made for (written by an earlier embshard, or "
                "through the planner's API): not checked against this run's"]
    if not isinstance(record.get("method"), str) or not isinstance(record.get("config"), dict):
        raise PlanError(f"{where}: malformed made_with (expected a method name and a config)")
    differences = plan_differences(record["config"], cfg)
    if differences:
        raise PlanError(f"{where} was made for another model config: {shown(differences, 'plan')}; train it "
                        "with the config it was made with, or make a plan for this one with `embshard plan`")
    if record["method"] != method:
        raise PlanError(f"{where} was made for method {record['method']!r}, this run trains {method!r}; "
                        "make a plan for this run with `embshard plan`")
    return []


def plan_differences(saved: dict[str, Any], cfg: JobConfig) -> list[tuple[str, Any, Any]]:
    """(key, the plan's config value, this config's) for every key the plan was made from that
    differs; MDE's knobs only where either side plans with MDE."""
    old, new = flatten(current_schema(saved)), flatten(to_dict(cfg))
    mde = "mde" in (old.get("embeddings.policy"), new.get("embeddings.policy"))

    def plan_defining(flat: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in flat.items() if under(k, PLAN_DEFINING_KEYS)
                and not under(k, NOT_PLAN_DEFINING_KEYS) and (mde or not under(k, ("embeddings.mde",)))}

    return _differences(plan_defining(old), plan_defining(new))


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not _emptied(old.get(k), new.get(k))]


def _emptied(a: Any, b: Any) -> bool:
    """An empty section against none: an empty one flattens to itself, a full one to its keys, so
    `model.options` {} against {hidden: 32} differs in model.options.hidden (None, 32) alone."""
    return (a == {} and b is None) or (a is None and b == {})


def shown(differences: list[tuple[str, Any, Any]], recorded: str) -> str:
    """The first four differences, each as key (recorded value, config value), and how many more."""
    text = ", ".join(f"{k} ({recorded} {old!r}, config {new!r})" for k, old, new in differences[:4])
    return text + (f" and {len(differences) - 4} more" if len(differences) > 4 else "")
