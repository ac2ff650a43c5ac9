"""Uniform policy, decisions files (format, loader, schema) and MLET on top of any policy."""

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from embshard.config import EmbeddingsConfig, MdeConfig, MletConfig
from embshard.datasets.schema import DatasetSpec, SparseFeature
from embshard.errors import ConfigError, PlanError
from embshard.planner.decisions import (
    BlockDecision,
    Decisions,
    TableDecision,
    load_decisions,
)
from embshard.planner.policies import from_decisions, plan_dimensions
from embshard.planner.remap import load_remap

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "planner" / "decisions.schema.json"
EXAMPLE = REPO / "configs" / "decisions.example.json"
SPEC = DatasetSpec("toy", ["d0"], [SparseFeature("C1", 50), SparseFeature("C2", 8, multi_hot=True)])


def test_uniform():
    plan = plan_dimensions(EmbeddingsConfig(dim=24), SPEC)
    assert plan.is_uniform and plan.base_dim == 24 and plan.notes == []
    assert [(t.name, t.features, t.num_embeddings) for t in plan.tables] == [("t_C1", ["C1"], 50), ("t_C2", ["C2"], 8)]
    b = plan.table("t_C2").blocks[0]
    assert (b.start, b.end, b.dim, b.mlet_width) == (0, 8, 24, None)
    assert b.source == {"policy": "uniform", "dim": 24}
    assert plan.policy["policy"] == "uniform" and plan.policy["dim"] == 24


# --- decisions ----------------------------------------------------------------------------------


def pep_decisions(tmp_path: Path) -> Path:
    """A PEP-style file: C1 cut into ranked blocks (remap beside it), C2 one narrow table."""
    remap = np.random.default_rng(0).permutation(50)
    np.save(tmp_path / "C1.pep.npy", remap)
    decisions = Decisions(
        method="pep",
        base_dim=16,
        tables={
            "t_C1": TableDecision(
                blocks=[BlockDecision(10, 16), BlockDecision(40, 6)], row_order="pep_nnz", remap="C1.pep.npy"
            ),
            "C2": TableDecision(dim=8),
        },
        meta={"sparsity": 0.8},
    )
    return decisions.save(tmp_path / "decisions.json")


def test_decisions_round_trip_into_a_plan(tmp_path):
    path = pep_decisions(tmp_path)
    assert load_decisions(path).to_json() == json.loads(path.read_text())
    out = tmp_path / "plan"
    cfg = EmbeddingsConfig(policy="decisions", dim=16, decisions=str(path))
    plan = plan_dimensions(cfg, SPEC, None, out)
    c1 = plan.table("t_C1")
    assert [(b.start, b.end, b.dim) for b in c1.blocks] == [(0, 10, 16), (10, 50, 8)]  # 6 -> 8
    assert c1.row_order == "pep_nnz" and re.fullmatch(r"t_C1\.[0-9a-f]{16}\.remap\.npy", c1.remap)
    assert load_remap(out / c1.remap, 50).tolist() == np.load(tmp_path / "C1.pep.npy").tolist()
    assert c1.blocks[1].source == {"policy": "decisions", "method": "pep", "file": str(path), "dim": 6}
    assert [b.dim for b in plan.table("t_C2").blocks] == [8]
    assert plan.notes == ["t_C1 block 1: 6 -> 8 (multiple4, FBGEMM needs widths divisible by 4)"]
    assert plan.policy["decisions_method"] == "pep" and plan.policy["decisions_meta"] == {"sparsity": 0.8}
    # the plan (with its remap) survives its own JSON round trip
    plan.save(out / "dimension_plan.json")
    assert plan.load(out / "dimension_plan.json") == plan
    # Through a link elsewhere: the remap is beside the file, not the link ("C1.pep.npy: not found").
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "linked.json").symlink_to(path)
    linked = EmbeddingsConfig(policy="decisions", dim=16, decisions=str(tmp_path / "elsewhere" / "linked.json"))
    again = plan_dimensions(linked, SPEC, None, tmp_path / "plan2").table("t_C1")
    assert [(b.start, b.end, b.dim) for b in again.blocks] == [(0, 10, 16), (10, 50, 8)]
    assert load_remap(tmp_path / "plan2" / again.remap, 50).tolist() == load_remap(out / c1.remap, 50).tolist()


def test_the_schemas_widest_width_is_the_loaders():
    from embshard.planner.rounding import MAX_DIM

    assert json.loads(SCHEMA.read_text())["definitions"]["width"]["maximum"] == MAX_DIM


def test_example_file_parses_and_matches_the_schema():
    decisions = load_decisions(EXAMPLE)
    assert decisions.method == "pep" and decisions.tables["t_C3"].row_order == "pep_nnz"
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft7Validator.check_schema(json.loads(SCHEMA.read_text()))
    jsonschema.validate(json.loads(EXAMPLE.read_text()), json.loads(SCHEMA.read_text()))


GOOD = {"version": 1, "method": "autodim", "base_dim": 16, "tables": {"C1": {"dim": 8}}}


def test_a_nan_in_decisions_meta_is_refused(tmp_path):
    # Copied into plan.json as a bare NaN, which no JSON reader takes. (Python's json reads and
    # writes NaN; JSON, and so the schema, has no such number.)
    path = tmp_path / "nan.json"
    path.write_text(json.dumps({**GOOD, "meta": {"x": float("nan")}}))
    with pytest.raises(PlanError, match=rf"^{path}: meta: holds NaN or an infinity"):
        load_decisions(path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tables": {"C1": {"dim": -3}}}, "tables.C1.dim: expected a positive integer, got -3"),
        ({"tables": {"C1": {"dimm": 8}}}, "tables.C1.dimm: unknown key"),
        (
            {"tables": {"C1": {"dim": 8, "blocks": [{"rows": 50, "dim": 8}]}}},
            "tables.C1: give exactly one of dim or blocks",
        ),
        ({"tables": {"C1": {"blocks": [{"rows": 50}]}}}, "tables.C1.blocks[0].dim: required key is missing"),
        (
            {"tables": {"C1": {"blocks": [{"rows": 0, "dim": 8}]}}},
            "tables.C1.blocks[0].rows: expected a positive integer",
        ),
        (
            {"tables": {"C1": {"blocks": [{"rows": 50, "dim": 8}], "row_order": "pep_nnz"}}},
            "tables.C1.remap: needed exactly when",
        ),
        (
            {"tables": {"C1": {"blocks": [{"rows": 50, "dim": 8}], "row_order": "random", "remap": "x.npy"}}},
            "tables.C1.row_order: 'random' is not one of",
        ),
        ({"tables": {}}, "tables: expected a non-empty object"),
        ({"version": 0}, "version: 0, expected 1"),
        # A newer embshard's decisions file, once read as a malformed one ("version: 2, expected 1").
        ({"version": 2}, "version: 2, newer than this embshard reads (1): written by a newer embshard; upgrade"),
        ({"version": True}, "version: True, expected 1"),  # True == 1 in Python
        # 2**63 overflowed int64 in the rounding and was planned 4 wide.
        ({"tables": {"C1": {"dim": 2**63}}}, "tables.C1.dim: at most 16,777,216 wide, got 9,223,372,036,854,775,808"),
        ({"base_dim": 2**24 + 1}, "base_dim: at most 16,777,216 wide"),
        ({"base_dim": "16"}, "base_dim: expected a positive integer, got '16'"),
        ({"extra": 1}, "extra: unknown key"),
    ],
)
def test_malformed_decisions_name_the_file_and_key(tmp_path, change, message):
    doc = {**GOOD, **change}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(PlanError) as e:
        load_decisions(path)
    assert str(e.value).startswith(f"{path}: ")
    assert message in str(e.value)
    # the schema rejects the same documents (they are one contract in two forms)
    jsonschema = pytest.importorskip("jsonschema")
    assert not jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).is_valid(doc)


@pytest.mark.parametrize(
    "tables, message",
    [
        ({"C1": {"dim": 8}}, "tables: no decision for feature(s) C2"),
        ({"C1": {"dim": 8}, "C2": {"dim": 8}, "C9": {"dim": 8}}, "tables.C9: dataset toy has no such feature or table"),
        (
            {"C1": {"dim": 8}, "t_C1": {"dim": 8}, "C2": {"dim": 8}},
            "tables.t_C1: feature C1 is already decided by tables.C1",
        ),
        (
            {"C1": {"blocks": [{"rows": 10, "dim": 8}, {"rows": 39, "dim": 4}]}, "C2": {"dim": 8}},
            "tables.C1.blocks: rows sum to 49, feature C1 has cardinality 50",
        ),
        (
            {"C1": {"blocks": [{"rows": 50, "dim": 8}], "row_order": "pep_nnz", "remap": "nope.npy"}, "C2": {"dim": 8}},
            "nope.npy: remap file not found",
        ),
    ],
)
def test_decisions_that_do_not_fit_the_dataset(tmp_path, tables, message):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({**GOOD, "tables": tables}))
    with pytest.raises(PlanError) as e:
        from_decisions(path, EmbeddingsConfig(policy="decisions", decisions=str(path)), SPEC, tmp_path)
    assert message in str(e.value)


def test_a_decided_width_above_the_base_dim_is_kept_and_said(tmp_path):
    # It was planned silently: a block wider than embeddings.dim costs more than a uniform row.
    path = tmp_path / "d.json"
    path.write_text(json.dumps({**GOOD, "base_dim": 16, "tables": {"C1": {"dim": 30}, "C2": {"dim": 8}}}))
    plan = from_decisions(path, EmbeddingsConfig(policy="decisions", dim=16, decisions=str(path)), SPEC, tmp_path)
    assert [b.dim for b in plan.table("t_C1").blocks] == [32]
    assert plan.notes == ["t_C1 block 0: 30 -> 32 (multiple4, FBGEMM needs widths divisible by 4); 32 wide, above "
                          "embeddings.dim 16: more than a uniform row"]


def test_decisions_made_on_another_dataset(tmp_path):
    # A prune run's ranked rows of one dataset were planned on another without a word.
    here, there = "a" * 64, "b" * 64
    path = pep_decisions(tmp_path)
    decisions = load_decisions(path)
    ranked = replace(decisions, meta={"dataset_id": there}).save(tmp_path / "ranked.json")
    cfg = EmbeddingsConfig(policy="decisions", dim=16, decisions=str(ranked))
    with pytest.raises(PlanError, match=r"ranked.json: decided on another dataset \(dataset id bbbbbbbb, the "
                                        r"data's aaaaaaaa\): its blocks rank that dataset's rows; decide again"):
        plan_dimensions(cfg, replace(SPEC, id=here), None, tmp_path / "p1")
    assert plan_dimensions(cfg, replace(SPEC, id=there), None, tmp_path / "p2").notes == [
        "t_C1 block 1: 6 -> 8 (multiple4, FBGEMM needs widths divisible by 4)"]
    # Widths per table (a search on a sample, trained on all the data) are taken, and said.
    widths = replace(decisions, tables={"C1": TableDecision(dim=8), "C2": TableDecision(dim=4)},
                     meta={"dataset_id": there}).save(tmp_path / "widths.json")
    plan = plan_dimensions(replace(cfg, decisions=str(widths)), replace(SPEC, id=here), None, tmp_path / "p3")
    assert plan.notes == [f"{widths}: decided on another dataset (dataset id bbbbbbbb, the data's aaaaaaaa): its "
                          "widths per table are taken as they are"]


def test_decisions_base_dim_must_match_config(tmp_path):
    path = pep_decisions(tmp_path)
    with pytest.raises(PlanError, match="base_dim 16 differs from embeddings.dim 32; set embeddings.dim: 16"):
        plan_dimensions(EmbeddingsConfig(policy="decisions", dim=32, decisions=str(path)), SPEC, None, tmp_path)


# --- MLET ----------------------------------------------------------------------------------------


def test_mlet_ratio_rounds_like_dims(tmp_path):
    cfg = EmbeddingsConfig(policy="mde", dim=32, mlet=MletConfig(ratio=1.5), mde=MdeConfig(alpha=0.5))
    spec = DatasetSpec("toy", [], [SparseFeature("a", 10), SparseFeature("b", 40), SparseFeature("c", 160)])
    plan = plan_dimensions(cfg, spec)  # dims 32, 16, 8 (p proportional to 1/n)
    assert [(b.dim, b.mlet_width) for t in plan.tables for b in t.blocks] == [(32, 48), (16, 24), (8, 12)]
    assert plan.table("t_a").blocks[0].source["mlet"] == {"ratio": 1.5}
    assert plan.serve_params() == 10 * 32 + 40 * 16 + 16 * 32 + 160 * 8 + 8 * 32  # serving is collapsed


def test_mlet_width_and_feature_selection():
    cfg = EmbeddingsConfig(dim=16, mlet=MletConfig(width=62, features=["C2"]))
    plan = plan_dimensions(cfg, SPEC)
    assert plan.table("t_C1").blocks[0].mlet_width is None
    assert plan.table("t_C2").blocks[0].mlet_width == 64
    assert plan.notes == ["t_C2 block 0 mlet width: 62 -> 64 (multiple4, FBGEMM needs widths divisible by 4)"]
    with pytest.raises(PlanError, match="embeddings.mlet.features: no sparse feature 'C7'"):
        plan_dimensions(EmbeddingsConfig(mlet=MletConfig(width=64, features=["C7"])), SPEC)


def test_mlet_narrower_than_dim_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match=r"embeddings\.mlet\.width: 8 < d = 16 \(table 't_C1' block 0\).*Theorem 2.2"):
        plan_dimensions(EmbeddingsConfig(dim=16, mlet=MletConfig(width=8)), SPEC)


def test_an_mlet_width_past_any_table_is_refused_not_overflowed():
    # ratio 1e18 overflowed int64 in the rounding to k = 1: "MLET width k=1 < d=16". (A width is
    # bounded as the config is read.)
    with pytest.raises(ConfigError, match=r"embeddings\.mlet\.ratio: 1e\+18 gives k = 16,000,000,000,000,000,000 "
                                          r"for table 't_C1' block 0 \(d = 16\); at most 16,777,216$"):
        plan_dimensions(EmbeddingsConfig(dim=16, mlet=MletConfig(ratio=1e18)), SPEC)
    # Its k of 300 digits: the line was longer than a screen.
    with pytest.raises(ConfigError, match=r"embeddings\.mlet\.ratio: 1e\+300 gives k = 1\.6e\+301 for table 't_C1' "):
        plan_dimensions(EmbeddingsConfig(dim=16, mlet=MletConfig(ratio=1e300)), SPEC)


def test_decisions_files_that_are_no_files_or_hold_no_json_are_one_line(tmp_path):
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(PlanError, match=r"dir\.json: a directory, not a decisions file$"):
        load_decisions(tmp_path / "dir.json")
    huge = tmp_path / "huge.json"
    huge.write_text('{"version": 1, "method": "m", "base_dim": ' + "9" * 5000 + ', "tables": {}}')
    with pytest.raises(PlanError, match=r"huge\.json: not a file embshard writes \(ValueError: Exceeds the limit"):
        load_decisions(huge)


def test_a_remap_beside_a_linked_decisions_file_and_remaps_that_are_no_arrays(tmp_path):
    from embshard.planner.remap import load_remap

    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(PlanError, match=r"empty\.npy: not a \.npy array \(EOFError"):
        load_remap(tmp_path / "empty.npy", 3)
    (tmp_path / "text.npy").write_text("root:x:0:0\n")
    with pytest.raises(PlanError, match=r"text\.npy: not a \.npy array \(a pickle or text file\)$"):
        load_remap(tmp_path / "text.npy", 3)
    with pytest.raises(PlanError, match=rf"{tmp_path}: a directory, not a remap file$"):
        load_remap(tmp_path, 3)


def test_remaps_of_other_kinds_and_claims_are_one_line_naming_the_table(tmp_path):
    # An .npz, a timedelta64 array (numpy counts it an integer) and a header claiming 10**12
    # entries (numpy allocated 7 TiB) were an AttributeError, a TypeError and a MemoryError; a
    # remap's error named the .npy alone, not which table of which file reads it.
    with open(tmp_path / "npz.npy", "wb") as f:  # by name, np.savez would add .npz
        np.savez(f, np.arange(50))
    np.save(tmp_path / "td.npy", np.arange(50).astype("m8[s]"))
    header = np.lib.format.header_data_from_array_1_0(np.arange(50))
    with open(tmp_path / "huge.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {**header, "shape": (10**12,)})
        f.write(b"\0" * 200)
    for name, said in (("npz.npy", r"not a \.npy array \(an \.npz archive\)"),
                       ("td.npy", r"remap must be a 1-D integer array, got timedelta64\[s\] \(50,\)"),
                       ("huge.npy", "remap has 1000000000000 entries, table has 50 rows")):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**GOOD, "tables": {"C1": {"blocks": [{"rows": 50, "dim": 8}], "remap": name,
                                                              "row_order": "frequency"},
                                                       "C2": {"dim": 8}}}))
        with pytest.raises(PlanError, match=rf"^{path}: tables\.C1\.remap: {tmp_path / name}: {said}$"):
            from_decisions(path, EmbeddingsConfig(dim=16), SPEC, tmp_path / "plan")


def test_decisions_keyed_by_feature_where_a_feature_is_named_like_a_table(tmp_path):
    # AutoDim keys its file by feature; with a feature named t_C1 (C1's table name) it was refused
    # as deciding C1 twice.
    spec = DatasetSpec("toy", ["d0"], [SparseFeature("C1", 50), SparseFeature("t_C1", 8)])
    path = tmp_path / "d.json"
    path.write_text(json.dumps({**GOOD, "tables": {"C1": {"dim": 8}, "t_C1": {"dim": 4}}}))
    plan = from_decisions(path, EmbeddingsConfig(dim=16), spec, None)
    assert {t.features[0]: t.blocks[0].dim for t in plan.tables} == {"C1": 8, "t_C1": 4}
    # PEP keys its file by table: there t_C1 is C1's table, and t_t_C1 the feature t_C1's.
    path.write_text(json.dumps({**GOOD, "tables": {"t_C1": {"dim": 8}, "t_t_C1": {"dim": 4}}}))
    plan = from_decisions(path, EmbeddingsConfig(dim=16), spec, None)
    assert {t.features[0]: t.blocks[0].dim for t in plan.tables} == {"C1": 8, "t_C1": 4}


def test_a_decisions_meta_too_deep_to_copy_is_refused(tmp_path):
    # A plan's save copies it recursively: 500 levels was a RecursionError after the whole plan.
    meta: dict = {}
    inner = meta
    for _ in range(500):
        inner["x"] = {}
        inner = inner["x"]
    path = tmp_path / "deep.json"
    path.write_text(json.dumps({**GOOD, "meta": meta}))
    with pytest.raises(PlanError, match=rf"^{path}: meta: nested deeper than 64 levels$"):
        load_decisions(path)
    path.write_text(json.dumps({**GOOD, "meta": {"a": [[{"b": 1}]]}}))
    assert load_decisions(path).meta == {"a": [[{"b": 1}]]}
