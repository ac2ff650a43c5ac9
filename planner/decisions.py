"""Decisions files: the dimensions a search (AutoDim) or a pruning run (PEP) chose, per table.

    {"version": 1, "method": "autodim", "base_dim": 16,
     "tables": {"C1": {"dim": 8},
                "t_C2": {"blocks": [{"rows": 100, "dim": 16}, {"rows": 900, "dim": 4}],
                         "row_order": "pep_nnz", "remap": "t_C2.pep.npy"}},
     "meta": {"epochs": 2}}

A table is keyed by its feature or its table name (`t_<feature>`) and is either one `dim` or
`blocks` of ranked rows (`rows` each, in `row_order`; a `remap` .npy path relative to this file
holds id -> ranked row when the order is not identity). `decisions.schema.json` is the same
contract as a JSON Schema (draft 7) for writers and editors. The loader checks by hand rather
than with `jsonschema`, which is not a declared dependency: messages and behaviour are then the
same on every install; tests keep the two in step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embshard.datasets.storage import read_json, write_whole
from embshard.errors import PlanError, no_file, version_mismatch
from embshard.planner.rounding import MAX_DIM
from embshard.planner.types import ROW_ORDERS, RowOrder

DECISIONS_VERSION = 1


@dataclass(frozen=True)
class BlockDecision:
    rows: int
    dim: int


@dataclass(frozen=True)
class TableDecision:
    dim: int | None = None  # one block over the whole table
    blocks: list[BlockDecision] | None = None  # or contiguous blocks of ranked rows
    row_order: RowOrder = "identity"
    remap: str | None = None  # .npy, relative to the decisions file


@dataclass(frozen=True)
class Decisions:
    method: str  # who decided: autodim, pep, manual, ...
    base_dim: int
    tables: dict[str, TableDecision]
    meta: dict[str, Any] = field(default_factory=dict)  # free-form: run id, epochs, thresholds
    version: int = DECISIONS_VERSION

    def to_json(self) -> dict[str, Any]:
        tables = {}
        for key, t in self.tables.items():
            entry: dict[str, Any] = (
                {"dim": t.dim}
                if t.blocks is None
                else {"blocks": [{"rows": b.rows, "dim": b.dim} for b in t.blocks]}
            )
            if t.row_order != "identity":
                entry.update(row_order=t.row_order, remap=t.remap)
            tables[key] = entry
        return {
            "version": self.version,
            "method": self.method,
            "base_dim": self.base_dim,
            "tables": tables,
            "meta": self.meta,
        }

    def save(self, path: str | Path) -> Path:
        """Writes the file whole (a temporary file renamed), never half a file over an earlier one."""
        return write_whole(Path(path), json.dumps(self.to_json(), indent=1) + "\n")


def load_decisions(path: str | Path) -> Decisions:
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"{path}: {no_file(path, 'decisions file')}")
    raw = read_json(path, PlanError)
    try:
        return parse_decisions(raw)
    except PlanError as e:
        raise PlanError(f"{path}: {e}") from None


MAX_META_DEPTH = 64  # a plan's deepcopy of a meta 500 deep was a RecursionError after the whole plan


def _depth(value: Any) -> int:
    """How deeply JSON `value` nests objects and arrays, counted without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            todo.extend((child, depth + 1) for child in children)
    return deepest


def parse_decisions(raw: Any) -> Decisions:
    """Check a decisions document; errors name the key (`tables.C1.blocks[0].dim: ...`)."""
    _mapping(raw, "<root>", required={"version", "method", "base_dim", "tables"}, optional={"meta"})
    mismatch = version_mismatch(raw["version"], DECISIONS_VERSION)
    if mismatch:
        raise PlanError(f"version: {mismatch.removeprefix('version ')}")
    if not isinstance(raw["method"], str) or not raw["method"]:
        raise PlanError(f"method: expected a non-empty string, got {raw['method']!r}")
    if not isinstance(raw.get("meta", {}), dict):
        raise PlanError(f"meta: expected an object, got {raw['meta']!r}")
    try:  # it is copied into plan.json, which then held a bare NaN no JSON reader takes
        json.dumps(raw.get("meta", {}), allow_nan=False)
    except ValueError:
        raise PlanError("meta: holds NaN or an infinity, which JSON has no number for") from None
    if _depth(raw.get("meta", {})) > MAX_META_DEPTH:  # a plan's save copies it, recursively
        raise PlanError(f"meta: nested deeper than {MAX_META_DEPTH} levels")
    tables = raw["tables"]
    if not isinstance(tables, dict) or not tables:
        raise PlanError(f"tables: expected a non-empty object, got {tables!r}")
    return Decisions(
        method=raw["method"],
        base_dim=_width(raw["base_dim"], "base_dim"),
        tables={key: _table(t, f"tables.{key}") for key, t in tables.items()},
        meta=raw.get("meta", {}),
    )


def _table(raw: Any, where: str) -> TableDecision:
    _mapping(raw, where, required=set(), optional={"dim", "blocks", "row_order", "remap"})
    if ("dim" in raw) == ("blocks" in raw):
        raise PlanError(f"{where}: give exactly one of dim or blocks")
    row_order = raw.get("row_order", "identity")
    if row_order not in ROW_ORDERS:
        raise PlanError(f"{where}.row_order: {row_order!r} is not one of {', '.join(ROW_ORDERS)}")
    remap = raw.get("remap")
    if (row_order == "identity") != (remap is None):
        raise PlanError(f"{where}.remap: needed exactly when row_order is not identity")
    if remap is not None and (not isinstance(remap, str) or not remap):
        raise PlanError(f"{where}.remap: expected a file name, got {remap!r}")
    if row_order != "identity" and "blocks" not in raw:
        raise PlanError(f"{where}.row_order: a reordered table needs blocks (one dim has no cuts)")
    if "dim" in raw:
        return TableDecision(dim=_width(raw["dim"], f"{where}.dim"))
    blocks = raw["blocks"]
    if not isinstance(blocks, list) or not blocks:
        raise PlanError(f"{where}.blocks: expected a non-empty list, got {blocks!r}")
    parsed = []
    for i, b in enumerate(blocks):
        at = f"{where}.blocks[{i}]"
        _mapping(b, at, required={"rows", "dim"}, optional=set())
        rows, dim = _positive_int(b["rows"], f"{at}.rows"), _width(b["dim"], f"{at}.dim")
        parsed.append(BlockDecision(rows, dim))
    return TableDecision(blocks=parsed, row_order=row_order, remap=remap)


def _mapping(raw: Any, where: str, required: set[str], optional: set[str]) -> None:
    if not isinstance(raw, dict):
        raise PlanError(f"{where}: expected an object, got {raw!r}")
    prefix = "" if where == "<root>" else f"{where}."
    missing = sorted(required - set(raw))
    if missing:
        raise PlanError(f"{prefix}{missing[0]}: required key is missing")
    unknown = sorted(set(raw) - required - optional)
    if unknown:
        valid = ", ".join(sorted(required | optional))
        raise PlanError(f"{prefix}{unknown[0]}: unknown key (valid: {valid})")


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PlanError(f"{where}: expected a positive integer, got {value!r}")
    return value


def _width(value: Any, where: str) -> int:
    """A positive width no wider than MAX_DIM: 2**63 overflowed int64 in the rounding and was
    planned 4 wide without a word."""
    width = _positive_int(value, where)
    if width > MAX_DIM:
        raise PlanError(f"{where}: at most {MAX_DIM:,} wide, got {width:,}")
    return width
