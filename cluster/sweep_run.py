"""`embshard sweep` on Ray Tune: one function trial per method, budget and seed (`sweep_trial`), each
launching its own TorchTrainer worker group (Ray Train v2's documented Tune pattern), run side
by side; Ray's experiment folder is `<out>/tune`, and `Tuner.restore` resumes it after a kill
(finished trials keep their results, unfinished ones start again and resume their runs from
their checkpoints).

`out` may be a URI (`s3://bucket/prefix`): Tune keeps its experiment there (its storage goes
through pyarrow.fs like ours) and the spec file sits beside it, but the runs and the log need a
local folder (a run's output_dir is local), `work_folder(cfg, out)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any

from ray import cloudpickle, tune

from embshard.cluster import console
from embshard.cluster.launch import init_ray, worker_error
from embshard.cluster.run_lock import LOCK_FILE, folder_lock
from embshard.cluster.sweep_plan import SPEC_FILE, UNCOMPARED, SweepSpec, Trial, config_difference
from embshard.cluster.sweep_report import metric_label
from embshard.cluster.sweep_trial import run_trial
from embshard.config import JobConfig, current_schema, with_paths_resolved
from embshard.datasets.outdir import check_not_in_sealed
from embshard.datasets.storage import RemotePath, StoragePath, check_writable, read_json, write_whole
from embshard.errors import ConfigError, EmbshardError, Interrupted, first_line
from embshard.typed_config import to_dict
from embshard.units import duration_text

EXPERIMENT = "tune"  # Ray Tune's experiment folder inside the sweep's folder
TRIAL_CPU = 0.01
# Tune saves its experiment state at most this often (seconds): a kill loses at most this much
# of "which trials finished". Its default (10 s and up) would rerun trials that had finished.
STATE_EVERY_S = "1"


def run_sweep(cfg: JobConfig, spec: SweepSpec, out: StoragePath, resume: bool,
              parallel: int | None, data_sha: str, data_id: str | None = None) -> list[dict[str, Any]]:
    """Run (or resume) the sweep in `out` (a folder or a URI) on the data `data_sha` identifies
    (data.path's `dataset_sha256`; `data_id`: the `id` of its writing); -> every trial's points."""
    out = out.resolve()
    work = work_folder(cfg, out)
    # One driver per sweep: a second `--resume` beside the first wrote Tune a state with every trial
    # failed (refused by a trial's run lock), and the next resume trained the finished ones again.
    with folder_lock(work):
        restore = _claim_folder(out, work, spec, cfg, resume, data_sha, data_id)
        return _run(cfg, spec, out, work, restore, parallel)


def _run(cfg: JobConfig, spec: SweepSpec, out: StoragePath, work: Path, restore: bool,
         parallel: int | None) -> list[dict[str, Any]]:
    per_trial = cfg.cluster.workers * cfg.cluster.cpus_per_worker
    parallel = parallel or max(1, int((os.cpu_count() or 1) // per_trial))
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", STATE_EVERY_S)
    total = len(spec.trials())
    with console.run_log(work) as log:
        # Said first: Ray starts for seconds, and a trial takes minutes before its line.
        print(f"{'resuming the sweep' if restore else 'sweep'} of {total} trials"
              f"{'' if restore else f', {parallel} at a time'}: a line as each finishes (log: {log})",
              file=sys.stderr, flush=True)
        init_ray(cfg, cpus=parallel * (per_trial + TRIAL_CPU) + 1, jobs=parallel)
        console.route_worker_output()
        # The trial only waits on its TorchTrainer, whose workers hold the CPUs (Tune refuses 0).
        trainable = tune.with_resources(run_trial, {"cpu": TRIAL_CPU})
        experiment = out / EXPERIMENT
        if restore:
            try:
                tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True,
                                           resume_errored=True)
            except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, AttributeError) as e:
                # Tune's files cannot be read back (a store that cannot be reached is another
                # matter: resumable, said as such by the caller).
                raise ConfigError(f"--resume: {experiment}: Ray Tune cannot restore the sweep's state "
                                  f"({first_line(e)}); start the sweep afresh with another --out") from None
        else:
            job = to_dict(with_paths_resolved(cfg))  # a Tune trial runs in a folder of its own
            trials = [t.to_json() for t in spec.trials()]
            tuner = tune.Tuner(
                trainable,
                param_space={"trial": tune.grid_search(trials), "job": job, "out": str(work),
                             "budgets": spec.budgets},
                tune_config=tune.TuneConfig(max_concurrent_trials=parallel),
                run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(out), verbose=0,
                                          callbacks=[_TrialLine(total)]),
            )
        # Tune prints its experiment banner and paths on stdout whatever its verbosity: into the
        # log with the rest of Ray's output; the console keeps one line per finished trial.
        with log.open("a", encoding="utf-8") as sink, contextlib.redirect_stdout(sink):
            results = tuner.fit()
    # ResultGrid is indexed, not iterable
    return trial_points([results[i] for i in range(len(results))], out, total)


def trial_points(results: list[tune.Result], out: StoragePath, trials: int) -> list[dict[str, Any]]:
    """Every trial's points; a failed trial's error, or, where Tune stopped before every one of
    the sweep's `trials` reported (Ctrl-C), how to continue: the finished trials are in Tune's
    state in `out`. Tune's results hold only the trials it had started."""
    failed = [(r, r.error) for r in results if r.error is not None]
    if failed:
        first, error = failed[0]
        found = worker_error(error)
        if isinstance(found.error, EmbshardError):
            # Which trial, and what --resume does: the line said neither.
            trial = Trial.from_json(first.config["trial"]).key if first.config else first.path
            found.error.args = (f"trial {trial}: {found.error} ({len(failed)} trial(s) failed; --resume retries them "
                                "once it is mended)",)
            raise found.error from None
        raise console.Crashed(f"{len(failed)} trial(s) failed, first in {first.path}: {found.summary()}; "
                              f"run again with --resume to retry them")
    finished = [r for r in results if "points" in (r.metrics or {})]
    if len(finished) < trials:
        raise Interrupted(f"the sweep stopped with {trials - len(finished)} of {trials} trials unfinished; "
                          f"the finished ones are kept in {out}: run the same command with --resume to continue")
    return [p for r in finished for p in json.loads((r.metrics or {})["points"])]


def work_folder(cfg: JobConfig, out: StoragePath) -> Path:
    """Where the runs and the log go: the sweep's folder itself, or for a URI a local folder
    named after it under output_dir (one per URI, so no sweep resumes another's runs)."""
    if isinstance(out, RemotePath):
        return Path(cfg.output_dir).resolve() / "sweeps" / out.uri.replace("://", "/", 1)
    return out


# What a sweep's spec file records besides the spec: the job config, the data's hash and where it
# was started.
RECORDED: dict[str, type] = {"config": dict, "dataset_sha256": str, "dataset_id": str, "data": str, "out": str,
                              "record_sha256": str}
# Sections every job config a sweep has recorded holds (to_dict writes each field): one without
# them was edited, and the defaults filled in read as what the sweep was started with. Sections
# added since take their defaults.
CONFIG_KEYS = ("data", "model", "embeddings", "train", "cluster")


def _claim_folder(out: StoragePath, work: Path, spec: SweepSpec, cfg: JobConfig, resume: bool,
                  data_sha: str, data_id: str | None = None) -> bool:
    """A fresh sweep takes an empty (or new) folder and records its spec, job config and data
    (`data_sha`: `dataset_sha256` of data.path's) there; --resume needs this same sweep's folder,
    spec, config and data: Tune restores the trials as they were started, and the report would
    name this command's config and data as what they trained (a resume on data.path written
    again filed the finished trials' points under the new data's hash). -> whether Tune has a
    state to restore (a sweep stopped before Tune started has none: it starts afresh)."""
    check_writable(out, "--out")  # a missing bucket or refused credentials: one line before Ray starts
    check_not_in_sealed(out, "--out", ConfigError, itself=True)
    saved = out / SPEC_FILE
    if resume:
        if not saved.is_file():
            raise ConfigError(f"--resume: {out} holds no sweep to resume (no {SPEC_FILE}); start the sweep afresh "
                              "with another --out")
        try:
            record = read_json(saved, ConfigError)  # an integer of 5,000 digits, nesting: one line each
        except ConfigError as e:
            raise ConfigError(f"--resume: {e}; start the sweep afresh with another --out") from None
        # The keys every spec has: --first-seed or --vary on a sweep started without them is another
        # sweep (said below), not a damaged spec file.
        required = ("methods", "budgets", "seeds")
        if not isinstance(record, dict) or not set(required) <= set(record) or not all(
                isinstance(record.get(key, kind()), kind) for key, kind in RECORDED.items()):
            raise ConfigError(f"--resume: {saved}: not a sweep spec (expected an object with "
                              f"{', '.join(required)}); start the sweep afresh with another --out")
        try:
            # Read as a job config: one edited (`train: 5`, `{}`) was said as this command's
            # difference ("was started with train = 5, this command has '(unset)'").
            started_with = _recorded_config(record["config"]) if "config" in record else None
        except ConfigError as e:
            raise ConfigError(f"--resume: {saved}: not a sweep spec ({e}); start the sweep afresh with "
                              "another --out") from None
        if record.get("record_sha256", _record_sha256(record)) != _record_sha256(record):  # older sweeps: unchecked
            # Tune restores the trials, their job and data as they were started, whatever the file
            # says: a method added by hand (and to the command) finished the recorded trials, fell
            # short of the spec's count, and said "--resume to continue" at every resume.
            raise ConfigError(f"--resume: {saved}: changed since the sweep started (Ray Tune resumes the trials as "
                              "they were started); put it back as it was, or start the sweep afresh with another --out")
        if record.get("out", _where(out)) != _where(out):  # a folder from before it was recorded: unchecked
            # Tune restores each trial with the folder it was started with: a moved or copied sweep
            # trained its trials in the original, and could report another sweep's run there.
            raise ConfigError(f"--resume: {out} is a sweep started at {record['out']} (moved or copied since); its "
                              f"trials would write there: resume it at {record['out']}, or start afresh")
        started = {k: v for k, v in record.items() if k not in RECORDED}
        # As JSON text: 0 and 0.0 are equal values but two settings' folders.
        if json.dumps(started) != json.dumps(spec.to_json()):
            raise ConfigError(f"--resume: {out} is the sweep {json.dumps(started)}; resume it with those "
                              f"--methods, --budgets, --seeds, --first-seed and --vary")
        differs = config_difference(started_with, to_dict(cfg), UNCOMPARED) if started_with is not None else None
        if differs:  # a sweep folder from before the config was recorded resumes unchecked
            key, then, now = differs
            raise ConfigError(f"--resume: {out} was started with {key} = {then!r}, this command has {now!r}; "
                              "resume it with the config and --set it was started with")
        data = _data_path(cfg)
        if record.get("data", data) != data:  # a sweep from before it was recorded: unchecked
            # Tune restores each trial with the job it was started with: its trials trained on the
            # recorded data whatever this command names, and the report filed them under this one's.
            raise ConfigError(f"--resume: {out} was started on data.path {record['data']}, which its trials train on "
                              f"whatever this command names; resume it with data.path {record['data']}")
        if record.get("dataset_sha256", data_sha) != data_sha:  # a sweep from before it was recorded: unchecked
            raise ConfigError(f"--resume: {out} was started on other data than data.path {cfg.data.path} holds now "
                              f"(dataset hash {record['dataset_sha256'][:12]}, now {data_sha[:12]}): its points "
                              "would be filed as results on this data; resume it on the data it was started on")
        if data_id is not None and record.get("dataset_id", data_id) != data_id:
            # The same content written again: its trials' checkpoints hold ids of the earlier
            # writing, and each refused it only once trained again, at every resume.
            raise ConfigError(f"--resume: {out} was started on data.path {cfg.data.path} as written before (dataset "
                              f"id {record['dataset_id'][:8]}, now {data_id[:8]}): its trials' checkpoints are of "
                              "that writing; start the sweep afresh with another --out")
        experiment = out / EXPERIMENT
        state = experiment.exists() and any(experiment.glob("experiment_state-*.json"))
        # can_restore looks for the tuner.pkl Tune writes first: stopped before the experiment
        # state followed, Tune restored one trial with no config, which failed ("KeyError:
        # 'trial'") at every resume after.
        if not (state and tune.Tuner.can_restore(str(experiment))):
            if (work / "runs").exists() or state:
                # Trials ran (Tune syncs its state to a bucket only now and then): not ours to redo.
                raise ConfigError(f"--resume: {out} holds no sweep to resume (no Ray Tune experiment state in "
                                  f"{experiment}); start the sweep afresh with another --out")
            # Stopped while Ray or Tune started: no trial ran. It was refused as "no sweep to
            # resume", and without --resume as "not empty": a folder for good.
            print(f"note: {out} holds no trial yet (stopped before Ray Tune started); starting it afresh",
                  file=sys.stderr)
            return False
        _check_tune_state(out / EXPERIMENT)
        return True
    if out.exists() and _holds_anything(out):
        raise ConfigError(f"--out {out}: not empty; resume the sweep there with --resume, or choose another folder")
    if work != out and work.exists() and _holds_anything(work):
        # Its runs' checkpoints would be resumed as this sweep's: a local leftover of an earlier
        # sweep to the same URI, which the user may still want.
        raise ConfigError(f"--out {out}: its local run folder {work} holds an earlier sweep's runs; "
                          f"resume with --resume, or move that folder away")
    out.mkdir(parents=True, exist_ok=True)
    recorded = {"config": to_dict(cfg), "dataset_sha256": data_sha, "data": _data_path(cfg), "out": _where(out)}
    record = spec.to_json() | recorded | ({"dataset_id": data_id} if data_id else {})
    text = json.dumps(record | {"record_sha256": _record_sha256(record)}) + "\n"
    # Whole or not at all: cut short, the folder held a spec that --resume refused and a new sweep
    # found "not empty".
    write_whole(saved, text)
    return False


def _record_sha256(record: dict[str, Any]) -> str:
    """The digest of a spec file's record, its own digest left out: of the values, not the text,
    so a file read back and written again whole (another indent) is the same record."""
    content = {k: v for k, v in record.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _recorded_config(config: dict[str, Any]) -> dict[str, Any]:
    """A sweep spec's job config as today's schema reads it (`current_schema`), to compare with
    this command's; ConfigError where it is no job config at all."""
    for key in CONFIG_KEYS:
        if not isinstance(config.get(key), dict):
            raise ConfigError(f"config.{key}: " + ("missing" if key not in config else
                                                   f"expected a mapping, got {type(config[key]).__name__}"))
    return current_schema(config)


def _data_path(cfg: JobConfig) -> str:
    """data.path as the trials read it: a relative path from where the sweep was started."""
    return with_paths_resolved(cfg).data.path


def _check_tune_state(experiment: StoragePath) -> None:
    """ConfigError unless the state files Tune restores from read back whole. Its experiment state
    damaged, Tune started over with no trials and failed the same way at every resume; its
    variant generator's (a pickle), cut short by a full disk, restored every trial with no config,
    and each resume failed them all again ("KeyError: 'trial'")."""
    def damaged(state: StoragePath, why: str) -> ConfigError:
        return ConfigError(f"--resume: {state}: Ray Tune's state of the sweep is damaged ({why}); start "
                           "the sweep afresh with another --out")

    for state in experiment.glob("experiment_state-*.json"):
        try:
            read_json(state, ConfigError)
        except ConfigError as e:
            raise damaged(state, str(e).removeprefix(f"{state}: ")) from None
    # Tune reads the newest only, as it was saved: its own pickle, in the sweep's own folder.
    variants: list[StoragePath] = sorted(experiment.glob("basic-variant-state-*.json"), key=lambda p: p.name)
    if variants:
        try:
            state = cloudpickle.loads(variants[-1].read_bytes())
            if not isinstance(state, dict):
                raise ValueError(f"a {type(state).__name__}, not Tune's state")
        except Exception as e:  # whatever a cut-short pickle raises
            raise damaged(variants[-1], first_line(e)) from None


def _holds_anything(folder: StoragePath) -> bool:
    return any(entry.name != LOCK_FILE for entry in folder.iterdir())  # this sweep's own lock aside


def _where(out: StoragePath) -> str:
    """The folder as one name whichever path reached it (a link, a relative --out)."""
    return str(out.resolve()) if isinstance(out, Path) else str(out)


class _TrialLine(tune.Callback):
    """One console line per finished trial, counted among the sweep's `total` (Tune's own tables
    are off: verbose=0)."""

    # Class defaults: Tune restores a sweep's callbacks from its own pickle, and one pickled before
    # these were kept has neither.
    total: int | None = None
    finished: frozenset[str] = frozenset()  # trials this callback saw finish (Tune marks them later)

    def __init__(self, total: int) -> None:
        self.total = total

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        points = json.loads(result.get("points", "[]"))
        shown = ", ".join(f"budget {p['budget']:g}: "
                          + (f"{metric_label(p['metric'])} {p['value']:.4f}" if "value" in p else p["error"])
                          for p in points)
        of = Trial.from_json(trial.config["trial"])
        # Those a resume restored as finished are Tune's TERMINATED ones.
        self.finished = self.finished | {trial.trial_id} | {t.trial_id for t in trials if t.status == "TERMINATED"}
        count = f"[{len(self.finished)}{f'/{self.total}' if self.total else ''}]"
        took = f" ({duration_text(result['time_total_s'])})" if "time_total_s" in result else ""
        print(f"{count} trial {of.label} seed {of.seed}: {shown}{took}", file=sys.stderr, flush=True)
