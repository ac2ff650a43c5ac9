"""`embshard sweep CONFIG --methods ... --budgets ... --seeds N`: which method at which budget on
this dataset, as a Ray Tune sweep (cluster/sweep_run.py), reported as one JSON, one frontier PNG
and one Markdown table (cluster/sweep_report.py).

The flags default to the config's `sweep:` section (`SweepConfig`), so a config that is a paper's
setting (configs/papers/) is also that paper's sweep: its methods, budgets, seeds and varied knobs;
a flag given on the command line overrides its key."""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embshard.arg_types import written_path
from embshard.cluster.cli_args import config_arguments, verbose_argument
from embshard.stops import stops_held

SETTINGS_FILE = "settings.md"  # a sweep of several settings: their reports side by side

if TYPE_CHECKING:
    from embshard.cluster.sweep_plan import SweepSpec
    from embshard.config import JobConfig
    from embshard.datasets.schema import DatasetSpec
    from embshard.datasets.storage import StoragePath


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "sweep", help="compare methods x budgets x seeds on a dataset (Ray Tune); frontier, table, claim",
        description="Train every method at every budget (a fraction of the serving parameters of the "
                    "uniform model at embeddings.dim) for every seed, as Ray Tune trials running side by "
                    "side, each its own Ray Train worker group; report the arch's test metric (AUC; "
                    "MSE for mf, lower is better) against serving bytes.")
    config_arguments(p, set_example="train.epochs=1", workers=True)
    p.add_argument("--methods",
                   help="comma-separated: uniform, mde, mlet, pep, autodim, mde+mlet, pep+mlet, autodim+mlet, "
                        "or a SweepMethod of yours as package.module:attr (+mlet too) (default: the config's "
                        "sweep.methods, else uniform,mde)")
    p.add_argument("--budgets",
                   help="fractions of the base model's serving parameters, in (0, 1] (default: the config's "
                        "sweep.budgets, else 0.125,0.25,0.5,1)")
    p.add_argument("--seeds", help="seeds per config: 0..N-1 (default: the config's sweep.seeds, else 3)")
    p.add_argument("--vary", action="append", metavar="KEY=V1,V2",
                   help="a config key at several values (repeatable: every combination; default: the config's "
                        "sweep.vary). A method's knob (embeddings.mde.alpha=0.3,1.0): the methods that read it run "
                        "once per value, each value a curve of its own. A setting (train.epochs=6,12): every method "
                        "runs once per value, each value a report of its own in a folder named after it")
    p.add_argument("--first-seed", type=int, default=0, metavar="K",
                   help="run seeds K..K+N-1 instead (a later seed on its own, to merge with `sweep-merge`)")
    p.add_argument("--out", type=written_path,
                   help="the sweep's folder, or a URI such as s3://bucket/sweep (default: <output_dir>/sweep)")
    p.add_argument("--resume", action="store_true",
                   help="continue the sweep in --out after an interruption (finished trials are kept)")
    p.add_argument("--parallel", type=int, metavar="N",
                   help="trials at once (default: as many as the local CPUs hold worker groups)")
    verbose_argument(p)
    p.set_defaults(func=sweep)

    m = commands.add_parser(
        "sweep-merge", help="one report (table, frontier, claim) of several sweeps on one dataset",
        description="Merge the points of sweeps run apart on one dataset (say, a method swept after the "
                    "others) into one report, its claim made over all of them; a method swept at other knobs "
                    "(MLET at another k) is a curve of its own. Refused: sweeps of other data or of job configs "
                    "that differ beyond outputs, logging, failure handling and the methods' knobs, and the same "
                    "curve, budget and seed in two sweeps (unless --replace).")
    m.add_argument("reports", nargs="+", metavar="SWEEP",
                   help="a sweep's folder (its --out, local or a URI such as s3://bucket/sweep) or its "
                        "sweep-<dataset>.json")
    m.add_argument("--out", type=written_path, required=True,
                   help="the folder (or URI) for the merged sweep-<dataset>.json, .md and .png")
    m.add_argument("--overwrite", action="store_true", help="replace the report files of an earlier merge in --out")
    m.add_argument("--assume-same-config", action="store_true",
                   help="merge reports that record no job config (sweeps from before they recorded it) unchecked")
    m.add_argument("--assume-same-data", action="store_true",
                   help="merge reports whose dataset hashes differ, unchecked: one dataset generated on two "
                        "machines by a version that hashed its numbers to the last digit")
    m.add_argument("--replace", action="store_true",
                   help="a later SWEEP's points of a curve (method at its knobs) at a budget replace the earlier "
                        "SWEEPs' points of that curve at that budget, every seed (a method measured again after a "
                        "fix); the report names what was replaced")
    m.set_defaults(func=sweep_merge)


def sweep(args: argparse.Namespace) -> int:
    # Imported here so that `embshard --help` does not load torch and Ray.
    from dataclasses import replace

    from embshard.cluster.sweep_plan import SweepSpec, check_vary, parse_budgets, parse_methods, parse_vary
    from embshard.config import load_job_config
    from embshard.datasets.schema import DatasetSpec
    from embshard.datasets.verify import verify_dataset
    from embshard.errors import ConfigError, Interrupted

    cfg = load_job_config(args.config, args.overrides)
    if args.workers is not None:
        cfg = replace(cfg, cluster=replace(cfg.cluster, workers=args.workers))
    if args.seeds is not None and (not args.seeds.isdecimal() or int(args.seeds) < 1):
        raise ConfigError(f"--seeds: expected a whole number >= 1, got {args.seeds!r}")
    if args.first_seed < 0:
        raise ConfigError(f"--first-seed: must be >= 0, got {args.first_seed}")
    if args.parallel is not None and args.parallel < 1:
        raise ConfigError(f"--parallel: must be >= 1, got {args.parallel}")
    methods = parse_methods(args.methods) if args.methods is not None else cfg.sweep.methods
    vary = parse_vary(args.vary) if args.vary else cfg.sweep.vary
    check_vary(cfg, vary, methods, "--vary" if args.vary else "sweep.vary")
    spec = SweepSpec(methods, parse_budgets(args.budgets) if args.budgets is not None else cfg.sweep.budgets,
                     int(args.seeds) if args.seeds is not None else cfg.sweep.seeds, args.first_seed, vary)
    data = DatasetSpec.load(cfg.data.path)
    verify_dataset(cfg.data.path)  # once here, not as a failure of every trial once Ray is up
    check_trials(cfg, spec, data)

    from embshard.cluster.sweep_plan import setting_label, with_knobs
    from embshard.cluster.sweep_report import (
        LONGEST_NAME,
        PlantedTruth,
        by_setting,
        dataset_sha256,
        report,
        settings_markdown,
        with_variants,
    )
    from embshard.cluster.sweep_run import run_sweep
    from embshard.config import AutodimConfig
    from embshard.datasets.storage import location
    from embshard.typed_config import to_dict

    name = location(cfg.data.path).resolve().name
    if len(name.encode()) > LONGEST_NAME:  # it was "File name too long" once every trial had trained
        raise ConfigError(f"data.path {cfg.data.path}: a folder name of {len(name.encode())} bytes, which names the "
                          f"sweep's report files; they take one of at most {LONGEST_NAME}: rename the folder")
    out = location(args.out or Path(cfg.output_dir) / "sweep")
    sha = dataset_sha256(to_dict(data))
    try:
        points = run_sweep(cfg, spec, out, args.resume, args.parallel, sha, data.id)
    except KeyboardInterrupt:
        # SIGTERM (Tune handles Ctrl-C itself, and says as much): what Ctrl-C says, the way on included.
        raise Interrupted(f"the sweep was stopped; its finished trials are kept in {out}: run the same command "
                          "with --resume to continue") from None
    truth = PlantedTruth.of_dataset(data.planted) if data.planted else None
    published: list[tuple[str, dict[str, Any]]] = []
    for setting, of_setting in by_setting(points, spec.settings()):
        job = with_knobs(cfg, setting)
        # A knob the sweep varied makes its method's points several curves, as a merge of sweeps would.
        of_setting = with_variants(of_setting)
        rep = report(of_setting, truth, (job.autodim or AutodimConfig()).candidates)
        at = ", at the best validation" if job.train.report_at == "best_valid" else ""
        # The job config goes with the points, so that `sweep-merge` can check sweeps trained alike:
        # a setting's report records the config with that setting, as a sweep with its --set would.
        record = {"dataset": name, "dataset_sha256": sha,
                  "sweep": spec.to_json() | ({"setting": dict(setting)} if setting else {}),
                  "config": to_dict(job), "points": of_setting, **rep}
        label = setting_label(setting)
        publish(record, f"{job.train.epochs} epoch(s){at}, {spec.seeds} seed(s)" + (f", {label}" if label else ""),
                out / label if label else out, f"{label}: " if label else "")
        published.append((label, record))
    if spec.settings() != [()]:
        title = f"{name}: one report per setting ({spec.seeds} seed(s))"
        [path] = write_files(out, {SETTINGS_FILE: lambda p: p.write_text(settings_markdown(title, published))},
                             marker=SETTINGS_FILE)
        print(f"settings side by side: {path}")
    return 0


def sweep_merge(args: argparse.Namespace) -> int:
    from embshard.cluster.run_lock import folder_lock
    from embshard.cluster.sweep_report import REPORT_SUFFIXES, check_report, merge_reports, report_file
    from embshard.datasets.outdir import check_not_in_sealed
    from embshard.datasets.storage import RemotePath, location, read_json
    from embshard.errors import DataError, EnvironmentProblem

    out = location(args.out)
    if isinstance(out, RemotePath):  # a bucket that is not there is one line before any work
        out.check_bucket()
    sources: dict[str, StoragePath] = {}
    given: dict[str, str] = {}  # report -> the argument that named it
    for arg in args.reports:
        path = sweep_json(arg)
        same = [name for name, p in sources.items() if p.resolve() == path.resolve()]
        if same:
            raise DataError(f"{given[same[0]]} and {arg}: the same report ({path}); give each sweep once")
        sources[str(path)], given[str(path)] = path, arg
    reports: dict[str, dict[str, Any]] = {}
    for name, path in sources.items():
        try:
            # Duplicate keys (one value read, another edited in) and nesting deeper than the
            # parser follows are refused there: the first merged the value JSON readers differ on.
            reports[name] = read_json(path, DataError)
        except OSError as e:
            raise DataError(f"{path}: not a sweep report ({e})") from e
        check_report(reports[name], str(path))
    if any(out.resolve() == path.parent.resolve() for path in sources.values()):
        raise DataError(f"--out {out}: holds one of the reports merged; merge into another folder")
    check_not_in_sealed(out, "--out", DataError, itself=True)
    rep = merge_reports(reports, args.assume_same_config, args.replace, args.assume_same_data)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: a file, not a folder; name a folder for the merged report")
    try:
        # A link to a folder not made yet: made, as `embshard sweep --out` makes it (it resolves its
        # --out); the link itself was "File exists".
        out.resolve().mkdir(parents=True, exist_ok=True)
    except OSError as e:  # /proc/x: a FileNotFoundError traceback
        raise EnvironmentProblem(f"--out {out}: cannot be made ({e.strerror or e})") from None
    # Two merges into one folder wrote the same staged files and renamed each other's: a report's
    # .json of one merge beside the .md of the other, and a traceback. A bucket takes no lock.
    with folder_lock(out.resolve()) if isinstance(out, Path) else contextlib.nullcontext():
        earlier = _earlier_merge(out, args.overwrite) if any(_entries(out)) else []
        publish(rep, f"{len(reports)} sweeps merged", out)
        written = {report_file(rep["dataset"], suffix) for suffix in REPORT_SUFFIXES}
        for stale in earlier:  # the earlier merge's files this one did not rewrite (another dataset's name)
            if stale.name not in written:
                stale.unlink()
    return 0


def _entries(out: StoragePath) -> list[StoragePath]:
    """What `out` holds besides a merge's lock on it."""
    from embshard.cluster.run_lock import LOCK_FILE

    return [entry for entry in out.iterdir() if entry.name != LOCK_FILE]


def _earlier_merge(out: StoragePath, overwrite: bool) -> list[StoragePath]:
    """The report files of an earlier merge in `out`, which --overwrite replaces; a sweep's own
    report (which later merges read as that sweep's points) or anything else is never replaced."""
    from embshard.cluster.sweep_plan import SPEC_FILE
    from embshard.datasets.storage import read_json
    from embshard.errors import DataError

    if not overwrite:
        raise DataError(f"--out {out}: not empty; pass --overwrite to replace the report of an earlier merge")
    entries: list[StoragePath] = sorted(_entries(out), key=str)
    files = []
    for entry in entries:
        name = entry.name
        if name.startswith(".sweep-") and ".partial" in name:
            continue  # an interrupted write of ours (write_files)
        if name == SPEC_FILE or not (name.startswith("sweep-") and name.rsplit(".", 1)[-1] in ("json", "md", "png")):
            raise DataError(f"--out {out}: holds {name}, which no merge writes; refusing to replace it, "
                            f"even with --overwrite")
        if name.endswith(".json"):
            report = read_json(entry, DataError)
            if not isinstance(report, dict) or "merged_from" not in report:
                raise DataError(f"--out {out}: {name} is a sweep's own report, not a merge's; refusing to "
                                f"replace it, even with --overwrite")
        files.append(entry)
    # A table or figure is a merge's only beside its report: a user's sweep-notes.md went with it.
    reports = {f.name.removesuffix(".json") for f in files if f.name.endswith(".json")}
    for f in files:
        if f.name.rsplit(".", 1)[0] not in reports:
            raise DataError(f"--out {out}: holds {f.name}, which is no merge's (no {f.name.rsplit('.', 1)[0]}.json "
                            "beside it); refusing to replace it, even with --overwrite")
    return files


def publish(rep: dict[str, Any], detail: str, out: StoragePath, prefix: str = "") -> int:
    """A report's files in `out`, titled by its dataset, metric and `detail`; its claim and the
    files' places on the console, each line after `prefix` (the setting of one of several reports)."""
    from embshard.cluster.sweep_report import report_label

    name = rep["dataset"]
    paths = write_report(rep, f"{name}: test {report_label(rep)} vs serving bytes ({detail})", out, name)
    print(f"{prefix}claim: {rep['claim']['statement']}")
    print(f"{prefix}report: " + ", ".join(str(p) for p in paths))
    return 0


def sweep_json(arg: str) -> StoragePath:
    """A sweep's report: the file named, or the one sweep-*.json in the folder named."""
    from embshard.cluster.sweep_plan import SPEC_FILE, is_setting
    from embshard.datasets.storage import location, read_json
    from embshard.errors import DataError

    path = location(arg)
    if path.is_file():
        return path
    if not path.is_dir():
        raise DataError(f"{arg}: no such sweep folder or report")
    found: list[StoragePath] = list(path.glob("sweep-*.json"))
    reports = sorted((p for p in found if p.name != SPEC_FILE), key=str)
    spec = path / SPEC_FILE
    record = read_json(spec, DataError) if not reports and spec.is_file() else None
    if isinstance(record, dict) and "points" in record:
        # The report of a sweep of a dataset named `spec`, written over its spec before reports
        # of that name were renamed (report_file): the one copy of its points.
        return spec
    if record is not None and any(map(is_setting, _varied(record, spec))):
        settings = sorted(d.name for d in path.iterdir() if d.is_dir() and any(d.glob("sweep-*.json")))
        raise DataError(f"{arg}: a sweep of several settings has a report per setting, in its folders "
                        f"{', '.join(settings) or 'of each setting (none yet: it has not finished)'}; name one of them")
    if len(reports) != 1:
        raise DataError(f"{arg}: expected one sweep-<dataset>.json in the folder, found "
                        f"{', '.join(p.name for p in reports) or 'none'} (a sweep that has not finished has none)")
    return reports[0]


def _varied(record: Any, spec: StoragePath) -> dict[str, Any]:
    """The `vary` of a sweep's spec file `spec`, which holds `record`; DataError for a damaged one
    (it was a traceback)."""
    from embshard.errors import DataError

    vary = record.get("vary", {}) if isinstance(record, dict) else None
    if not isinstance(vary, dict):
        raise DataError(f"{spec}: not a sweep spec (expected an object with a mapping `vary`)")
    return vary


def check_trials(cfg: JobConfig, spec: SweepSpec, data: DatasetSpec) -> None:
    """Every trial's first run built and checked against its method and arch (`planning_step`:
    what `embshard train` checks before it plans) before Ray starts: a bad combination, or an arch
    option a varied setting gives an arch without it, is one line, not a failed trial."""
    from embshard.cluster.sweep_methods import TrialRuns
    from embshard.cluster.sweep_plan import with_knobs
    from embshard.trainer.planning import planning_step

    scratch = Path(cfg.output_dir) / "sweep-check"
    checked: set[tuple[str, str]] = set()
    for trial in spec.trials():
        run, method = TrialRuns(with_knobs(cfg, trial.knobs), data, trial, spec.budgets, scratch).first_run()
        # What planning_step checks (the method's sections, the arch's options and labels) is the
        # same at every budget and seed: once per method and --vary values.
        combination = (trial.method, json.dumps(trial.knobs))
        if combination not in checked:
            planning_step(run, method)
            checked.add(combination)


def write_report(rep: dict[str, Any], title: str, out: StoragePath, name: str) -> list[StoragePath]:
    """sweep-<dataset>.json, .md and .png in `out` (`report_file`), the JSON last (`write_files`)."""
    from embshard.cluster.sweep_report import markdown, plot, report_file

    json_file = report_file(name, "json")
    return write_files(out, {json_file: lambda p: p.write_text(json.dumps(rep, indent=1) + "\n"),
                             report_file(name, "md"): lambda p: p.write_text(markdown(rep, title)),
                             report_file(name, "png"): lambda p: plot(rep, title, p)}, marker=json_file)


def write_files(out: StoragePath, files: dict[str, Callable[[Path], Any]], marker: str) -> list[StoragePath]:
    """Each file of `files` (name -> what writes it to a path) in `out`, written whole then renamed
    into place, `marker` last (a reader that finds it finds the others); into a URI they are
    written to a local folder and uploaded. -> their paths, in the order of `files`."""
    from embshard.cluster.sweep_report import staged_file
    from embshard.datasets.storage import RemotePath, upload

    if isinstance(out, RemotePath):
        with tempfile.TemporaryDirectory(prefix="embshard-sweep-report-") as staging:
            write_files(Path(staging), files, marker)
            upload(Path(staging), out, marker=marker)
        return [out / name for name in files]
    out.mkdir(parents=True, exist_ok=True)  # a setting's folder in a sweep of several
    order = sorted(files, key=lambda n: n == marker)
    staged = {name: out / staged_file(name) for name in order}
    try:
        for name in order:
            files[name](staged[name])
        # Every file written before any is renamed, and the renames not stopped halfway: a stop
        # during `sweep-merge --overwrite` left the new .md beside the old .json.
        with stops_held():
            for name in order:
                staged[name].replace(out / name)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    return [out / name for name in files]
