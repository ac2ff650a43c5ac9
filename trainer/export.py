"""The serving export: a compact single-process model from a live sharded model or a checkpoint.

Serving keeps only what inference reads: MLET blocks collapsed to W = W1 . W2 (n x d), MDE
blocks and their projections, the dense arches, and the id remaps of reordered tables. One
folder holds it:

    serving.json        manifest: tables (block, rows, dim, trained width), the model config
                        (arch, options, arches), the dataset spec the arch builds from, and the
                        files below
    plan.json           the DimensionPlan with MLET removed (every block at its serving width)
    weights.pt          the arch model's state dict, plain tensors (`torch.load(weights_only=True)`)
    <table>.<digest>.remap.npy  id -> ranked row, for tables whose rows are reordered (MDE, PEP)
    vocab/<feature>.parquet  the dataset's raw value of each id, for features a converter wrote
                        (none for synth's ids or a dataset converted before they were kept)

Loading it back (no process group, no TorchRec sharding, CPU):

    from embshard.trainer.export import load_serving
    model = load_serving("outputs/run/serving")       # a ServingModel, in eval mode
    logits = model(dense, sparse)                     # sparse: KeyedJaggedTensor of the dataset's ids
    sparse = model.sparse_batch({"userId": [1, 42], "movieId": [2858, 1]})  # raw values -> ids

The arch (`model.arch`, a built-in or a user's package.module:attr) must be importable where the
export is loaded: the model is rebuilt by it over the collapsed plan.

`ServingModel` applies the remaps itself, so it takes the ids as they appear in the data.
"""

from __future__ import annotations

import json
import pickle
import tempfile
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint import CheckpointException
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from embshard.config import ModelConfig
from embshard.datasets.outdir import Replaceable, check_output, drop_staging, make_staging, publish, writing
from embshard.datasets.schema import (
    OOV_ID,
    VOCAB_DIR,
    DatasetSpec,
    SparseFeature,
    vocabulary_file,
)
from embshard.datasets.storage import (
    RemotePath,
    StoragePath,
    copy_file,
    copytree,
    location,
    moved_aside,
    read_json_object,
    read_json_version,
)
from embshard.datasets.vocabulary import Vocabulary, raw_values
from embshard.errors import (
    ConfigError,
    DataError,
    EmbshardError,
    EnvironmentProblem,
    PlanError,
    StorageError,
    disk_full,
    first_line,
)
from embshard.planner.pipeline import check_plan_holds
from embshard.planner.remap import load_remap
from embshard.planner.types import DimensionPlan
from embshard.sealed_folders import CHECKPOINT_MANIFEST, SERVING_KEYS, SERVING_MANIFEST
from embshard.sharding.embedding_module import inner_module
from embshard.sharding.mlet import collapse_mlet_tables, is_mlet_w2, mlet_tables, without_mlet
from embshard.sharding.planned_embedding import PlannedEmbeddingBags
from embshard.trainer.checkpoint import CONFIG, PLAN_DIR, newest_verified
from embshard.trainer.checkpoint_integrity import (
    RankFailure,
    SafeLoadPlanner,
    check_checkpoint_io,
    checkpoint_reader,
    file_record,
    sha256_file,
)
from embshard.trainer.method import get_method
from embshard.trainer.models import TrainModel, build_model, get_arch
from embshard.trainer.planning import check_same_inputs
from embshard.typed_config import from_dict

MANIFEST = SERVING_MANIFEST
WEIGHTS = "weights.pt"
PLAN = "plan.json"
EXPORT_VERSION = 2  # 2: any arch; the manifest keeps the model config and the dataset spec


class ExportError(EmbshardError):
    """A model or checkpoint cannot be exported, or an export folder cannot be loaded."""


@dataclass(frozen=True)
class FileRecord:
    bytes: int
    sha256: str


@dataclass
class ServingManifest:
    """serving.json, each field checked as it is read: a hand-edited one was a traceback from
    wherever a field was first used (`'list' object has no attribute 'items'`)."""

    version: int
    plan: str
    weights: str
    model: ModelConfig
    spec: dict[str, Any]
    source: str = ""
    remaps: dict[str, str] = field(default_factory=dict)  # feature -> file
    # None of them in exports written before vocabularies were kept.
    vocabularies: dict[str, str] = field(default_factory=dict)  # feature -> file
    # None in exports written before the hashes were kept; every later one lists the files it reads.
    files: dict[str, FileRecord] | None = None
    base_dim: int | None = None
    tables: list[dict[str, Any]] = field(default_factory=list)
    serve_params: int | None = None


def read_manifest(directory: StoragePath) -> ServingManifest:
    """The export's serving.json; ExportError unless it is one `embshard export` wrote."""
    path = directory / MANIFEST
    if not path.is_file():
        if isinstance(directory, Path) and not directory.exists():  # a bucket's prefix is there or not alike
            raise ExportError(f"{directory}: not found{moved_aside(directory)}")
        raise ExportError(f"{directory}: no {MANIFEST} (not a folder written by `embshard export`)")
    raw = read_json_version(path, EXPORT_VERSION, ExportError)
    # Only an export from before the hashes has no `files`; `"files": null` read as one, and its
    # files were loaded unchecked.
    if "files" in raw and raw["files"] is None:
        raise ExportError(f"{path}: files: null, where an export lists its files' hashes; the export is damaged: "
                          "export the checkpoint again")
    try:
        return from_dict(ServingManifest, raw)
    except ConfigError as e:
        raise ExportError(f"{path}: {e}; export the checkpoint again") from None


# What --overwrite may replace: an earlier export, and nothing besides: the files its manifest
# names (a user's `notes.remap.npy` beside them only looked like one). Any version of it: an
# export written before an upgrade is still ours to replace, read as loosely as it may differ.
def _export_holds(parts: tuple[str, ...], manifest: Mapping[str, Any]) -> bool:
    named = {name for key in ("remaps", "vocabularies") if isinstance(manifest.get(key), dict)
             for name in manifest[key].values() if isinstance(name, str)}
    if parts == (VOCAB_DIR,):
        # The folder of the vocabularies the manifest names: a user's file of that name beside an
        # export without vocabularies was taken for it, and deleted by --overwrite.
        return any(name.startswith(f"{VOCAB_DIR}/") for name in named)
    return "/".join(parts) in named or parts in ((MANIFEST,), (WEIGHTS,), (PLAN,))


EXPORT = Replaceable("export", MANIFEST, _export_holds,
                     lambda d: read_json_object(d / MANIFEST, SERVING_KEYS, ExportError), ExportError)


def export_serving(source: str | Path | nn.Module, out_dir: str | Path, *, overwrite: bool = False,
                   model_config: ModelConfig | None = None, spec: DatasetSpec | None = None,
                   plan_dir: str | Path | None = None, data_dir: str | Path | None = None) -> StoragePath | None:
    """Write the serving model of `source` to `out_dir`; returns `out_dir` (None on ranks > 0).

    `source` is a checkpoint (a step-NNNNNN folder or a checkpoint directory: its newest good
    step; runs in one process) or a live model (a TrainModel, sharded or not, or the arch's
    model itself). A live model is collective on every rank of its process group and needs
    `model_config` and `spec` (what its arch is rebuilt from), when its plan reorders rows
    `plan_dir` (the folder of plan.json and the remap files) and, for the export to carry the
    dataset's vocabularies, `data_dir` (a checkpoint's run names its dataset itself).

    The export is written into a staging folder and put in place whole once complete (an object
    store: uploaded, serving.json last). `out_dir` must be absent or empty, or with overwrite=True
    hold an earlier export and nothing else, which is replaced only then. Either may be an
    object-store URI."""
    out = location(out_dir)
    if not isinstance(source, nn.Module):
        with writing(out, EXPORT):  # one process: `out` is its own from this check on
            check_output(out, overwrite, EXPORT)  # before minutes of loading, not after
            return _export_checkpoint_from(location(source), out, overwrite)
    # Every rank of a live model checks, so that all refuse alike; rank 0 alone writes, and locks
    # `out` once the tables are gathered.
    check_output(out, overwrite, EXPORT)
    if model_config is None or spec is None:
        raise ExportError("export_serving: a live model needs model_config and spec (what its arch is built from)")
    if spec.vocabularies and data_dir is None:
        warnings.warn(f"export without the vocabularies of dataset {spec.name!r} (pass data_dir= to carry "
                      "them): the served model takes its ids, not raw values", stacklevel=2)
    if spec.vocabularies and data_dir is not None:
        _check_trained_on(spec, data_dir)
    model = source
    sources = _Sources(spec, model_config, location(plan_dir) if plan_dir else None,
                       location(data_dir) if data_dir else None, "live model")
    return _stored(out, f"exporting a live model to {out}", lambda: _export_live(model, out, sources, overwrite))


def _export_checkpoint_from(checkpoint: StoragePath, out: StoragePath, overwrite: bool) -> StoragePath | None:
    check_checkpoint_io(checkpoint, "checkpoint")
    # A raw error of a client library (DCP's s3fs) comes from reading the checkpoint; the upload's
    # own are StorageErrors already, naming the object.
    where = checkpoint if isinstance(checkpoint, RemotePath) else out
    return _stored(where, f"exporting {checkpoint} to {out}", lambda: _export_checkpoint(checkpoint, out, overwrite))


def _check_trained_on(spec: DatasetSpec, data_dir: str | Path) -> None:
    """ExportError when `data_dir` holds another writing of the data than `spec` (with as many
    ids): its vocabularies would name every served id wrongly. A checkpoint's export reads its
    spec from the run's data.path, so there both are one dataset."""
    there = DatasetSpec.load(data_dir).id
    if spec.id and there != spec.id:
        raise ExportError(f"{data_dir}: holds another dataset (id {there[:8]}) than the model was trained on "
                          f"({spec.id[:8]}); give the dataset the model was trained on")


@dataclass(frozen=True)
class _Sources:
    """What an export is written from, besides the plan and the weights."""

    spec: DatasetSpec  # what the arch is rebuilt from
    model_config: ModelConfig
    plan_dir: StoragePath | None  # plan.json and the remap files
    data_dir: StoragePath | None  # the dataset, whose vocabularies the export carries
    source: str  # what serving.json names as its origin


def _stored(where: StoragePath, doing: str, export: Callable[[], StoragePath | None]) -> StoragePath | None:
    """`export()`, its failures of a store as one StorageError line saying what was being done."""
    try:
        return export()
    except (Exception, CheckpointException) as e:  # DCP's errors are BaseExceptions
        failure = RankFailure.of(e, where)
        if not failure.storage:
            raise
        raise StorageError(f"{failure.message} while {doing}") from e


def load_serving(directory: str | Path) -> ServingModel:
    """The exported model as a plain single-process module in eval mode, its parameters frozen
    (`requires_grad_(True)` to fine-tune it): served outputs carry no autograd graph (see the
    module docstring)."""
    where = location(directory)
    if isinstance(where, RemotePath):  # a few small files: read them from a local copy
        read_manifest(where)  # not an export: said of the URI, before anything is copied
        with tempfile.TemporaryDirectory(prefix="embshard-serving-") as local:
            copytree(where, Path(local))
            try:
                return load_serving(local)
            except EmbshardError as e:  # said of the URI, not of a copy that is gone by then
                raise type(e)(str(e).replace(local, str(where).rstrip("/"))) from None
    directory = Path(directory)
    path = directory / MANIFEST
    manifest = read_manifest(directory)
    _verify_files(directory, manifest)
    plan = DimensionPlan.load(directory / manifest.plan)
    spec = DatasetSpec.from_json(manifest.spec, str(path))
    try:
        # Ids past a table's rows passed the serving range check, which reads the spec, and
        # FBGEMM's bounds check served them from row 0.
        check_plan_holds(plan, {f.name: f.cardinality for f in spec.sparse}, f"{path}: spec",
                         "the export is damaged: export the checkpoint again")
    except PlanError as e:
        raise ExportError(str(e)) from None
    model = arch_model(plan, spec, manifest.model)
    weights = directory / manifest.weights
    # Only exports written before the hashes get here with a weights.pt that is not theirs: torch's
    # unpickling errors, or size mismatches listed one per parameter.
    try:
        model.load_state_dict(torch.load(weights, weights_only=True))
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ExportError(f"{weights}: cannot be read ({first_line(e)}); export the checkpoint again") from None
    rows = {f: t.num_embeddings for t in plan.tables for f in t.features}
    unplanned = sorted(set(manifest.remaps) - set(rows))
    if unplanned:
        raise ExportError(f"{path}: remaps.{unplanned[0]}: {manifest.plan} has no feature of that name")
    # The plan names each table's remap: one dropped from serving.json, or two swapped, served
    # every id of those features from another row, without a word.
    planned = {f: t.remap for t in plan.tables if t.remap is not None for f in t.features}
    differs = sorted(f for f in {*planned, *manifest.remaps} if manifest.remaps.get(f) != planned.get(f))
    if differs:
        f = differs[0]
        plans = f"reorders its rows by {planned[f]!r}" if f in planned else "reorders none of its rows"
        raise ExportError(f"{path}: remaps.{f}: {manifest.remaps.get(f)!r}, where {manifest.plan} {plans}; the "
                          "export is damaged: export the checkpoint again")
    remaps = {f: torch.from_numpy(load_remap(directory / name, rows[f])) for f, name in manifest.remaps.items()}
    # Exports written before vocabularies were kept have none. Their values were checked distinct
    # at export, which reads every value; here only that each file is the one exported.
    vocabularies = {f: Vocabulary.read(directory / name, spec.feature(f).cardinality, spec.id, f, check_values=False)
                    for f, name in manifest.vocabularies.items()}
    return ServingModel(model, remaps, spec.sparse, vocabularies).eval().requires_grad_(False)


def _verify_files(directory: Path, manifest: ServingManifest) -> None:
    """ExportError naming the first file of the export that is missing or not as written (its
    size, its sha256 in serving.json), or that it reads but does not list; exports written before
    the hashes have no `files`."""
    if manifest.files is None:
        return
    read = [manifest.plan, manifest.weights, *manifest.remaps.values(), *manifest.vocabularies.values()]
    # One that is there is loaded with no hash vouching for it (every export that lists files
    # lists them all: `"files": {}` was taken for an export from before the hashes, and served
    # whatever weights.pt held); one that is not is said as missing where it is read.
    unlisted = [name for name in read if name not in manifest.files and (directory / name).exists()]
    if unlisted:
        raise ExportError(f"{directory / MANIFEST}: files: {unlisted[0]} is not listed; the export is damaged: "
                          "export the checkpoint again")
    for name, entry in manifest.files.items():
        path = directory / name
        why = None
        if not path.is_file():
            why = "missing"
        elif path.stat().st_size != entry.bytes:
            why = f"{path.stat().st_size:,} bytes, written {entry.bytes:,}"
        elif sha256_file(path) != entry.sha256:
            why = "its contents are not those written (sha256)"
        if why is not None:
            raise ExportError(f"{path}: {why}; the export is damaged: export the checkpoint again")


def arch_model(plan: DimensionPlan, spec: DatasetSpec, model_config: ModelConfig,
               device: torch.device | None = None) -> nn.Module:
    """The config's arch over `PlannedEmbeddingBags(plan)`: how a plan's blocks serve."""
    return build_model(get_arch(model_config), PlannedEmbeddingBags(plan, device=device), spec, model_config, device)


class ServingModel(nn.Module):
    """The arch's model over the collapsed plan, fed the dataset's ids: reordered features go
    through their remap first. An id outside its feature's range is a DataError naming both
    (PyTorch's index error named neither).

    With the dataset's vocabularies (a converted dataset's export), `encode`, `decode` and
    `sparse_batch` translate between ids and the raw values of the converter's input."""

    def __init__(self, model: nn.Module, remaps: dict[str, torch.Tensor], features: list[SparseFeature],
                 vocabularies: Mapping[str, Vocabulary] | None = None) -> None:
        super().__init__()
        self.model = model
        self.remapped = sorted(remaps)
        self.features = {f.name: f for f in features}
        self.vocabularies = dict(vocabularies or {})
        for feature, remap in remaps.items():
            self.register_buffer(f"remap_{feature}", remap, persistent=False)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        by_key = sparse.to_dict()
        self._check_ids(by_key)
        if self.remapped:
            sparse = self._remap(sparse, by_key)
        return self.model(dense, sparse)

    def encode(self, feature: str, values: Any) -> torch.Tensor:
        """The id of each raw value of `feature` (a list, 1-D array, tensor, Arrow array or pandas
        Series, a value a row, as the converter read it: MovieLens' movie id, a Criteo hex string);
        a value unseen in training, too rare, or None is the OOV id 0. A value of another type is
        refused, not converted."""
        vocabulary = self._vocabulary(feature)
        try:
            return torch.from_numpy(vocabulary.encode(raw_values(_host(values), vocabulary.values.type)))
        except DataError as e:
            raise DataError(f"feature {feature!r}: {e}") from None

    def decode(self, feature: str, ids: torch.Tensor | np.ndarray | Sequence[Any]) -> Any:
        """The raw value of each id of `feature`, as nested lists of the ids' shape (a top-k's
        [queries, k] ids give a list a query); None for the OOV id (every unknown value)."""
        vocabulary = self._vocabulary(feature)
        try:
            flat = np.asarray(_host(ids))
        except (ValueError, OverflowError) as e:  # ragged lists
            raise DataError(f"feature {feature!r}: expected an array of ids ({e})") from None
        if flat.size == 0:
            return flat.tolist()  # [] reads as floats
        if flat.dtype.kind not in "iu":
            raise DataError(f"feature {feature!r}: ids are integers; got {flat.dtype} ({flat.reshape(-1)[:1]!r:.40})")
        try:
            values = vocabulary.decode(flat.reshape(-1).astype(np.int64, casting="same_kind")).to_pylist()
        except DataError as e:
            raise DataError(f"feature {feature!r}: {e}") from None
        return np.array(values, dtype=object).reshape(flat.shape).tolist()

    def sparse_batch(self, rows: Mapping[str, Sequence[Any]], *, unread: Collection[str] = ()) -> KeyedJaggedTensor:
        """The KeyedJaggedTensor `forward` takes for a batch given as raw values: per feature, one
        value a row (a list of values a row for a multi-hot feature); a feature the export has no
        vocabulary for takes the dataset's ids. Every feature the model was trained on must be
        given, each with as many rows, but those of `unread` (features the output the caller reads
        does not depend on, such as a query tower's item features): left out, every row of them is
        the OOV id (no value, multi-hot)."""
        missing = [f for f in self.features if f not in rows and f not in unread]
        unknown = [f for f in (*rows, *unread) if f not in self.features]
        if missing or unknown:
            wrong = f"unknown feature {unknown[0]!r}" if unknown else f"no values for {missing[0]!r}"
            raise DataError(f"sparse_batch: {wrong} (the model reads {', '.join(self.features)})")
        given = [f for f in self.features if f in rows]
        scalar = next((f for f in given if not _one_a_row(rows[f])), None)
        if scalar is not None:
            raise DataError(f"sparse_batch: feature {scalar!r}: give a list of values, one a row")
        sizes = {len(rows[f]) for f in given}
        if len(sizes) > 1:
            raise DataError(f"sparse_batch: features given for different numbers of rows ({sorted(sizes)})")
        if not sizes:
            raise DataError(f"sparse_batch: no feature given (the model reads {', '.join(self.features)})")
        (n,) = sizes
        values, lengths = [], []
        for name, feature in self.features.items():
            if name not in rows:
                values.append(torch.full((0 if feature.multi_hot else n,), OOV_ID, dtype=torch.int64))
                lengths.append(torch.full((n,), 0 if feature.multi_hot else 1, dtype=torch.int64))
                continue
            column = rows[name]
            if feature.multi_hot:
                if not all(r is None or isinstance(r, (list, tuple, np.ndarray)) for r in column):
                    raise DataError(f"sparse_batch: feature {name!r} is multi-hot: give a list of values a row")
                lists = [[] if r is None else list(r) for r in column]
                values.append(self._ids(name, [v for r in lists for v in r]))
                lengths.append(torch.tensor([len(r) for r in lists], dtype=torch.int64))
            else:
                values.append(self._ids(name, column))
                lengths.append(torch.ones(len(column), dtype=torch.int64))
        return KeyedJaggedTensor(keys=list(self.features), values=torch.cat(values), lengths=torch.cat(lengths))

    def _ids(self, feature: str, values: Any) -> torch.Tensor:
        if feature in self.vocabularies:
            return self.encode(feature, values)
        try:  # its ids as they are; forward checks their range
            ids = raw_values(_host(values), pa.int64())
            if ids.null_count:
                raise DataError("an id is missing (None); id 0 is the unknown value's")
            return torch.from_numpy(ids.to_numpy().copy())  # Arrow's buffer is read-only
        except DataError as e:
            raise DataError(f"feature {feature!r} (no vocabulary: give its ids): {e}") from None

    def _vocabulary(self, feature: str) -> Vocabulary:
        if feature not in self.features:
            raise DataError(f"no feature {feature!r} (the model reads {', '.join(self.features)})")
        if feature not in self.vocabularies:
            raise DataError(f"feature {feature!r}: the export has no vocabulary for it (its dataset was made by "
                            "`data synth`, whose ids are the values, or converted before vocabularies were kept)")
        return self.vocabularies[feature]

    def _check_ids(self, by_key: dict[str, JaggedTensor]) -> None:
        for key, jagged in by_key.items():
            ids, feature = jagged.values(), self.features.get(key)
            if feature is None or not ids.numel():
                continue
            rows = feature.cardinality
            if int(ids.min()) < 0 or int(ids.max()) >= rows:
                bad = int(ids[(ids < 0) | (ids >= rows)][0])
                raise DataError(f"feature {key!r}: id {bad} outside [0, {rows}), the ids of the dataset it was "
                                "trained on")

    def _remap(self, sparse: KeyedJaggedTensor, by_key: dict[str, JaggedTensor]) -> KeyedJaggedTensor:
        keys = sparse.keys()
        values = [
            getattr(self, f"remap_{k}")[by_key[k].values()] if k in self.remapped else by_key[k].values()
            for k in keys
        ]
        return KeyedJaggedTensor(keys=keys, values=torch.cat(values),
                                 lengths=sparse.lengths(), stride=sparse.stride())


def _host(values: Any) -> Any:
    """A tensor (on any device) or a pandas Series as numpy; anything else as it is."""
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    if type(values).__module__.startswith("pandas"):
        return values.to_numpy()
    return values


def _one_a_row(column: object) -> bool:
    if isinstance(column, (np.ndarray, torch.Tensor)):
        return column.ndim == 1
    return isinstance(column, (list, tuple))


# -- from a live model ---------------------------------------------------------------------------

def _export_live(model: nn.Module, out_dir: StoragePath, sources: _Sources, overwrite: bool) -> StoragePath | None:
    plan = _find(model, PlannedEmbeddingBags).plan
    state = model.state_dict()
    state.update(collapse_mlet_tables(model, state))
    # A TrainModel's keys are its arch model's under "model."; serving holds the arch model alone.
    wrapped = inner_module(model, TrainModel) is not None
    rank = dist.get_rank() if dist.is_initialized() else 0
    full: dict[str, torch.Tensor] = {}
    # Serving is single-process: every table comes to rank 0 (a collective, in key order).
    for key, value in state.items():
        if isinstance(value, ShardedTensor):
            out = torch.empty(value.size(), dtype=value.dtype) if rank == 0 else None
            value.gather(dst=0, out=out)
            value = out
        if rank == 0:
            full[_arch_key(key) if wrapped else key] = value.detach().cpu()
    if rank != 0:
        return None
    return _write(out_dir, plan, full, sources, overwrite)


# -- from a checkpoint ---------------------------------------------------------------------------

def _export_checkpoint(source: StoragePath, out_dir: StoragePath, overwrite: bool) -> StoragePath:
    path = newest_verified(source)  # every file's hash, before DCP's metadata (a pickle) is read
    try:
        plan, weights, sources = _read_step(path)
    except (Exception, CheckpointException) as e:  # DCP's errors are BaseExceptions
        if (path / CHECKPOINT_MANIFEST).is_file():
            failure = RankFailure.of(e, path)
            if failure.storage or isinstance(e, EmbshardError):
                raise  # a store failing (`_stored` says what was being done), or a line of ours
            # Verified, and still unreadable: damage its hashes were made over, or a model whose
            # code changed since. Once a traceback; said as a resume says it.
            raise ExportError(f"checkpoint {path} cannot be exported ({failure.message}); it was left as it "
                              "is") from e
        # A run still saving into `source` prunes its older steps, the manifest first: the files
        # went mid-read (a FileNotFoundError, or an AssertionError inside DCP), not damage.
        raise ExportError(f"{path}: removed while it was being exported (a run still saving into {source} "
                          "keeps only its newest steps); export again to read the newest one then") from e
    return _write(out_dir, plan, weights, sources, overwrite)


def _read_step(path: StoragePath) -> tuple[DimensionPlan, dict[str, torch.Tensor], _Sources]:
    """A checkpoint's plan, serving weights, and what else its export is written from."""
    config = json.loads((path / CONFIG).read_text())
    plan_dir = path / PLAN_DIR
    raw = json.loads((plan_dir / PLAN).read_text())
    plan = DimensionPlan.from_json(raw["dimension_plan"], where=str(plan_dir / PLAN))
    _check_serves(plan, path)
    model_config = ModelConfig(**config.get("model", {}))
    spec = _run_spec(config, path)
    # The arch is rebuilt from the data at data.path now, which may have been written again since:
    # another feature list, or more ids than the tables hold, is said here as a resume says it.
    data_path = config.get("data", {}).get("path")
    check_plan_holds(plan, {f.name: f.cardinality for f in spec.sparse},
                     f"{path}: its plan and the dataset at {data_path}")
    trained_on = plan.made_with.get("dataset_id")
    if trained_on and spec.id and trained_on != spec.id:
        # As few or fewer ids pass the check above: the export would carry another dataset's spec
        # (its catalog, its id meanings) beside these weights.
        raise ExportError(f"{path}: trained on another dataset than {data_path} holds now (dataset id {spec.id[:8]}, "
                          f"trained on {str(trained_on)[:8]}: written again since); export needs the dataset it "
                          "was trained on at data.path")
    try:  # its serving.json would tell clients the edited spec: another order of the dense features
        check_same_inputs(plan, spec, f"{path}: the dataset.json at {data_path}", "since the run trained")
    except DataError as e:
        raise ExportError(str(e)) from None
    shapes = _saved_shapes(path)
    # With the collapse hook W already sits under W1's key and loads into the plain model; a
    # checkpoint written without it still holds W1 (n x k) and W2, and is collapsed here.
    meta = torch.device("meta")
    probe = TrainModel(get_arch(model_config), arch_model(plan, spec, model_config, meta))
    collapsed_on_save = all(shapes.get(f"model.{t.w1_key}") == (t.rows, t.dim)
                            for t in mlet_tables(probe, probe.state_dict()))
    model = TrainModel(get_arch(model_config),
                       arch_model(without_mlet(plan) if collapsed_on_save else plan, spec, model_config))
    state = model.state_dict()
    # Parameters the rebuilt model has no place for would be dropped, and the export serve another
    # model than the one trained (as a search's was, before `serves`). Beside the arch, `model.`
    # also holds training state, e.g. MLET's exact_resume W1.
    known = {f"model.{k}" for k in (*state, *probe.state_dict())}
    unread = sorted(k.removeprefix("model.model.") for k in shapes if k.startswith("model.model.") and k not in known)
    if unread:
        more = f" and {len(unread) - 1} more" if len(unread) > 1 else ""
        raise ExportError(f"{path}: holds model parameters the model rebuilt from its config has no place for "
                          f"({unread[0]!r}{more}): its arch or method is not the code that wrote it, or its method "
                          "keeps state of its own; served without them, it would be another model")
    with warnings.catch_warnings():
        # DCP says, even with no_dist=True asked for, that it loads in one process: it is meant to.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load({"model": state}, storage_reader=checkpoint_reader(path), planner=SafeLoadPlanner(), no_dist=True)
    if not collapsed_on_save:
        state.update(collapse_mlet_tables(model, state))
    sources = _Sources(spec, model_config, plan_dir, location(data_path), str(path))
    return plan, {_arch_key(k): v for k, v in state.items()}, sources


def _check_serves(plan: DimensionPlan, path: StoragePath) -> None:
    method, serves = plan.made_with.get("method"), plan.made_with.get("serves")
    if not isinstance(serves, bool):  # a plan from before plans recorded it: the method says
        try:
            serves = get_method(method).serves if isinstance(method, str) else True
        except EmbshardError as e:
            raise ExportError(f"{path}: its plan does not record whether method {method!r} trains a model to "
                              f"serve, and the method cannot be read here ({e}); export where it can be "
                              "imported") from None
    if not serves:
        # AutoDim's alpha and unifying layers, PEP's thresholds: exported, the bare tables were served.
        raise ExportError(f"{path}: a checkpoint of a {method!r} run, which decides a plan and trains no model to "
                          "serve; export the run trained on its decisions file")


def _arch_key(key: str) -> str:
    return key.removeprefix("model.")


def _saved_shapes(path: StoragePath) -> dict[str, tuple[int, ...]]:
    metadata = checkpoint_reader(path).read_metadata()
    return {k: tuple(m.size) for k, m in metadata.state_dict_metadata.items() if hasattr(m, "size")}


def _run_spec(config: dict[str, Any], path: StoragePath) -> DatasetSpec:
    """The dataset spec the run's arch was built from (its features and dense inputs)."""
    data = config.get("data", {}).get("path")
    try:
        return DatasetSpec.load(data)
    except EmbshardError as e:
        raise ExportError(f"{path}: the arch is rebuilt from the run's dataset spec, and "
                          f"{data!r} is unreadable ({e})") from None


# -- writing -------------------------------------------------------------------------------------

def _write(out_dir: StoragePath, plan: DimensionPlan, state: dict[str, torch.Tensor], sources: _Sources,
           overwrite: bool) -> StoragePath:
    staging = make_staging(out_dir, kind=EXPORT)
    try:
        _write_files(staging, plan, state, sources)
        publish(staging, out_dir, overwrite, EXPORT)
    except RuntimeError as e:
        free = disk_full(staging.parent)  # before the partial export is removed, which frees room
        drop_staging(staging)
        if free is not None:  # torch.save's words for it: "unexpected pos 965632 vs 965520", a traceback
            raise EnvironmentProblem(f"{out_dir}: cannot be written: the disk is full ({free:,} bytes free) "
                                     f"({first_line(e)})") from None
        raise
    except BaseException:
        drop_staging(staging)
        raise
    return out_dir


def _write_files(out_dir: Path, plan: DimensionPlan, state: dict[str, torch.Tensor], sources: _Sources) -> None:
    plan_dir, spec = sources.plan_dir, sources.spec
    serving = without_mlet(plan)
    weights = {k: v for k, v in state.items() if not is_mlet_w2(k, state)}
    torch.save(weights, out_dir / WEIGHTS)
    serving.save(out_dir / PLAN)
    remaps = {}
    for table in plan.tables:
        if table.remap is None:
            continue
        if plan_dir is None:
            raise ExportError(f"table {table.name!r} reorders its rows: export needs the plan folder "
                              f"holding {table.remap}")
        load_remap(plan_dir / table.remap, table.num_embeddings)  # validates before copying
        copy_file(plan_dir / table.remap, out_dir / table.remap)
        remaps.update({f: table.remap for f in table.features})
    vocabularies = _copy_vocabularies(sources, out_dir)
    manifest: dict[str, Any] = {
        "version": EXPORT_VERSION,
        "source": sources.source,
        "plan": PLAN,
        "weights": WEIGHTS,
        "remaps": remaps,
        "vocabularies": vocabularies,
        "model": asdict(sources.model_config),
        "spec": asdict(spec),
        "base_dim": plan.base_dim,
        "tables": [
            {"table": t.name, "block": t.block_name(i), "rows": b.num_rows, "dim": b.dim,
             "trained_width": b.train_dim, "features": t.features}
            for t in plan.tables for i, b in enumerate(t.blocks)
        ],
        "serve_params": serving.serve_params(),
    }
    # What load_serving verifies before it reads: a damaged weights file or remap served wrong
    # predictions without a word.
    written = [WEIGHTS, PLAN, *sorted(set(remaps.values())), *sorted(vocabularies.values())]
    manifest["files"] = {name: file_record(out_dir / name) for name in written}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def _copy_vocabularies(sources: _Sources, out_dir: Path) -> dict[str, str]:
    """The dataset's vocabularies, each checked against its feature's ids before it is copied: a
    served id must name the value it was trained on."""
    spec, data_dir = sources.spec, sources.data_dir
    if not spec.vocabularies or data_dir is None:  # export_serving warned of the second
        return {}
    for name in spec.vocabularies:
        Vocabulary.read(data_dir / vocabulary_file(name), spec.feature(name).cardinality, spec.id, name)
        copy_file(data_dir / vocabulary_file(name), out_dir / vocabulary_file(name))
    return {name: vocabulary_file(name) for name in spec.vocabularies}


def _find(model: nn.Module, kind: type[nn.Module]) -> Any:
    found = inner_module(model, kind)
    if found is None:
        raise ExportError(f"export_serving: the model has no {kind.__name__}")
    return found
