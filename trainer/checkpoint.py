"""Checkpoints of the whole training state, written with `torch.distributed.checkpoint` (DCP).

Layout of one checkpoint (all ranks write into one folder on storage they share):

    step-000123/
      __0_0.distcp ... .metadata   DCP: {"model": DMP state dict, "optim": CombinedOptimizer state}
      rank-00000.pt ...            per rank: RNG states
      progress.json                step, epoch, samples, reader position, world size, batch size
      config.json                  the JobConfig the run trained with
      plan/                        plan.json (DimensionPlan + shard plan) and its remap files
      manifest.json                every file above with its size; written LAST

Atomicity: everything goes into `step-000123.tmp/`; the manifest is written last and only then
is the folder renamed to `step-000123/`. A folder without `.tmp` and with a manifest whose sizes
match is complete; anything else is skipped at resume with a warning naming it.

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

import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer

from embshard.errors import EmbshardError, first_line

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
CONFIG = "config.json"
PLAN_DIR = "plan"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")

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

    def __init__(self, directory: str | Path, keep: int = 2,
                 before_save: list[StateTransform] | None = None,
                 before_load: list[StateTransform] | None = None,
                 after_load: list[StateTransform] | None = None) -> None:
        """The transforms map a model state dict to another (MLET registers its collapse as
        `before_save`, the matching n x d template as `before_load` and the rebuild of W1 as
        `after_load`), so a checkpoint holds what serving needs, not the training factorisation."""
        self.directory = Path(directory)
        self.keep = keep
        self.before_save: list[StateTransform] = list(before_save or [])
        self.before_load: list[StateTransform] = list(before_load or [])
        self.after_load: list[StateTransform] = list(after_load or [])

    # -- save (collective) ---------------------------------------------------------------------

    def save(self, progress: Progress, model: nn.Module, optimizer: KeyedOptimizer,
             config: Mapping[str, Any], plan_dir: Path) -> Path:
        """Write a checkpoint of step `progress.step` on every rank; returns the final folder."""
        rank = dist.get_rank()
        final = self.directory / step_dir_name(progress.step)
        tmp = final.with_name(final.name + ".tmp")
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        model_state = model.state_dict()
        for transform in self.before_save:
            model_state = transform(model_state)
        dcp.save({"model": model_state, "optim": optimizer.state_dict()}, checkpoint_id=tmp)
        torch.save(_rng_state(), tmp / f"rank-{rank:05d}.pt")
        dist.barrier()  # every rank's files are in place before the manifest lists them
        if rank == 0:
            _write_json(tmp / PROGRESS, asdict(progress))
            _write_json(tmp / CONFIG, dict(config))
            shutil.copytree(plan_dir, tmp / PLAN_DIR)
            _write_manifest(tmp, progress.step)
            if final.exists():  # re-saving a step (a resumed run reaching it again)
                shutil.rmtree(final)
            tmp.rename(final)
            _fsync_dir(self.directory)
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        for old in complete_checkpoints(self.directory)[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)

    # -- load (collective) ---------------------------------------------------------------------

    def load_latest(self, model: nn.Module, optimizer: KeyedOptimizer,
                    candidates: list[Path]) -> tuple[Path, Progress] | None:
        """Load the newest candidate that validates and loads; warn about every one skipped.

        Rank 0 validates manifests and broadcasts the survivors, so every rank tries the same
        folders in the same order (DCP load is collective, and its errors reach all ranks)."""
        listed: list[Any] = [valid_checkpoints(candidates) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(listed, src=0)
        for path in listed[0]:
            try:
                return path, self.load(path, model, optimizer)
            except Exception as e:  # noqa: BLE001 - any load failure means: try the previous one
                if dist.get_rank() == 0:
                    log.warning("checkpoint %s: cannot be loaded (%s); trying the previous one",
                                path, first_line(e))
        return None

    def load(self, path: Path, model: nn.Module, optimizer: KeyedOptimizer) -> Progress:
        _init_lazy_state(optimizer)
        state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
        for transform in self.before_load:
            state["model"] = transform(state["model"])
        # A hook may ask for optional state an older checkpoint lacks (MLET's exact_resume W1);
        # a key the model itself needs and the checkpoint lacks still fails in load_state_dict.
        present = set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
        state["model"] = {k: v for k, v in state["model"].items() if f"model.{k}" in present}
        dcp.load(state, checkpoint_id=path)
        for transform in self.after_load:
            state["model"] = transform(state["model"])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optim"])
        progress = Progress.from_json(json.loads((path / PROGRESS).read_text()))
        rng = path / f"rank-{dist.get_rank():05d}.pt"
        if progress.world_size == dist.get_world_size() and rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=False))
        return progress


def complete_checkpoints(directory: Path) -> list[Path]:
    """Finished checkpoint folders (renamed from .tmp), newest first; not yet validated."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def resolve_source(path: str | Path) -> list[Path]:
    """A `--resume` argument -> candidate folders, newest first: a step folder itself, or the
    complete checkpoints inside a checkpoint directory."""
    path = Path(path)
    if (path / MANIFEST).is_file() or _STEP_DIR.match(path.name):
        return [path]
    found = complete_checkpoints(path)
    if not found:
        raise CheckpointError(f"{path}: no checkpoint found (expected step-NNNNNN folders or one of them)")
    return found


def problem(path: Path) -> str | None:
    """Why a checkpoint folder is unusable, or None. Checks the manifest only (cheap)."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (the write did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return f"unreadable manifest ({e})"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {size}"
    return None


def valid_checkpoints(candidates: list[Path]) -> list[Path]:
    """The candidates whose manifest checks out; a warning names every one skipped."""
    good = []
    for path in candidates:
        why = problem(path)
        if why is None:
            good.append(path)
        else:
            log.warning("checkpoint %s: skipped, %s", path, why)
    return good


# -- helpers -------------------------------------------------------------------------------------

def _init_lazy_state(optimizer: KeyedOptimizer) -> None:
    # torch optimizers (Adam: exp_avg, step) create their state on the first step, and
    # KeyedOptimizer.load_state_dict copies into existing state only. A zero-gradient step
    # creates it without moving any parameter; the load then overwrites it.
    parts = [o for _, o in optimizer._optims] if isinstance(optimizer, CombinedOptimizer) else [optimizer]
    for part in parts:
        if not part.state and any(p.requires_grad for p in part.params.values()):
            part.init_state()


def _write_manifest(folder: Path, step: int) -> None:
    files = {str(p.relative_to(folder)): p.stat().st_size
             for p in sorted(folder.rglob("*")) if p.is_file()}
    _write_json(folder / MANIFEST, {"step": step, "written_at": time.time(), "files": files})


def _write_json(path: Path, payload: Any) -> None:
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
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
