"""Decisions: dimensions chosen elsewhere (AutoDim's search, PEP's pruning) turned into a plan."""

from __future__ import annotations

from pathlib import Path

from embshard.config import EmbeddingsConfig
from embshard.datasets.schema import DatasetSpec, SparseFeature
from embshard.errors import PlanError
from embshard.planner.decisions import Decisions, TableDecision, load_decisions
from embshard.planner.remap import load_remap, save_remap
from embshard.planner.rounding import round_width
from embshard.planner.types import Block, DimensionPlan, TablePlan, table_name
from embshard.typed_config import to_dict


def from_decisions(
    path: str | Path, cfg: EmbeddingsConfig, spec: DatasetSpec, out_dir: Path | None
) -> DimensionPlan:
    """Every sparse feature needs exactly one decision. Widths are rounded like MDE's (and noted)
    but not capped at the base dim: a searched width above it is kept, with its projection."""
    path = Path(path)
    decisions = load_decisions(path)
    if decisions.base_dim != cfg.dim:
        raise PlanError(
            f"{path}: base_dim {decisions.base_dim} differs from embeddings.dim {cfg.dim}; "
            f"set embeddings.dim: {decisions.base_dim}"
        )
    by_feature = _by_feature(decisions, spec, path)
    notes: list[str] = _made_on(decisions, spec, path)
    tables = []
    for feature in spec.sparse:
        key, decision = by_feature[feature.name]
        name = table_name(feature.name)
        blocks = _blocks(feature, f"{path}: tables.{key}", decision, decisions.method, cfg, path)
        for i, (_, note) in enumerate(blocks):
            if note:
                notes.append(f"{name} block {i}: {note}")
        remap = None
        if decision.remap is not None:
            # Beside the decisions file as named, else beside the file a link of that name points to.
            beside = path.parent / decision.remap
            if not beside.exists():
                beside = path.resolve().parent / decision.remap
            try:
                ranks = load_remap(beside, feature.cardinality)
            except PlanError as e:  # it named the .npy alone, not which table of which file reads it
                raise PlanError(f"{path}: tables.{key}.remap: {e}") from None
            remap = save_remap(out_dir, name, ranks)
        tables.append(
            TablePlan(name, [feature.name], feature.cardinality, [b for b, _ in blocks],
                      row_order=decision.row_order, remap=remap)
        )
    policy = {
        **to_dict(cfg), "decisions_method": decisions.method, "decisions_meta": decisions.meta,
    }
    return DimensionPlan(cfg.dim, tables, policy=policy, notes=notes)


def other_data(made_on: object, spec: DatasetSpec) -> str | None:
    """"another dataset (dataset id X, the data's Y)" where `made_on`, the dataset id a file of
    decisions or masks records, is not `spec`'s; None where they agree or either is unrecorded."""
    if not made_on or not spec.id or made_on == spec.id:
        return None
    return f"another dataset (dataset id {str(made_on)[:8]}, the data's {spec.id[:8]})"


def _made_on(decisions: Decisions, spec: DatasetSpec, path: Path) -> list[str]:
    """Decisions made on another dataset (their meta's `dataset_id`): refused where they rank
    rows (blocks, remaps: that data's ids), said where they give whole tables a width (a search
    on a sample, trained on the whole data, is a use)."""
    other = other_data(decisions.meta.get("dataset_id"), spec)
    if other is None:
        return []
    said = f"{path}: decided on {other}"
    if any(d.blocks is not None or d.remap is not None for d in decisions.tables.values()):
        raise PlanError(f"{said}: its blocks rank that dataset's rows; decide again on this data")
    return [f"{said}: its widths per table are taken as they are"]


def _by_feature(
    decisions: Decisions, spec: DatasetSpec, path: Path
) -> dict[str, tuple[str, TableDecision]]:
    """feature -> (key in the file, decision); the file may key a table by feature or table name."""
    # One reading for the whole file where one fits every key: with a feature named like another's
    # table (t_C1), a file keyed by feature (AutoDim's) and one keyed by table (PEP's) each read
    # t_C1 their own way; key by key, one of them was refused as deciding a feature twice.
    by_feature = {f: f for f in spec.sparse_names}
    by_table = {table_name(f): f for f in spec.sparse_names}
    if decisions.tables.keys() <= by_feature.keys():
        owner = by_feature
    elif decisions.tables.keys() <= by_table.keys():
        owner = by_table
    else:
        owner = by_table | by_feature
    found: dict[str, tuple[str, TableDecision]] = {}
    for key, decision in decisions.tables.items():
        if key not in owner:
            raise PlanError(
                f"{path}: tables.{key}: dataset {spec.name} has no such feature or table"
            )
        if owner[key] in found:
            raise PlanError(
                f"{path}: tables.{key}: feature {owner[key]} is already decided by "
                f"tables.{found[owner[key]][0]}"
            )
        found[owner[key]] = (key, decision)
    missing = [f for f in spec.sparse_names if f not in found]
    if missing:
        raise PlanError(
            f"{path}: tables: no decision for feature(s) {', '.join(missing)} (each needs one)"
        )
    return found


def _blocks(
    feature: SparseFeature,
    where: str,
    decision: TableDecision,
    method: str,
    cfg: EmbeddingsConfig,
    path: Path,
) -> list[tuple[Block, str | None]]:
    """The decided blocks, rounded, each with its rounding note."""
    if decision.blocks is not None:
        sizes = [(b.rows, b.dim) for b in decision.blocks]
    elif decision.dim is not None:
        sizes = [(feature.cardinality, decision.dim)]
    else:
        raise PlanError(f"{where}: give exactly one of dim or blocks")
    covered = sum(rows for rows, _ in sizes)
    if covered != feature.cardinality:
        raise PlanError(
            f"{where}.blocks: rows sum to {covered}, feature {feature.name} has cardinality "
            f"{feature.cardinality}"
        )
    out, start = [], 0
    for rows, dim in sizes:
        rounded = round_width(dim, cfg.rounding, cfg.min_dim)
        source = {"policy": "decisions", "method": method, "file": str(path), "dim": dim}
        note = rounded.note
        if rounded.value > cfg.dim:
            # Kept (a search may find a width above the base worth its cost), but said: a block
            # wider than embeddings.dim costs more than the uniform model's row.
            wider = f"{rounded.value} wide, above embeddings.dim {cfg.dim}: more than a uniform row"
            note = f"{note}; {wider}" if note else wider
        out.append((Block(start, start + rows, rounded.value, source=source), note))
        start += rows
    return out
