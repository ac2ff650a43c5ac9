"""MLET in one process: the collapse W = W1 . W2 is the same model at width d, the rebuild
W1' = W . pinv(W2) gives W back, the serving export predicts what the trained model predicts,
and k < d is refused through the config."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import held_elsewhere, plan_spec, predict, writer_refused
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
from torchrec.distributed.types import ParameterSharding
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embshard.cluster.export_cli import register
from embshard.config import MLET_INIT_STD, DataConfig, JobConfig, MletConfig, ModelConfig
from embshard.errors import ConfigError, EmbshardError, PlanError
from embshard.planner.memory import memory_report
from embshard.planner.pipeline import PlanBundle
from embshard.planner.policies.mlet import apply_mlet
from embshard.planner.shard_plan import ShardPlan, block_table_configs
from embshard.planner.topology import TopologySpec
from embshard.planner.types import Block, DimensionPlan, TablePlan
from embshard.sharding.mlet import (
    collapse_mlet_tables,
    mlet_after_load,
    mlet_before_save,
    mlet_load_template,
    mlet_tables,
    without_mlet,
)
from embshard.sharding.planned_embedding import PlannedEmbeddingBags
from embshard.trainer.build import build_sharded
from embshard.trainer.checkpoint import CheckpointManager, Progress
from embshard.trainer.export import MANIFEST, ExportError, export_serving, load_serving
from embshard.trainer.loop import quiet_libraries
from embshard.trainer.models import TrainModel, get_arch
from embshard.trainer.models.dlrm import DLRM
from embshard.typed_config import load_yaml, to_dict

NUM_DENSE = 3
MODEL = ModelConfig(dense_arch=[8], over_arch=[8])


def mlet_plan(remap: str | None = None) -> DimensionPlan:
    """MLET blocks next to a plain block, an MDE block with a projection, and a shared table."""
    return DimensionPlan(
        base_dim=8,
        tables=[
            TablePlan("t_a", ["a"], 30, [Block(0, 10, 8, mlet_width=32), Block(10, 30, 4, mlet_width=16)],
                      row_order="frequency" if remap else "identity", remap=remap),
            TablePlan("t_bc", ["b", "c"], 12, [Block(0, 12, 8, mlet_width=24)]),
            TablePlan("t_d", ["d"], 9, [Block(0, 9, 8)]),
        ],
    )


def batch(seed: int = 0, size: int = 16) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    g = torch.Generator().manual_seed(seed)
    rows = {"a": 30, "b": 12, "c": 12, "d": 9}
    lengths = torch.randint(0, 4, (len(rows) * size,), generator=g)
    values = torch.cat([
        torch.randint(0, n, (int(lengths[i * size:(i + 1) * size].sum()),), generator=g)
        for i, n in enumerate(rows.values())
    ])
    sparse = KeyedJaggedTensor(keys=list(rows), values=values, lengths=lengths.int(), stride=size)
    return torch.randn(size, NUM_DENSE, generator=g), sparse


def shard_plan(plan: DimensionPlan, kind: str, world: int) -> ShardPlan:
    """table_wise: block tables dealt round the ranks; column_wise: every table split into equal
    column slices, one per rank (TorchRec's planner never splits tables this narrow itself)."""
    sharding = {}
    for i, c in enumerate(block_table_configs(plan)):
        n, k = c.num_embeddings, c.embedding_dim
        if kind == "table_wise":
            shards, ranks = [ShardMetadata([0, 0], [n, k], f"rank:{i % world}/cpu")], [i % world]
        else:
            part = k // world
            shards = [ShardMetadata([0, r * part], [n, part], f"rank:{r}/cpu") for r in range(world)]
            ranks = list(range(world))
        sharding[c.name] = ParameterSharding(kind, "fused", ranks, EnumerableShardingSpec(shards))
    return ShardPlan(sharding, TopologySpec(world, "cpu"))


def trained_like(plan: DimensionPlan) -> DLRM:
    """A model whose tables are not at their initial values (any W1 is as good as a trained one)."""
    torch.manual_seed(0)
    model = DLRM.planned(plan, NUM_DENSE, MODEL)
    with torch.no_grad():
        for p in model.embeddings.ebc.parameters():
            p.normal_()
    return model.eval()


def trained_train_model(plan: DimensionPlan) -> TrainModel:
    """`trained_like` as the builder wraps it: what `build_sharded(init_from=...)` copies."""
    return TrainModel(get_arch(MODEL), trained_like(plan))


def test_collapsed_state_loads_into_the_plain_model_with_equal_outputs() -> None:
    model = trained_like(mlet_plan())
    state = mlet_before_save(model, model.state_dict())
    plain = DLRM.planned(without_mlet(mlet_plan()), NUM_DENSE, MODEL).eval()
    # W sits under W1's key; W2 has no place in the plain model (no MLET, and the d-wide blocks
    # at the base dim have no projection either).
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert missing == [] and all(".mlet." in k for k in unexpected) and len(unexpected) == 3
    assert state["embeddings.ebc.embedding_bags.t_a__b0.weight"].shape == (10, 8)
    dense, sparse = batch()
    with torch.no_grad():
        torch.testing.assert_close(plain(dense, sparse), model(dense, sparse), rtol=1e-5, atol=1e-6)


def test_collapse_is_w1_times_w2_and_reports_its_time() -> None:
    model = trained_like(mlet_plan())

    class Observer:
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def observe_collapse(self, seconds: float) -> None:
            self.seconds.append(seconds)

    observer = Observer()
    collapsed = collapse_mlet_tables(model, metrics=observer)
    w1 = model.embeddings.ebc.embedding_bags["t_bc"].weight
    w2 = model.embeddings.mlet["t_bc"].weight.t()
    torch.testing.assert_close(collapsed["embeddings.ebc.embedding_bags.t_bc.weight"], w1 @ w2)
    assert len(collapsed) == 3 and len(observer.seconds) == 1 and observer.seconds[0] > 0


def test_rebuild_gives_w1_whose_product_is_w_and_keeps_outputs() -> None:
    model = trained_like(mlet_plan())
    dense, sparse = batch(1)
    with torch.no_grad():
        before = model(dense, sparse)
    saved = mlet_before_save(model, model.state_dict())
    fresh = DLRM.planned(mlet_plan(), NUM_DENSE, MODEL).eval()  # other W1, other W2 until loaded
    template = mlet_load_template(fresh, fresh.state_dict())
    for t in mlet_tables(fresh, template):
        assert template[t.w1_key].shape == (t.rows, t.dim)
    loaded = {k: saved[k].clone() for k in template}  # what dcp.load fills in
    fresh.load_state_dict(mlet_after_load(fresh, loaded))
    for t in mlet_tables(fresh, fresh.state_dict()):
        w1 = fresh.state_dict()[t.w1_key]
        assert w1.shape == (t.rows, t.width)
        torch.testing.assert_close(w1 @ fresh.state_dict()[t.w2_key].t(), saved[t.w1_key], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(fresh(dense, sparse), before, rtol=1e-5, atol=1e-6)


def test_w2_starts_gaussian_with_the_papers_scale() -> None:
    plan = DimensionPlan(base_dim=64, tables=[TablePlan("t", ["f"], 8, [Block(0, 8, 64, mlet_width=256)])])
    torch.manual_seed(0)
    w2 = PlannedEmbeddingBags(plan).mlet["t"].weight
    assert w2.mean().abs() < 0.01 and w2.std().item() == pytest.approx(MLET_INIT_STD, rel=0.03)
    assert PlannedEmbeddingBags(plan, mlet_init_std=0.01).mlet["t"].weight.std() < 0.02


def test_k_below_d_is_refused_by_the_config_and_by_the_plan(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text("embeddings:\n  dim: 16\n  mlet:\n    ratio: 0.5\n")
    with pytest.raises(ConfigError, match=r"ratio.*k < d.*Theorem 2\.2"):
        load_yaml(JobConfig, config)
    # Named by its field and as given: it was reported after rounding, as k=4 of table t_a.
    with pytest.raises(ConfigError, match=r"embeddings\.mlet\.width: 2 < d = 8 \(table 't_a' block 0\).*Theorem 2\.2"):
        apply_mlet(without_mlet(mlet_plan()), MletConfig(width=2), "multiple4")
    with pytest.raises(PlanError, match=r"k=4 < d=8.*caps the rank"):
        DimensionPlan(base_dim=8, tables=[TablePlan("t", ["f"], 8, [Block(0, 8, 8, mlet_width=4)])])


def test_export_loads_as_a_plain_model_that_predicts_the_same(tmp_path: Path) -> None:
    ranked = np.random.default_rng(0).permutation(30)  # id -> ranked row of table t_a
    np.save(tmp_path / "t_a.remap.npy", ranked)
    plan = mlet_plan(remap="t_a.remap.npy")
    model = trained_like(plan)
    out = export_serving(model, tmp_path / "serving", model_config=MODEL, spec=plan_spec(plan, NUM_DENSE),
                         plan_dir=tmp_path)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["remaps"] == {"a": "t_a.remap.npy"}
    assert {(t["block"], t["dim"], t["trained_width"]) for t in manifest["tables"]} >= {("t_a__b1", 4, 16)}
    serving = load_serving(out)
    assert not any(".mlet." in k for k in serving.state_dict())
    dense, raw = batch(2)
    by_key, keys = raw.to_dict(), raw.keys()
    ranked_ids = KeyedJaggedTensor(
        keys=keys, lengths=raw.lengths(), stride=raw.stride(),
        values=torch.cat([torch.from_numpy(ranked)[by_key[k].values()] if k == "a" else by_key[k].values()
                          for k in keys]),
    )
    with torch.no_grad():
        torch.testing.assert_close(serving(dense, raw), model(dense, ranked_ids), rtol=1e-5, atol=1e-6)
    # An id past its feature: PyTorch's index error, naming neither.
    from embshard.errors import DataError

    past = KeyedJaggedTensor(keys=keys, lengths=raw.lengths(), stride=raw.stride(),
                             values=torch.cat([by_key[k].values() + (30 if k == "a" else 0) for k in keys]))
    with pytest.raises(DataError, match=r"^feature 'a': id 3\d outside \[0, 30\), the ids of the dataset"):
        serving(dense, past)


def exported_with_a_remap(tmp_path: Path) -> tuple[Path, dict]:
    """An export of `mlet_plan` whose table t_a is reordered by a remap, and its serving.json."""
    np.save(tmp_path / "t_a.remap.npy", np.random.default_rng(0).permutation(30))
    plan = mlet_plan(remap="t_a.remap.npy")
    out = export_serving(trained_like(plan), tmp_path / "serving", model_config=MODEL,
                         spec=plan_spec(plan, NUM_DENSE), plan_dir=tmp_path)
    return out, json.loads((out / MANIFEST).read_text())


def test_a_serving_json_whose_remaps_are_not_the_plan_s_is_one_line(tmp_path: Path) -> None:
    # Dropped, or named for another feature: every id of that feature served from another row.
    out, written = exported_with_a_remap(tmp_path)
    for remaps, said in (({}, r"remaps\.a: None, where plan\.json reorders its rows by 't_a\.remap\.npy'"),
                         ({"a": "t_a.remap.npy", "b": "t_a.remap.npy"},
                          r"remaps\.b: 't_a\.remap\.npy', where plan\.json reorders none of its rows")):
        (out / MANIFEST).write_text(json.dumps({**written, "remaps": remaps}))
        with pytest.raises(ExportError, match=rf"serving\.json: {said}; the export is damaged: export the checkpoint "
                                              "again$"):
            load_serving(out)


def test_a_serving_json_whose_spec_takes_more_ids_than_the_plan_has_rows_is_one_line(tmp_path: Path) -> None:
    # Its ids past the table's rows passed the serving model's range check and reached the lookup,
    # whose bounds check reads them as row 0, silently.
    out, written = exported_with_a_remap(tmp_path)
    features = [{**f, "cardinality": 40} if f["name"] == "a" else f for f in written["spec"]["sparse"]]
    (out / MANIFEST).write_text(json.dumps({**written, "spec": {**written["spec"], "sparse": features}}))
    with pytest.raises(ExportError, match=r"serving\.json: spec: feature 'a' takes 40 ids, table 't_a' has 30 rows: "
                                          r"the export is damaged: export the checkpoint again$"):
        load_serving(out)


def test_a_serving_json_with_files_must_list_every_file_it_reads(tmp_path: Path) -> None:
    # One entry dropped from its list: that file was loaded with no hash vouching for it. Every
    # entry dropped (`"files": {}`) read as an export from before the hashes: none was checked.
    out, written = exported_with_a_remap(tmp_path)
    for name in (written["weights"], written["plan"], "t_a.remap.npy"):
        files = {k: v for k, v in written["files"].items() if k != name}
        (out / MANIFEST).write_text(json.dumps({**written, "files": files}))
        with pytest.raises(ExportError, match=rf"serving\.json: files: {re.escape(name)} is not listed; the export is "
                                              "damaged: export the checkpoint again$"):
            load_serving(out)
    (out / MANIFEST).write_text(json.dumps({**written, "files": {}}))
    with pytest.raises(ExportError, match=rf"serving\.json: files: {re.escape(written['plan'])} is not listed"):
        load_serving(out)
    (out / MANIFEST).write_text(json.dumps({**written, "files": None}))
    with pytest.raises(ExportError, match=r"serving\.json: files: null, where an export lists its files' hashes; the "
                                          "export is damaged: export the checkpoint again$"):
        load_serving(out)
    # An export from before the hashes has no `files` at all: it loads.
    (out / MANIFEST).write_text(json.dumps({k: v for k, v in written.items() if k != "files"}))
    load_serving(out)


def test_an_export_replaces_only_an_earlier_export_and_only_once_complete(tmp_path: Path, monkeypatch) -> None:
    plan = mlet_plan()
    model, spec = trained_like(plan), plan_spec(plan, NUM_DENSE)

    def export(out: Path, **flags: bool) -> Path:
        return export_serving(model, out, model_config=MODEL, spec=spec, **flags)

    out = export(tmp_path / "serving")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ExportError, match=r"serving: not empty; pass --overwrite to replace the export there"):
        export(out)
    # Once written in place: an interrupted re-export left a 0-byte weights.pt beside the old manifest.
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(out, overwrite=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["serving"]
    export(out, overwrite=True)
    assert load_serving(out) is not None
    # A folder of the user's is never written into, with a manifest of the same name or not.
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(ExportError, match=r"notes: not empty and holds no serving\.json, so it is no export"):
        export(notes, overwrite=True)
    (notes / MANIFEST).write_bytes(before[MANIFEST])
    with pytest.raises(ExportError, match=r"notes: holds 'todo\.txt', which no export holds"):
        export(notes, overwrite=True)
    assert (notes / "todo.txt").read_text() == "keep me"


def test_an_export_into_an_out_another_process_writes_is_refused_before_it_loads(tmp_path: Path) -> None:
    # Two `export --overwrite` into one --out at once both said they wrote it; it held the last one's.
    plan = mlet_plan()
    model, spec = trained_like(plan), plan_spec(plan, NUM_DENSE)
    out = export_serving(model, tmp_path / "serving", model_config=MODEL, spec=spec)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with held_elsewhere(f"writer_lock(Path({str(out)!r}))") as writing:
        with pytest.raises(ExportError, match=rf"^{re.escape(str(out))}: another embshard process is writing it "
                                              rf"\(pid {writing} "):
            export_serving(model, out, model_config=MODEL, spec=spec, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_an_export_onto_a_full_disk_is_one_line_and_keeps_the_earlier_one(tmp_path: Path, monkeypatch) -> None:
    # torch.save onto a full disk: "RuntimeError: [enforce fail at inline_container.cc:672] .
    # unexpected pos 965632 vs 965520", a traceback of 46 lines, exit 1. Only the disk is faked.
    import shutil

    from embshard import errors
    from embshard.errors import EnvironmentProblem

    plan = mlet_plan()
    model, spec = trained_like(plan), plan_spec(plan, NUM_DENSE)
    out = export_serving(model, tmp_path / "serving", model_config=MODEL, spec=spec)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def short_write(*args: object, **kwargs: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 965632 vs 965520")

    monkeypatch.setattr(torch, "save", short_write)
    def usage(path: object) -> object:  # full while the partial export is there, as a real disk would be
        staged = any(tmp_path.glob(".serving.partial-*"))
        return shutil._ntuple_diskusage(1 << 30, 1 << 30, 4096 if staged else 1 << 30)

    monkeypatch.setattr(errors.shutil, "disk_usage", usage)
    with pytest.raises(EnvironmentProblem, match=rf"^{out}: cannot be written: the disk is full \(4,096 bytes free\) "
                                                 r"\(RuntimeError: \[enforce fail"):
        export_serving(model, out, model_config=MODEL, spec=spec, overwrite=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["serving"]


def test_export_without_plan_folder_names_the_remap(tmp_path: Path) -> None:
    plan = mlet_plan(remap="t_a.remap.npy")
    with pytest.raises(ExportError, match=r"t_a.*t_a\.remap\.npy"):
        export_serving(trained_like(plan), tmp_path / "serving", model_config=MODEL, spec=plan_spec(plan, NUM_DENSE))


def checkpointed_with_the_collapse_hook(
        tmp_path: Path) -> tuple[Path, tuple[torch.Tensor, KeyedJaggedTensor], torch.Tensor]:
    """A one-rank MLET checkpoint in tmp_path/ckpt; -> it, a batch, and what the model predicts for it."""
    plan = mlet_plan()
    shard = shard_plan(plan, "table_wise", world=1)
    bundle = PlanBundle(plan, shard, memory_report(plan, shard, "rowwise_adagrad"), tmp_path / "plan")
    bundle.save()
    spec = plan_spec(plan, NUM_DENSE)
    (tmp_path / "data").mkdir()
    spec.save(tmp_path / "data")  # export rebuilds the arch from the run's dataset spec
    cfg = JobConfig(model=MODEL, data=DataConfig(path=str(tmp_path / "data")))
    with single_rank_group():
        sharded = build_sharded(cfg, bundle, spec, torch.device("cpu"), init_from=trained_train_model(plan))
        manager = CheckpointManager(tmp_path / "ckpt", before_save=[partial(mlet_before_save, sharded.model)])
        manager.save(Progress(step=1), sharded.model, sharded.optimizer, to_dict(cfg), bundle.directory)
        dense, sparse = batch(3)
        with torch.no_grad():
            want = predict(sharded.model, dense, sparse)
    return tmp_path / "ckpt", (dense, sparse), want


def test_export_from_a_checkpoint_written_with_the_collapse_hook(tmp_path: Path) -> None:
    checkpoints, inputs, want = checkpointed_with_the_collapse_hook(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = export_serving(checkpoints, tmp_path / "serving")
    assert [str(w.message) for w in caught] == []  # DCP's "loading in a single process": two lines on every export
    with torch.no_grad():
        torch.testing.assert_close(load_serving(out)(*inputs), want, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_s_export_holds_its_out_while_it_loads(tmp_path: Path, monkeypatch) -> None:
    # Locked only from its staging folder on: a second export --overwrite that started while the
    # first loaded the checkpoint passed both checks, and both said they wrote --out.
    from embshard.trainer import export

    checkpoints, _, _ = checkpointed_with_the_collapse_hook(tmp_path)
    out, refused = tmp_path / "new" / "serving", []
    verified = export.newest_verified

    def another_writer_meanwhile(source: Path) -> Path:
        refused.append(writer_refused(out))
        return verified(source)

    monkeypatch.setattr(export, "newest_verified", another_writer_meanwhile)
    export_serving(checkpoints, out)
    assert refused == [True] and load_serving(out) is not None
    assert sorted(p.name for p in out.parent.iterdir()) == ["serving"]  # no lock file left beside it


def test_a_damaged_export_is_refused_in_one_line(tmp_path: Path) -> None:
    # A bit flipped in weights.pt served AUC 0.5 without a word; a truncated or missing file was a
    # torch or numpy traceback.
    checkpoints, inputs, want = checkpointed_with_the_collapse_hook(tmp_path)
    out = export_serving(checkpoints, tmp_path / "serving")
    manifest = json.loads((out / "serving.json").read_text())
    assert set(manifest["files"]) == {"weights.pt", "plan.json"}
    weights = out / "weights.pt"
    written = weights.read_bytes()
    flipped = bytearray(written)
    flipped[len(written) // 2] ^= 0x40
    weights.write_bytes(bytes(flipped))
    with pytest.raises(ExportError, match=r"weights.pt: its contents are not those written \(sha256\); the export "
                                          r"is damaged: export the checkpoint again$"):
        load_serving(out)
    weights.write_bytes(written[:-100])
    with pytest.raises(ExportError, match=rf"weights.pt: {len(written) - 100:,} bytes, written {len(written):,}"):
        load_serving(out)
    weights.unlink()
    with pytest.raises(ExportError, match=r"weights.pt: missing; the export is damaged"):
        load_serving(out)
    # An export written before the hashes: what cannot be read is still one line.
    del manifest["files"]
    (out / "serving.json").write_text(json.dumps(manifest))
    weights.write_bytes(written[:-100])
    with pytest.raises(ExportError, match=r"weights.pt: cannot be read \(.*\); export the checkpoint again$"):
        load_serving(out)
    weights.write_bytes(written)
    with torch.no_grad():
        torch.testing.assert_close(load_serving(out)(*inputs), want, rtol=1e-5, atol=1e-6)


def test_a_hand_edited_serving_json_is_one_line(tmp_path: Path) -> None:
    # Each was a traceback from wherever its field was first used ("'list' object has no attribute
    # 'items'", "ModelConfig.__init__() got an unexpected keyword argument"), in load_serving and in
    # an export with --overwrite onto it.
    checkpoints, inputs, want = checkpointed_with_the_collapse_hook(tmp_path)
    out = export_serving(checkpoints, tmp_path / "serving")
    written = json.loads((out / "serving.json").read_text())
    edits = {
        "remaps: expected a mapping, got []": {"remaps": []},
        "vocabularies: expected a mapping, got None": {"vocabularies": None},
        "model.bogus: unknown field": {"model": {**written["model"], "bogus": 1}},
        "model: expected a mapping, got": {"model": []},
        "spec: expected a mapping, got None": {"spec": None},
        "files.weights.pt.bytes: required field is missing": {"files": {**written["files"], "weights.pt": {}}},
        "remaps.nofeature: plan.json has no feature of that name": {"remaps": {"nofeature": "x.remap.npy"}},
    }
    for said, edit in edits.items():
        (out / "serving.json").write_text(json.dumps({**written, **edit}))
        with pytest.raises(ExportError, match=re.escape(said)):
            load_serving(out)
        if "remaps" in edit or "vocabularies" in edit:  # it names no file besides weights.pt and plan.json
            export_serving(checkpoints, out, overwrite=True)
    # Without the hashes (an export of before them), a weights.pt of another model: its first mismatch.
    (out / "serving.json").write_text(json.dumps({k: v for k, v in written.items() if k != "files"}))
    torch.save({"bogus": torch.zeros(1)}, out / "weights.pt")
    with pytest.raises(ExportError, match=r"weights.pt: cannot be read \(RuntimeError: "
                                          r"Error\(s\) in loading state_dict for \w+: (Missing|Unexpected) key"):
        load_serving(out)
    export_serving(checkpoints, out, overwrite=True)
    with torch.no_grad():
        torch.testing.assert_close(load_serving(out)(*inputs), want, rtol=1e-5, atol=1e-6)


def test_export_overwrite_replaces_only_what_the_old_export_wrote(tmp_path: Path) -> None:
    # A user's file named like an export's (`*.remap.npy`) was deleted with the export it sat in.
    checkpoints, _, _ = checkpointed_with_the_collapse_hook(tmp_path)
    out = export_serving(checkpoints, tmp_path / "serving")
    (out / "notes.remap.npy").write_text("precious")
    with pytest.raises(ExportError, match=r"serving: holds 'notes.remap.npy', which no export holds; refusing to "
                                          r"replace it, even with --overwrite"):
        export_serving(checkpoints, out, overwrite=True)
    assert (out / "notes.remap.npy").read_text() == "precious"
    (out / "notes.remap.npy").unlink()
    # Named as the vocabularies' folder, in an export that has none: taken for it, and deleted.
    (out / "vocab").write_text("precious")
    with pytest.raises(ExportError, match=r"serving: holds 'vocab', which no export holds; refusing to replace it"):
        export_serving(checkpoints, out, overwrite=True)
    assert (out / "vocab").read_text() == "precious"
    (out / "vocab").unlink()
    export_serving(checkpoints, out, overwrite=True)
    # Beside the export, not in it: was refused as "inside the export".
    assert export_serving(checkpoints, out / ".." / "beside") == out / ".." / "beside"
    assert load_serving(tmp_path / "beside") is not None


def test_a_checkpoint_pruned_while_it_is_exported_is_one_line(tmp_path: Path, monkeypatch) -> None:
    # A run still saving into the folder keeps its newest steps only: the step export chose went
    # mid-read, and export was a 60-line traceback ending in DCP's AssertionError.
    from embshard.trainer import export

    checkpoints, _, _ = checkpointed_with_the_collapse_hook(tmp_path)
    read = export.checkpoint_reader

    def pruned_then_read(path):
        shutil.rmtree(path)
        return read(path)

    monkeypatch.setattr(export, "checkpoint_reader", pruned_then_read)
    with pytest.raises(ExportError, match=r"step-000001: removed while it was being exported \(a run still saving "
                                          r"into .*ckpt keeps only its newest steps\); export again"):
        export_serving(checkpoints, tmp_path / "serving")
    assert not (tmp_path / "serving").exists()


def _restep(step: Path, number: int) -> None:
    """`step` made a checkpoint of step `number`: its progress, its manifest and the hash between."""
    from embshard.trainer.checkpoint_integrity import file_record

    progress = json.loads((step / "progress.json").read_text())
    (step / "progress.json").write_text(json.dumps({**progress, "step": number}))
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["files"]["progress.json"] = file_record(step / "progress.json")
    (step / "manifest.json").write_text(json.dumps({**manifest, "step": number}))


def test_a_checkpoint_pruned_as_export_chooses_is_passed_for_the_newer_one(tmp_path: Path, monkeypatch) -> None:
    # Every step listed was pruned by the run saving there before it was read: export said "no
    # checkpoint there verifies (step-000001: No such file ...)", blaming a step simply gone.
    from embshard.trainer import checkpoint

    checkpoints, inputs, want = checkpointed_with_the_collapse_hook(tmp_path)
    check = checkpoint.problem

    def pruned_meanwhile(path, every_file=False):
        if path.name == "step-000001":
            newer = path.rename(path.with_name("step-000002"))  # pruned, and a newer step written
            _restep(newer, 2)
        return check(path, every_file)

    monkeypatch.setattr(checkpoint, "problem", pruned_meanwhile)
    out = export_serving(checkpoints, tmp_path / "serving")
    assert json.loads((out / "serving.json").read_text())["source"].endswith("step-000002")
    with torch.no_grad():
        torch.testing.assert_close(load_serving(out)(*inputs), want, rtol=1e-5, atol=1e-6)


def test_collapsing_sharded_tables_puts_no_library_deprecation_on_the_console(tmp_path: Path) -> None:
    # The collapse assembles TorchRec's own ShardedTensor, which torch marks deprecated: a worker
    # warned once per checkpoint, into every sweep's console.
    plan = mlet_plan()
    shard = shard_plan(plan, "table_wise", world=1)
    bundle = PlanBundle(plan, shard, memory_report(plan, shard, "rowwise_adagrad"), tmp_path / "plan")
    cfg = JobConfig(model=MODEL, data=DataConfig(path=str(tmp_path)))
    with single_rank_group(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_libraries()
        sharded = build_sharded(cfg, bundle, plan_spec(plan, NUM_DENSE), torch.device("cpu"))
        collapsed = mlet_before_save(sharded.model, sharded.model.state_dict())
    assert any(isinstance(v, ShardedTensor) for v in collapsed.values())  # the path that warned
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []


@contextmanager
def single_rank_group() -> Iterator[None]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_export_cli_names_a_missing_checkpoint(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    with pytest.raises(EmbshardError, match="nope.*no checkpoint found"):
        args.func(args)


def test_load_serving_names_a_folder_that_is_not_an_export(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=str(tmp_path)):
        load_serving(tmp_path)


def test_an_mlet_w2_is_told_from_an_arch_s_own_mlet_submodule() -> None:
    # Any key ending "mlet.<x>.weight" was taken for a W2: an arch's own `self.mlet` layers were left
    # out of the export's weights and dropped on resume.
    from embshard.sharding.mlet import is_mlet_w2

    keys = {"model.emb.ebc.embedding_bags.t_C1.weight", "model.emb.mlet.t_C1.weight", "model.mlet.proj.weight"}
    assert is_mlet_w2("model.emb.mlet.t_C1.weight", keys)
    assert not is_mlet_w2("model.mlet.proj.weight", keys)
    assert is_mlet_w2("mlet.t_C1.weight", {"ebc.embedding_bags.t_C1.weight"})
