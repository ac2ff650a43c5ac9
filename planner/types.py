"""The DimensionPlan: the one artifact every dimension method (uniform, MDE, AutoDim, PEP) emits
and every consumer (shard planner, embedding module, memory report, export) reads.

A table's rows are first ranked (`row_order`; the id -> rank permutation is stored beside the plan
as `remap`), then cut into contiguous blocks of ranked rows. Each block becomes one TorchRec table
of width `dim` (or `mlet_width` while training with MLET); a block narrower than its table's output
width (`base_dim`, or with `uniform_width` off the widest block of the table), or one trained
factorised, is followed by a projection to that width.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from embshard.errors import PlanError, version_mismatch

PLAN_VERSION = 1
RowOrder = Literal["identity", "frequency", "pep_nnz"]
ROW_ORDERS: tuple[str, ...] = get_args(RowOrder)


def table_name(feature: str) -> str:
    """Name of the table a policy builds for one sparse feature."""
    return f"t_{feature}"


@dataclass(frozen=True)
class Block:
    start: int  # first ranked row, inclusive
    end: int  # last ranked row, exclusive
    dim: int  # serving width of this block
    mlet_width: int | None = None  # training width k >= dim when trained as W1 (n x k) . W2 (k x d)
    source: dict[str, Any] = field(default_factory=dict)  # policy and parameters that chose `dim`
    # Columns each row carries beside its weights while training, never served (PEP's per-row
    # thresholds): the shard planner and the memory report count them.
    state_cols: int = 0
    # Bytes a method holds per weight entry beside the table while training, outside TorchRec's
    # tensors (a lottery retrain's mask of the kept entries: one); the memory report counts them.
    side_bytes_per_entry: int = 0

    @property
    def num_rows(self) -> int:
        return self.end - self.start

    @property
    def train_dim(self) -> int:
        return (self.mlet_width or self.dim) + self.state_cols


@dataclass(frozen=True)
class TablePlan:
    name: str
    features: list[str]
    num_embeddings: int
    blocks: list[Block]
    row_order: RowOrder = "identity"
    remap: str | None = None  # .npy file (relative to the plan file) holding id -> ranked row
    # False: looked up unpooled (TorchRec's EmbeddingCollection) and pooled by the module after
    # a per-row step (PEP's thresholds); True: TorchRec's pooled EmbeddingBagCollection.
    pooled: bool = True
    sharding_types: list[str] | None = None  # what the method allows TorchRec; None = the device's

    def block_name(self, i: int) -> str:
        """TorchRec table name of block i; a single-block table keeps the table's own name."""
        return self.name if len(self.blocks) == 1 else f"{self.name}__b{i}"

    def data_feature(self, feature: str) -> str:
        """The dataset feature whose ids this table's `feature` looks up: the feature itself, or
        the one its blocks' source names (AutoDim's separate candidates are tables of their own,
        each under a name of its own, over one feature's ids)."""
        return self.blocks[0].source.get("feature", feature) if self.blocks else feature


@dataclass(frozen=True)
class DimensionPlan:
    base_dim: int
    tables: list[TablePlan]
    policy: dict[str, Any] = field(default_factory=dict)  # the config that produced the plan
    notes: list[str] = field(default_factory=list)  # decisions a user should see (rounding, ...)
    version: int = PLAN_VERSION
    # What the model's arch takes (trainer/models/): True, every feature at base_dim; False, each
    # table's features at its widest block, so only narrower blocks of a table are projected (or,
    # in AutoDim's search plan, none: its module unifies the candidate tables' widths itself).
    uniform_width: bool = True
    # The method and job config the plan was made for (`trainer/planning.py`), so a run handed a
    # plan file can tell it was made for another model; empty in plans written before 2026-12.
    made_with: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_plan(self)

    def table(self, name: str) -> TablePlan:
        for t in self.tables:
            if t.name == name:
                return t
        raise PlanError(f"plan has no table {name!r}")

    @property
    def is_uniform(self) -> bool:
        """One block per table at base_dim, no MLET and no row reordering: plain TorchRec tables."""
        return all(
            len(t.blocks) == 1
            and t.blocks[0].dim == self.base_dim
            and t.blocks[0].mlet_width is None
            and t.row_order == "identity"
            for t in self.tables
        )

    def output_dim(self, table: TablePlan) -> int:
        """Width at which the table's features reach the model."""
        return self.base_dim if self.uniform_width else max(b.dim for b in table.blocks)

    def projection_shape(self, table: TablePlan, block: Block) -> tuple[int, int] | None:
        """(in, out) of the block's projection to its table's output width; None: it has none."""
        out = self.output_dim(table)
        return None if block.dim == out else (block.dim, out)

    def serve_params(self) -> int:
        """Embedding parameters when serving: collapsed blocks plus their projections."""
        total = 0
        for t in self.tables:
            for b in t.blocks:
                total += b.num_rows * b.dim
                shape = self.projection_shape(t, b)
                if shape is not None:
                    total += shape[0] * shape[1]
        return total

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(raw: dict[str, Any], where: str = "plan") -> "DimensionPlan":
        try:
            mismatch = version_mismatch(raw.get("version"), PLAN_VERSION)
            if mismatch:
                raise PlanError(f"{where}: {mismatch}")
            tables = [
                TablePlan(**{**t, "blocks": [Block(**b) for b in t["blocks"]]}) for t in raw["tables"]
            ]
            return DimensionPlan(**{**raw, "tables": tables})
        except (KeyError, TypeError) as e:
            raise PlanError(f"{where}: malformed dimension plan ({e})") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path

    @staticmethod
    def load(path: str | Path) -> "DimensionPlan":
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"{path}: dimension plan not found")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"{path}: not JSON ({e})") from None
        return DimensionPlan.from_json(raw, where=str(path))


def _check_int(value: Any, where: str) -> None:
    # A float or a numpy integer of a method's own arithmetic was a traceback from torch (a tensor
    # size) or from json (the plan file); True read as 1.
    if type(value) is not int:
        raise PlanError(f"{where} must be an int, got {type(value).__name__} {value!r}")


# TorchRec's ShardingType values: one outside them was TorchRec's "No available sharding type and
# compute kernel combination", a traceback naming no method.
SHARDING_TYPE_NAMES = ("data_parallel", "table_wise", "column_wise", "row_wise", "table_row_wise",
                       "table_column_wise", "grid_shard")


def _check_json(value: Any, where: str) -> None:
    # Saved as JSON with the plan: a numpy integer or a set of a method's own was json's
    # traceback, after the memory report.
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise PlanError(f"{where}: cannot be saved as JSON ({e}); give plain int, float, str, list and dict "
                        "values (int(x), list(s))") from None


def _check_table(t: TablePlan, block_names: dict[str, str]) -> None:
    # A table's name is a TorchRec table's, a module's name within the model: "t.C1" and "" were
    # torch's KeyError from inside the collection's constructor.
    if not isinstance(t.name, str) or not t.name or "." in t.name:
        raise PlanError(f"table {t.name!r}: a table's name is a non-empty str without '.' (TorchRec's table "
                        "names are module names)")
    for i in range(len(t.blocks)):
        name = t.block_name(i)
        if name in block_names:  # "t_X"'s block 0 and a table "t_X__b0": TorchRec's "Duplicate table name"
            raise PlanError(f"table {t.name!r}: block {i} is TorchRec table {name!r}, as {block_names[name]} is; "
                            "rename one of the tables (or, where they are named after the data's features, one "
                            "of those features)")
        block_names[name] = f"table {t.name!r}" if len(t.blocks) == 1 else f"table {t.name!r} block {i}"
    types = t.sharding_types
    if types is not None and (not isinstance(types, (list, tuple)) or not types
                              or any(s not in SHARDING_TYPE_NAMES for s in types)):
        raise PlanError(f"table {t.name!r}: sharding_types {types!r}: give a non-empty list of "
                        f"{', '.join(SHARDING_TYPE_NAMES)} (or None: the device's)")


def validate_plan(plan: DimensionPlan) -> None:
    _check_int(plan.base_dim, "base_dim")
    if plan.base_dim <= 0:
        raise PlanError(f"base_dim must be positive, got {plan.base_dim}")
    for name, value in (("policy", plan.policy), ("made_with", plan.made_with)):
        if not isinstance(value, dict):  # read as a dict: an AttributeError of "str"
            raise PlanError(f"{name} must be a dict, got {type(value).__name__} {value!r}")
        _check_json(value, name)
    if not isinstance(plan.notes, list) or not all(isinstance(n, str) for n in plan.notes):
        raise PlanError(f"notes must be a list of str, got {plan.notes!r}")
    names = set()
    block_names: dict[str, str] = {}
    read_by: dict[str, str] = {}
    for t in plan.tables:
        if t.name in names:
            raise PlanError(f"table {t.name!r} appears twice")
        names.add(t.name)
        _check_table(t, block_names)
        _check_int(t.num_embeddings, f"table {t.name!r}: num_embeddings")
        for feature in t.features:
            # Each feature is one key of the lookups' output: a second table of it was a KeyError
            # in the model, blamed on the model.
            if feature in read_by:
                raise PlanError(f"feature {feature!r} is read by tables {read_by[feature]!r} and {t.name!r}; "
                                "a feature is one table's")
            read_by[feature] = t.name
        if not t.blocks:
            raise PlanError(f"table {t.name!r}: no blocks")
        if t.row_order != "identity" and t.remap is None:
            raise PlanError(f"table {t.name!r}: row_order {t.row_order} needs a remap file")
        expect = 0
        for i, b in enumerate(t.blocks):
            where = f"table {t.name!r} block {i}"
            for name in ("start", "end", "dim", "state_cols", "side_bytes_per_entry"):
                _check_int(getattr(b, name), f"{where}: {name}")
            if not isinstance(b.source, dict):
                raise PlanError(f"{where}: source must be a dict, got {type(b.source).__name__} {b.source!r}")
            _check_json(b.source, f"{where}: source")
            if b.mlet_width is not None:
                _check_int(b.mlet_width, f"{where}: mlet_width")
            if b.start != expect or b.end <= b.start:
                raise PlanError(f"{where}: rows [{b.start}, {b.end}) do not continue from row {expect}")
            if b.dim <= 0:
                raise PlanError(f"{where}: dim must be positive, got {b.dim}")
            for name in ("state_cols", "side_bytes_per_entry"):
                if getattr(b, name) < 0:
                    raise PlanError(f"{where}: {name} must be >= 0, got {getattr(b, name)}")
            if b.mlet_width is not None and b.mlet_width < b.dim:
                raise PlanError(
                    f"{where}: MLET width k={b.mlet_width} < d={b.dim}; a factorisation W1(n x k)."
                    f"W2(k x d) with k < d caps the rank of W at k, which shrinks the space of "
                    f"embeddings the table can represent (MLET paper, Theorem 2.2): use k >= d"
                )
            expect = b.end
        if expect != t.num_embeddings:
            raise PlanError(f"table {t.name!r}: blocks cover {expect} rows, table has {t.num_embeddings}")
