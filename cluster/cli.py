"""The `embshard` command line. Every verb has --help; bad input exits non-zero with one line
that says what was wrong and where."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embshard.arg_types import EMPTY_PATH, names_folder, nonempty_name, written_path
from embshard.cluster import autodim_cli, config_cli, console, export_cli, pep_cli, sweep_cli
from embshard.cluster.cli_args import config_arguments, gibibytes, verbose_argument, world_size
from embshard.cluster.interrupt import sigterm_as_ctrl_c
from embshard.datasets import cli as data_cli
from embshard.errors import (
    EXIT_CRASH,
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    ConfigError,
    EmbshardError,
    Interrupted,
    environment_problem,
    first_line,
    one_line,
)
from embshard.trainer.resume_config import ADOPT_FLAG
from embshard.units import human_bytes, metrics_text

if TYPE_CHECKING:
    from embshard.config import JobConfig
    from embshard.planner.pipeline import Decide, PlanBundle
    from embshard.planner.topology import TopologySpec


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console.set_verbose(getattr(args, "verbose", False))
    console.log_to_console()
    with sigterm_as_ctrl_c():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """The verb, its failures said in one line each, with the exit status that says which kind."""
    try:
        return int(args.func(args) or 0)
    except EmbshardError as e:
        print(f"embshard: error: {one_line(str(e))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Interrupted as e:
        print(f"embshard: {one_line(str(e))}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("embshard: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Whoever read the output stopped (`| head -c 0`): nothing left to say, and Python's own
        # flush at exit would raise again into the pipe, as a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        problem = environment_problem(e)
        if problem is not None and not console.is_verbose():
            # The machine, not the input or the code: a full disk, a read-only mount, a permission.
            console.record_error(e)
            print(f"embshard: error: {one_line(_written_at(args, e) + str(problem))}", file=sys.stderr)
            return EXIT_USER_ERROR
        # A crash, not bad input: one line here, the whole traceback in the run's log. Before a
        # run has a log (or with --verbose) the traceback goes to the console as Python prints it.
        log = console.record_error(e)
        if log is None or console.is_verbose():
            raise
        line = str(e) if isinstance(e, console.Crashed) else first_line(e)
        print(f"embshard: crashed: {one_line(line)} (full traceback: {log})", file=sys.stderr)
        return EXIT_CRASH


def _written_at(args: argparse.Namespace, e: BaseException) -> str:
    """"writing OUT: " before a machine's error that names no file (pyarrow's and numpy's writers
    name none: "No space left on device" alone), where the verb names what it writes."""
    out = getattr(args, "out", None) or getattr(args, "dir", None)
    return f"writing {out}: " if isinstance(e, OSError) and e.filename is None and out else ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embshard",
        description="Sharded mixed-dimension embedding training on TorchRec and Ray.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data_cli.register(commands)
    _register_plan(commands)
    _register_train(commands)
    pep_cli.register(commands)
    export_cli.register(commands)
    autodim_cli.register(commands)
    sweep_cli.register(commands)
    config_cli.register(commands)
    _register_jobs(commands)
    return parser


def _register_plan(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "plan", help="turn a config's dimension policy into a TorchRec shard plan and memory report",
        description="Decide dimensions (uniform/MDE/decisions, MLET widths), shard the block tables "
                    "with TorchRec's planner for a topology, and print per-rank memory for training "
                    "and serving. Needs no GPU and no cluster.")
    config_arguments(p)
    p.add_argument("--world-size", type=world_size, help="ranks to plan for (default: cluster.workers)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="device kind (default: sharding.device)")
    p.add_argument("--device-memory-gb", type=gibibytes, metavar="G", help="memory per rank in GiB")
    p.add_argument("--local-world-size", type=world_size, metavar="N",
                   help="ranks per host, e.g. 8 GPUs per node (default: sharding.local_world_size; "
                        "unset = all ranks on one host)")
    p.add_argument("--out", type=written_path, help="folder or .json path for the plan (default: <output_dir>/plan)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a plan already at --out (a file there that is no plan is never replaced)")
    p.add_argument("--method", type=nonempty_name, metavar="NAME",
                   help="plan what this method trains: pep (a prune run), autodim (a search), pep_lottery, "
                        "or a registered one (default: embeddings.policy, or pep_lottery for a retrain)")
    p.set_defaults(func=_plan)


def _register_train(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "train", help="train a config on Ray (a local in-process cluster unless --address)",
        description="Plan, then train with N Ray Train workers under TorchRec's "
                    "DistributedModelParallel. Prints validation AUC/logloss and throughput.")
    config_arguments(p, workers=True)
    p.add_argument("--address", help="attach to an existing Ray cluster (e.g. auto, ray://host:10001)")
    p.add_argument("--resume", metavar="DIR",
                   help="start from a checkpoint dir (its newest good step) or one step-NNNNNN folder; "
                        "also works on another worker count (the tables are resharded). A run whose "
                        "output_dir holds checkpoints of its own continues from those instead")
    p.add_argument("--overwrite", action="store_true",
                   help="train from scratch into an output_dir that holds a finished run this one would not "
                        "resume (checkpoints off, or none), replacing its summary, plan and logs")
    p.add_argument(ADOPT_FLAG, action="store_true", dest="adopt_checkpoint_config",
                   help="when resuming, take the model config (embeddings, model, PEP/AutoDim structure) "
                        "from the checkpoint instead of refusing a config that differs from it")
    verbose_argument(p)
    p.set_defaults(func=_train)


def _register_jobs(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "submit", help="run `embshard train CONFIG` as a Ray job on a cluster and stream its logs",
        description="Submit `embshard train` as a Ray job (same Python and working directory: the "
                    "cluster must share this machine's filesystem), stream its logs and exit with "
                    "the job's exit status: 0 when it succeeded, 2 bad input, 130 stopped before its "
                    "end (submit it again to continue), 1 otherwise.")
    config_arguments(p, workers=True)
    _address_arg(p)
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    p.set_defaults(func=_submit)
    for verb, text, func in (("status", "print a Ray job's status", _status),
                             ("logs", "print a Ray job's logs so far", _logs),
                             ("stop", "stop a Ray job", _stop)):
        p = commands.add_parser(verb, help=text, description=text + ".")
        p.add_argument("job_id", metavar="JOB_ID", help="the id `embshard submit` printed")
        _address_arg(p)
        p.set_defaults(func=func)


def _address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), required="RAY_ADDRESS" not in os.environ,
                   help="the cluster's job API, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS)")


def _submit(args: argparse.Namespace) -> int:
    from embshard.cluster import jobs

    if args.config.is_file():
        _load(args)  # a config that cannot parse is one line here, not a failed job on the cluster
    job_id = jobs.submit(args.address, args.config, args.overrides, args.workers)
    print(f"submitted {job_id} to {args.address}", flush=True)
    if args.no_wait:
        return 0
    final = jobs.follow(args.address, job_id)
    # A success's message repeats the log just streamed; a failure's may be the only reason given
    # (a runtime_env or entrypoint that never started the driver).
    print(f"{job_id}: {final}" if final == "SUCCEEDED" else jobs.status(args.address, job_id))
    return jobs.exit_status(args.address, job_id, final)


def _status(args: argparse.Namespace) -> int:
    from embshard.cluster import jobs

    print(jobs.status(args.address, args.job_id))
    return 0


def _logs(args: argparse.Namespace) -> int:
    from embshard.cluster import jobs

    print(jobs.logs(args.address, args.job_id), end="")
    return 0


def _stop(args: argparse.Namespace) -> int:
    from embshard.cluster import jobs

    stopped = jobs.stop(args.address, args.job_id)
    print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


def _load(args: argparse.Namespace):
    from embshard.config import load_job_config

    return load_job_config(args.config, args.overrides)


def _plan(args: argparse.Namespace) -> int:
    from embshard.cluster.run_lock import folder_lock, run_folder_holding
    from embshard.datasets.outdir import check_file_output
    from embshard.datasets.storage import read_json_object
    from embshard.errors import PlanError
    from embshard.planner.pipeline import PLAN_FILE
    from embshard.trainer.planning import planning_step

    cfg = _load(args)
    sharding = replace(
        cfg.sharding,
        device=args.device or cfg.sharding.device,
        device_memory_gb=args.device_memory_gb if args.device_memory_gb is not None else cfg.sharding.device_memory_gb,
        local_world_size=args.local_world_size if args.local_world_size is not None else cfg.sharding.local_world_size,
    )
    cfg = replace(cfg, sharding=sharding)
    local_from = "sharding.local_world_size" if args.local_world_size is None else "--local-world-size"
    topology = sharding.topology(args.world_size or cfg.cluster.workers, local_from)
    decide = planning_step(cfg, args.method)
    if cfg.sharding.plan_file:
        print(f"note: sharding.plan_file {cfg.sharding.plan_file} is what `train` trains; `plan` makes a new plan")
    out = Path(args.out) if args.out else cfg.plan_dir
    names_file = out.suffix.lower() == ".json" and not (args.out and names_folder(args.out))
    out_dir, name = (out.parent, out.name) if names_file else (out, PLAN_FILE)
    # Any version of a plan is ours to replace (the run's own plan folder without asking, --out
    # with --overwrite); another file never.
    def check_out() -> None:
        check_file_output(out_dir / name, args.overwrite or args.out is None, "plan",
                          lambda path: read_json_object(path, ("dimension_plan", "shard_plan"), PlanError), PlanError,
                          plan_file=True)

    if args.out is None and not args.overwrite and (out_dir / name).exists() and _has_trained(cfg):
        raise PlanError(f"{out_dir / name}: the plan {cfg.output_dir} trained on (it holds the run's summary or "
                        "checkpoints); pass --overwrite to replace it, or --out to plan elsewhere")
    check_out()
    # The run's own folder while it trains is the run's (its checkpoints copy the plan), and two
    # `plan`s into one folder would each replace the other's plan.
    # So is any run's folder --out lies in: a plan written into a training run's plan folder
    # was copied into every checkpoint after it, beside weights of the old widths. Both, where
    # they differ (a retrain's output_dir inside its search's): `train` locks the inner one.
    output = Path(cfg.output_dir).resolve()
    own = output if out_dir.resolve().is_relative_to(output) else out_dir.resolve()
    with contextlib.ExitStack() as held:
        for folder in dict.fromkeys([own, *filter(None, [run_folder_holding(out_dir)])]):
            held.enter_context(folder_lock(folder))
        check_out()  # again: another `plan` may have written there since
        bundle = _plan_into(cfg, decide, topology, out_dir, name, args.method)
    path = bundle.directory / name
    print_notes(bundle, name)
    print(f"plan -> {path}")
    return 0


def _has_trained(cfg: JobConfig) -> bool:
    """Whether a run in cfg's output_dir has results: its plan file is then the record of what
    trained (a resume takes the checkpoint's own copy), not a draft `plan` may replace unasked."""
    from embshard.trainer.checkpoint import complete_checkpoints
    from embshard.trainer.loop import SUMMARY_FILE

    return (Path(cfg.output_dir) / SUMMARY_FILE).is_file() or bool(complete_checkpoints(cfg.checkpoint_dir))


def _plan_into(cfg: JobConfig, decide: Decide, topology: TopologySpec, out_dir: Path, name: str,
               method: str | None) -> PlanBundle:
    from embshard.datasets.outdir import drop_staging, make_staging
    from embshard.datasets.schema import DatasetSpec
    from embshard.planner.pipeline import plan_with
    from embshard.trainer.build import dense_layer_bytes

    # Planned apart, then copied in: the remap files are written while planning, and must not
    # replace those of a plan already there before this one is known to be complete, or fits.
    staging = make_staging(out_dir / name)
    try:
        staged = plan_with(
            decide,
            cfg.data.path,
            topology,
            staging,
            batch_size=cfg.data.batch_size,
            optimizer=cfg.train.sparse_optimizer,
            sharding_types=cfg.sharding.sharding_types,
        )
        plan = staged.dimension_plan
        staged.memory = replace(staged.memory, dense_bytes=dense_layer_bytes(
            cfg, plan, DatasetSpec.load(cfg.data.path), method))
        blocks = sum(len(t.blocks) for t in plan.tables)
        print(f"{len(plan.tables)} tables, {blocks} blocks, base dim {plan.base_dim}, "
              f"{topology.world_size} x {topology.device} ranks on {topology.hosts} host(s) of "
              f"{topology.world_size // topology.hosts}, "
              f"serving parameters {plan.serve_params():,}")
        print(staged.memory.format())
        staged.memory.check_fits()  # a plan that does not fit is shown, not written
        return staged.copy_to(out_dir, name)
    finally:
        drop_staging(staging)


def _train(args: argparse.Namespace) -> int:
    from embshard.cluster.launch import (
        check_replaces_no_run,
        plan_for_training,
        ray_storage,
        train_on_ray,
        with_checkpoint_config,
    )
    from embshard.cluster.run_lock import run_lock

    cfg = _load(args)
    cluster = replace(
        cfg.cluster,
        workers=cfg.cluster.workers if args.workers is None else args.workers,
        address=args.address or cfg.cluster.address,
    )
    if args.resume is not None and not args.resume.strip():
        # `--resume "$CKPT"` with CKPT unset trained from scratch without a word.
        raise ConfigError(f"--resume: {EMPTY_PATH}")
    checkpoint = replace(cfg.checkpoint, resume=cfg.checkpoint.resume if args.resume is None
                         else os.path.expanduser(args.resume))
    cfg = replace(cfg, cluster=cluster, checkpoint=checkpoint)
    if args.adopt_checkpoint_config:
        cfg = with_checkpoint_config(cfg, adopt=True)
    with run_lock(cfg):
        check_replaces_no_run(cfg, args.overwrite)
        bundle = plan_for_training(cfg)
        dense = bundle.memory.dense_bytes
        print(f"plan: {len(bundle.dimension_plan.tables)} tables on {cluster.workers} workers; "
              f"per-rank training bytes of the tables "
              + ", ".join(f"{r}: {human_bytes(v['train_bytes'])}" for r, v in bundle.memory.per_rank.items())
              + (f", and {human_bytes(dense)} of dense layers on every rank" if dense else ""))
        print_notes(bundle)
        metrics = train_on_ray(cfg)
    best = f" (best, at step {metrics.get('selected_step')})" if cfg.train.report_at == "best_valid" else ""
    rate = metrics.get("samples_per_s")
    print(
        f"validation{best} {validation_text(metrics)}; "
        f"{metrics.get('samples') or 0:,} samples in {metrics.get('steps')} steps, "
        + (f"{rate:.0f} samples/s" if rate is not None else "none of them by this start (resumed after the last)")
    )
    if metrics.get("restarts"):
        print(f"recovered from {metrics['restarts']} worker-group restart(s)")
    print(outputs_line(cfg, ray_storage(cfg)))
    return 0


def outputs_line(cfg: JobConfig, ray_storage: str) -> str:
    """Where a finished run's files are; no checkpoint folder where none was written."""
    out = Path(cfg.output_dir)
    checkpoints = cfg.checkpoint_dir if cfg.checkpoint.enabled else "none (checkpoint.enabled is false)"
    return (f"outputs: plan {out / 'plan' / 'plan.json'}, summary {out / 'summary.json'}, "
            f"checkpoints {checkpoints}, Ray run storage {ray_storage}, log {out / console.LOG_FILE}")


SHOWN_NOTES = 10


def print_notes(bundle: PlanBundle, name: str | None = None) -> None:
    """The plan's first notes; the rest are in its file, `name` in its folder (default plan.json;
    MDE within tables makes one or two per block: hundreds of lines for a few dozen tables)."""
    from embshard.planner.pipeline import PLAN_FILE

    notes = [*bundle.dimension_plan.notes, *bundle.shard_plan.notes]
    for note in notes[:SHOWN_NOTES]:
        print(f"note: {note}")
    if len(notes) > SHOWN_NOTES:
        print(f"note: {len(notes) - SHOWN_NOTES} more in {bundle.directory / (name or PLAN_FILE)} (`notes`)")


def validation_text(summary: dict[str, Any]) -> str:
    """"AUC 0.7612, logloss 0.4701": the arch's primary metric first (trainer.loop.eval_summary)."""
    primary = summary.get("valid_primary") or "auc"
    # eval_summary's keys that describe the evaluation rather than measure the model
    about = ("primary", "lower_is_better", "examples")
    measured = {k.removeprefix("valid_"): v for k, v in summary.items()
                if k.startswith("valid_") and k.removeprefix("valid_") not in about}
    # The primary metric is shown, as "n/a", in a summary that did not measure it.
    return metrics_text({primary: None} | measured, primary)


if __name__ == "__main__":
    sys.exit(main())
