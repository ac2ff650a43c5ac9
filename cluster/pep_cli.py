"""`embshard prune pep CONFIG --targets 0.5,0.2,0.1,0.03`: the PEP prune run on Ray.

The driver plans the dense (uniform) tables like `embshard train`, then every Ray Train worker runs
the `pep` method (`trainer.pep.PepPrune`) in `run_worker`. Output, under `pep.out` (default
<output_dir>/pep): one folder per target with the masks and a decisions file for
`embeddings.policy: decisions`, and `pep.json`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from embshard.cluster.cli_args import config_arguments, verbose_argument

if TYPE_CHECKING:
    from embshard.config import JobConfig



def register(commands: argparse._SubParsersAction) -> None:
    prune = commands.add_parser("prune", help="pruning runs that write dimension decisions (pep)")
    methods = prune.add_subparsers(dest="method", required=True, metavar="METHOD")
    p = methods.add_parser(
        "pep", help="PEP: learn soft thresholds, save a mask and a decisions file per target",
        description="Train with PEP's learnable soft thresholds (granularity from pep.granularity) "
                    "until the non-zero embedding parameters fall to each target fraction; write "
                    "masks (for the lottery-ticket retrain) and a decisions file per target.")
    config_arguments(p, "job config (YAML) with embeddings.policy uniform", "pep.granularity=dimension",
                     workers=True)
    p.add_argument("--targets", type=parse_targets, metavar="F,F,...",
                   help="fractions of the dense embedding parameters to keep, e.g. 0.5,0.2,0.1,0.03")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished run in output_dir that this one would train over from scratch")
    verbose_argument(p)
    p.set_defaults(func=prune_pep)


def parse_targets(text: str) -> list[float]:
    try:
        targets = [float(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions, got {text!r}") from None
    if not targets or any(not 0 < t < 1 for t in targets):
        raise argparse.ArgumentTypeError(f"fractions must lie in (0, 1), got {text!r}")
    return targets


def prune_job(cfg: JobConfig, workers: int | None, targets: list[float] | None) -> JobConfig:
    """The config a prune run trains: the command line's workers and targets; everything else,
    checkpoints included, as the config says."""
    from embshard.config import PepConfig

    pep = cfg.pep or PepConfig()
    return replace(cfg, cluster=replace(cfg.cluster, workers=cfg.cluster.workers if workers is None else workers),
                   pep=replace(pep, targets=targets or pep.targets))


def prune_pep(args: argparse.Namespace) -> int:
    # Imported here so that `embshard --help` does not load torch and Ray.
    from embshard.cluster.cli import print_notes, validation_text
    from embshard.cluster.launch import check_replaces_no_run, plan_for_training, train_on_ray
    from embshard.cluster.run_lock import run_lock
    from embshard.config import load_job_config
    from embshard.errors import ConfigError
    from embshard.trainer.pep import NONZERO_HISTORY_FILE, check_pep_out

    cfg = prune_job(load_job_config(args.config, args.overrides), args.workers, args.targets)
    check_pep_out(cfg)
    # pep.out too: two prune runs of different output_dirs into one folder would both pass the check.
    with run_lock(cfg, also=[cfg.pep_dir]):
        check_pep_out(cfg)  # again, under the lock
        # As `train` and `search`: a prune run into a finished run's folder replaced its summary and plan.
        check_replaces_no_run(cfg, args.overwrite)
        bundle = plan_for_training(cfg, "pep")
        print_notes(bundle)
        summary = train_on_ray(cfg, "pep")
    pep = summary.get("pep", {})
    reached = sorted(pep.get("reached", {}).items(), key=lambda kv: -float(kv[0]))  # widest first
    for target, hit in reached:
        print(f"target {target}: reached at step {hit['step']} ({hit['nonzero']:,} non-zero) -> "
              f"{Path(hit['dir']) / 'decisions.json'}")
    print(f"validation {validation_text(summary)} after {summary.get('steps')} steps; "
          f"run record {cfg.pep_dir / 'pep.json'}")
    print(f"non-zeros over time -> {cfg.pep_dir / NONZERO_HISTORY_FILE}")
    _warn_of_shared_counts(reached, cfg.pep.count_every if cfg.pep else None)
    missed = pep.get("missed", [])
    if missed:
        # Not exit 0: a script's next step (a retrain on that target's decisions) would fail later,
        # on a file that was never written, far from the cause.
        raise ConfigError(
            f"{_targets_text(missed)} not reached in {summary.get('steps')} steps (kept "
            f"{pep.get('kept_fraction', 1):.3f} of the entries at the end); train longer (train.epochs), or raise "
            f"pep.weight_decay / pep.threshold_lr (what lifts the thresholds)"
            + (f"; the {len(pep['reached'])} reached are written" if pep.get("reached") else ""))
    return 0


def passed_together(reached: Iterable[tuple[str, dict]]) -> list[list[tuple[str, dict]]]:
    """The targets (as a prune run's summary records them) that one count passed together, a list
    per count, widest first. They share that count's mask and decisions: a sweep of them trained
    one plan several times, under several names, without a word. Those a run of an earlier
    embshard wrote (no step recorded) are not compared."""
    by_step: dict[int, list[tuple[str, dict]]] = {}
    for target, hit in reached:
        if isinstance(hit.get("step"), int):
            by_step.setdefault(hit["step"], []).append((target, hit))
    return [sorted(together, key=lambda th: -float(th[0])) for together in by_step.values() if len(together) > 1]


def same_mask_as(reached: Mapping[str, dict]) -> dict[str, tuple[str, dict]]:
    """target -> (the widest target passed by the same count, its record), for every target but
    the widest of each such count: the one retrain all of them share."""
    return {target: together[0] for together in passed_together(reached.items()) for target, _ in together[1:]}


def tell_apart(count_every: int | None) -> str:
    return (f"count more often (pep.count_every, now {count_every}) or prune more slowly (pep.threshold_lr, "
            "pep.weight_decay) to tell them apart")


def _warn_of_shared_counts(reached: list[tuple[str, dict]], count_every: int | None) -> None:
    for together in passed_together(reached):
        _, hit = together[0]
        print(f"warning: {_targets_text([float(t) for t, _ in together])} were passed by one count (step "
              f"{hit['step']}, {hit['nonzero']:,} non-zero), so their masks and decisions are the same; "
              f"{tell_apart(count_every)}", file=sys.stderr)


def _targets_text(targets: list[float]) -> str:
    return ("target " if len(targets) == 1 else "targets ") + ", ".join(f"{t:g}" for t in targets)
