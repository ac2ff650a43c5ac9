"""PEP: soft threshold and its sub-gradient, per-row thresholding before pooling, counting,
initial values, masks kept at zero, and PEP masks -> decisions -> DimensionPlan."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from embshard.datasets.schema import DatasetSpec, SparseFeature
from embshard.planner.config import EmbeddingsConfig
from embshard.planner.policies import from_decisions, plan_dimensions
from embshard.planner.policies.pep import pep_table_decision
from embshard.planner.types import Block, DimensionPlan, TablePlan
from embshard.sharding.pep import (
    LocalShard,
    PepEmbeddings,
    initial_values,
    local_shards,
    soft_threshold,
)
from embshard.trainer.callbacks import StepInfo
from embshard.trainer.pep import (
    MaskKeeper,
    nonzero_counts,
    save_target,
    start_from_ticket,
)
from embshard.trainer.pep_config import PepConfig
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embshard.errors import ConfigError, PlanError

SPEC = DatasetSpec("toy", [], [SparseFeature("a", 6), SparseFeature("b", 5, multi_hot=True)])
D = 4


def pep(granularity: str, s_init: float = 0.0) -> PepEmbeddings:
    plan = plan_dimensions(EmbeddingsConfig(dim=D), SPEC)
    return PepEmbeddings(plan, granularity, s_init)


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
    expected = [[math.copysign(max(abs(x) - gi, 0.0), x) for x, gi in zip(vr, gr)] for vr, gr in zip(v.tolist(), g.tolist())]
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


def test_multi_hot_bag_sums_pruned_rows():
    """Each looked-up row is thresholded, then the bag sums them."""
    m = pep("global", s_init=math.log(0.5 / 0.5))  # g = 0.5
    with torch.no_grad():
        m.ec.embeddings["t_a"].weight.fill_(0.2)
        m.ec.embeddings["t_b"].weight.copy_(torch.arange(5 * D, dtype=torch.float).reshape(5, D) / 20 + 0.3)
    kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([1, 0, 2, 4, 3]),
                            lengths=torch.tensor([1, 0, 3, 1]))  # a: [1], []; b: [0, 2, 4], [3]
    out = {k: v.detach() for k, v in m(kjt).to_dict().items()}
    w = m.ec.embeddings["t_b"].weight.detach()
    pruned = torch.sign(w) * torch.relu(w.abs() - 0.5)
    assert out["a"].tolist() == [[0.0] * D, [0.0] * D]  # 0.2 < 0.5 and an empty bag
    assert out["b"][0].numpy() == pytest.approx((pruned[0] + pruned[2] + pruned[4]).numpy())
    assert out["b"][1].numpy() == pytest.approx(pruned[3].numpy())
    # pooling after the threshold differs from thresholding the pooled sum
    assert not torch.allclose(out["b"][0], soft_threshold(w[0] + w[2] + w[4], torch.tensor(0.0)))


def test_nonzero_count_and_initial_values():
    m = pep("feature_dimension", s_init=math.log(0.2 / 0.8))  # g = 0.2
    m.initialise(seed=3)
    for shard in local_shards(m.ec):
        n = m.plan.table(shard.table).num_embeddings
        assert shard.tensor[:, :D].numpy() == pytest.approx(
            initial_values(3, shard.table, n, D, range(n), range(D)).numpy())
        assert torch.allclose(shard.tensor[:, D:], torch.tensor(math.log(0.25)))
    counts = nonzero_counts(m)
    expected = {t: int((m.ec.embeddings[t].weight[:, :D].abs() > 0.2).sum()) for t in ("t_a", "t_b")}
    assert counts == expected


def test_initial_values_regenerate_any_slice(monkeypatch):
    monkeypatch.setattr("embshard.sharding.pep.INIT_ROW_CHUNK", 7)
    whole = initial_values(1, "t", 30, 4, range(30), range(4))
    assert whole.abs().max() <= 30 ** -0.5
    assert torch.equal(initial_values(1, "t", 30, 4, range(5, 23), range(1, 3)), whole[5:23, 1:3])
    assert not torch.equal(initial_values(2, "t", 30, 4, range(30), range(4)), whole)


def test_lottery_ticket_starts_masked_and_stays_masked():
    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t_a", embedding_dim=D, num_embeddings=6, feature_names=["a"])])
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


def test_pep_blocks_keep_survivors_in_fused_widths(tmp_path):
    nnz = np.array([0, 16, 3, 9, 16, 5, 1, 12])
    d = pep_table_decision(nnz, 16, "t.npy", tmp_path)
    assert d.row_order == "pep_nnz" and d.remap == "t.npy"
    # needs ceil4(nnz) >= 4: ranked 16, 16, 12, 12 (nnz 9), 8, 4, 4, 4
    assert [(b.rows, b.dim) for b in d.blocks] == [(2, 16), (2, 12), (1, 8), (3, 4)]
    ranks = np.load(tmp_path / "t.npy")
    assert ranks[[1, 4]].tolist() == [0, 1] and ranks[0] == 7  # most survivors first, stable
    assert pep_table_decision(np.full(4, 7), 16, "u.npy", tmp_path).dim == 8  # one width: no remap
    assert not (tmp_path / "u.npy").exists()


def test_saved_target_loads_as_a_smaller_plan(tmp_path):
    rng = np.random.default_rng(0)
    masks = {"t_a": rng.random((6, D)) < 0.3, "t_b": np.zeros((5, D), dtype=bool)}
    masks["t_b"][0] = True
    path = save_target(masks, D, tmp_path / "target-0.3", {"target": 0.3})
    assert np.load(tmp_path / "target-0.3" / "t_a.mask.npy").tolist() == masks["t_a"].tolist()
    plan = from_decisions(path, EmbeddingsConfig(dim=D, policy="decisions", decisions=str(path)), SPEC, tmp_path / "plan")
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
    with pytest.raises(ConfigError, match="granularity"):
        PepConfig(granularity="rowwise")
    with pytest.raises(PlanError, match="uniform"):
        PepEmbeddings(DimensionPlan(D, [TablePlan("t_a", ["a"], 6, [Block(0, 6, 8)])]), "global", -15)
