"""Foundation: two gloo ranks training a sharded DLRM take the same step as one process training the
same model unsharded on the whole batch.

What equivalence holds: each rank sees half of a global batch B and its loss is the mean over its
half. DDP averages the dense gradients over ranks; TorchRec's pooled all-to-all divides the
embedding gradients by the world size on their way back to the shard owners (comm_ops'
GRADIENT_DIVISION, on by default), so the fused optimizer also sees the average of the ranks'
gradients. The average of two half-batch means is the mean over B, hence every parameter gets
exactly the gradient of the unsharded mean loss, and with SGD on both sides (no state, update
linear in the gradient) the updated weights agree to float rounding. The reported loss is the mean
of the two ranks' losses.
"""

from __future__ import annotations

from dataclasses import replace
from itertools import islice
from pathlib import Path

import pytest
import torch
from conftest import profiled_synth
from distributed import run_ranks
from movielens_fixture import write_ml1m_like
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
from torchrec import EmbeddingBagCollection
from torchrec.distributed.types import ParameterSharding
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embshard.config import DataConfig, EmbeddingsConfig, JobConfig, MdeConfig, ModelConfig, TrainConfig
from embshard.datasets.convert import convert
from embshard.datasets.reader import Batch, ParquetBatchReader
from embshard.datasets.schema import DatasetSpec
from embshard.planner.pipeline import PlanBundle, make_plan, plan_with
from embshard.planner.shard_plan import ShardPlan, block_table_configs
from embshard.planner.topology import TopologySpec
from embshard.trainer.build import build_sharded, build_unsharded
from embshard.trainer.planning import planning_step

WORLD = 2
BATCH = 256  # global; each rank takes half
STEPS = 3


def job_config(dataset: Path, embeddings: EmbeddingsConfig, arch: str, dense_weight_decay: float = 0.0) -> JobConfig:
    options = {"dcn_num_layers": 2, "dcn_low_rank_dim": 8} if arch == "dlrm_dcn" else {}
    return JobConfig(
        seed=7,
        data=DataConfig(path=str(dataset)),
        embeddings=embeddings,
        model=ModelConfig(arch=arch, options=options, dense_arch=[16], over_arch=[16]),
        # SGD on both sides keeps the update linear in the gradient, so equal gradients mean
        # equal weights (Adam's normalisation would magnify rounding in tiny gradients).
        train=TrainConfig(sparse_optimizer="sgd", sparse_lr=0.5, dense_optimizer="sgd", dense_lr=0.1,
                          dense_weight_decay=dense_weight_decay),
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return profiled_synth(tmp_path_factory.mktemp("equiv") / "data", rows=4000, max_cardinality=2000, seed=3)


def mixed_shard_plan(bundle: PlanBundle) -> ShardPlan:
    """The planner's table-wise plan with every other table (of a width that halves into fused-kernel
    widths) split column-wise over both ranks, so one model holds both kinds of shard. TorchRec's
    planner never splits tables this narrow by itself (its column-wise shards are >= 128 wide)."""
    sharding = dict(bundle.shard_plan.sharding)
    configs = [c for c in block_table_configs(bundle.dimension_plan) if c.embedding_dim % 8 == 0]
    for config in configs[::2]:
        half = config.embedding_dim // WORLD
        sharding[config.name] = ParameterSharding(
            sharding_type="column_wise",
            compute_kernel=sharding[config.name].compute_kernel,
            ranks=list(range(WORLD)),
            sharding_spec=EnumerableShardingSpec([
                ShardMetadata([0, r * half], [config.num_embeddings, half], f"rank:{r}/cpu")
                for r in range(WORLD)
            ]),
        )
    return ShardPlan(sharding=sharding, topology=bundle.shard_plan.topology)


def make_bundle(dataset: Path, tmp: Path, cfg: JobConfig) -> PlanBundle:
    """The driver's plan for cfg's method and arch, with a mixed table-wise / column-wise layout."""
    topology = TopologySpec(world_size=WORLD, device="cpu")
    bundle = plan_with(planning_step(cfg), dataset, topology, tmp / "plan",
                       batch_size=BATCH // WORLD, optimizer=cfg.train.sparse_optimizer, sharding_types=["table_wise"])
    bundle = replace(bundle, shard_plan=mixed_shard_plan(bundle))
    types = {ps.sharding_type for ps in bundle.shard_plan.sharding.values()}
    assert types == {"table_wise", "column_wise"}
    bundle.save()
    return bundle


def global_batches(dataset: Path, bundle: PlanBundle) -> list[Batch]:
    reader = ParquetBatchReader(dataset, "train", BATCH, shuffle=False, id_maps=bundle.id_maps())
    return list(islice(reader, STEPS))


def rows_of(batch: Batch, lo: int, hi: int) -> Batch:
    """Examples [lo, hi) of a batch: what one rank of the sharded run is fed."""
    per_key = batch.sparse.to_dict()
    keys = batch.sparse.keys()
    values, lengths = [], []
    for k in keys:
        offsets = per_key[k].offsets()
        values.append(per_key[k].values()[offsets[lo]:offsets[hi]])
        lengths.append(per_key[k].lengths()[lo:hi])
    sparse = KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths), stride=hi - lo)
    return Batch(batch.dense[lo:hi], sparse, batch.labels[lo:hi], {})


def unsharded_run(
    cfg: JobConfig, bundle: PlanBundle, batches: list[Batch]
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The reference: one process, the whole batch, plain torch SGD with the sparse lr on the
    embedding tables and the dense lr and weight decay elsewhere."""
    model = build_unsharded(cfg, bundle, DatasetSpec.load(cfg.data.path), torch.device("cpu"))
    tables = [p for m in model.modules() if isinstance(m, EmbeddingBagCollection) for p in m.parameters()]
    others = [p for p in model.parameters() if all(p is not t for t in tables)]
    opt = torch.optim.SGD([{"params": tables, "lr": cfg.train.sparse_lr},
                           {"params": others, "lr": cfg.train.dense_lr, "weight_decay": cfg.train.dense_weight_decay}])
    losses = []
    for batch in batches:
        loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _sharded_run(rank: int, world: int, cfg: JobConfig, plan_dir: Path, dataset: Path
                 ) -> tuple[list[float], dict[str, torch.Tensor] | None]:
    """One rank: its half of every global batch; returns its losses and (rank 0) the full state."""
    from embshard.trainer.loop import train_step

    bundle = PlanBundle.load(plan_dir, cfg.train.sparse_optimizer)
    batches = global_batches(dataset, bundle)
    spec = DatasetSpec.load(dataset)
    init = build_unsharded(cfg, bundle, spec, torch.device("cpu"))
    sharded = build_sharded(cfg, bundle, spec, torch.device("cpu"), init_from=init)
    half = BATCH // world
    losses = [train_step(sharded, rows_of(b, rank * half, (rank + 1) * half)).item() for b in batches]
    state = {}
    for key, value in sharded.model.state_dict().items():
        if isinstance(value, ShardedTensor):
            full = torch.zeros(value.size()) if rank == 0 else None
            value.gather(dst=0, out=full)  # a collective: every rank takes part
            value = full
        state[key] = value.detach().clone() if value is not None else None
    return losses, state if rank == 0 else None


def assert_sharded_equals_unsharded(dataset: Path, tmp: Path, embeddings: EmbeddingsConfig,
                                    arch: str = "dlrm", dense_weight_decay: float = 0.0) -> None:
    cfg = job_config(dataset, embeddings, arch, dense_weight_decay)
    bundle = make_bundle(dataset, tmp, cfg)
    ref_losses, ref_state = unsharded_run(cfg, bundle, global_batches(dataset, bundle))
    results = run_ranks(_sharded_run, WORLD, cfg, bundle.directory, dataset)

    rank_losses = [losses for losses, _ in results]
    mean_losses = [sum(ls) / WORLD for ls in zip(*rank_losses, strict=True)]
    assert mean_losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    # Training moved the weights: equal tables are not just equal initial tables.
    assert ref_losses[-1] != ref_losses[0]

    state = results[0][1]
    init = build_unsharded(cfg, bundle, DatasetSpec.load(dataset), torch.device("cpu")).state_dict()
    table_keys = [k for k in ref_state if ".ebc.embedding_bags." in k]
    assert len(table_keys) == len(bundle.shard_plan.sharding)
    for key, want in ref_state.items():
        assert key in state, f"sharded state_dict lacks {key}"
        torch.testing.assert_close(state[key], want, rtol=1e-4, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    assert any(not torch.equal(ref_state[k], init[k]) for k in table_keys)


@pytest.mark.slow
def test_uniform_sharded_step_equals_unsharded(dataset: Path, tmp_path: Path) -> None:
    assert_sharded_equals_unsharded(dataset, tmp_path, EmbeddingsConfig(policy="uniform", dim=8))


@pytest.mark.slow
def test_mde_within_sharded_step_equals_unsharded(dataset: Path, tmp_path: Path) -> None:
    embeddings = EmbeddingsConfig(policy="mde", dim=8, min_dim=4, mde=MdeConfig(mode="within", blocks=3, alpha=0.4))
    plan = make_plan(embeddings, dataset, TopologySpec(world_size=WORLD), tmp_path / "probe",
                     batch_size=BATCH, optimizer="sgd").dimension_plan
    # The test needs what makes MDE different: several blocks per table and narrow projected ones.
    assert max(len(t.blocks) for t in plan.tables) > 1
    assert any(b.dim < plan.base_dim for t in plan.tables for b in t.blocks)
    # With weight decay on the dense side: it must reach the projections (and the MLPs) alone,
    # as the reference applies it. Over 3 steps it shrinks them by about 3% (lr x decay = 0.01 a
    # step), far above the comparison's tolerance.
    assert_sharded_equals_unsharded(dataset, tmp_path, embeddings, dense_weight_decay=0.1)


@pytest.mark.slow
def test_dcn_with_per_feature_widths_sharded_step_equals_unsharded(dataset: Path, tmp_path: Path) -> None:
    """dlrm_dcn over an MDE plan: every feature at its own width into the cross net, projections
    only within tables."""
    embeddings = EmbeddingsConfig(policy="mde", dim=8, min_dim=4, mde=MdeConfig(mode="within", blocks=3, alpha=0.4))
    cfg = job_config(dataset, embeddings, "dlrm_dcn")
    plan = make_bundle(dataset, tmp_path / "probe", cfg).dimension_plan
    assert not plan.uniform_width
    widths = {plan.output_dim(t) for t in plan.tables}
    assert len(widths) > 1  # features really reach the cross net at different widths
    assert_sharded_equals_unsharded(dataset, tmp_path, embeddings, arch="dlrm_dcn")


@pytest.fixture(scope="module")
def ratings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MovieLens-shaped ratings as matrix factorisation reads them: userId, movieId, the rating."""
    root = tmp_path_factory.mktemp("equiv-mf")
    src = write_ml1m_like(root / "ml", users=100, movies=60, per_user=12, seed=4)
    convert("movielens", src, root / "data", target="rating", split="random", min_count=1)
    return root / "data"


@pytest.mark.slow
def test_mf_over_mde_within_sharded_step_equals_unsharded(ratings: Path, tmp_path: Path) -> None:
    """mf (dot product + data-parallel biases) over MDE within tables, the paper's MovieLens setting."""
    embeddings = EmbeddingsConfig(policy="mde", dim=16, min_dim=4, mde=MdeConfig(mode="within", blocks=2, alpha=0.5))
    plan = make_plan(embeddings, ratings, TopologySpec(world_size=WORLD), tmp_path / "probe",
                     batch_size=BATCH, optimizer="sgd").dimension_plan
    assert any(b.dim < plan.base_dim for t in plan.tables for b in t.blocks)
    assert_sharded_equals_unsharded(ratings, tmp_path, embeddings, arch="mf")
