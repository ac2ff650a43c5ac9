"""Checkpoints of the whole training state, written with `torch.distributed.checkpoint` (DCP).

Layout of one checkpoint (all ranks write into one folder on storage they share):

    step-000123/
      __0_0.distcp ... .metadata   DCP: {"model": DMP state dict, "optim": CombinedOptimizer state}
      rank-00000.pt ...            per rank: RNG states
      progress.json                step, epoch, samples, reader position, world size, batch size
      config.json                  the JobConfig the run trained with
      plan/                        plan.json (DimensionPlan + shard plan) and its remap files
      manifest.json                every file above with its size and SHA-256; written LAST

Atomicity: everything goes into `step-000123.tmp/`; the manifest is written last and only then
is the folder renamed to `step-000123/`. A folder without `.tmp` and with a manifest whose sizes
and hashes match is complete.

Resume: every rank agrees on one checkpoint before anything is read from it: the newest whose
files all verify against the manifest on every rank (checkpoint_integrity.py; nothing is
unpickled before that). A checkpoint of this run that fails verification is never deleted or
overwritten: it is renamed aside to `step-000123.damaged` and named in a warning. When none
verifies, nothing has been loaded and the run starts fresh, saying so. A verified checkpoint that
still fails to load (this run's model differs from the saved one) is an error on every rank, not
a partial resume.

Resharding: DCP stores sharded tables as global tensors with shard metadata, so a checkpoint
written by W ranks loads into any shard plan of the same DimensionPlan. The reader position is
per-world-size: on another world size it resumes at the same global sample offset within the
epoch, rounded down to a whole batch of the new world size (which rows a rank sees then differs
from an uninterrupted run; the number of samples trained does not, up to one batch).

MLET hook: `before_save` transforms run, in order, on the model state dict just before it is
written (MLET will register its collapse W = W1 @ W2 there). Loading expects the state dict in
the layout the model has, so a transform that changes the layout needs a matching load path.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, cast

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer

from embshard.datasets.storage import RemotePath, StoragePath, copytree, location, move, read_json, rmtree
from embshard.errors import ConfigError, EmbshardError, StorageError, disk_full, first_line
from embshard.planner.pipeline import PLAN_FILE
from embshard.planner.remap import REMAP_SUFFIX
from embshard.sealed_folders import STEP_FOLDER, STEP_FOLDER_BEING_WRITTEN
from embshard.sharding.mlet import is_mlet_w2
from embshard.trainer.checkpoint_integrity import (
    MANIFEST,
    PROGRESS,
    RankFailure,
    SafeLoadPlanner,
    checkpoint_reader,
    checkpoint_writer,
    on_every_rank,
    unusable,
    verify,
    verify_collective,
    write_manifest,
)

log = logging.getLogger(__name__)

CONFIG = "config.json"
PLAN_DIR = "plan"
DAMAGED_SUFFIX = ".damaged"
# What the driver reads from a checkpoint before any worker starts (all JSON).
DRIVER_FILES = (PROGRESS, CONFIG)

StateTransform = Callable[[dict[str, Any]], dict[str, Any]]


class CheckpointError(EmbshardError):
    """A checkpoint asked for explicitly is missing or unusable."""


@dataclass
class Progress:
    """Where training stands; saved with every checkpoint and restored on resume."""

    step: int = 0
    epoch: int = 0
    samples: int = 0  # all ranks together
    reader: dict[str, int] | None = None  # the train reader's state_dict()
    world_size: int = 1
    batch_size: int = 0  # per rank; with world_size it converts the reader position
    first_loss: float | None = None
    # The last logged loss: a start that resumes with nothing left to train reported None.
    last_loss: float | None = None
    # train.report_at best_valid: {"step", "valid", "test"} of the best validation so far (the
    # EvalResults as dicts), so the choice spans restarts.
    best: dict[str, Any] | None = None
    # Saved after a step the loop evaluates after (an eval_every step, an epoch's end, the run's
    # last step, whose final evaluation a failure must not lose the steps to), so before that
    # evaluation: a resume evaluates this step first, so best_valid still chooses among every
    # evaluation of the run (a restart lost the one at its checkpoint's step, which could be the best).
    evaluation_due: bool = False
    # The run's last evaluated step, restarts included: with train.eval_every, an epoch's end is
    # evaluated only while the run has none (a restarted start with none of its own evaluated
    # steps the run without the restart never did).
    last_evaluated: int | None = None

    @staticmethod
    def from_json(raw: Mapping[str, Any]) -> "Progress":
        return Progress(**{k: raw[k] for k in Progress.__dataclass_fields__ if k in raw})

    def reader_state(self, world_size: int, batch_size: int) -> dict[str, int]:
        """The reader position for this world size (see the module docstring)."""
        state = dict(self.reader or {"epoch": self.epoch, "batches": 0})
        if world_size != self.world_size or batch_size != self.batch_size:
            global_samples = state["batches"] * self.batch_size * self.world_size
            state["batches"] = global_samples // (batch_size * world_size)
        return state


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


class CheckpointManager:
    """Save, find, validate, load and prune the checkpoints of one run in `directory`."""

    def __init__(self, directory: str | StoragePath, keep: int = 2,
                 before_save: list[StateTransform] | None = None,
                 before_load: list[StateTransform] | None = None,
                 after_load: list[StateTransform] | None = None,
                 owner_check: Callable[[], None] | None = None,
                 fits: Callable[[StoragePath], None] | None = None) -> None:
        """The transforms map a model state dict to another (MLET registers its collapse as
        `before_save`, the matching n x d template as `before_load` and the rebuild of W1 as
        `after_load`), so a checkpoint holds what serving needs, not the training factorisation.
        `owner_check` runs on rank 0 before a step is written and again before it is published
        (and older ones pruned); what it raises fails the save, with nothing published. `fits`
        runs on every rank before a load; what it raises (a checkpoint of another model than the
        one built) fails the load on every rank."""
        self.directory = location(directory)
        self.keep = keep
        self.before_save: list[StateTransform] = list(before_save or [])
        self.before_load: list[StateTransform] = list(before_load or [])
        self.after_load: list[StateTransform] = list(after_load or [])
        self.owner_check = owner_check
        self.fits = fits
        self.rejected: list[tuple[StoragePath, str]] = []  # what the last `select` passed over, and why
        self._not_pruned: set[StoragePath] = set()  # step-named folders pruning leaves, said once

    # -- save (collective) ---------------------------------------------------------------------

    def save(self, progress: Progress, model: nn.Module, optimizer: KeyedOptimizer,
             config: Mapping[str, Any], plan_dir: Path) -> StoragePath:
        """Write a checkpoint of step `progress.step` on every rank; returns the final folder. A
        failure on any rank (the store going away, its credentials revoked) raises on every rank:
        a StorageError naming the object and the step when the store failed, else CheckpointError;
        the step's `.tmp` folder holds no manifest then, and earlier checkpoints are untouched."""
        rank = dist.get_rank()
        final = self.directory / step_dir_name(progress.step)
        tmp = final.with_name(final.name + ".tmp")

        def start() -> None:
            if rank == 0:
                if self.owner_check is not None:
                    self.owner_check()
                rmtree(tmp)  # this run's own unfinished write of the same step
                tmp.mkdir(parents=True)

        def write_state() -> None:
            model_state = model.state_dict()
            for transform in self.before_save:
                model_state = transform(model_state)
            dcp.save({"model": model_state, "optim": optimizer.state_dict()}, storage_writer=checkpoint_writer(tmp))
            with (tmp / f"rank-{rank:05d}.pt").open("wb") as f:
                torch.save(_rng_state(), f)

        def write_run_files() -> None:
            if rank == 0:
                _write_json(tmp / PROGRESS, asdict(progress))
                _write_json(tmp / CONFIG, dict(config))
                copytree(plan_dir, tmp / PLAN_DIR)

        manifest: dict[str, Any] = {}

        def publish() -> None:
            if rank == 0:
                if self.owner_check is not None:
                    self.owner_check()
                _write_json(tmp / MANIFEST, manifest)
                if final.exists():  # a step reached again (after resuming from an older one): keep it
                    log.warning("checkpoint %s: already exists, kept as %s", final, set_aside(final, ".superseded"))
                move(tmp, final, marker=MANIFEST)
                if isinstance(self.directory, Path):
                    _fsync_dir(self.directory)

        # Each stage ends with every rank agreeing it succeeded (the barrier between stages).
        for stage in (start, write_state, write_run_files,
                      lambda: manifest.update(write_manifest(tmp, progress.step)), publish):
            _raise_save_failure(on_every_rank(stage, tmp), progress.step, tmp)
        if rank == 0:
            try:
                self._prune()
            except (OSError, StorageError) as e:  # the checkpoint is saved: a failed clean-up is no failed save
                log.warning("checkpoint %s saved; removing older ones failed: %s", final, first_line(e))
        return final

    def _prune(self) -> None:
        # Only folders a save wrote, or a prune began on: one named like a step with neither a
        # manifest nor the prune's mark (a user's) went, files and all, and a link to a step
        # elsewhere lost its target's manifest, another run's checkpoint.
        listed = complete_checkpoints(self.directory)
        kept = [p for p in listed if not p.is_symlink() and ((p / MANIFEST).is_file() or (p / PRUNING_MARK).is_file())]
        for other in listed:
            if other not in kept and not other.is_symlink() and other not in self._not_pruned:
                # Said once a run: a prune an embshard before the mark left half done looks the same,
                # and is the user's to delete.
                self._not_pruned.add(other)
                print(f"note: {other} holds no manifest: not a checkpoint a save wrote, so pruning leaves it "
                      "(delete it yourself if it is what an interrupted prune of an earlier embshard left)", flush=True)
        for old in kept[self.keep:]:
            _delete_step(old)
        # Unfinished writes of earlier steps (a run killed mid-save) that no run will finish:
        # each is as large as a checkpoint. One with a manifest was complete and is left alone.
        if not kept:
            return
        newest = int(STEP_FOLDER.fullmatch(kept[0].name).group(1))  # type: ignore[union-attr]
        for leftover in self.directory.iterdir():
            m = STEP_FOLDER_BEING_WRITTEN.match(leftover.name)
            if m and int(m.group(1)) < newest and not (leftover / MANIFEST).is_file() and not leftover.is_symlink():
                rmtree(leftover)

    # -- load (collective) ---------------------------------------------------------------------

    def load_latest(self, model: nn.Module, optimizer: KeyedOptimizer, candidates: list[StoragePath],
                    set_damaged_aside: bool = True) -> tuple[StoragePath, Progress] | None:
        """Collective. Load the newest candidate that verifies on every rank; None when none does
        (then nothing was loaded). `set_damaged_aside`: rename failed candidates to
        `step-N.damaged` (this run's own folder) instead of only naming them (another run's)."""
        path = self.select(candidates, set_damaged_aside)
        if path is None:
            return None
        return path, self.load(path, model, optimizer)

    def select(self, candidates: list[StoragePath], set_damaged_aside: bool = True) -> StoragePath | None:
        """Collective: the newest candidate whose files verify on every rank (see the module doc)."""
        self.rejected = []
        for path in candidates:
            why = verify_collective(path)
            if why is None:
                return path
            self.rejected.append((path, why))
            if dist.get_rank() == 0:
                kept = set_aside(path, DAMAGED_SUFFIX) if set_damaged_aside else path
                log.warning("checkpoint %s: %s; not loaded, kept as %s", path, why, kept)
            dist.barrier()  # the rename is done before any rank looks at the next candidate
        return None

    def load(self, path: StoragePath, model: nn.Module, optimizer: KeyedOptimizer) -> Progress:
        """Collective: load a verified checkpoint. Ranks agree after each stage, so a failure on
        one rank raises CheckpointError on all of them (no rank waits in a collective alone)."""
        reader = checkpoint_reader(path)
        state: dict[str, Any] = {}

        def prepare() -> None:
            if self.fits is not None:
                self.fits(path)
            fresh = _init_lazy_state(optimizer)
            saved = reader.read_metadata().state_dict_metadata
            _forget_unsaved_state(fresh, saved)
            state["model"] = model.state_dict()
            own = set(state["model"])
            state["optim"] = optimizer.state_dict()
            for transform in self.before_load:
                state["model"] = transform(state["model"])
            # A hook may ask for optional state an older checkpoint lacks (MLET's exact_resume W1);
            # what the model itself holds must all be there (`_check_shapes`).
            state["model"] = {k: v for k, v in state["model"].items() if k in own or f"model.{k}" in saved}
            _check_shapes(path, state["model"], saved)

        def restore() -> None:
            for transform in self.after_load:
                state["model"] = transform(state["model"])
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optim"])
            state["progress"] = Progress.from_json(json.loads((path / PROGRESS).read_text()))
            rng = path / f"rank-{dist.get_rank():05d}.pt"
            if state["progress"].world_size == dist.get_world_size() and rng.is_file():
                try:
                    _set_rng_state(torch.load(io.BytesIO(rng.read_bytes()), weights_only=True))
                except (pickle.UnpicklingError, RuntimeError, KeyError, ValueError) as e:
                    # RNG states are optional (another world size has none); checkpoints written
                    # before they were plain tensors hold a numpy array weights_only refuses.
                    log.warning("checkpoint %s: RNG state of rank %d not restored (%s)",
                                path, dist.get_rank(), first_line(e))

        _agreed(path, "cannot be read", prepare)
        # DCP's load is collective and raises its errors on every rank itself.
        _agreed(path, "cannot be loaded", lambda: dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner()))
        _agreed(path, "cannot be restored", restore)
        return state["progress"]


def _raise_save_failure(failed: tuple[RankFailure, BaseException | None] | None, step: int, tmp: StoragePath) -> None:
    if failed is None:
        return
    failure, own = failed
    if failure.storage:
        raise StorageError(f"{failure.message} while saving checkpoint step {step} "
                           f"(earlier checkpoints are kept)") from own
    why = failure.message
    free = disk_full(tmp.parent) if isinstance(tmp, Path) else None
    if free is not None:
        why = f"the disk is full ({free:,} bytes free; {why})"
    raise CheckpointError(f"{tmp}: saving checkpoint step {step} failed on rank {failure.rank}: {why} "
                          f"(earlier checkpoints are kept)") from own



def _agreed(path: StoragePath, what: str, stage: Callable[[], None]) -> None:
    """Run one stage of a load on every rank; raise on all of them if it failed on any: a
    StorageError when the store failed, else CheckpointError."""
    failed = on_every_rank(stage, path)
    if failed is None:
        return
    failure, own = failed
    if failure.storage:
        raise StorageError(f"{failure.message} while loading checkpoint {path}") from own
    if _gone(path):
        # A run still saving into that folder prunes its older steps, the manifest first: the
        # files went mid-read (`--resume` of a run that trains), not damage "left as it is".
        raise CheckpointError(f"{path}: removed while it was being loaded (a run still saving into {path.parent} "
                              f"keeps only its newest steps); resume from {path.parent}, which names its newest "
                              "step") from own
    if failure.message.startswith(str(path)):  # already a full sentence about this checkpoint
        raise CheckpointError(failure.message) from own
    raise CheckpointError(f"checkpoint {path} {what} (rank {failure.rank}: {failure.message}); "
                          f"it was left as it is") from own


def _gone(step: StoragePath) -> bool:
    """Whether a step's manifest is gone; False where that cannot be asked (a store failing:
    the load's own failure says more)."""
    try:
        return not (step / MANIFEST).is_file()
    except Exception:  # noqa: BLE001 - only a better wording is at stake
        return False


def _check_shapes(path: StoragePath, model_state: Mapping[str, Any], saved: Mapping[str, Any]) -> None:
    """A model built differently from the saved one (another dense arch, dims, dataset) is named
    here, before DCP would fail with its own size-mismatch traceback."""
    missing = [key for key in model_state if f"model.{key}" not in saved]
    if missing:
        raise CheckpointError(f"{path}: the checkpoint lacks {len(missing)} of this run's tensors (e.g. {missing[0]}): "
                              f"another model (or the model's code changed since), or an embshard from before "
                              f"`model.arch` (whose keys lack the TrainModel's `model.` level); resume with the "
                              f"code that wrote it, or train into a new output_dir")
    # The arch's parameters sit under the TrainModel's `model.`; beside them the checkpoint's
    # `model.` holds training state a hook may leave unread (MLET's exact_resume W1). Its MLET W2s
    # are left unread by a d-wide model, which reads the collapsed tables alone.
    unread = sorted(k.removeprefix("model.model.") for k in saved
                    if k.startswith("model.model.") and k.removeprefix("model.") not in model_state
                    and not is_mlet_w2(k, saved))
    if unread:
        more = f" and {len(unread) - 1} more" if len(unread) > 1 else ""
        raise CheckpointError(f"{path}: holds model parameters this run's model has no place for ({unread[0]!r}"
                              f"{more}), which a resume would drop: this run's model differs from the one that "
                              f"wrote it; resume with that model's code and config, or train into a new output_dir")
    wrong = [f"{key}: saved {list(saved[f'model.{key}'].size)}, this run {list(value.size())}"
             for key, value in model_state.items()
             if hasattr(value, "size") and hasattr(saved[f"model.{key}"], "size")
             and tuple(saved[f"model.{key}"].size) != tuple(value.size())]
    if wrong:
        raise CheckpointError(f"{path}: this run's model differs from the checkpoint's ({len(wrong)} tensors, "
                              f"e.g. {wrong[0]}); "
                              f"train with the checkpoint's config and code, or into a new output_dir")


def set_aside(path: StoragePath, suffix: str) -> StoragePath:
    """Rename a checkpoint folder out of the way of resume and pruning; never overwrites. In
    object storage the "rename" copies every object it can read, then deletes the originals; an
    object it cannot read stops it before anything is deleted."""
    target, n = path.with_name(path.name + suffix), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}{suffix}-{n}"), n + 1
    move(path, target, marker=MANIFEST)
    return target


# Written into a step folder as its prune begins: the folder is the prune's to finish.
PRUNING_MARK = ".pruning"


def _delete_step(step: StoragePath) -> None:
    """Marked, then its manifest: a reader of it (`embshard export` while the run saves) finds it
    incomplete the moment any file of it is gone, as `export` checks. The mark goes last, so a
    prune killed or failing on the way (a file NFS keeps while open) leaves the folder to the next."""
    (step / PRUNING_MARK).write_text("")
    if (step / MANIFEST).is_file():
        (step / MANIFEST).unlink()
    for entry in step.iterdir():
        if entry.name == PRUNING_MARK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            rmtree(entry)
        else:
            entry.unlink()
    if all(entry.name == PRUNING_MARK for entry in step.iterdir()):
        rmtree(step)


def complete_checkpoints(directory: StoragePath) -> list[StoragePath]:
    """Finished checkpoint folders (renamed from .tmp), newest first; not yet validated."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if p.is_dir() and (m := STEP_FOLDER.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def recorded_config(path: StoragePath) -> dict[str, Any]:
    """The job config a checkpoint records (ConfigError for a file that holds none)."""
    saved = read_json(path / CONFIG, ConfigError)
    if not isinstance(saved, dict):  # `[]` was a ConfigError that advised the flag already given
        raise ConfigError(f"{path / CONFIG}: not a job config (a JSON {type(saved).__name__})")
    return saved


def resolve_source(path: str | StoragePath) -> list[StoragePath]:
    """A `--resume` argument -> candidate folders, newest first: a step folder itself, or the
    complete checkpoints inside a checkpoint directory."""
    path = location(path)
    if not path.is_dir():
        # A step folder's name alone made it a candidate: "no manifest.json (the write did not
        # finish)" was said of a folder never there (a step pruned since, a typo).
        raise CheckpointError(f"{path}: no checkpoint found (no such folder)")
    if is_step_folder(path):
        return [path]
    found = complete_checkpoints(path)
    if not found:
        raise CheckpointError(f"{path}: no checkpoint found (expected step-NNNNNN folders or one of them)")
    return found


def is_step_folder(path: StoragePath) -> bool:
    """A checkpoint of one step (rather than a checkpoint directory of them)."""
    return (path / MANIFEST).is_file() or bool(STEP_FOLDER.match(path.name))


def problem(path: StoragePath, every_file: bool = False) -> str | None:
    """Why a checkpoint folder cannot be used in this one process, or None. Checks the layout and
    the hashes of the files the driver reads, or of `every_file` (export reads them all); a
    training run's workers verify every file together (`CheckpointManager.select`)."""
    # The manifest's plan files, not those on disk: a stray file there (plan.json~) is read by no
    # one, and the workers, who leave it be, resumed a step the driver had skipped unchecked.
    def read(name: str) -> bool:
        return name in DRIVER_FILES or name.startswith(f"{PLAN_DIR}/")

    return unusable(path, lambda: verify(path, None if every_file else read, _read_by_name(path)))


def _read_by_name(path: StoragePath) -> list[str]:
    """The files of a step that are there and read for what they say, not unpickled (which
    `check_layout` refuses unlisted): one put there after its manifest, or dropped from it, was
    read with no hash vouching for it, and an export served its remaps swapped."""
    plan = path / PLAN_DIR
    remaps = sorted(f"{PLAN_DIR}/{f.name}" for f in plan.iterdir() if f.name.endswith(REMAP_SUFFIX)) \
        if plan.is_dir() else []
    return [name for name in (*DRIVER_FILES, f"{PLAN_DIR}/{PLAN_FILE}") if (path / name).is_file()] + remaps


def first_usable(candidates: list[StoragePath],
                 every_file: bool = False) -> tuple[StoragePath | None, list[tuple[StoragePath, str]]]:
    """The newest candidate that passes `problem` (None: none does), and why each newer one did
    not (`warn_skipped` says it). Candidates older than the answer are not read."""
    rejected: list[tuple[StoragePath, str]] = []
    for path in candidates:
        # A step a run set aside failed the workers' check of every file once, which the driver's
        # check of its own files may pass: it started Ray for workers that refused it.
        why = problem(path, every_file or DAMAGED_SUFFIX in path.name)  # `.damaged-1` too (set_aside)
        if why is None:
            return path, rejected
        rejected.append((path, why))
    return None, rejected


def warn_skipped(rejected: list[tuple[StoragePath, str]]) -> None:
    for path, why in rejected:
        log.warning("checkpoint %s: skipped, %s", path, why)


def newest_verified(source: str | StoragePath) -> StoragePath:
    """One process: the newest checkpoint at `source` whose every file verifies (export reads them
    all); CheckpointError saying why each one failed."""
    for _ in range(3):
        path, rejected = first_usable(resolve_source(source), every_file=True)
        # A run still saving there prunes what it lists: a step gone by the time it was read is
        # no damage, and the newer ones it wrote meanwhile are listed again.
        if path is not None or all(p.exists() for p, _ in rejected):
            break
    if path is None:
        raise none_verifies(source, rejected)
    warn_skipped(rejected)  # only when an older one is read instead: else the error says it
    return path


def rejected_text(rejected: list[tuple[StoragePath, str]]) -> str:
    return "; ".join(f"{path.name}: {why}" for path, why in rejected)


def none_verifies(source: str | StoragePath, rejected: list[tuple[StoragePath, str]]) -> CheckpointError:
    return CheckpointError(f"{source}: no checkpoint there verifies ({rejected_text(rejected)})")


# -- helpers -------------------------------------------------------------------------------------

def _init_lazy_state(optimizer: KeyedOptimizer) -> list[tuple[list[str], KeyedOptimizer]]:
    """-> the parts of `optimizer` it gave state, each with its parameters' keys in the whole's
    state_dict."""
    # torch optimizers (Adam: exp_avg, step) create their state on the first step, and
    # KeyedOptimizer.load_state_dict copies into existing state only. A zero-gradient step
    # creates it without moving any parameter; the load then overwrites it.
    parts = optimizer._optims if isinstance(optimizer, CombinedOptimizer) else [("", optimizer)]
    fresh = []
    for key, part in parts:
        if not part.state and any(p.requires_grad for p in part.params.values()):
            part.init_state()
            fresh.append(([CombinedOptimizer.prepend_opt_key(name, key) for name in part.params], part))
    return fresh


def _forget_unsaved_state(fresh: list[tuple[list[str], KeyedOptimizer]], saved: Mapping[str, Any]) -> None:
    """Drops the state `_init_lazy_state` gave a parameter that had none when the checkpoint was
    saved: AutoDim's alpha before its first architecture step. DCP refused the load for its
    missing keys ("Missing key in checkpoint state_dict: optim.state....arch.logits.step"), so a
    search stopped in its warm-up never resumed; it resumes with no state there, as it was saved."""
    for names, part in fresh:
        for name, param in zip(names, part.params.values(), strict=True):
            if not any(f"optim.state.{name}.{key}" in saved for key in part.state.get(param, {})):
                part.state.pop(param, None)


def _write_json(path: StoragePath, payload: Any) -> None:
    if isinstance(path, RemotePath):  # an object appears whole when its upload completes
        path.write_text(json.dumps(payload, indent=1) + "\n")
        return
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state() -> dict[str, Any]:
    """Plain tensors and numbers only, so that loading needs no pickle of arbitrary classes."""
    # cast: numpy's stubs type the no-argument call as the dict form, but the default
    # (legacy=True) returns this tuple for the global MT19937 state.
    legacy = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    kind, keys, pos, has_gauss, gauss = legacy
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
