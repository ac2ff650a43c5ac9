"""The names that make a folder one that holds what its writer put there alone: a checkpoint's
step (checked file by file against its manifest), an export, and a run's plan folder (which each
of its checkpoints copies). Torch-free, so that every command's output check
(`datasets/outdir.py`) knows them without loading the trainer."""

from __future__ import annotations

import re

CHECKPOINT_MANIFEST = "manifest.json"
CHECKPOINT_KEYS = ("files",)  # what every checkpoint manifest holds
SERVING_MANIFEST = "serving.json"
SERVING_KEYS = ("version", "weights", "plan")  # what every export's serving.json holds
STEP_FOLDER = re.compile(r"^step-(\d{6,})$")
STEP_FOLDER_BEING_WRITTEN = re.compile(r"^step-(\d{6,})\.tmp$")
RUN_MARKER = ".embshard-run"  # in a folder a run took as its output_dir (cluster/run_lock.py)
RUN_PLAN_DIR = "plan"  # a run's plan folder, in its output_dir


def is_step_name(name: str) -> bool:
    """The name of a step's folder in a checkpoint directory, complete or being written."""
    return bool(STEP_FOLDER.match(name) or STEP_FOLDER_BEING_WRITTEN.match(name))

