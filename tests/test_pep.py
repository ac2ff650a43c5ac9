"""PEP: soft threshold and its sub-gradient, per-row thresholding before pooling, counting,
initial values, masks kept at zero, and PEP masks -> decisions -> DimensionPlan."""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import profiled_synth
from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embshard.cluster.launch import plan_for_training
from embshard.config import DataConfig, EmbeddingsConfig, JobConfig, ModelConfig, PepConfig, ShardingConfig, TrainConfig
from embshard.datasets.schema import DatasetSpec, SparseFeature
from embshard.errors import ConfigError, PlanError
from embshard.planner.policies import from_decisions, plan_dimensions
from embshard.planner.policies.pep import merge_widths, pep_table_decision
from embshard.planner.types import Block, DimensionPlan, TablePlan
from embshard.sharding.pep import (
    LocalShard,
    PepEmbeddings,
    initial_values,
    local_shards,
    soft_threshold,
)
from embshard.trainer.build import build_sharded
from embshard.trainer.callbacks import StepInfo
from embshard.trainer.loop import make_reader, train_step
from embshard.trainer.pep import (
    LotteryTicket,
    MaskKeeper,
    PepPrune,
    nonzero_counts,
    pep_module,
    pep_sharding_types,
    row_threshold_decay,
    save_target,
    start_from_ticket,
)

SPEC = DatasetSpec("toy", [], [SparseFeature("a", 6), SparseFeature("b", 5, multi_hot=True)])
D = 4


def pep(granularity: str, s_init: float = 0.0, pooled_lookup: bool = True) -> PepEmbeddings:
    plan = plan_dimensions(EmbeddingsConfig(dim=D), SPEC)
    return PepEmbeddings(plan, granularity, s_init, multi_hot=["b"], pooled_lookup=pooled_lookup)


def weight(m: PepEmbeddings, table: str) -> torch.Tensor:
    if m.ebc is not None and table in m.ebc.embedding_bags:
        return m.ebc.embedding_bags[table].weight
    return m.ec.embeddings[table].weight


def test_soft_threshold_and_subgradient_by_hand():
    v = torch.tensor([0.9, -0.7, 0.2, -0.1], requires_grad=True)
    s = torch.tensor([0.0], requires_grad=True)  # g(0) = 0.5
    out = soft_threshold(v, s)
    assert out.tolist() == pytest.approx([0.4, -0.2, 0.0, 0.0])
    out.sum().backward()
    assert v.grad.tolist() == [1.0, 1.0, 0.0, 0.0]  # passes only where |v| > g(s)
    # d/ds: -sign(v) * g'(s) over survivors = -(1 - 1) * 0.25
    assert s.grad.item() == pytest.approx(0.0)


@pytest.mark.parametrize(
    "granularity, s_columns",
    [("global", None), ("dimension", None), ("feature", [[0.0, 9, 9, 9], [2.0, 9, 9, 9]]),
     ("feature_dimension", [[0.0, 1.0, -1.0, 0.0], [2.0, 2.0, 2.0, 2.0]])],
)
def test_prune_each_granularity_by_hand(granularity, s_columns):
    m = pep(granularity)
    v = torch.tensor([[0.9, -0.8, 0.3, -0.95], [0.6, 0.7, -0.99, 0.1]])
    if m.threshold is not None:
        with torch.no_grad():
            m.threshold.copy_(torch.tensor([0.0]) if granularity == "global" else torch.tensor([0.0, 1.0, -1.0, 2.0]))
        s = m.threshold.detach().expand(2, D) if granularity == "global" else m.threshold.detach().repeat(2, 1)
        rows = v.clone().requires_grad_()
    else:
        rows = torch.cat([v, torch.tensor(s_columns)], dim=1).requires_grad_()
        s = rows.detach()[:, D:D + 1].expand(2, D) if granularity == "feature" else rows.detach()[:, D:]
    out = m.prune(rows)
    g = torch.sigmoid(s)
    expected = [[math.copysign(max(abs(x) - gi, 0.0), x) for x, gi in zip(vr, gr, strict=True)]
                for vr, gr in zip(v.tolist(), g.tolist(), strict=True)]
    assert out.detach().numpy() == pytest.approx(np.array(expected), abs=1e-6)
    out.sum().backward()
    alive = (v.abs() > g).float()
    ds = -(torch.sign(v) * alive * g * (1 - g))  # per entry, before summing over shared s
    if m.threshold is not None:
        want = ds.sum() if granularity == "global" else ds.sum(0)
        assert m.threshold.grad.numpy() == pytest.approx(want.reshape(-1).numpy(), abs=1e-6)
        assert rows.grad.numpy() == pytest.approx(alive.numpy())
    else:
        assert rows.grad[:, :D].numpy() == pytest.approx(alive.numpy())
        if granularity == "feature":
            assert rows.grad[:, D].numpy() == pytest.approx(ds.sum(1).numpy(), abs=1e-6)
            assert rows.grad[:, D + 1:].abs().sum() == 0  # padding never read
        else:
            assert rows.grad[:, D:].numpy() == pytest.approx(ds.numpy(), abs=1e-6)


@pytest.mark.parametrize("granularity", ["field", "field_dimension"])
def test_a_per_table_granularity_thresholds_each_table_by_its_own_s(granularity):
    # One s per column shared by every table cut the tables of smaller entries first (a higher
    # rank at the same row norm); per table (the authors' code's field and field_dim), each
    # table's rows meet its own s, pooled or not, in the forward, the masks and the gradient.
    m = pep(granularity)
    s = (torch.tensor([[0.0], [-1.0]]) if granularity == "field"
         else torch.tensor([[0.0, 1.0, -1.0, 2.0], [-2.0, -1.0, 0.5, 0.0]]))
    assert m.threshold.shape == s.shape and m.pooled_tables == ["t_a"] and m.unpooled_features == ["b"]
    with torch.no_grad():
        m.threshold.copy_(s)
        weight(m, "t_a").copy_(torch.linspace(-0.95, 0.95, 6 * D).reshape(6, D))
        weight(m, "t_b").copy_(torch.linspace(0.9, -0.9, 5 * D).reshape(5, D))
    g = torch.sigmoid(s).expand(2, D)
    wa, wb = weight(m, "t_a").detach(), weight(m, "t_b").detach()

    def pruned(w: torch.Tensor, table: int) -> torch.Tensor:
        return torch.sign(w) * torch.relu(w.abs() - g[table])

    kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([1, 4, 0, 2, 3]),
                            lengths=torch.tensor([1, 1, 2, 1]))  # a: [1], [4]; b: [0, 2], [3]
    out = m(kjt).to_dict()
    assert out["a"].detach().numpy() == pytest.approx(torch.stack([pruned(wa[1], 0), pruned(wa[4], 0)]).numpy())
    assert out["b"].detach().numpy() == pytest.approx(
        torch.stack([pruned(wb[0], 1) + pruned(wb[2], 1), pruned(wb[3], 1)]).numpy())
    masks = {shard.table: mask for shard, mask in m.local_masks()}
    assert torch.equal(masks["t_a"], wa.abs() > g[0]) and torch.equal(masks["t_b"], wb.abs() > g[1])
    assert not torch.equal(masks["t_a"], wa.abs() > g[1])  # the other table's s would cut otherwise
    out["b"].sum().backward()  # only table b's rows were read: only its row of s moves
    assert m.threshold.grad[0].abs().sum() == 0 and m.threshold.grad[1].abs().sum() > 0


def test_multi_hot_bag_sums_pruned_rows():
    """Each looked-up row is thresholded, then the bag sums them."""
    m = pep("global", s_init=math.log(0.5 / 0.5))  # g = 0.5
    assert m.pooled_tables == ["t_a"] and m.unpooled_features == ["b"]
    with torch.no_grad():
        weight(m, "t_a").fill_(0.2)
        weight(m, "t_b").copy_(torch.arange(5 * D, dtype=torch.float).reshape(5, D) / 20 + 0.3)
    kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([1, 0, 2, 4, 3]),
                            lengths=torch.tensor([1, 0, 3, 1]))  # a: [1], []; b: [0, 2, 4], [3]
    out = {k: v.detach() for k, v in m(kjt).to_dict().items()}
    w = weight(m, "t_b").detach()
    pruned = torch.sign(w) * torch.relu(w.abs() - 0.5)
    assert out["a"].tolist() == [[0.0] * D, [0.0] * D]  # 0.2 < 0.5 and an empty bag
    assert out["b"][0].numpy() == pytest.approx((pruned[0] + pruned[2] + pruned[4]).numpy())
    assert out["b"][1].numpy() == pytest.approx(pruned[3].numpy())
    # pooling after the threshold differs from thresholding the pooled sum
    assert not torch.allclose(out["b"][0], soft_threshold(w[0] + w[2] + w[4], torch.tensor(0.0)))


@pytest.mark.parametrize("granularity", ["global", "dimension", "field", "field_dimension", "feature",
                                         "feature_dimension"])
def test_pooled_lookup_of_single_hot_rows_equals_unpooled(granularity):
    """Thresholding a single-hot feature after pooling is exact: same output, same gradients."""
    fast, slow = pep(granularity, s_init=-2.0), pep(granularity, s_init=-2.0, pooled_lookup=False)
    assert fast.ebc is not None and slow.ebc is None
    for m in (fast, slow):
        m.initialise(seed=1)
        with torch.no_grad():  # spread the row thresholds so some entries survive and some do not
            for t in ("t_a", "t_b"):
                w = weight(m, t)
                w[:, D:] = torch.linspace(-4.0, -1.0, w[:, D:].numel()).reshape(w[:, D:].shape)
    kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([1, 5, 0, 2, 4, 3, 1]),
                            lengths=torch.tensor([1, 1, 1, 0, 3, 1]))  # a: 3 rows of one id
    outs = [m(kjt).to_dict() for m in (fast, slow)]
    for f in ("a", "b"):
        assert torch.allclose(outs[0][f], outs[1][f])
    assert outs[0]["a"].abs().sum() > 0 and (outs[0]["a"] == 0).any()  # some pruned, some kept
    grad_out = torch.randn(3, 2 * D)
    for out in outs:
        torch.cat([out["a"], out["b"]], dim=1).backward(grad_out)
    for t in ("t_a", "t_b"):
        assert torch.allclose(weight(fast, t).grad, weight(slow, t).grad)
    if fast.threshold is not None:
        assert torch.allclose(fast.threshold.grad, slow.threshold.grad)


def test_nonzero_count_and_initial_values():
    m = pep("feature_dimension", s_init=math.log(0.2 / 0.8))  # g = 0.2
    m.initialise(seed=3)
    assert len(m.local_shards()) == 2  # one table pooled, one unpooled
    for shard in m.local_shards():
        n = m.plan.table(shard.table).num_embeddings
        assert shard.tensor[:, :D].numpy() == pytest.approx(
            initial_values(3, shard.table, n, D, range(n), range(D)).numpy())
        assert torch.allclose(shard.tensor[:, D:], torch.tensor(math.log(0.25)))
    counts = nonzero_counts(m)
    expected = {t: int((weight(m, t)[:, :D].abs() > 0.2).sum()) for t in ("t_a", "t_b")}
    assert counts == expected


def test_initial_values_regenerate_any_slice(monkeypatch):
    monkeypatch.setattr("embshard.sharding.pep.INIT_ROW_CHUNK", 7)
    whole = initial_values(1, "t", 30, 4, range(30), range(4))
    assert whole.abs().max() <= 30 ** -0.5
    assert torch.equal(initial_values(1, "t", 30, 4, range(5, 23), range(1, 3)), whole[5:23, 1:3])
    assert not torch.equal(initial_values(2, "t", 30, 4, range(30), range(4)), whole)


def test_lottery_ticket_starts_masked_and_stays_masked():
    ebc = EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name="t_a", embedding_dim=D, num_embeddings=6, feature_names=["a"])]
    )
    mask = np.random.default_rng(0).random((6, D)) > 0.5
    shards = [LocalShard("t_a", 0, 2, ebc.embedding_bags["t_a"].weight.data[:, 2:]),
              LocalShard("t_a", 0, 0, ebc.embedding_bags["t_a"].weight.data[:, :2])]
    start_from_ticket(shards, {"t_a": mask}, seed=5, num_rows={"t_a": 6})
    keeper = MaskKeeper(shards, {"t_a": mask})
    w = ebc.embedding_bags["t_a"].weight
    assert w.detach().numpy() == pytest.approx(initial_values(5, "t_a", 6, D, range(6), range(D)).numpy() * mask)
    opt = torch.optim.SGD(ebc.parameters(), lr=1.0)
    kjt = KeyedJaggedTensor(keys=["a"], values=torch.arange(6), lengths=torch.tensor([3, 3]))
    for step in range(3):
        opt.zero_grad()
        ebc(kjt)["a"].pow(2).sum().neg().backward()  # pushes every entry away from zero
        opt.step()
        keeper.on_step(StepInfo(step + 1, 0, 2, 0.0, 0.0, None))
        assert (w.detach().numpy()[~mask] == 0).all() and (w.detach().numpy()[mask] != 0).all()


def test_a_lottery_retrain_holds_one_byte_per_local_entry_of_its_masks(tmp_path):
    # Every rank read every table's whole mask and kept it for the run (a quarter of the whole
    # model's fp32 bytes on each rank), and the keeper an fp32 copy of its shards' (as much as the
    # tables it keeps): a retrain the plan said fitted held up to twice it.
    from embshard.trainer.pep import load_masks, mask_file

    mask = np.random.default_rng(0).random((6, D)) > 0.5
    np.save(tmp_path / mask_file("t_a"), mask)
    masks = load_masks(tmp_path, {"t_a": 6}, D)
    assert isinstance(masks["t_a"], np.memmap)  # read from the file as each rank's shards need it
    weight = torch.zeros(6, D)
    keeper = MaskKeeper([LocalShard("t_a", 2, 1, weight[2:, 1:])], masks)
    assert sum(kept.numel() * kept.element_size() for _, kept in keeper.kept) == 4 * (D - 1)
    weight += 1
    keeper.on_step(StepInfo(1, 0, 2, 0.0, 0.0, None))
    assert torch.equal(weight[2:, 1:], torch.from_numpy(mask[2:, 1:].astype(np.float32)))


def test_pep_blocks_keep_survivors_at_the_fewest_parameters(tmp_path):
    nnz = np.concatenate([np.full(900, 2), np.full(100, 16), np.full(3, 9)])
    nnz[0] = 0
    d = pep_table_decision(nnz, 16, "t.npy", tmp_path)
    assert d.row_order == "pep_nnz" and d.remap == "t.npy"
    # Needs (ceil4, at least 4): 100 x 16, 3 x 12, 900 x 4. The 12-run alone would cost
    # 3*12 + 12*16 (projection) = 228 against 3*16 = 48 inside the 16-wide block; the 4-run alone
    # 900*4 + 4*16 = 3664 against 900*16 = 14400.
    assert [(b.rows, b.dim) for b in d.blocks] == [(103, 16), (900, 4)]
    ranks = np.load(tmp_path / "t.npy")
    assert ranks[900:1000].tolist() == list(range(100))  # most survivors first, stable
    assert ranks[1000:].tolist() == [100, 101, 102] and ranks[0] == 1002  # fully pruned: last
    # A few rows: every projection costs more than it saves, so one table at the widest need.
    assert pep_table_decision(np.array([0, 16, 3, 9, 16, 5, 1, 12]), 16, "u.npy", tmp_path).dim == 16
    assert pep_table_decision(np.full(4, 7), 16, "v.npy", tmp_path).dim == 8
    assert not (tmp_path / "u.npy").exists() and not (tmp_path / "v.npy").exists()


def test_merge_widths_is_the_cheapest_split():
    rng = np.random.default_rng(0)
    for _ in range(50):
        k = int(rng.integers(1, 8))
        widths = sorted(rng.choice(np.arange(4, 68, 4), size=k, replace=False).tolist(), reverse=True)
        rows = rng.integers(1, 400, size=k).tolist()

        def cost(blocks):
            return sum(n * w + (w * 64 if w != 64 else 0) for n, w in blocks)

        brute = min(
            cost([(sum(rows[a:b]), widths[a]) for a, b in zip([0, *cuts], [*cuts, k], strict=True)])
            for r in range(k) for cuts in map(list, itertools.combinations(range(1, k), r))
        )
        blocks = merge_widths(widths, rows, 64)
        assert cost(blocks) == brute and sum(n for n, _ in blocks) == sum(rows)


def test_saved_target_loads_as_a_smaller_plan(tmp_path):
    rng = np.random.default_rng(0)
    masks = {"t_a": rng.random((6, D)) < 0.3, "t_b": np.zeros((5, D), dtype=bool)}
    masks["t_b"][0] = True
    path = save_target(masks, D, tmp_path / "target-0.3", {"target": 0.3})
    assert np.load(tmp_path / "target-0.3" / "t_a.mask.npy").tolist() == masks["t_a"].tolist()
    embeddings = EmbeddingsConfig(dim=D, policy="decisions", decisions=str(path))
    plan = from_decisions(path, embeddings, SPEC, tmp_path / "plan")
    dense = plan_dimensions(EmbeddingsConfig(dim=D), SPEC)
    assert plan.policy["decisions_method"] == "pep"
    # every survivor fits its row's width
    for name, mask in masks.items():
        table = plan.table(name)
        ranks = np.arange(table.num_embeddings) if table.remap is None else np.load(tmp_path / "plan" / table.remap)
        for row, n in enumerate(mask.sum(1)):
            block = next(b for b in table.blocks if b.start <= ranks[row] < b.end)
            assert n <= block.dim
    assert plan.serve_params() <= dense.serve_params()


def test_pep_config_checks():
    with pytest.raises(ConfigError, match="targets"):
        PepConfig(targets=[0.5, 1.5])
    # A target twice wrote its folder twice; an empty entry of the flag was dropped without a word.
    for twice in ([0.5, 0.5], [0.1, 0.1000001]):  # one folder, target-0.1, for both
        with pytest.raises(ConfigError, match=r"targets: each fraction once \(to 6 significant digits\)"):
            PepConfig(targets=twice)
    import argparse

    from embshard.cluster.pep_cli import parse_targets

    with pytest.raises(argparse.ArgumentTypeError, match="expected comma-separated fractions"):
        parse_targets("0.5,,0.2")
    with pytest.raises(ConfigError, match="granularity"):
        PepConfig(granularity="rowwise")
    with pytest.raises(ConfigError, match="weight_decay"):
        PepConfig(weight_decay=-1.0)
    with pytest.raises(PlanError, match="uniform"):
        PepEmbeddings(DimensionPlan(D, [TablePlan("t_a", ["a"], 6, [Block(0, 6, 8)])]), "global", -15, multi_hot=())


@pytest.mark.parametrize(
    "granularity, device, pooled, expected",
    [("dimension", "cpu", True, ["table_wise", "column_wise", "table_column_wise"]),
     ("feature_dimension", "cpu", True, ["table_wise"]),
     ("dimension", "cpu", False, ["table_wise", "row_wise", "column_wise"]),
     ("feature", "cpu", False, ["table_wise", "row_wise"]),
     ("feature", "cuda", True, ["table_wise", "row_wise", "table_row_wise"])],
)
def test_pep_sharding_types_per_collection(granularity, device, pooled, expected):
    cfg = JobConfig(sharding=ShardingConfig(device=device), pep=PepConfig(granularity=granularity))
    assert pep_sharding_types(cfg, pooled) == expected


def test_pep_sharding_types_refuse_what_cannot_shard():
    cfg = JobConfig(sharding=ShardingConfig(sharding_types=["row_wise"]), pep=PepConfig(granularity="dimension"))
    assert pep_sharding_types(cfg, pooled=False) == ["row_wise"]
    with pytest.raises(ConfigError, match=r"sharding.sharding_types: .*single-hot \(pooled\).* on cpu"):
        pep_sharding_types(cfg, pooled=True)


@pytest.mark.parametrize("granularity", ["dimension", "field_dimension"])
def test_weight_decay_raises_dense_thresholds(tmp_path, process_group, granularity):
    """The decay pulls s from s_init toward 0: Adam moves each s by about threshold_lr per step."""
    data = profiled_synth(tmp_path / "data", rows=600, max_cardinality=50)
    cfg = JobConfig(
        output_dir=str(tmp_path / "run"),
        data=DataConfig(path=str(data), batch_size=64),
        model=ModelConfig(dense_arch=[8], over_arch=[8]),
        embeddings=EmbeddingsConfig(dim=8),
        pep=PepConfig(granularity=granularity, s_init=-15.0, threshold_lr=0.1, weight_decay=1e-2),
    )
    bundle = plan_for_training(replace(cfg, cluster=replace(cfg.cluster, workers=1)), "pep")
    reader = make_reader(cfg, bundle, "train", 0, 1)
    sharded = build_sharded(cfg, bundle, reader.spec, torch.device("cpu"), method=PepPrune())
    module = pep_module(sharded.model)
    assert module.ec is None and module.ebc is not None  # synthetic features are all single-hot
    for batch in itertools.islice(reader, 5):
        train_step(sharded, batch)
    assert (module.threshold.detach() > -15.0 + 0.4).all()


def test_example_config_loads_from_yaml():
    from pathlib import Path

    from embshard.config import load_job_config

    cfg = load_job_config(Path(__file__).resolve().parents[1] / "configs" / "pep-movielens.yaml")
    assert cfg.pep.granularity == "dimension" and cfg.pep.weight_decay == 1e-3
    assert cfg.embeddings.policy == "uniform"


def test_row_threshold_decay_needs_a_decaying_fused_optimizer():
    def cfg(optimizer, granularity="feature_dimension", decay=1e-5):
        return JobConfig(train=TrainConfig(sparse_optimizer=optimizer), sharding=ShardingConfig(device="cuda"),
                         pep=PepConfig(granularity=granularity, weight_decay=decay))

    assert row_threshold_decay(cfg("adam")) == {"weight_decay": 1e-5}
    assert row_threshold_decay(cfg("rowwise_adagrad"))["weight_decay_mode"] == WeightDecayMode.L2
    assert row_threshold_decay(cfg("sgd", granularity="dimension")) == {}  # Adam decays dense s
    assert row_threshold_decay(cfg("sgd", decay=0.0)) == {}
    with pytest.raises(ConfigError, match="pep.weight_decay: FBGEMM's fused adagrad has no weight decay"):
        row_threshold_decay(cfg("adagrad"))


def test_cpu_fused_rowwise_adagrad_ignores_weight_decay(process_group):
    """The platform fact pep.weight_decay documents: on CPU, FBGEMM's fused row-wise Adagrad
    steps the same with and without a weight decay (so row thresholds are not decayed there).
    If this starts failing, FBGEMM applies the decay and the CPU note can go."""
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    def stepped_row(decay: dict) -> list[float]:
        ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t", embedding_dim=D, num_embeddings=10,
                                                                feature_names=["f"])], device=torch.device("meta"))
        apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": 0.1, **decay})
        planner = EmbeddingShardingPlanner(topology=Topology(world_size=1, compute_device="cpu"),
                                           constraints={"t": ParameterConstraints(sharding_types=["table_wise"])})
        sharders = [EmbeddingBagCollectionSharder()]
        dmp = DistributedModelParallel(ebc, device=torch.device("cpu"), plan=planner.collective_plan(ebc, sharders),
                                       sharders=sharders)
        weight = local_shards(dmp.module)[0].tensor
        with torch.no_grad():
            weight.fill_(1.0)
        kjt = KeyedJaggedTensor(keys=["f"], values=torch.tensor([1]), lengths=torch.tensor([1]))
        for _ in range(3):
            (dmp(kjt)["f"].sum() * 1e-3).backward()  # a tiny loss gradient; an L2 of 0.5 would dwarf it
        return weight[1].tolist()

    plain = stepped_row({})
    assert plain[0] < 1.0  # the row did step
    assert stepped_row({"weight_decay": 0.5, "weight_decay_mode": WeightDecayMode.L2}) == plain


def test_pep_runs_refuse_mlet_in_one_line():
    # The prune run said "plan it with embeddings.policy uniform" of a uniform plan with MLET.
    from embshard.config import MletConfig
    from embshard.trainer.pep import PepLottery, PepPrune

    cfg = JobConfig(embeddings=EmbeddingsConfig(dim=8, mlet=MletConfig(ratio=2.0)),
                    pep=PepConfig(targets=[0.5], retrain_target=0.5, retrain_from="runs/prune/pep"))
    for method, does in ((PepPrune(), "a PEP prune run thresholds"), (PepLottery(), "a lottery-ticket retrain keeps")):
        with pytest.raises(ConfigError, match=rf"^embeddings\.mlet: {does} "):
            method.check_config(cfg)


def test_prune_run_keeps_the_configs_checkpoint_settings():
    # `embshard prune pep` used to switch checkpoints off whatever `checkpoint:` said.
    from embshard.cluster.pep_cli import prune_job
    from embshard.config import CheckpointConfig

    cfg = JobConfig(checkpoint=CheckpointConfig(every_steps=50, keep=3), pep=PepConfig(targets=[0.5]))
    pruned = prune_job(cfg, workers=4, targets=[0.3, 0.1])
    assert pruned.checkpoint == cfg.checkpoint
    assert (pruned.cluster.workers, pruned.pep.targets) == (4, [0.3, 0.1])


def small_prune_run(tmp_path: Path, pep: PepConfig) -> JobConfig:
    """A 4-step prune run on one rank, checkpointing every 2 steps, planned."""
    from embshard.config import CheckpointConfig

    data = profiled_synth(tmp_path / "data", rows=600, max_cardinality=50)
    cfg = JobConfig(
        output_dir=str(tmp_path / "run"),
        data=DataConfig(path=str(data), batch_size=64, prefetch=1),
        model=ModelConfig(dense_arch=[8], over_arch=[8]),
        embeddings=EmbeddingsConfig(dim=8),
        train=TrainConfig(max_steps=4, progress=False, eval_max_batches=1),
        checkpoint=CheckpointConfig(every_steps=2),
        pep=pep,
    )
    plan_for_training(replace(cfg, cluster=replace(cfg.cluster, workers=1)), "pep")
    return cfg


def test_prune_run_checkpoints_in_the_one_loop(tmp_path, process_group):
    from embshard.trainer.loop import run_worker

    cfg = small_prune_run(tmp_path, PepConfig(targets=[0.01], count_every=2))
    summary = run_worker(cfg, method="pep")
    assert summary["steps"] == 4 and summary["pep"]["missed"] == [0.01]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    # Its tables with their thresholds are no model to serve; exported, they were the bare tables.
    from embshard.trainer.export import ExportError, export_serving

    with pytest.raises(ExportError, match=r"step-000004: a checkpoint of a 'pep' run, which decides a plan"):
        export_serving(tmp_path / "run" / "checkpoints", tmp_path / "serving")


def test_a_run_that_ends_between_counts_counts_at_its_end(tmp_path, process_group):
    # Ending before its first count, it said "kept 1.000 at the end" and pointed at a
    # nonzero_history.jsonl it had never written.
    import json

    from embshard.trainer.loop import run_worker
    from embshard.trainer.pep import NONZERO_HISTORY_FILE

    cfg = small_prune_run(tmp_path, PepConfig(targets=[0.01], count_every=20))
    summary = run_worker(cfg, method="pep")
    history = [json.loads(line) for line in (cfg.pep_dir / NONZERO_HISTORY_FILE).read_text().splitlines()]
    assert [h["step"] for h in history] == [summary["steps"]] == [4]
    assert summary["pep"]["kept_fraction"] == history[0]["kept_fraction"]


def test_a_resumed_prune_run_never_rewrites_a_target(tmp_path, process_group):
    # A resumed prune run used to write every target it had reached again, over the first masks.
    from embshard.errors import ConfigError
    from embshard.trainer.loop import run_worker

    # 0.99 only is reached, at the first count
    cfg = small_prune_run(tmp_path, PepConfig(targets=[0.99, 1e-6], count_every=2, s_init=-4.0))
    first = run_worker(cfg, method="pep")
    decisions = cfg.pep_dir / "target-0.99" / "decisions.json"
    written = (decisions.read_bytes(), decisions.stat().st_mtime_ns)
    assert first["pep"]["reached"]["0.99"]["step"] == 2, first["pep"]

    resumed = run_worker(replace(cfg, train=replace(cfg.train, max_steps=6)), method="pep")
    assert resumed["resumed_from"].endswith("step-000004")
    assert (decisions.read_bytes(), decisions.stat().st_mtime_ns) == written
    assert resumed["pep"]["reached"]["0.99"]["step"] == 2 and resumed["pep"]["missed"] == [1e-6]

    other_seed = replace(cfg, seed=7, output_dir=str(tmp_path / "other"), pep=replace(cfg.pep, out=str(cfg.pep_dir)))
    plan_for_training(replace(other_seed, cluster=replace(cfg.cluster, workers=1)), "pep")
    with pytest.raises(ConfigError, match=r"target-0.99: written by another prune run"):
        run_worker(other_seed, method="pep")
    assert (decisions.read_bytes(), decisions.stat().st_mtime_ns) == written
    # Started again at another pace (or on other data, or widths), its targets were reported as
    # reached with the first run's masks, though it pruned nothing.
    other_pace = replace(cfg, output_dir=str(tmp_path / "pace"),
                         pep=replace(cfg.pep, out=str(cfg.pep_dir), threshold_lr=1e-4))
    plan_for_training(replace(other_pace, cluster=replace(cfg.cluster, workers=1)), "pep")
    with pytest.raises(ConfigError, match=r"target-0.99: written by another prune run \({'threshold_lr': 0.05} there"):
        run_worker(other_pace, method="pep")


def test_a_prune_run_stopped_between_counts_writes_its_targets_where_an_uninterrupted_one_does(tmp_path,
                                                                                               process_group):
    # Stopped (Ctrl-C, a preempted pod) between counts, it wrote a reached target's masks at the
    # stop's step: resumed, it never wrote them again, and they were 2,747 entries off the masks
    # the uninterrupted run wrote at its count.
    from embshard.trainer.loop import run_worker
    from embshard.trainer.preemption import STOP_REQUEST_FILE

    pep = PepConfig(targets=[0.99], count_every=4, s_init=-4.0)
    whole = run_worker(small_prune_run(tmp_path / "whole", pep), method="pep")
    assert whole["pep"]["reached"]["0.99"]["step"] == 4
    cfg = small_prune_run(tmp_path / "stopped", pep)
    request = Path(cfg.output_dir) / STOP_REQUEST_FILE
    request.write_text("")
    stopped = run_worker(cfg, method="pep")
    assert stopped["preempted"] and stopped["steps"] < 4 and stopped["pep"]["reached"] == {}
    request.unlink()
    resumed = run_worker(cfg, method="pep")
    assert resumed["pep"]["reached"]["0.99"]["step"] == 4
    masks = [np.load(run / "pep" / "target-0.99" / "t_C1.mask.npy") for run in (tmp_path / "whole" / "run",
                                                                                 tmp_path / "stopped" / "run")]
    np.testing.assert_array_equal(*masks)


@pytest.mark.parametrize("granularity", ["feature", "feature_dimension"])
def test_row_thresholds_with_a_decay_are_refused_on_cpu(granularity):
    # A 10-epoch prune run of feature thresholds on CPU ended "target not reached (kept 0.988)":
    # no CPU fused optimizer decays them, so they never rose. Now one line before anything trains.
    from embshard.trainer.pep import PepPrune

    def cfg(device, decay=1e-3, granularity=granularity):
        return JobConfig(sharding=ShardingConfig(device=device),
                         pep=PepConfig(granularity=granularity, weight_decay=decay))

    with pytest.raises(ConfigError, match=rf"pep.granularity: {granularity} thresholds live in the table rows, "
                                          r"and on CPU no fused optimizer decays them"):
        PepPrune().check_config(cfg("cpu"))
    PepPrune().check_config(cfg("cpu", decay=0.0))
    PepPrune().check_config(cfg("cuda"))
    PepPrune().check_config(cfg("cpu", granularity="dimension"))


def sweep_trial_runs(tmp_path: Path, pep: PepConfig):
    """-> a sweep trial's base config over `small_prune_run`, the trial's `train` (its runs on one
    rank in this process), and the list of the run folders it trained, in order."""
    from embshard.config import CheckpointConfig, ClusterConfig
    from embshard.trainer.loop import run_worker

    base = replace(small_prune_run(tmp_path, pep), cluster=ClusterConfig(workers=1), checkpoint=CheckpointConfig())
    trained: list[str] = []

    def train(cfg: JobConfig, method: str | None):
        trained.append(Path(cfg.output_dir).name)
        bundle = plan_for_training(cfg, method)
        return bundle.dimension_plan, run_worker(cfg, method=method)

    return base, train, trained


def test_a_pep_sweep_trial_gives_a_point_per_budget(tmp_path, process_group):
    """The sweep's PEP recipe, its runs trained on one rank in this process: a prune run, then
    for each target reached the lottery ticket (sized by its mask) or, for pep+mlet, the target's
    decisions as an MLET plan; a target never reached and budget 1 are points with their reason."""
    from embshard.cluster.sweep_methods import TrialRuns, base_params
    from embshard.cluster.sweep_plan import Trial

    base, train, trained = sweep_trial_runs(tmp_path, PepConfig(count_every=2, s_init=-4.0))
    spec = DatasetSpec.load(base.data.path)
    budgets = [1e-6, 0.99, 1.0]
    sizes = {}
    for method in ("pep", "pep+mlet"):
        trial = Trial(method, seed=0)
        points = TrialRuns(base, spec, trial, budgets, tmp_path / method).points(train)
        assert [(p["budget"], "error" in p) for p in points] == [(1e-6, True), (0.99, False), (1.0, True)]
        assert points[0]["error"].startswith("target 1e-06 not reached in 4 prune steps (kept ")
        kept = points[1]
        assert kept["method"] == method and kept["metric"] == "auc" and 0 <= kept["value"] <= 1
        assert kept["serving_bytes"] == 4 * kept["serving_params"]
        assert set(kept["widths"]) == {f.name for f in spec.sparse} and max(kept["widths"].values()) <= 8
        sizes[method] = kept["serving_params"]
    assert trained == ["prune", "retrain-0.99"] * 2
    # The lottery ticket is sized by its mask's non-zeros, below 0.99 of the base model's (the
    # target it reached); pep+mlet by its decisions' plan, a row as wide as its widest survivor.
    prune, _ = TrialRuns(base, spec, Trial("pep", 0), budgets, tmp_path / "pep").first_run()
    ticket = LotteryTicket.load(prune.pep_dir, 0.99)
    assert sizes["pep"] == ticket.nonzero
    assert sizes["pep"] <= 0.99 * base_params(base, spec) and sizes["pep+mlet"] <= base_params(base, spec)
    # A prune that diverges is each budget's point with its error: as a failed trial it failed
    # again on every resume, and the sweep never wrote a report.
    diverging = replace(base, train=replace(base.train, sparse_lr=1e30, dense_lr=1e30))
    points = TrialRuns(diverging, spec, Trial("pep", 1), budgets, tmp_path / "diverged").points(train)
    assert [p["budget"] for p in points] == budgets
    assert all(p["error"].startswith("training diverged") for p in points), points


def test_a_pep_sweep_trains_once_the_targets_one_count_passed(tmp_path, process_group):
    # Both targets fall at the one count of the run (step 4): the same mask, retrained for each and
    # drawn as two points of the curve at one size, under two budgets' names.
    from embshard.cluster.sweep_methods import TrialRuns
    from embshard.cluster.sweep_plan import Trial

    base, train, trained = sweep_trial_runs(tmp_path, PepConfig(count_every=4, s_init=-4.0))
    spec = DatasetSpec.load(base.data.path)
    points = TrialRuns(base, spec, Trial("pep", 0), [0.999, 0.99], tmp_path / "pep").points(train)
    assert trained == ["prune", "retrain-0.999"]
    assert "error" not in points[0] and points[0]["budget"] == 0.999
    assert re.fullmatch(r"target 0\.99 was passed by the count that passed 0\.999 \(step 4, [\d,]+ non-zero\): the "
                        r"same mask, trained as 0\.999's point; count more often \(pep\.count_every, now 4\) or prune "
                        r"more slowly \(pep\.threshold_lr, pep\.weight_decay\) to tell them apart", points[1]["error"])


def test_a_lottery_retrains_plan_counts_the_bytes_its_mask_keeper_holds(tmp_path):
    # MaskKeeper holds a bool mask of every local entry beside the tables for the whole run; the
    # memory report counted the tables and their optimizer state alone.
    from embshard.planner.memory import memory_report
    from embshard.planner.shard_plan import plan_sharding
    from embshard.planner.topology import TopologySpec
    from embshard.trainer.pep import PepLottery

    spec = DatasetSpec("toy", [], [SparseFeature("a", 6), SparseFeature("c", 5)])
    rng = np.random.default_rng(0)
    masks = {"t_a": rng.random((6, D)) > 0.5, "t_c": rng.random((5, D)) > 0.5}
    ticket = LotteryTicket(seed=0, base_dim=D, tables={"t_a": 6, "t_c": 5}, masks=masks, where=tmp_path)
    cfg = JobConfig(embeddings=EmbeddingsConfig(dim=D),
                    pep=PepConfig(targets=[0.5], retrain_target=0.5, retrain_from=str(tmp_path)))
    plan = PepLottery(ticket).dimension_plan(cfg, spec, {}, tmp_path)
    report = memory_report(plan, plan_sharding(plan, TopologySpec(2, "cpu"), batch_size=8), "rowwise_adagrad")
    keeper = MaskKeeper([LocalShard(t, 0, 0, torch.zeros(m.shape)) for t, m in masks.items()], masks)
    held = sum(kept.numel() * kept.element_size() for _, kept in keeper.kept)
    assert held == (6 + 5) * D
    assert sum(s.side_bytes for s in report.shards) == held
    assert sum(r["train_bytes"] for r in report.per_rank.values()) == held + sum(
        s.weight_bytes + s.optimizer_bytes for s in report.shards)


def test_a_lottery_ticket_is_one_prune_runs_on_its_own_data(tmp_path):
    # A second prune run (seed 1) in the same folders rewrote pep.json: a retrain of the first run's
    # target drew seed 1's initial values under seed 0's mask; on other data of as many rows, the
    # masks kept other ids' entries; a record without its tables was a KeyError. Each exit 0, or a crash.
    from embshard.trainer.pep import RUN_FILE, check_pep_out, mask_file

    pep_dir = tmp_path / "run" / "pep"
    target = pep_dir / "target-0.5"
    target.mkdir(parents=True)
    np.save(target / mask_file("t_a"), np.random.default_rng(0).random((6, D)) > 0.5)
    record = {"output_dir": str((tmp_path / "run").resolve()), "seed": 0, "base_dim": D, "tables": {"t_a": 6}}
    (pep_dir / RUN_FILE).write_text(json.dumps(record))
    (target / "decisions.json").write_text(json.dumps({"version": 1, "method": "pep", "tables": {},
                                                       "meta": {"seed": 0, "dataset_id": "a" * 32}}))
    ticket = LotteryTicket.load(pep_dir, 0.5)
    plan = plan_dimensions(EmbeddingsConfig(dim=D), DatasetSpec("toy", [], [SparseFeature("a", 6)]))
    ticket.check_matches(plan, DatasetSpec("toy", [], [SparseFeature("a", 6)], id="a" * 32))
    with pytest.raises(PlanError, match=r"its masks are of the dataset with id aaaaaaaa, this run's data is bbbbbbbb"):
        ticket.check_matches(plan, DatasetSpec("toy", [], [SparseFeature("a", 6)], id="b" * 32))
    cfg = JobConfig(output_dir=str(tmp_path / "run"), seed=1, pep=PepConfig(out=str(pep_dir)))
    with pytest.raises(ConfigError, match=r"pep\.out .*: holds the prune run of seed 0 \(its pep\.json\), this one "
                                          r"has seed 1"):
        check_pep_out(cfg)
    (pep_dir / RUN_FILE).write_text(json.dumps({**record, "seed": 1}))  # as the second run rewrote it
    with pytest.raises(PlanError, match=r"target-0\.5: the mask of the prune run of seed 0, and .*pep\.json is of "
                                        r"seed 1 \(another prune run wrote it since\)"):
        LotteryTicket.load(pep_dir, 0.5)
    (pep_dir / RUN_FILE).write_text(json.dumps({"seed": 0}))
    with pytest.raises(PlanError, match=r"pep\.json: not the JSON object expected \(no 'base_dim'\)"):
        LotteryTicket.load(pep_dir, 0.5)
