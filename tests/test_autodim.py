"""AutoDim: Gumbel-softmax mixing and temperature against hand-computed values, what each candidate
reads from its table, the bi-level separation of gradients on a (one-rank) sharded model, and the
decisions file back into a DimensionPlan."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import profiled_synth
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embshard.cluster.launch import plan_for_training
from embshard.config import (
    AutodimConfig,
    CheckpointConfig,
    DataConfig,
    EmbeddingsConfig,
    JobConfig,
    MletConfig,
    ModelConfig,
    TrainConfig,
)
from embshard.datasets.reader import ParquetBatchReader
from embshard.datasets.schema import DatasetSpec
from embshard.errors import ConfigError, PlanError
from embshard.planner.decisions import load_decisions
from embshard.planner.policies import plan_dimensions
from embshard.planner.types import Block, DimensionPlan, TablePlan
from embshard.sharding.autodim import (
    AutodimEmbeddingBags,
    _repeat_features,
    gumbel_softmax,
    search_plan,
)
from embshard.trainer.autodim import (
    AutodimSearch,
    WidthCost,
    alpha_step,
    base_plan,
    decisions_path,
    make_decisions,
    model_step,
    search_embedding,
)
from embshard.trainer.build import build_sharded
from embshard.trainer.evaluate import EvalResult

CANDIDATES = [2, 8, 16]


def uniform(base_dim: int = 16) -> DimensionPlan:
    return DimensionPlan(base_dim, [
        TablePlan("t_a", ["a"], 10, [Block(0, 10, base_dim)]),
        TablePlan("t_b", ["b"], 6, [Block(0, 6, base_dim)]),
    ])


def kjt() -> KeyedJaggedTensor:
    """3 examples; a: [1], [2, 3], [] ; b: [4], [], [5]"""
    return KeyedJaggedTensor(
        keys=["a", "b"],
        values=torch.tensor([1, 2, 3, 4, 5]),
        lengths=torch.tensor([1, 2, 0, 1, 0, 1], dtype=torch.int32),
    )


def test_gumbel_softmax_matches_hand_computation():
    logits = torch.tensor([[0.0, math.log(2.0)]])
    noise = torch.tensor([[0.5, -0.5]])
    # (0 + 0.5) / 0.5 = 1 and (ln 2 - 0.5) / 0.5 = 2 ln 2 - 1: p0 = e / (e + 4 / e) = 1 / (1 + 4 e^-2)
    p = gumbel_softmax(logits, tau=0.5, noise=noise)
    p0 = 1 / (1 + 4 * math.exp(-2))
    assert p.tolist()[0] == pytest.approx([p0, 1 - p0], abs=1e-6)
    # logits are alpha's log up to a constant: softmax(logits) as alpha gives the same mixture
    log_alpha = torch.log_softmax(logits, dim=-1)
    assert torch.allclose(gumbel_softmax(log_alpha, 0.5, noise), p)


def test_temperature_schedule():
    cfg = AutodimConfig()
    assert cfg.temperature(0) == 1.0
    assert cfg.temperature(1000) == pytest.approx(0.95)
    assert cfg.temperature(19_000) == pytest.approx(0.05)
    assert cfg.temperature(19_800) == pytest.approx(0.01)
    assert cfg.temperature(10**6) == 0.01  # floored at tau_min


def test_mixing_uses_the_modules_noise_and_temperature():
    m = AutodimEmbeddingBags(uniform(), CANDIDATES)
    with torch.no_grad():
        m.arch.logits.copy_(torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0]]))
    m.tau = 0.5
    m.seed_noise(7)
    sampled = m.mixing_weights()
    g = torch.Generator().manual_seed(7)
    u = torch.rand((2, 3), generator=g)
    expected = torch.softmax((m.arch.logits - torch.log(-torch.log(u))) / 0.5, dim=-1)
    assert torch.allclose(sampled, expected)
    m.eval()  # no noise when evaluating
    assert torch.allclose(m.mixing_weights(), torch.softmax(m.arch.logits / 0.5, dim=-1))


def _repeat(features: KeyedJaggedTensor) -> KeyedJaggedTensor:
    return _repeat_features(features, ["a", "b"], CANDIDATES)


def reference(m: AutodimEmbeddingBags, features: KeyedJaggedTensor, p: torch.Tensor) -> torch.Tensor:
    """The paper's search embedding written out per field and candidate: slice the candidate's
    first d_n columns (of the shared table, or of its own), transform or zero-pad it to d_N,
    BatchNorm it with batch statistics, mix with p. -> [B, F, d_N]"""
    pooled = m.ebc(features if m.lookup == "weight_sharing" else _repeat(features)).to_dict()
    fields = []
    for fi, feature in enumerate(m.feature_names):
        total = 0
        for ni, d in enumerate(CANDIDATES):
            x = pooled[feature if m.lookup == "weight_sharing" else f"{feature}__d{d}"][:, :d]
            if m.unify == "linear":
                start = 0 if m.lookup == "weight_sharing" else sum(-(-c // 4) * 4 for c in CANDIDATES[:ni])
                y = x @ m.weight[fi, ni, start : start + d]
                if m.bias is not None:
                    y = y + m.bias[fi, ni]
            else:
                y = torch.nn.functional.pad(x, (0, m.base_dim - d))
            if m.batchnorm:
                mean, var = y.mean(0), y.var(0, unbiased=False)
                y = (y - mean) / torch.sqrt(var + 1e-5) * m.gamma[fi, ni] + m.beta[fi, ni]
                if m.unify == "zero_pad":
                    y = y * (torch.arange(m.base_dim) < d)
            total = total + p[fi, ni] * y
        fields.append(total)
    return torch.stack(fields, dim=1)


@pytest.mark.parametrize("lookup", ["weight_sharing", "separate"])
@pytest.mark.parametrize("unify", ["linear", "zero_pad"])
@pytest.mark.parametrize("batchnorm", [True, False])
def test_search_embedding_equals_the_per_candidate_reference(lookup, unify, batchnorm):
    torch.manual_seed(0)
    m = AutodimEmbeddingBags(uniform(), CANDIDATES, lookup=lookup, unify=unify, batchnorm=batchnorm)
    if batchnorm:
        with torch.no_grad():
            m.gamma.uniform_(0.5, 1.5)
            m.beta.uniform_(-0.5, 0.5)
    with torch.no_grad():
        m.arch.logits.normal_()
    m.tau = 0.7
    m.seed_noise(3)
    out = m(kjt()).values().view(3, 2, 16)
    m.seed_noise(3)
    expected = reference(m, kjt(), m.mixing_weights())
    assert torch.allclose(out, expected, atol=1e-5)


def test_running_statistics_serve_evaluation():
    """Eval mode uses BatchNorm's running statistics; after one momentum-1 step they are the
    batch's own (unbiased variance), so eval equals the reference up to that variance factor."""
    m = AutodimEmbeddingBags(uniform(), CANDIDATES, momentum=1.0)
    m(kjt())
    m.eval()
    p = m.mixing_weights()
    m.train()
    pooled = m.ebc(kjt()).to_dict()
    y = pooled["a"][:, :8] @ m.weight[0, 1, :8]  # field a, candidate 8
    assert torch.allclose(m.running_mean[0, 1], y.mean(0), atol=1e-6)
    assert torch.allclose(m.running_var[0, 1], y.var(0, unbiased=True), atol=1e-6)
    m.eval()
    out = m(kjt()).values().view(3, 2, 16)
    expected = 0
    for ni, d in enumerate(CANDIDATES):
        y = pooled["a"][:, :d] @ m.weight[0, ni, :d]
        expected = expected + p[0, ni] * (y - m.running_mean[0, ni]) / torch.sqrt(m.running_var[0, ni] + 1e-5)
    assert torch.allclose(out[:, 0], expected, atol=1e-5)


@pytest.mark.parametrize("n", range(len(CANDIDATES)))
def test_weight_sharing_candidate_trains_only_its_columns(n):
    """With the mixture on candidate n alone, the shared table's gradient stays in its first d_n
    columns: the candidate is exactly a d_n-wide embedding."""
    m = AutodimEmbeddingBags(uniform(), CANDIDATES, unify="linear", batchnorm=False)
    with torch.no_grad():
        m.arch.logits.fill_(-math.inf)  # exactly one-hot: e^-100 would still leak a denormal
        m.arch.logits[:, n] = 0.0
    m.tau = 1.0
    m.eval()
    m(kjt()).values().pow(2).sum().backward()
    for table in ("t_a", "t_b"):
        grad = m.ebc.embedding_bags[table].weight.grad
        assert grad[:, : CANDIDATES[n]].abs().sum() > 0
        assert not grad[:, CANDIDATES[n]:].any()


def test_separate_tables_round_narrow_candidates_up_with_a_note():
    plan = search_plan(uniform(), CANDIDATES, "separate")
    widths = {t.name: t.blocks[0].dim for t in plan.tables}
    assert widths == {"t_a__d2": 4, "t_a__d8": 8, "t_a__d16": 16, "t_b__d2": 4, "t_b__d8": 8, "t_b__d16": 16}
    assert any("t_a__d2" in note and "first 2 columns" in note for note in plan.notes)
    assert search_plan(uniform(), CANDIDATES, "weight_sharing") == uniform()
    with pytest.raises(PlanError, match="largest candidate"):
        search_plan(uniform(32), CANDIDATES, "weight_sharing")


def test_config_checks_name_the_field():
    with pytest.raises(ConfigError, match="candidates: must be strictly ascending"):
        AutodimConfig(candidates=[8, 2])
    with pytest.raises(ConfigError, match="alpha_every"):
        AutodimConfig(alpha_every=0)
    with pytest.raises(ConfigError, match=r"^width_cost: must be >= 0, got -0.1$"):
        AutodimConfig(width_cost=-0.1)
    cfg = JobConfig(embeddings=EmbeddingsConfig(dim=16))
    cfg.autodim = AutodimConfig(candidates=[2, 8, 32])
    with pytest.raises(ConfigError, match="autodim.candidates: the largest candidate 32 must equal embeddings.dim 16"):
        plan_search(cfg, 1)
    # MLET was dropped without a word: the search trains tables of its own.
    cfg = JobConfig(embeddings=EmbeddingsConfig(dim=16, mlet=MletConfig(ratio=2.0)),
                    autodim=AutodimConfig(candidates=[4, 16]))
    with pytest.raises(ConfigError, match=r"^embeddings\.mlet: the AutoDim search trains candidate widths .* \(the "
                                          r"sweep's pep\+mlet and autodim\+mlet do\)$"):
        plan_search(cfg, 1)


def test_width_cost_gradient_is_that_of_the_expected_width():
    cost = WidthCost(CANDIDATES, 1.0)
    # Equal weights: each candidate's p is 1/3 and E[d / d_N] = (2 + 8 + 16) / 3 / 16 = 13/24, so
    # d/d logit_n = (d_n / 16 - 13/24) / 3.
    hand = torch.tensor([(2 / 16 - 13 / 24) / 3, (8 / 16 - 13 / 24) / 3, (16 / 16 - 13 / 24) / 3])
    assert torch.allclose(cost.gradient(torch.zeros(2, 3)), hand.expand(2, 3))
    logits = torch.tensor([[0.5, -1.0, 2.0], [3.0, 0.0, -2.0]], requires_grad=True)
    expected = (torch.softmax(logits, -1) * torch.tensor(CANDIDATES) / 16).sum()
    (autograd,) = torch.autograd.grad(expected, [logits])
    assert torch.allclose(cost.gradient(logits.detach()), autograd)


# --- on a sharded model (one gloo rank, in process) ---------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return profiled_synth(tmp_path_factory.mktemp("autodim") / "data", rows=3000, max_cardinality=300, seed=0)



def job(dataset: Path, out: Path, **search) -> JobConfig:
    cfg = JobConfig(
        output_dir=str(out),
        data=DataConfig(path=str(dataset), batch_size=256, eval_batch_size=1024, prefetch=1),
        model=ModelConfig(dense_arch=[16], over_arch=[16]),
        embeddings=EmbeddingsConfig(dim=16),
        train=TrainConfig(progress=False),
        checkpoint=CheckpointConfig(enabled=False),
    )
    cfg.autodim = AutodimConfig(candidates=CANDIDATES, **search)
    return cfg


def plan_search(cfg: JobConfig, world: int):
    """The driver's planning step of `embshard search autodim` for `world` ranks."""
    return plan_for_training(replace(cfg, cluster=replace(cfg.cluster, workers=world)), "autodim")


def _build(cfg: JobConfig):
    spec = DatasetSpec.load(cfg.data.path)
    return build_sharded(cfg, plan_search(cfg, 1), spec, torch.device("cpu"), method=AutodimSearch())


def _alpha(model) -> torch.nn.Parameter:
    return search_embedding(model).arch.logits


def _batches(cfg: JobConfig, split: str, n: int):
    reader = ParquetBatchReader(cfg.data.path, split, cfg.data.batch_size, shuffle=False, prefetch=1)
    it = iter(reader)
    return [next(it) for _ in range(n)]


def _weights(model) -> dict[str, torch.Tensor]:
    """Every trained tensor but alpha: dense parameters and the local shards of the tables."""
    out = {}
    for name, value in model.model.state_dict().items():
        if any(s in name for s in ("running_", "num_batches_tracked", "arch.logits")):
            continue  # BatchNorm statistics are not trained weights
        if hasattr(value, "local_shards"):
            value = torch.cat([s.tensor.flatten() for s in value.local_shards()])
        out[name] = value.detach().clone()
    return out


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.model.named_parameters() if p.grad is not None}


def test_bilevel_alpha_learns_from_validation_only_and_tables_do_not(dataset, tmp_path, process_group):
    cfg = job(dataset, tmp_path / "run", alpha_lr=0.1)
    model = _build(cfg)
    train, valid = _batches(cfg, "train", 2), _batches(cfg, "valid", 1)

    alpha0, weights0 = _alpha(model).detach().clone(), _weights(model)
    model_step(model, train[0], train_alpha=False)
    assert _alpha(model).grad is None and torch.equal(_alpha(model), alpha0)  # training loss: not alpha's
    weights1 = _weights(model)
    assert any(not torch.equal(weights0[k], weights1[k]) for k in weights0 if ".ebc." in k)  # tables train

    grads1 = _grads(model)
    alpha_step(model, valid[0])
    assert not torch.equal(_alpha(model), alpha0)  # validation loss moves alpha ...
    after = _weights(model)
    changed = [k for k in weights1 if not torch.equal(weights1[k], after[k])]
    assert changed == []  # ... and nothing else: no table, transform or arch
    assert _grads(model).keys() == grads1.keys()  # nor adds to their gradients
    assert all(torch.equal(g, grads1[n]) for n, g in _grads(model).items())


def test_an_architecture_step_descends_the_validation_loss_plus_the_width_cost(dataset, tmp_path, process_group):
    # SGD, so a step is -lr x the gradient: the cost's part is the difference of two steps on the
    # same batch from the same start.
    valid = _batches(job(dataset, tmp_path / "run"), "valid", 1)[0]
    steps = {}
    for width_cost in (0.0, 0.5):
        model = _build(job(dataset, tmp_path / f"run-{width_cost}", alpha_optimizer="sgd", alpha_lr=0.1,
                           width_cost=width_cost))
        alpha_step(model, valid)
        steps[width_cost] = _alpha(model).detach().clone()
    cost_part = steps[0.5] - steps[0.0]
    assert torch.allclose(cost_part, -0.1 * 0.5 * WidthCost(CANDIDATES, 1.0).gradient(torch.zeros_like(cost_part)),
                          atol=1e-6)
    assert (cost_part[:, 0] > 0).all() and (cost_part[:, -1] < 0).all()  # towards the narrowest


def test_architecture_steps_take_whole_batches_only(dataset, tmp_path, process_group):
    # They read the validation split as an evaluation does, whose last batch may be partial (of
    # one row, on several ranks): it trained BatchNorm on a batch of zero variance.
    from embshard.trainer.autodim import AlphaStep
    from embshard.trainer.method import Worker

    cfg = job(dataset, tmp_path / "run")
    cfg = replace(cfg, data=replace(cfg.data, batch_size=160))  # 300 valid rows: one batch of 160, 140 left
    bundle = plan_search(cfg, 1)
    sharded = build_sharded(cfg, bundle, DatasetSpec.load(cfg.data.path), torch.device("cpu"), method=AutodimSearch())
    step = AlphaStep(Worker(cfg, bundle, 0, 1, torch.device("cpu"), None), sharded)
    assert [len(next(step.batches).labels) for _ in range(3)] == [160, 160, 160]


def test_single_level_steps_alpha_from_the_training_batch(dataset, tmp_path, process_group):
    cfg = job(dataset, tmp_path / "run", single_level=True, lookup="separate")
    model = _build(cfg)
    alpha0 = _alpha(model).detach().clone()
    model_step(model, _batches(cfg, "train", 1)[0], train_alpha=True)
    assert not torch.equal(_alpha(model), alpha0)
    assert _alpha(model).grad is None and not _alpha(model).requires_grad


def test_single_level_steps_take_the_width_cost(dataset, tmp_path, process_group):
    cfg = job(dataset, tmp_path / "run", single_level=True, alpha_optimizer="sgd", alpha_lr=0.1, width_cost=100.0)
    model = _build(cfg)
    model_step(model, _batches(cfg, "train", 1)[0], train_alpha=True)
    # A cost this large outweighs the training loss's gradient: every field moves to its narrowest.
    assert (_alpha(model).argmax(dim=-1) == 0).all()


def test_decisions_round_trip_into_a_dimension_plan(dataset, tmp_path):
    cfg = job(dataset, tmp_path / "run")
    spec = DatasetSpec.load(dataset)
    embedding = AutodimEmbeddingBags(base_plan(cfg, spec), CANDIDATES)
    with torch.no_grad():
        embedding.arch.logits.zero_()
        embedding.arch.logits[::2, 0] = 3.0  # every other field picks width 2
        embedding.arch.logits[1::2, 2] = 3.0  # the rest 16
    decisions = make_decisions(cfg, embedding, EvalResult({"auc": 0.71, "logloss": 0.5}, "auc", 10), {"steps": 4})
    path = decisions.save(tmp_path / "decisions.json")
    loaded = load_decisions(path)
    assert loaded.method == "autodim" and loaded.base_dim == 16
    assert loaded.meta["valid_auc"] == 0.71
    assert loaded.meta["width_cost"] == 0.0  # what the search priced width at: the paper's none
    # A rating model's search keeps its own metric (it was recorded as AUC and logloss, both None).
    rated = make_decisions(cfg, embedding, EvalResult({"mse": 0.8}, "mse", 10, lower_is_better=True), {})
    assert (rated.meta["valid_primary"], rated.meta["valid_mse"], rated.meta["valid_lower_is_better"]) == \
        ("mse", 0.8, True)
    assert make_decisions(cfg, embedding, None, {}).meta["valid_primary"] is None  # stopped before evaluating
    assert loaded.meta["alpha"]["C1"] == pytest.approx(torch.softmax(embedding.arch.logits[0], 0).tolist())

    plan = plan_dimensions(EmbeddingsConfig(policy="decisions", dim=16, decisions=str(path)), spec)
    dims = {t.features[0]: t.blocks[0].dim for t in plan.tables}
    assert dims == {f: (4 if i % 2 == 0 else 16) for i, f in enumerate(spec.sparse_names)}
    # width 2 is below what FBGEMM takes: the planner raises it and says so
    assert any("C1" in note and "2 -> 4" in note for note in plan.notes)


def test_search_config_loads_from_yaml():
    from embshard.config import load_job_config

    cfg = load_job_config(Path(__file__).resolve().parents[1] / "configs" / "autodim-movielens.yaml")
    assert cfg.autodim.candidates[-1] == cfg.embeddings.dim


@pytest.mark.parametrize("pretrain_steps, width_cost, alpha_steps", [
    (1, 0.0, 4),
    # Stopped in its warm-up, before alpha's optimizer had stepped: the checkpoint holds no state
    # of it, and the resume was refused ("Missing key in checkpoint state_dict: ...arch.logits.step").
    (5, 0.0, 2),
    (5, 0.5, 2),
])
def test_a_resumed_search_takes_the_architecture_steps_the_uninterrupted_one_takes(
        dataset, tmp_path, process_group, pretrain_steps, width_cost, alpha_steps):
    # Its Gumbel noise started again from the seed, and its validation batches from the first:
    # resumed mid-search, softmax(alpha) drifted 0.15 from the uninterrupted search's, and 3 of 26
    # fields chose other widths.
    from embshard.trainer.loop import run_worker

    def search(out: Path, steps: int) -> dict:
        cfg = job(dataset, out, alpha_every=2, pretrain_steps=pretrain_steps, width_cost=width_cost)
        cfg.train = replace(cfg.train, max_steps=steps, eval_every=100, eval_max_batches=1)
        cfg.checkpoint = CheckpointConfig(every_steps=3)
        plan_search(cfg, 1)
        return run_worker(cfg, method="autodim")

    whole = search(tmp_path / "whole", 9)
    search(tmp_path / "stopped", 4)
    resumed = search(tmp_path / "stopped", 9)
    assert resumed["resumed_from"].endswith("step-000004")
    assert resumed["alpha_steps"] == whole["alpha_steps"] == alpha_steps
    assert resumed["alpha"] == whole["alpha"]


def test_search_checkpoints_evaluates_and_resumes_like_train(dataset, tmp_path, process_group, monkeypatch):
    """The search runs in the one loop: `checkpoint.every_steps`, `train.eval_every` and metrics
    apply, and alpha (and its optimizer) come back from a checkpoint."""
    from embshard.config import MetricsConfig
    from embshard.trainer.loop import run_worker

    cfg = job(dataset, tmp_path / "run", alpha_every=2, pretrain_steps=1)
    cfg.train = replace(cfg.train, max_steps=4, eval_every=2, eval_max_batches=1)
    cfg.checkpoint = CheckpointConfig(every_steps=2)
    cfg.metrics = MetricsConfig(enabled=True, port_base=0)
    plan_search(cfg, 1)
    reports: list[dict] = []
    first = run_worker(cfg, reports.append, method="autodim")
    assert [r["step"] for r in reports if "step" in r] == [2, 4]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert first["alpha_steps"] == 2  # before steps 1 and 3

    again = run_worker(cfg, method="autodim")  # nothing left to train: alpha as checkpointed
    assert again["resumed_from"].endswith("step-000004") and again["steps"] == 4
    assert again["alpha"] == first["alpha"]
    # It said 1.0, the module's temperature before any step of this start.
    assert again["tau_final"] == first["tau_final"] == cfg.autodim.temperature(3)
    longer = run_worker(replace(cfg, train=replace(cfg.train, max_steps=6)), method="autodim")
    assert longer["steps"] == 6 and longer["alpha_steps"] == 3
    assert load_decisions(longer["decisions"]).meta["steps"] == 6
    # A search killed between writing its decisions and its last line: the same command's --out
    # check refused the file as someone else's.
    from embshard.cluster.autodim_cli import check_decisions_out

    check_decisions_out(Path(longer["decisions"]), False, cfg.output_dir)
    with pytest.raises(ConfigError, match=r"a decisions file is there already; pass --overwrite to replace it$"):
        check_decisions_out(Path(longer["decisions"]), False, str(tmp_path / "other"))
    # The search's model is no model to serve: its bare tables were exported without a word.
    from embshard.trainer.export import ExportError, export_serving

    with pytest.raises(ExportError, match=r"step-000006: a checkpoint of a 'autodim' run, which decides a plan and "
                                          r"trains no model to serve; export the run trained on its decisions file$"):
        export_serving(tmp_path / "run" / "checkpoints", tmp_path / "serving")
    # A method that does not say so is caught by what its model holds beyond the plan's tables.
    monkeypatch.setattr(AutodimSearch, "serves", True)
    unsaid = replace(cfg, output_dir=str(tmp_path / "unsaid"), train=replace(cfg.train, max_steps=2))
    plan_search(unsaid, 1)
    run_worker(unsaid, method="autodim")
    with pytest.raises(ExportError, match=r"step-000002: holds model parameters the model rebuilt from its config has "
                                          r"no place for \('embeddings\.arch\.logits' and \d+ more\)"):
        export_serving(tmp_path / "unsaid" / "checkpoints", tmp_path / "serving")
    assert not (tmp_path / "serving").exists()


def test_a_search_that_took_no_architecture_step_writes_no_decisions(dataset, tmp_path, process_group):
    # Every alpha still equal, its widths were ties broken to the narrowest candidate, written as
    # a finished search's decisions file under a warning, and retrained without a word.
    from embshard.trainer.autodim import decisions_path
    from embshard.trainer.loop import run_worker

    # A price on width with Adam: a model step that handed alpha's optimizer a gradient (zeros,
    # say) would move alpha by the price alone.
    cfg = job(dataset, tmp_path / "run", alpha_every=2, pretrain_steps=10, width_cost=10.0, history_every=1)
    cfg.train = replace(cfg.train, max_steps=3, eval_max_batches=1)
    plan_search(cfg, 1)
    summary = run_worker(cfg, method="autodim")
    assert summary["alpha_steps"] == 0 and summary["decisions"] is None
    assert not decisions_path(cfg).exists()
    from embshard.trainer.autodim import alpha_history_path
    from embshard.trainer.history import read_history

    records = read_history(alpha_history_path(cfg))
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert all(p == pytest.approx(1 / len(CANDIDATES)) for r in records for ps in r["alpha"].values() for p in ps)
    # As a sweep's trial: a point saying so, not the retrain's "no decisions file".
    from embshard.cluster.sweep_methods import TrialRuns
    from embshard.cluster.sweep_plan import Trial

    def train(run: JobConfig, method: str | None):
        bundle = plan_for_training(run, method)
        return bundle.dimension_plan, run_worker(run, method=method)

    trial = replace(cfg, output_dir=str(tmp_path / "sweep"), cluster=replace(cfg.cluster, workers=1))
    runs = TrialRuns(trial, DatasetSpec.load(cfg.data.path), Trial("autodim", seed=0, budget=1.0), [1.0],
                     tmp_path / "trial")
    [point] = runs.points(train)
    assert point["error"] == "the search ended within autodim.pretrain_steps (10): no architecture step, no decisions"


def test_search_checkpoints_and_stops_on_sigterm(dataset, tmp_path, process_group):
    """SIGTERM during a search: the step finishes, a checkpoint is written, the run stops, exactly
    as `embshard train` does (the signal comes from a callback a subclass adds: the seam's part)."""
    import os
    import signal

    from embshard.trainer.callbacks import Callback
    from embshard.trainer.loop import run_worker

    class SigtermAt(Callback):
        def on_step(self, info) -> None:
            if info.step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    class PreemptedSearch(AutodimSearch):
        def callbacks(self, worker, sharded):
            return [*super().callbacks(worker, sharded), SigtermAt()]

    cfg = job(dataset, tmp_path / "run", alpha_every=2, pretrain_steps=1)
    cfg.train = replace(cfg.train, max_steps=6, eval_max_batches=1)
    cfg.checkpoint = CheckpointConfig()  # no periodic checkpoints: only the SIGTERM one
    plan_search(cfg, 1)
    summary = run_worker(cfg, method=PreemptedSearch())
    assert summary["preempted"] and summary["steps"] == 2
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000002"]
    # Stopped, it chose nothing: 2 steps' widths were written, read as a finished search's.
    decisions = decisions_path(cfg)
    assert summary["decisions"] is None and not decisions.exists()
    resumed = run_worker(cfg, method="autodim")
    assert resumed["resumed_from"].endswith("step-000002") and resumed["steps"] == 6
    assert resumed["decisions"] == str(decisions) and load_decisions(decisions).meta["steps"] == 6


def test_the_retrain_command_sets_each_key_once(tmp_path):
    # The search's own `--set output_dir=...` came before the retrain's: a command `--set` refuses.
    from conftest import REPO

    from embshard.cluster.autodim_cli import retrain_overrides
    from embshard.config import load_job_config

    search = ["train.epochs=2", "output_dir=out/search/", "embeddings.policy=uniform"]
    config = REPO / "configs" / "autodim-movielens.yaml"
    retrain = retrain_overrides(search, tmp_path / "d.json", load_job_config(config, search))
    assert retrain == ["train.epochs=2", "embeddings.policy=decisions", f"embeddings.decisions={tmp_path / 'd.json'}",
                       "output_dir=out/search/retrain"]
    cfg = load_job_config(config, retrain)
    assert (cfg.embeddings.policy, cfg.output_dir, cfg.train.epochs) == ("decisions", "out/search/retrain", 2)


def test_the_retrain_command_checkpoints_apart_from_the_search(tmp_path):
    # The search's own checkpoint.dir and checkpoint.resume were kept: the retrain resumed the
    # search's steps (another model), or the search's source.
    from conftest import REPO

    from embshard.cluster.autodim_cli import retrain_overrides
    from embshard.config import load_job_config

    config = REPO / "configs" / "autodim-movielens.yaml"
    search = ["output_dir=out/search", "checkpoint={dir: s3://b/ckpt/, resume: old/checkpoints}"]
    retrain = load_job_config(config, retrain_overrides(search, tmp_path / "d.json", load_job_config(config, search)))
    assert (retrain.checkpoint.dir, retrain.checkpoint.resume) == ("s3://b/ckpt/retrain", None)
    assert retrain.checkpoint_dir != load_job_config(config, search).checkpoint_dir


def test_a_search_plan_counts_no_projections_its_module_does_not_build(dataset, tmp_path) -> None:
    # The plan counted projections for the narrower candidate tables of a separate lookup, which
    # the search's module does not build: taken off its dense layers' bytes, -4,960 bytes was
    # printed; held at zero, the rank's bytes were overstated by them.
    cfg = job(dataset, tmp_path / "run", lookup="separate", unify="zero_pad", batchnorm=False)
    cfg.model = ModelConfig(dense_arch=[32], over_arch=[4, 1])
    cfg.embeddings = EmbeddingsConfig(dim=32)
    cfg.autodim = replace(cfg.autodim, candidates=[4, 8, 16, 32])
    bundle = plan_search(cfg, 1)
    assert bundle.dimension_plan.uniform_width is False
    assert bundle.memory.projection_bytes == bundle.memory.serve_projection_bytes == 0
    assert bundle.memory.dense_bytes is not None and bundle.memory.dense_bytes > 0
