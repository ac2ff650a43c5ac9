"""`embshard train`: plan on the driver, then run one `run_worker` per Ray Train worker.

The driver plans (it has the dataset profile), writes `plan.json` into the run folder, and every
worker trains exactly that plan. Ray Train's TorchTrainer starts the workers and their
torch.distributed process group (gloo on CPU, nccl on GPU); its FailureConfig restarts the group
after a worker dies, but not after bad input (see fatal.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray import cloudpickle
from ray._common.utils import get_default_ray_temp_dir
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from embshard.cluster import console, fatal
from embshard.cluster.address import malformed, no_ray_at
from embshard.cluster.interrupt import run_with_graceful_ctrl_c, sigterm_kept
from embshard.cluster.run_lock import WORKERS_PLACED_FILE, owner_check, run_owner
from embshard.config import JobConfig, with_paths_resolved
from embshard.datasets.outdir import check_not_in_sealed
from embshard.datasets.profile import load_profile
from embshard.datasets.schema import DatasetSpec
from embshard.datasets.storage import StoragePath, check_writable, copytree, location, nearest_existing, read_json
from embshard.datasets.verify import verify_dataset
from embshard.errors import (
    ConfigError,
    DataError,
    EmbshardError,
    EnvironmentProblem,
    Interrupted,
    PlanError,
    disk_full,
    environment_problem,
    first_line,
)
from embshard.planner.pipeline import PLAN_FILE, PlanBundle, check_plan_holds, plan_with, shard_dimension_plan
from embshard.trainer.build import dense_layer_bytes
from embshard.trainer.checkpoint import PLAN_DIR as CHECKPOINT_PLAN_DIR
from embshard.trainer.checkpoint import (
    complete_checkpoints,
    first_usable,
    none_verifies,
    recorded_config,
    resolve_source,
    warn_skipped,
)
from embshard.trainer.checkpoint_integrity import check_checkpoint_io
from embshard.trainer.loop import SUMMARY_FILE, run_worker
from embshard.trainer.method import EmbeddingMethod, get_method, method_name, register_method, registered_here
from embshard.trainer.metrics import read_file_sd_targets
from embshard.trainer.planning import check_method_plans_as_then, check_same_data, check_same_decisions, planning_step
from embshard.trainer.preemption import STOP_REQUEST_FILE
from embshard.trainer.reference import raised_at_in
from embshard.trainer.restarts import reset_starts
from embshard.trainer.resume_config import check_plan_made_for, reconcile
from embshard.typed_config import from_dict, to_dict
from embshard.units import human_bytes


def plan_for_training(cfg: JobConfig, method: str | None = None) -> PlanBundle:
    """The plan every worker will train, saved as `<output_dir>/plan/plan.json`: the plan of the
    checkpoint the run resumes from (whose model config must agree with cfg's, see
    `with_checkpoint_config`), else a copy of the given plan file, else a fresh one made by the
    run's method (default: the one `cfg` names) for this topology."""
    decide = planning_step(cfg, method)
    verify_dataset(cfg.data.path)  # a missing or truncated part file, before any worker starts
    check_not_in_sealed(Path(cfg.output_dir), "output_dir", ConfigError, itself=True)
    file_sd = cfg.metrics.file_sd
    if cfg.metrics.enabled and file_sd and Path(file_sd).exists() and read_file_sd_targets(file_sd) is None:
        # Rank 0 replaces it with the run's target list and removes it at the end.
        raise ConfigError(f"metrics.file_sd: {file_sd} exists and is no file-SD target list; refusing to replace "
                          "it (a Prometheus config there was overwritten, then deleted)")
    if cfg.checkpoint.enabled:
        # A missing bucket, client or a read-only folder now, not at the first checkpoint.
        check_checkpoint_io(cfg.checkpoint_dir, "checkpoint.dir")
        if cfg.checkpoint.resume:
            check_checkpoint_io(location(cfg.checkpoint.resume), "checkpoint.resume")
        check_writable(cfg.checkpoint_dir, "checkpoint.dir")
        check_not_in_plan(cfg)  # first: the run's own plan folder is sealed too once the run marked its folder
        # As output_dir: inside another run's step, its pruning deleted this run's checkpoints.
        check_not_in_sealed(cfg.checkpoint_dir, "checkpoint.dir", ConfigError, itself=True)
    topology = cfg.sharding.topology(cfg.cluster.workers)
    source = resume_source(cfg)
    if source is not None:
        with_checkpoint_config(cfg, source, adopt=False, method=method)
        bundle = plan_from_checkpoint(cfg, source)
        made_for = f"{source} (resumed)"
        if cfg.sharding.plan_file:
            check_plan_file_resumed(cfg.sharding.plan_file, cfg, bundle, source)
    elif cfg.sharding.plan_file:
        bundle = PlanBundle.load(cfg.sharding.plan_file, cfg.train.sparse_optimizer)
        made_for = f"sharding.plan_file {cfg.sharding.plan_file}"
        refused = disallowed_sharding(bundle, cfg.sharding.sharding_types)
        if refused:
            # Trained as the plan file says, the types the config forbids, without a word.
            raise PlanError(f"{made_for}: {refused[0]} is sharded {refused[1]}, which sharding.sharding_types "
                            f"{cfg.sharding.sharding_types} does not allow; plan it again with them (`embshard plan`)")
        if bundle.dimension_plan.base_dim != cfg.embeddings.dim:
            # Trained as the plan says, but recorded in every checkpoint as the config says.
            raise PlanError(f"{made_for}: a plan for embeddings.dim {bundle.dimension_plan.base_dim}, "
                            f"the config has {cfg.embeddings.dim}")
        notes = check_plan_made_for(bundle.dimension_plan, cfg, method or method_name(cfg), made_for)
        plan = bundle.dimension_plan
        bundle = replace(bundle, dimension_plan=replace(plan, notes=[*notes, *plan.notes])).copy_to(cfg.plan_dir)
    else:
        bundle = plan_with(decide, cfg.data.path, topology, cfg.plan_dir, **sharding_options(cfg))
        made_for = "the plan"
    spec = DatasetSpec.load(cfg.data.path)
    bundle.memory = replace(bundle.memory, dense_bytes=dense_layer_bytes(cfg, bundle.dimension_plan, spec, method))
    bundle.save()
    bundle.shard_plan.check_matches(bundle.dimension_plan, topology)
    check_plan_holds(bundle.dimension_plan, {f.name: f.cardinality for f in spec.sparse},
                     f"{made_for} on {cfg.data.path}")
    check_same_data(bundle.dimension_plan, spec, cfg.data.path, made_for)
    check_same_decisions(bundle.dimension_plan, cfg, made_for)
    if source is not None:  # after the data's check: a dataset written again was said as the method's change
        check_method_plans_as_then(decide, cfg, method or method_name(cfg), bundle.dimension_plan, str(source))
    bundle.memory.check_fits()
    return bundle


def sharding_options(cfg: JobConfig) -> dict[str, Any]:
    """What shapes a run's shard plan besides its topology: one source for fresh and resumed plans."""
    return {
        "batch_size": cfg.data.batch_size,
        "optimizer": cfg.train.sparse_optimizer,
        "sharding_types": cfg.sharding.sharding_types,
    }


def with_checkpoint_config(cfg: JobConfig, source: StoragePath | None = None, adopt: bool = False,
                           method: str | None = None) -> JobConfig:
    """cfg, checked against the config of the checkpoint it resumes from (ConfigError naming the
    keys that differ, the `method`'s `resume_keys` among them); with `adopt`, cfg with the
    checkpoint's values of those keys instead."""
    source = source or resume_source(cfg)
    if source is None:
        return cfg
    also = get_method(method or method_name(cfg)).resume_keys
    return reconcile(cfg, recorded_config(source), source, adopt, also)


def check_not_in_plan(cfg: JobConfig) -> None:
    """ConfigError when checkpoint.dir lies in the run's own plan folder, which every checkpoint
    copies: it was copied into itself at the first save, a folder tree that deep, and failed.
    Said so before `check_not_in_sealed`, which refuses any run's plan folder in general terms."""
    ckpt = cfg.checkpoint_dir
    if isinstance(ckpt, Path) and ckpt.resolve().is_relative_to(cfg.plan_dir.resolve()):
        raise ConfigError(f"checkpoint.dir {ckpt}: inside the run's plan folder {cfg.plan_dir}, which every checkpoint "
                          "copies; write the checkpoints elsewhere")


def resume_source(cfg: JobConfig) -> StoragePath | None:
    """The checkpoint workers will resume from (the same choice they make; manifests only)."""
    if not cfg.checkpoint.enabled:
        return None
    # As the workers (loop.py): the run's own, then checkpoint.resume when none of those verifies.
    # Only while there were none did it look at checkpoint.resume, which the workers then resumed
    # with no check of its config and data.
    path, rejected = first_usable(complete_checkpoints(cfg.checkpoint_dir))
    warn_skipped(rejected)
    if path is None and cfg.checkpoint.resume:
        path, rejected = first_usable(resolve_source(cfg.checkpoint.resume))
        if path is None:  # the workers' refusal, before Ray starts and the run's folders are made
            raise none_verifies(cfg.checkpoint.resume, rejected)
        warn_skipped(rejected)
    return path


def check_replaces_no_run(cfg: JobConfig, overwrite: bool) -> None:
    """ConfigError where output_dir holds a finished run (its summary.json) that this run would
    train over from scratch (checkpoints off, or none to resume), unless `overwrite`: a search's
    folder, say, lost its summary and plan to a retrain given the same output_dir. Whether there
    is one to resume is read from the listing alone: `resume_source` verifies them, and planning
    does that next (and warns of those it skips) once."""
    summary = location(cfg.output_dir) / SUMMARY_FILE
    if summary.is_file() and not _finished(summary):
        return  # stopped, or short of a PEP target: its own line said to run the same command again
    own = cfg.checkpoint.enabled and complete_checkpoints(cfg.checkpoint_dir)
    resumable = own or (cfg.checkpoint.enabled and cfg.checkpoint.resume)
    if overwrite and own:
        # It resumed, trained nothing more and exited 0: a user who asked for a fresh run got none.
        print(f"note: --overwrite replaces a finished run only where this one would train from scratch; this one "
              f"resumes from its checkpoints (in {cfg.checkpoint_dir}): for a fresh run, give it another "
              f"{'checkpoint.dir' if cfg.checkpoint.dir else 'output_dir'}")
    if overwrite or resumable or not summary.is_file():
        return
    why = "checkpoint.enabled is false" if not cfg.checkpoint.enabled else "it holds no checkpoint to resume"
    raise ConfigError(f"output_dir {cfg.output_dir}: holds a finished run (its {SUMMARY_FILE}) and {why}, so this "
                      "run would train from scratch over it; set another output_dir, or pass --overwrite to "
                      "replace it")


def _finished(summary: StoragePath) -> bool:
    """Whether the run whose summary.json this is ended as asked: not stopped before its end (a
    SIGTERM, Ctrl-C) nor short of a PEP target, whose lines say to run the same command again (a
    rerun was refused as over a finished run). A summary that does not read is one (kept)."""
    try:
        record = read_json(summary, DataError)
    except (OSError, DataError):
        return True
    if not isinstance(record, dict):
        return True
    pep = record.get("pep")
    return not (record.get("preempted") or (isinstance(pep, dict) and pep.get("missed")))


def disallowed_sharding(bundle: PlanBundle, allowed: list[str] | None) -> tuple[str, str] | None:
    """(table, sharding type) of the first table `bundle` shards in a way `allowed` (the config's
    sharding.sharding_types; None: any) does not take, else None."""
    return next(((name, ps.sharding_type) for name, ps in bundle.shard_plan.sharding.items()
                 if allowed is not None and ps.sharding_type not in allowed), None)


def check_plan_file_resumed(plan_file: str, cfg: JobConfig, resumed: PlanBundle, checkpoint: StoragePath) -> None:
    """A resume trains its checkpoint's plan (`resumed`): PlanError where `plan_file` (the config's
    sharding.plan_file) holds other widths or rows (it was not trained, without a word), a note
    where only its shard layout differs on the same topology (a resume keeps the checkpoint's)."""
    given = PlanBundle.load(plan_file, cfg.train.sparse_optimizer)
    plan, theirs = given.dimension_plan, resumed.dimension_plan
    if (plan.base_dim, plan.tables, plan.uniform_width) != (theirs.base_dim, theirs.tables, theirs.uniform_width):
        raise PlanError(f"sharding.plan_file {plan_file}: another plan than the one {checkpoint} trained, "
                        "which its resume trains; drop sharding.plan_file to resume, or give a new output_dir to "
                        "train that plan")
    if given.shard_plan.topology == resumed.shard_plan.topology and given.shard_plan.sharding != \
            resumed.shard_plan.sharding:
        print(f"note: sharding.plan_file {plan_file}: its shard layout is not the one {checkpoint} "
              "trained, which the resume keeps (a resume lays the tables out again only for another topology "
              "or sharding.sharding_types)", file=sys.stderr)


def plan_from_checkpoint(cfg: JobConfig, checkpoint: StoragePath) -> PlanBundle:
    """The checkpoint's DimensionPlan (dims, remaps), sharded for this run's topology.

    The same world size keeps the checkpoint's shard plan while it has only sharding types the
    config allows; else TorchRec's planner runs again over the unchanged DimensionPlan, and DCP
    reshards the saved tables into the new layout."""
    copytree(checkpoint / CHECKPOINT_PLAN_DIR, cfg.plan_dir)
    bundle = PlanBundle.load(cfg.plan_dir, cfg.train.sparse_optimizer)
    topology = cfg.sharding.topology(cfg.cluster.workers)
    # A config that allows other sharding types than the checkpoint's plan has was trained on the
    # checkpoint's types without a word (row_wise on a CPU, which `plan` refuses, included).
    if bundle.shard_plan.topology != topology or disallowed_sharding(bundle, cfg.sharding.sharding_types):
        bundle = shard_dimension_plan(
            bundle.dimension_plan, load_profile(cfg.data.path), topology, cfg.plan_dir, **sharding_options(cfg)
        )
    bundle.save()
    return bundle


def _worker_entry(config: dict[str, Any]) -> None:
    # Runs in the Ray worker process: the method's modules are imported there.
    console.mark_console()
    cfg = from_dict(JobConfig, config["job"])
    # Ray placed it: from now on the first Ctrl-C asks for a checkpoint (the workers read the
    # request once their loop begins, after loading the plan, data and model: minutes, at scale).
    with contextlib.suppress(OSError):  # a hint: a folder that cannot take it is said by the run itself
        (Path(cfg.output_dir) / WORKERS_PLACED_FILE).touch()
    board = config["board"]
    if fatal.recorded(board) is not None:
        return  # Ray restarted the group after bad input: training again would fail the same way
    try:
        if config.get("registered") is not None:
            register_method(config["method"], _received(config["method"], config["registered"]))
        run_worker(cfg, report=ray.train.report, local_rank=ray.train.get_context().get_local_rank(),
                   method=config["method"], owner_check=owner_check(config.get("owner")))
    except EmbshardError as e:
        fatal.record(board, e)
        raise
    except OSError as e:
        problem = environment_problem(e)  # a full disk or read-only folder: one line, not retried
        if problem is None:
            raise
        fatal.record(board, problem)
        raise problem from e
    except Exception as e:
        if lost_a_peer(e):
            # The echo of a peer that died, held back until Ray has seen the death: Ray Train's
            # error holds what its poll found when the first rank failed, and a death it had not
            # seen yet was missing, so the run's line blamed this rank.
            time.sleep(peer_death_wait_s())
        # A bug in a forward or a callback: with max_failures Ray restarted the group, which
        # failed the same way at the same step, again and again (forever, under -1).
        if cfg.cluster.max_failures:
            fatal.crashed(board, ray.train.get_context().get_world_rank(), e)
        raise


def train_on_ray(cfg: JobConfig, method: str | None = None) -> dict[str, Any]:
    """Run `method` (default: the one `cfg` names) with `run_worker` on every Ray Train worker (a
    local in-process cluster unless cfg.cluster.address) on the plan `plan_for_training` saved;
    returns rank 0's summary. Ctrl-C stops it with a checkpoint (`Interrupted`)."""
    method = method or method_name(cfg)
    registered = _sendable(method)  # before Ray starts
    output = Path(cfg.output_dir).resolve()
    cfg = worker_config(cfg)
    reset_starts(output)
    (output / WORKERS_PLACED_FILE).unlink(missing_ok=True)
    with console.run_log(output):
        init_ray(cfg)
        console.route_worker_output()
        stop_requested = _fit(cfg, method, registered, output)
    # Rank 0 writes the summary itself: Ray Train v2 keeps only metrics reported with a checkpoint.
    summary = json.loads((output / SUMMARY_FILE).read_text())
    if summary.get("preempted"):
        # Whoever stopped it, the run has not finished: a worker's SIGTERM (a preempted pod) ended
        # with exit 0 and a result, so a job system took a part of a run for the whole.
        by = "Ctrl-C or SIGTERM" if stop_requested else "SIGTERM to its workers (a preempted pod?)"
        raise Interrupted(f"stopped by {by} after step {summary['steps']}, before its end; checkpoint "
                          f"{summary.get('checkpoint')}; run the same command again to continue")
    return summary


def _fit(cfg: JobConfig, method: str, registered: bytes | None, output: Path) -> bool:
    """Train; returns whether Ctrl-C asked the workers to stop."""
    with fatal.launch_board() as board:
        return _fit_reporting(cfg, method, registered, output, board)


def _fit_reporting(cfg: JobConfig, method: str, registered: bytes | None, output: Path,
                   board: str) -> bool:
    """`_fit` with the launch's board of records (`fatal`): its bad input raised as that."""
    use_gpu = cfg.sharding.device == "cuda"
    # The locks this driver holds, for its workers to check before each checkpoint they write.
    owner = run_owner([output, *([cfg.checkpoint_dir] if cfg.checkpoint.enabled else [])])
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config={"method": method, "job": to_dict(cfg), "board": board, "owner": owner,
                           "registered": registered},
        scaling_config=ScalingConfig(
            num_workers=cfg.cluster.workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.cluster.cpus_per_worker, **cfg.cluster.worker_resources},
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=cfg.cluster.collective_timeout_s),
        run_config=RunConfig(
            name=f"{cfg.name}-{method}",
            storage_path=ray_storage(cfg),
            failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
        ),
    )
    graceful = cfg.checkpoint.enabled and cfg.checkpoint.on_sigterm
    started = (output / WORKERS_PLACED_FILE).is_file
    try:
        _, stop_requested = run_with_graceful_ctrl_c(
            trainer.fit, output / STOP_REQUEST_FILE, graceful, started,
            (SLOW_START_SECONDS, lambda: print(f"embshard: note: {placement_wait(cfg)}", file=sys.stderr, flush=True)))
    except KeyboardInterrupt:
        # The workers' lines went on after the process said it was interrupted (an evaluation).
        console.mute_workers()
        raise Interrupted(aborted(cfg, started())) from None
    except Exception as e:  # Ray Train's wrapper of the workers' (or its controller's) errors
        failure = worker_error(e)
        bad_input = fatal.recorded(board)
        if bad_input is not None or isinstance(failure.error, EmbshardError):
            console.record_error(e)  # the workers' tracebacks, for whoever debugs the reader
            raise (bad_input or failure.error) from None
        raise console.Crashed(failure.summary() + console.worker_deaths()) from e  # the cause: every worker's traceback
    # The workers of a group restarted after bad input return at once: the fit "succeeded".
    bad_input = fatal.recorded(board)
    if bad_input is not None:
        console.record_error(bad_input, fatal.worker_traceback(board))
        raise bad_input
    return stop_requested


SLOW_START_SECONDS = 60.0  # a local group starts in 5-30 s on 2 busy cores
# Touched by each worker as it starts (the run folder is shared with the driver, as the plan and
# the stop request are). A group restarted after a failure finds it there: a group Ray cannot
# place again is then stopped by a second signal, as before.


def placement_wait(cfg: JobConfig) -> str:
    """What Ray waits for while no worker has started: the group's resources against the
    cluster's. Ray Train waits for good (an autoscaler may add nodes); this says so."""
    each = {"CPU": cfg.cluster.cpus_per_worker, **cfg.cluster.worker_resources,
            **({"GPU": 1.0} if cfg.sharding.device == "cuda" else {})}
    try:
        total, free = ray.cluster_resources(), ray.available_resources()
    except Exception as e:  # noqa: BLE001 - a note: the GCS gone must not end the run here
        return f"no worker has started after {SLOW_START_SECONDS:.0f} s (the cluster's resources: {first_line(e)})"
    short = [f"{name} {total.get(name, 0):g} in all" for name, amount in each.items()
             if total.get(name, 0) < amount * cfg.cluster.workers]
    workers = f"{cfg.cluster.workers} worker{'s' if cfg.cluster.workers > 1 else ''}"
    asked = f"{workers} of {', '.join(f'{k} {v:g}' for k, v in each.items())} each"
    if short:
        return (f"no worker has started after {SLOW_START_SECONDS:.0f} s: Ray cannot place {asked} on this cluster "
                f"({', '.join(short)}) and waits for nodes to join; Ctrl-C stops it, or give fewer workers "
                "(--workers) or smaller ones (cluster.cpus_per_worker, cluster.worker_resources)")
    return (f"no worker has started after {SLOW_START_SECONDS:.0f} s: Ray is placing {asked} "
            f"({', '.join(f'{k} {free.get(k, 0):g}' for k in each)} free now: other jobs may hold the rest); "
            "Ctrl-C stops it")


def aborted(cfg: JobConfig, started: bool) -> str:
    """The line of a run stopped without a checkpoint of its last steps."""
    if not started:
        return "interrupted before any worker started: nothing was trained"
    if not cfg.checkpoint.enabled:
        return "interrupted; checkpoints are off (checkpoint.enabled: false), so nothing this run trained is kept"
    return ("interrupted without a checkpoint of the last steps; the same command resumes from the newest "
            f"checkpoint in {cfg.checkpoint_dir}, or starts afresh where none was written")


def _sendable(method: str) -> bytes | None:
    """The method registered under `method` in this process, pickled for the workers to register
    too (None for a built-in or a "module:attr" they import themselves): said here in one line if
    it cannot be pickled, rather than in Ray's traceback."""
    registered = registered_here(method)
    if registered is None:
        return None
    try:
        return cloudpickle.dumps(registered)
    except Exception as e:  # whatever its attributes raise when pickled
        raise ConfigError(f"method {method!r}: registered in this process, but cannot be sent to the Ray "
                          f"workers ({first_line(e)}); name it as package.module:attr on their Python "
                          "path") from None


def _received(method: str, pickled: bytes) -> EmbeddingMethod:
    """On a worker: the driver's registered method. Unpickled here, not by Ray: a class from a
    module the workers cannot import (one the driver reached through its own sys.path) failed
    Ray's controller with an ActorDiedError, retried under max_failures."""
    try:
        return cloudpickle.loads(pickled)
    except ImportError as e:
        raise ConfigError(f"method {method!r}: registered in the driver, but the Ray workers cannot import "
                          f"{e.name or 'its module'!r} ({first_line(e)}); put that module on their Python path "
                          "(PYTHONPATH, an installed package), or define the method in the driver's script") from None
    except AttributeError as e:  # the workers' copy of its module has no such class (another version)
        raise ConfigError(f"method {method!r}: registered in the driver, but its class is not in the module the "
                          f"Ray workers import ({first_line(e)}); give them the driver's version of it") from None


def ray_storage(cfg: JobConfig) -> str:
    """Where Ray Train keeps its run state: `cluster.storage` (a folder or a URI Ray's pyarrow
    file system serves), else <output_dir>/ray."""
    if cfg.cluster.storage:
        return str(location(cfg.cluster.storage).resolve())
    return str(Path(cfg.output_dir).resolve() / "ray")


def worker_config(cfg: JobConfig) -> JobConfig:
    """`cfg` as the workers get it: every path absolute (workers may run in other directories,
    or on hosts with the same shared storage), and the plan the driver saved."""
    cfg = with_paths_resolved(cfg)
    # Where the run's own folders default to, named: a worker's defaults would be its own.
    return replace(
        cfg,
        sharding=replace(cfg.sharding, plan_file=str(Path(cfg.output_dir) / "plan" / PLAN_FILE)),
        checkpoint=replace(cfg.checkpoint, dir=str(cfg.checkpoint_dir)),
        pep=replace(cfg.pep, out=str(cfg.pep_dir)) if cfg.pep else None,
    )


def init_ray(cfg: JobConfig, cpus: float | None = None, jobs: int = 1) -> None:
    """Attach to cfg.cluster.address, else start a local in-process cluster with at least `cpus`
    CPUs (default: one job's workers and its driver) and the `worker_resources` of `jobs` jobs at
    once; nothing when Ray is already up."""
    if ray.is_initialized():
        return
    # ray.init puts a SIGTERM handler of Ray's in place of the process's (the CLI's, see
    # `sigterm_as_ctrl_c`): a `kill` before the workers start was a C++ stack dump and an abort.
    with sigterm_kept():
        try:
            _join_or_start_ray(cfg, cpus, jobs)
        except SystemExit as e:
            # Ray's handler while ray.init runs (2-5 s) is `sys.exit(15)`: a SIGTERM then ended the
            # command with exit 15, no word, and the local cluster's processes left running.
            if e.code != signal.SIGTERM:
                raise
            with contextlib.suppress(Exception):
                ray.shutdown()
            raise KeyboardInterrupt from None


def _join_or_start_ray(cfg: JobConfig, cpus: float | None, jobs: int) -> None:
    if cfg.cluster.address:
        _check_ray_answers(cfg.cluster.address)
        try:
            ray.init(address=cfg.cluster.address, log_to_driver=True)
        except ConnectionError as e:  # nothing there, or a token the cluster does not take
            raise ConfigError(f"cluster.address {cfg.cluster.address}: cannot join the Ray cluster ({first_line(e)}); "
                              "give the head's GCS address (host:6379 by default), and RAY_AUTH_MODE / "
                              "RAY_AUTH_TOKEN as the cluster was started with") from None
        return
    joined = os.environ.get("RAY_ADDRESS", "")
    # Ray joins RAY_ADDRESS where no address is given, and then refused the local cluster's sizes
    # in a crash line, exit 1. The job API's http address (README's `export RAY_ADDRESS` for
    # `embshard submit`) is no cluster to join: a local one starts. A cluster's own (a job
    # started with `ray job submit`) is the user's to name: joined silently, or a local cluster
    # in the head pod started silently, either would surprise someone.
    if joined.startswith(("http://", "https://")):
        print(f"note: RAY_ADDRESS={joined} (the job API's, for embshard submit) is not joined: a run joins a "
              "cluster given by --address, else starts a local one", file=sys.stderr, flush=True)
    elif joined and joined != "local":
        raise ConfigError(f"RAY_ADDRESS={joined} names a Ray cluster, and cluster.address is not set: to join it, "
                          "set cluster.address (`--address` of train, `--set cluster.address=...` elsewhere; "
                          "`auto` inside the cluster), or unset RAY_ADDRESS to train on a local cluster")
    _private_token_auth()
    _check_machine_holds(cfg.cluster.workers, jobs)
    # A local cluster sized for the job even on a 2-core laptop: Ray's CPU count is a
    # scheduling budget, and the workers mostly wait on each other's collectives.
    need = cpus if cpus is not None else cfg.cluster.workers * cfg.cluster.cpus_per_worker + 1
    try:
        ray.init(
            address="local",
            num_cpus=max(os.cpu_count() or 1, int(need + 0.999)),
            resources={name: amount * cfg.cluster.workers * jobs
                       for name, amount in cfg.cluster.worker_resources.items()},
            runtime_env={"env_vars": local_cluster_env(os.environ)},
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=False,
        )
    except Exception as e:
        # Ray's session folder on a full disk: "crashed: RuntimeError: Timed out waiting for file
        # .../gcs_server_port_...", exit 1, naming neither the disk nor the folder.
        temp = Path(get_default_ray_temp_dir())
        free = disk_full(nearest_existing(temp))
        if free is None:
            raise
        raise EnvironmentProblem(f"{temp}: Ray cannot start its local cluster there: the disk is full ({free:,} bytes "
                                 f"free) ({first_line(e)}); free some space, or set RAY_TMPDIR to a folder on another "
                                 "disk") from None


# How often Ray Train's controller looks at a local cluster's few workers (seconds, as text).
LOCAL_HEALTH_CHECK_S = "0.2"
HEALTH_CHECK_INTERVAL_S_ENV_VAR = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # Ray Train's own name for it


def local_cluster_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables a local cluster's processes get beyond Ray's: the driver's EMBSHARD_* settings
    (e.g. the test fault hook), and Ray Train's controller looking at the group every
    LOCAL_HEALTH_CHECK_S, not Ray's 2 s (a run's start and end each waited for its next look, 3 to
    5 s of a short run here), unless the driver's environment sets that itself."""
    return {HEALTH_CHECK_INTERVAL_S_ENV_VAR: environ.get(HEALTH_CHECK_INTERVAL_S_ENV_VAR, LOCAL_HEALTH_CHECK_S),
            **{k: v for k, v in environ.items() if k.startswith("EMBSHARD_")}}


# A training worker's resident memory once it has imported torch, TorchRec and embshard's loop,
# before any table (measured on Linux, CPU builds: 438 MiB).
WORKER_PROCESS_BYTES = 440 << 20


def _check_machine_holds(workers: int, jobs: int) -> None:
    """ConfigError when this machine's memory cannot hold the processes of a local cluster's
    `workers` x `jobs` workers: `--workers 1000` on a laptop spawned them until it ran out."""
    processes = workers * jobs
    memory = memory_limit()
    if memory is None or processes * WORKER_PROCESS_BYTES <= memory[0]:
        return
    at_once = f" ({jobs} trials of {workers} at once)" if jobs > 1 else ""
    raise ConfigError(f"cluster.workers: a local cluster of {processes:,} workers{at_once} needs about "
                      f"{human_bytes(processes * WORKER_PROCESS_BYTES)} for their processes alone (each imports "
                      f"torch and TorchRec, about {WORKER_PROCESS_BYTES >> 20} MiB), and {memory[1]} has "
                      f"{human_bytes(memory[0])}; use fewer workers, or join a cluster (--address)")


CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def memory_limit() -> tuple[int, str] | None:
    """The memory this process may use, and what sets it: the machine's, or less where a control
    group (a container's, a pod's) limits it. Physical memory alone let a container's workers
    be started past its limit, and the kernel killed them. None where the system does not say."""
    try:
        machine = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
    return min([(machine, "this machine"), *_cgroup_limits()], key=lambda found: found[0])


def _cgroup_limits() -> Iterator[tuple[int, str]]:
    """Each memory limit set on this process's control group or a group above it."""
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except OSError:
        return
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:  # not a line of this file's format: the check is a courtesy, not a gate
            continue
        _, controllers, path = fields
        # v2's one hierarchy (controllers empty) limits in memory.max; v1's memory one in memory.limit_in_bytes.
        if controllers == "":
            root, name = CGROUP_ROOT, "memory.max"
        elif "memory" in controllers.split(","):
            root, name = CGROUP_ROOT / "memory", "memory.limit_in_bytes"
        else:
            continue
        # A limit on any group above this one's holds too; inside a container the path may name
        # the host's groups (absent there), so its own root is read as well.
        folder = root / os.path.normpath("/" + path).lstrip("/")
        for limits in [folder, *folder.parents]:
            if not limits.is_relative_to(root):
                break
            try:
                text = (limits / name).read_text().strip()
            except OSError:
                continue
            if text.isdigit() and int(text) < 1 << 62:  # v2 says "max", v1 a huge number, for none
                yield int(text), f"this process's control group ({limits})"


def _check_ray_answers(address: str) -> None:
    """ConfigError at once when no Ray answers at a `host:port` (or `ray://host:port`) address."""
    if address.startswith(("http://", "https://")):
        # The job API's address (what `embshard submit` takes): read as a host named "http".
        raise ConfigError(f"cluster.address {address}: the Ray dashboard's HTTP address, which `embshard submit` "
                          "takes; a run joins the cluster at its head's GCS address (host:6379 by default) or "
                          "ray://host:10001")
    problem = malformed(address)
    if problem is not None:
        # Handed to Ray: "crashed: ValueError: Unable to parse port number", or "Invalid address format".
        raise ConfigError(f"cluster.address {address}: not a Ray address ({problem})")
    why = no_ray_at(address)
    if why is not None:
        raise ConfigError(f"cluster.address {address}: no Ray answers there ({why}); start the cluster "
                          "(`ray start --head`) or give its head's GCS address (host:6379 by default)")


def _private_token_auth() -> None:
    """Token auth for the local in-process cluster, with a token only this process tree knows.

    Ray 2.60's GCS, raylet and worker gRPC servers listen on every interface whatever the node IP
    (`_node_ip_address="127.0.0.1"` is rewritten to the host's address, and the servers bind
    0.0.0.0/:: regardless), so binding to loopback cannot close them; a token can: without it
    every connection is refused. Nothing outside this process tree needs to join this cluster,
    so the token is fresh per run and written nowhere (Ray's default would store one in
    ~/.ray/auth_token). A token the user configured (RAY_AUTH_MODE=token) is kept."""
    # ray/_raylet.pyi (the Cython module's stub) lists neither name; both exist at runtime.
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    # Ray read the environment when it was imported; children (GCS, raylet, workers) inherit it.
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@dataclass(frozen=True)
class WorkerFailure:
    error: BaseException
    rank: int | None  # None: not raised by a training worker (Ray Train's controller, the driver)
    # ` at file:line` in a user's code (a method's callback, an arch's forward), out of the
    # worker's traceback, which reaches the driver as text; "" where it passed through none.
    where: str = ""

    def summary(self) -> str:
        said = first_line(self.error) + self.where
        waited = _COLLECTIVE_TIMEOUT.search(said)
        if waited:  # gloo's words for it name a source file and "recv operation"
            said = (f"waited {int(waited['ms']) / 1000:g} s in a collective for a rank that did not come (a worker "
                    f"hung, stopped or far slower; cluster.collective_timeout_s) ({said})")
        return said if self.rank is None else f"rank {self.rank}: {said}"


_COLLECTIVE_TIMEOUT = re.compile(r"Timed out waiting (?P<ms>\d+)ms for \w+ operation to complete")


# What a collective raises when a peer it was exchanging with went away, in gloo's words and
# NCCL's: the echo of another rank's failure, never its cause. Only a backend's error: a data
# source's "Connection reset by peer" is a cause of its own.
_BACKEND = re.compile(r"gloo|NCCL")
_LOST_PEER = re.compile(r"Connection (?:reset|closed) by peer|Broken pipe|remote process exited")


def lost_a_peer(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, RuntimeError) and bool(_BACKEND.search(text) and _LOST_PEER.search(text))


def peer_death_wait_s() -> float:
    """Two of Ray Train's worker polls and the time Ray takes to learn of a process's death."""
    return 2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")) + 2


def worker_error(e: BaseException) -> WorkerFailure:
    """What a worker really raised, out of Ray Train's wrappers (a worker-group error holding
    per-rank failures, task errors holding causes): the first EmbshardError found (its message
    names the bad input; it may itself be caused by a library error), else a worker process that
    died (the other ranks' errors are its echo: a collective lost its peer), else the lowest
    rank's root cause that is not such an echo, else the lowest rank's."""
    stack: list[tuple[int | None, BaseException, str]] = [(None, e, "")]
    seen: set[int] = set()
    roots: list[WorkerFailure] = []
    died: WorkerFailure | None = None
    while stack:  # depth first, lowest rank first
        rank, err, where = stack.pop()
        if id(err) in seen:
            continue
        seen.add(id(err))
        # Ray re-raises a worker's error as a subclass of both RayTaskError and its own class,
        # whose message is the whole traceback: look inside it for the original.
        if isinstance(err, EmbshardError) and not isinstance(err, RayError):
            return WorkerFailure(err, rank)
        if isinstance(err, RayActorError) and not isinstance(err, RayTaskError) and died is None:
            died = WorkerFailure(err, rank)
        if isinstance(err, RayTaskError):
            where = raised_at_in(str(err)) or where  # its message holds the worker's traceback
        inner = _inner_errors(err)
        if not inner:
            roots.append(WorkerFailure(err, rank, where))
        snippets = rank_snippets(str(err)) if getattr(err, "worker_failures", None) else {}
        stack.extend((rank if r is None else r, x, (raised_at_in(snippets[r]) if r in snippets else "") or where)
                     for r, x in reversed(inner))
    cause = next((r for r in roots if not lost_a_peer(r.error)), roots[0] if roots else None)
    return died or cause or WorkerFailure(e, None)


_SNIPPET_HEAD = re.compile(r"^\[Rank (?P<ranks>\d+(?:,\d+)*) Error Snippet\]:$", re.MULTILINE)


def rank_snippets(message: str) -> dict[int, str]:
    """A Ray Train worker-group error's message, by rank. Ray hands the driver each rank's bare
    exception, without its traceback, which lives on only as text in this message: a head
    `[Rank 0,1 Error Snippet]:` per group of alike errors, then the first one's traceback."""
    heads = list(_SNIPPET_HEAD.finditer(message))
    if not heads:
        return {}
    ends = [h.start() for h in heads[1:]] + [len(message)]
    # Ray shows the first rank's text for a group of errors alike but for their digits (line
    # numbers among them): the others' lines may differ, so only the first is given one.
    return {int(h["ranks"].split(",")[0]): message[h.end():end] for h, end in zip(heads, ends, strict=True)}


def _inner_errors(err: BaseException) -> list[tuple[int | None, BaseException]]:
    failures = getattr(err, "worker_failures", None) or {}
    others = [
        getattr(err, "controller_failure", None),
        getattr(err, "health_check_failure", None),  # a worker that died: its ActorDiedError
        getattr(err, "cause", None),
        err.__cause__,
        None if err.__suppress_context__ else err.__context__,
    ]
    return [*((rank, failures[rank]) for rank in sorted(failures)),
            *((None, x) for x in others if isinstance(x, BaseException))]
