"""`embshard search autodim CONFIG`: run an AutoDim search on Ray and write its decisions file.

The driver plans the search tables through the `autodim` method, Ray Train runs `run_worker` with
it exactly as `embshard train` does (checkpoints, metrics, SIGTERM, evaluation included), and
rank 0 writes the decisions file that `embeddings: {policy: decisions}` turns into the retrain's plan.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from embshard.arg_types import file_path
from embshard.cluster.cli_args import config_arguments, verbose_argument
from embshard.typed_config import override_key

if TYPE_CHECKING:
    from embshard.config import JobConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    search = subparsers.add_parser(
        "search", help="search embedding dimensions (writes a decisions file)",
        description="Dimension searches that end in a decisions file for `embeddings.policy: decisions`.")
    methods = search.add_subparsers(dest="search_method", required=True, metavar="METHOD")
    p = methods.add_parser(
        "autodim", help="AutoDim: learn each field's width among candidate widths",
        description="Train a DLRM whose fields mix candidate widths by Gumbel-softmax weights "
                    "(alpha, learnt on validation batches), then keep each field's argmax width. "
                    "Needs an `autodim:` section in the config (see configs/autodim-movielens.yaml).")
    config_arguments(p, "job config (YAML) with an autodim: section", "autodim.alpha_every=5", workers=True)
    p.add_argument("--out", type=file_path, metavar="FILE",
                   help="decisions file to write (default: autodim.decisions, else <output_dir>/decisions.json, "
                        "which a rerun of the same run rewrites)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a decisions file already at --out / autodim.decisions (a file there that "
                        "is no decisions file is never replaced), and a finished search in output_dir that "
                        "this one would search over from scratch")
    verbose_argument(p)
    p.set_defaults(func=_autodim)


def _autodim(args: argparse.Namespace) -> int:
    # Imported here so that `embshard --help` does not load torch and Ray.
    from embshard.cluster.cli import print_notes, validation_text
    from embshard.cluster.launch import check_replaces_no_run, plan_for_training, train_on_ray
    from embshard.cluster.run_lock import file_lock, run_lock, written_by_a_run
    from embshard.config import load_job_config
    from embshard.errors import ConfigError
    from embshard.trainer.autodim import DECISIONS_FILE, autodim_section, decisions_path

    cfg = load_job_config(args.config, args.overrides)
    search = autodim_section(cfg)
    workers = cfg.cluster.workers if args.workers is None else args.workers
    # Absolute: workers may run elsewhere (train_on_ray resolves the other paths the same way).
    decisions = Path(args.out or decisions_path(cfg)).resolve()
    named = args.out is not None or search.decisions is not None
    own = written_by_a_run(cfg, decisions)
    if named and own is not None and own != (Path(cfg.output_dir) / DECISIONS_FILE).resolve():
        # Said "decisions -> X" while the run's own summary, log, plan or history replaced them
        # (or they replaced it).
        raise ConfigError(f"{'--out' if args.out else 'autodim.decisions'} {decisions}: the search's own run writes "
                          f"{own}; give the decisions file another name")
    # A path the user named may hold anything, their config included, and so may the default one (a
    # hand-written decisions.json there was replaced, and a folder there found only after the whole
    # search): checked before the search. A decisions file at the default path is the run's own.
    replaceable = args.overwrite or not named
    check_decisions_out(decisions, replaceable, cfg.output_dir)
    cfg = replace(cfg, cluster=replace(cfg.cluster, workers=workers),
                  autodim=replace(search, decisions=str(decisions)))
    # Its decisions file too: two searches with one --out both said they wrote it, and the file
    # held the last one's widths.
    with run_lock(cfg), file_lock(decisions):
        check_decisions_out(decisions, replaceable, cfg.output_dir)  # again: one may have ended since
        # A search into a finished one's folder replaced its decisions, summary, plan and history.
        check_replaces_no_run(cfg, args.overwrite)
        bundle = plan_for_training(cfg, "autodim")
        plan = bundle.dimension_plan
        print(f"search: candidates {search.candidates}, {search.lookup} lookup, {search.unify} unify"
              f"{', AutoDim-s' if search.single_level else ''}; {len(plan.tables)} tables on {workers} workers")
        print_notes(bundle)
        summary = train_on_ray(cfg, "autodim")
    print(f"search validation {validation_text(summary)} after {summary['steps']} steps "
          f"({summary['alpha_steps']} architecture steps)")
    if "no_decisions" in summary:
        raise ConfigError(f"{summary['no_decisions']}: every alpha is still equal, so it chose nothing and wrote no "
                          "decisions file; train longer (train.epochs, train.max_steps) or lower "
                          "autodim.pretrain_steps")
    print("chosen widths: " + ", ".join(f"{f} {d}" for f, d in summary["dims"].items()))
    print(f"decisions -> {decisions}")
    if "alpha_history" in summary:
        print(f"softmax(alpha) every {search.history_every} steps -> {summary['alpha_history']}")
    retrain = retrain_overrides(args.overrides, decisions, cfg)
    print(f"retrain: embshard train {shlex.quote(str(args.config))} "
          + " ".join(f"--set {shlex.quote(s)}" for s in retrain))
    return 0


def check_decisions_out(decisions: Path, overwrite: bool, output_dir: str) -> None:
    """ConfigError unless the search in `output_dir` may write its decisions file at `decisions`:
    nothing there, a decisions file with `overwrite`, or one this very search wrote (a kill
    between writing it and its last line: the same command resumes the finished search and writes
    it again, as it does at the default path)."""
    from embshard.datasets.outdir import check_file_output
    from embshard.datasets.storage import read_json_object
    from embshard.errors import ConfigError
    from embshard.trainer.autodim import written_by_search

    decisions_keys = ("version", "method", "tables")  # of any version: ours to replace
    check_file_output(decisions, overwrite, "decisions file",
                      lambda path: read_json_object(path, decisions_keys, ConfigError), ConfigError,
                      ours=lambda record: written_by_search(record, output_dir))


def retrain_overrides(overrides: list[str], decisions: Path, cfg: JobConfig) -> list[str]:
    """The search's `--set`s for the retrain on its decisions, in a run folder of its own (in the
    search's, its summary and plan replaced the search's) with checkpoints of its own (in the
    search's checkpoint.dir it resumed the search's steps, another model; from its
    checkpoint.resume, the search's source); a key the retrain sets is not given twice (refused:
    `--set output_dir` of the search's own would be)."""
    sets = ["embeddings.policy=decisions", f"embeddings.decisions={decisions}",
            f"output_dir={cfg.output_dir.rstrip('/')}/retrain"]
    if cfg.checkpoint.dir is not None:
        sets.append(f"checkpoint.dir={cfg.checkpoint.dir.rstrip('/')}/retrain")
    if cfg.checkpoint.resume is not None:
        sets.append("checkpoint.resume=null")
    replaced = {override_key(item) for item in sets}
    return [*(item for item in overrides if override_key(item) not in replaced), *sets]
