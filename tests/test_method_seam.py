"""The method seam: a method defined here, registered by name, plans, trains on 2 gloo ranks and
checkpoints through the one planner driver, builder and loop, with nothing else to change."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import profiled_synth
from distributed import run_ranks

from embshard.cluster.launch import plan_for_training, worker_config
from embshard.config import (
    CheckpointConfig,
    DataConfig,
    EmbeddingsConfig,
    JobConfig,
    MdeConfig,
    MletConfig,
    ModelConfig,
    TrainConfig,
)
from embshard.datasets.schema import DatasetSpec
from embshard.errors import ConfigError, PlanError
from embshard.planner.pipeline import PlanBundle, make_plan, plan_with
from embshard.planner.topology import TopologySpec
from embshard.planner.types import Block, DimensionPlan, TablePlan, table_name
from embshard.trainer.callbacks import Callback
from embshard.trainer.loop import run_worker
from embshard.trainer.method import EmbeddingMethod, get_method, register_method
from embshard.trainer.planning import planning_step


class FixedWidth(EmbeddingMethod):
    """Every table at one width, projected to the base dim: only the planning part changes."""

    def __init__(self, width: int) -> None:
        self.width = width

    def dimension_plan(self, cfg: JobConfig, spec: DatasetSpec, counts: Mapping[str, np.ndarray],
                       out_dir: Path) -> DimensionPlan:
        source = {"policy": "fixed_width", "width": self.width}
        tables = [TablePlan(table_name(f.name), [f.name], f.cardinality,
                            [Block(0, f.cardinality, self.width, source=source)])
                  for f in spec.sparse]
        return DimensionPlan(cfg.embeddings.dim, tables, policy=source)


class DropsAFeature(FixedWidth):
    """A method's plan without a table for the data's last feature."""

    def dimension_plan(self, cfg: JobConfig, spec: DatasetSpec, counts: Mapping[str, np.ndarray],
                       out_dir: Path) -> DimensionPlan:
        plan = super().dimension_plan(cfg, spec, counts, out_dir)
        return replace(plan, tables=plan.tables[:-1])


# Module level: the spawned ranks import this module, and so register it too.
register_method("fixed_width", FixedWidth(8))
register_method("drops_a_feature", DropsAFeature(8))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return profiled_synth(tmp_path_factory.mktemp("seam") / "data", rows=2000, max_cardinality=200, seed=3)


def job(dataset: Path, out: Path, **train) -> JobConfig:
    return JobConfig(
        output_dir=str(out),
        data=DataConfig(path=str(dataset), batch_size=128, eval_batch_size=512, prefetch=1),
        model=ModelConfig(dense_arch=[8], over_arch=[8]),
        embeddings=EmbeddingsConfig(dim=16),
        train=TrainConfig(progress=False, log_every=2, eval_max_batches=1, **train),
        checkpoint=CheckpointConfig(every_steps=2),
    )


def _train(rank: int, world: int, cfg: JobConfig, method: str) -> dict:
    return run_worker(worker_config(cfg), method=method)


@pytest.mark.slow
def test_a_registered_method_plans_trains_and_checkpoints(dataset, tmp_path, monkeypatch):
    cfg = job(dataset, tmp_path / "run", max_steps=4)
    cfg.cluster.workers = 2
    bundle = plan_for_training(cfg, "fixed_width")
    saved = json.loads((tmp_path / "run" / "plan" / "plan.json").read_text())
    assert {b["dim"] for t in saved["dimension_plan"]["tables"] for b in t["blocks"]} == {8}
    assert bundle.memory.per_rank[0]["train_bytes"] > 0
    first, second = run_ranks(_train, 2, cfg, "fixed_width")
    assert first["steps"] == second["steps"] == 4
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-000002", "step-000004"]
    assert json.loads((tmp_path / "run" / "checkpoints" / "step-000004" / "plan" / "plan.json").read_text()) == saved
    # Its code changed since (here: its width): the resume trained the checkpoint's 8 without a word.
    with monkeypatch.context() as changed:
        changed.setattr(get_method("fixed_width"), "width", 12)
        with pytest.raises(ConfigError, match=r"^method 'fixed_width' now plans other widths than .*step-000004 was "
                                              r"trained with \(table 't_C1': rows 0-\d+ at 8 there, rows 0-\d+ at 12 "
                                              r"now\): its code, or what else it plans from, has changed since; "
                                              r"resume with the method as it was"):
            plan_for_training(cfg, "fixed_width")
        # A method whose plans differ from run to run says so, and resumes its checkpoint's plan.
        changed.setattr(get_method("fixed_width"), "replans_alike", False, raising=False)
        assert plan_for_training(cfg, "fixed_width").dimension_plan.tables[0].blocks[0].dim == 8
    assert plan_for_training(cfg, "fixed_width").dimension_plan.tables[0].blocks[0].dim == 8  # as it was: resumed


def test_embeddings_mlet_factorises_the_plan_of_any_method(dataset, tmp_path):
    # A method of its own planned without MLET, and every checkpoint recorded an MLET run.
    cfg = job(dataset, tmp_path / "run")
    cfg.embeddings = replace(cfg.embeddings, mlet=MletConfig(ratio=2.0))
    bundle = plan_for_training(cfg, "fixed_width")
    assert {(b.dim, b.mlet_width) for t in bundle.dimension_plan.tables for b in t.blocks} == {(8, 16)}


def test_a_policy_the_method_does_not_plan_by_is_said(dataset, tmp_path):
    # MDE's budget under a method of its own: a plan of 8-wide tables, read as the budget's.
    cfg = job(dataset, tmp_path / "run")
    cfg.embeddings = replace(cfg.embeddings, policy="mde", mde=MdeConfig(budget_params=1000))
    notes = plan_for_training(cfg, "fixed_width").dimension_plan.notes
    assert ("embeddings.policy mde is not what method 'fixed_width' plans by (its plan's policy is fixed_width): "
            "embeddings.policy and its settings change nothing in this run") in notes
    assert not any("plans by" in n for n in plan_for_training(job(dataset, tmp_path / "plain")).dimension_plan.notes)


def test_a_method_s_plan_without_a_feature_is_refused_by_plan_as_by_train(dataset, tmp_path):
    # `embshard plan` saved it, and only `train` refused it.
    cfg = job(dataset, tmp_path / "run")
    with pytest.raises(PlanError, match=r"^method 'drops_a_feature': dimension_plan\(\): the data's feature '\w+' "
                                        r"has no table in the plan: every feature of the data needs a table"):
        plan_with(planning_step(cfg, "drops_a_feature"), dataset, TopologySpec(1, "cpu"), tmp_path / "plan",
                  batch_size=64, optimizer="rowwise_adagrad")


def test_unknown_and_clashing_names_are_config_errors():
    with pytest.raises(ConfigError, match=r"method 'nope': not registered \(known: .*fixed_width"):
        get_method("nope")
    with pytest.raises(ConfigError, match=r"package\.module:attr\); did you mean 'test_method_seam:EightWide'\?$"):
        get_method("test_method_seam.EightWide")
    with pytest.raises(ConfigError, match="a built-in method has that name"):
        register_method("mde", FixedWidth(4))
    assert isinstance(get_method("fixed_width"), FixedWidth)


class ThreeArgumentEmbeddings(EmbeddingMethod):
    def embeddings(self, cfg, plan, device):  # the seam before embeddings took the dataset spec
        return super().embeddings(cfg, plan, None, device)


def test_a_method_written_for_the_earlier_embeddings_seam_is_refused_in_one_line():
    # It failed in every build as "embeddings() raised TypeError: ... takes 4 positional arguments".
    said = (r"^method '{}': ThreeArgumentEmbeddings\.embeddings\(cfg, plan, device\) cannot take the seam's "
            r"\(cfg, plan, spec, device\): embeddings takes the dataset spec now")
    with pytest.raises(ConfigError, match=said.format("three_arguments")):
        register_method("three_arguments", ThreeArgumentEmbeddings())
    with pytest.raises(ConfigError, match=said.format("test_method_seam:ThreeArgumentEmbeddings")):
        get_method("test_method_seam:ThreeArgumentEmbeddings")


def test_plan_file_is_the_plan_workers_train(dataset, tmp_path):
    # `sharding.plan_file` used to point workers at <output_dir>/plan/plan.json, which that path
    # never wrote: the run found no plan (or a stale one of an earlier run).
    made = make_plan(EmbeddingsConfig(dim=16), dataset, TopologySpec(2, "cpu"), tmp_path / "made",
                     batch_size=64, optimizer="rowwise_adagrad")
    made.save()
    cfg = job(dataset, tmp_path / "run")
    cfg.cluster.workers = 2
    cfg.sharding.plan_file = str(tmp_path / "made" / "plan.json")
    plan_for_training(cfg)
    trained = PlanBundle.load(worker_config(cfg).sharding.plan_file, cfg.train.sparse_optimizer)
    assert trained.shard_plan.to_json() == made.shard_plan.to_json()
    assert trained.dimension_plan.tables == made.dimension_plan.tables
    # made through the planner's API, it records no config to check this run's against: said so
    assert trained.dimension_plan.notes[0].startswith(f"sharding.plan_file {cfg.sharding.plan_file} does not record")


class EightWide(FixedWidth):
    """FixedWidth(8) as a class: what a config names as "package.module:attr"."""

    def __init__(self) -> None:
        super().__init__(8)


def _train_by_reference(rank: int, world: int, cfg: JobConfig) -> dict:
    return run_worker(cfg)  # the method comes from cfg.embeddings.method alone


def test_a_method_by_reference_reaches_workers_that_never_registered_it(dataset, tmp_path):
    # register_method lives in the driver's process; a worker process (Ray's, or a spawned gloo
    # rank) finds a method named by "module:attr" in the config by importing it.
    cfg = job(dataset, tmp_path / "run", max_steps=2)
    cfg.cluster.workers = 2
    cfg.embeddings.method = "test_method_seam:EightWide"
    plan_for_training(cfg)
    first, _ = run_ranks(_train_by_reference, 2, cfg)
    assert first["steps"] == 2
    saved = json.loads((tmp_path / "run" / "plan" / "plan.json").read_text())
    assert {b["source"]["policy"] for t in saved["dimension_plan"]["tables"] for b in t["blocks"]} == {"fixed_width"}
    for bad, why in (("test_method_seam:Nope", "cannot import"), ("json:dumps", "not an EmbeddingMethod")):
        with pytest.raises(ConfigError, match=why):
            get_method(bad)


@pytest.mark.slow
@pytest.mark.ray
def test_a_method_registered_in_the_driver_trains_on_ray_workers_that_never_ran_the_registration(
        dataset, tmp_path, monkeypatch):
    # README "Adding a method", step 2: `train_on_ray(cfg, name)` after `register_method` in the
    # driver failed on every worker: "method ...: not registered".
    import ray

    from embshard.cluster.launch import train_on_ray

    class TwelveWide(EmbeddingMethod):  # local to this test: a worker can receive it, not import it
        def dimension_plan(self, cfg, spec, counts, out_dir):
            from embshard.planner.types import Block, DimensionPlan, TablePlan, table_name

            tables = [TablePlan(table_name(f.name), [f.name], f.cardinality, [Block(0, f.cardinality, 12)])
                      for f in spec.sparse]
            return DimensionPlan(cfg.embeddings.dim, tables, policy={"policy": "twelve_wide"})

    register_method("twelve_wide_here_only", TwelveWide())
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cfg = job(dataset, tmp_path / "run", max_steps=2)
    cfg.cluster.workers = 2
    plan_for_training(cfg, "twelve_wide_here_only")
    try:
        summary = train_on_ray(cfg, "twelve_wide_here_only")
    finally:
        ray.shutdown()
    assert summary["steps"] == 2
    trained = json.loads((tmp_path / "run" / "checkpoints" / "step-000002" / "plan" / "plan.json").read_text())
    assert {b["dim"] for t in trained["dimension_plan"]["tables"] for b in t["blocks"]} == {12}


@pytest.mark.slow
@pytest.mark.ray
def test_a_registered_method_from_a_module_the_workers_cannot_import_is_one_line(dataset, tmp_path, monkeypatch):
    # A class from a module the driver reached through its own sys.path is pickled by reference:
    # Ray's controller failed to unpickle it, and the run ended as "crashed: ActorDiedError: The
    # actor died because of an error raised in its creation task ..." over Ray's traceback.
    import importlib

    import ray

    from embshard.cluster.launch import train_on_ray

    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "driver_only_method.py").write_text(
        "from embshard.trainer.method import EmbeddingMethod\n\nclass DriverOnly(EmbeddingMethod):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    register_method("driver_only", importlib.import_module("driver_only_method").DriverOnly())
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cfg = job(dataset, tmp_path / "run", max_steps=2)
    cfg.cluster.max_failures = 2  # bad input: not retried
    plan_for_training(cfg, "driver_only")
    try:
        with pytest.raises(ConfigError, match=r"^method 'driver_only': registered in the driver, but the Ray workers "
                                              r"cannot import 'driver_only_method' \(ModuleNotFoundError: No module "
                                              r"named 'driver_only_method'\); put that module on their Python path"):
            train_on_ray(cfg, "driver_only")
    finally:
        ray.shutdown()


def test_a_registered_method_a_worker_cannot_rebuild_is_one_line(tmp_path, monkeypatch):
    # What a worker does with the driver's pickled method (`_received`), for a module it lacks and
    # for a module of another version without the class: Ray's ActorDiedError or a crash before.
    import importlib
    import sys

    from embshard.cluster.launch import _received, _sendable

    (tmp_path / "versioned_method.py").write_text(
        "from embshard.trainer.method import EmbeddingMethod\n\nclass Versioned(EmbeddingMethod):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("versioned_method")
    register_method("versioned", module.Versioned())
    pickled = _sendable("versioned")
    assert isinstance(_received("versioned", pickled), module.Versioned)
    monkeypatch.delattr(module, "Versioned")
    with pytest.raises(ConfigError, match=r"^method 'versioned': registered in the driver, but its class is not in "
                                          r"the module the Ray workers import \(AttributeError: "):
        _received("versioned", pickled)
    monkeypatch.delitem(sys.modules, "versioned_method")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    with pytest.raises(ConfigError, match=r"^method 'versioned': registered in the driver, but the Ray workers "
                                          r"cannot import 'versioned_method'"):
        _received("versioned", pickled)


def test_a_registered_method_ray_cannot_send_is_one_line_before_ray_starts(dataset, tmp_path):
    import threading

    from embshard.cluster.launch import train_on_ray

    class HoldsALock(FixedWidth):
        def __init__(self) -> None:
            super().__init__(8)
            self.lock = threading.Lock()

    register_method("holds_a_lock", HoldsALock())
    cfg = job(dataset, tmp_path / "run", max_steps=2)
    with pytest.raises(ConfigError, match=r"method 'holds_a_lock': registered in this process, but cannot be sent "
                                          r"to the Ray workers \(TypeError: cannot pickle '_thread.lock' object\); "
                                          r"name it as package.module:attr"):
        train_on_ray(cfg, "holds_a_lock")
    assert not (tmp_path / "run").exists()


class ChecksBadly(FixedWidth):
    def check_config(self, cfg: JobConfig) -> None:
        raise RuntimeError("check boom")


class PlansBadly(FixedWidth):
    def dimension_plan(self, cfg, spec, counts, out_dir):
        raise ValueError("plan boom")


class PlansNothing(FixedWidth):
    def dimension_plan(self, cfg, spec, counts, out_dir):
        return None


class PlansNoWidth(FixedWidth):
    def __init__(self, width: int) -> None:
        super().__init__(0)


class Relabelled(FixedWidth):
    """Its plan with `change` applied to the first table (or to the plan: `whole`)."""

    change: dict = {}
    whole: dict = {}

    def dimension_plan(self, cfg, spec, counts, out_dir):
        plan = super().dimension_plan(cfg, spec, counts, out_dir)
        tables = [replace(plan.tables[0], **self.change), *plan.tables[1:]]
        return replace(plan, tables=tables, **self.whole)


class DotName(Relabelled):
    change = {"name": "t.C1"}


class NoName(Relabelled):
    change = {"name": ""}


class ClashingBlocks(Relabelled):
    def dimension_plan(self, cfg, spec, counts, out_dir):
        plan = super().dimension_plan(cfg, spec, counts, out_dir)
        a, b = plan.tables[:2]
        split = [Block(0, 1, 8), Block(1, a.num_embeddings, 8)]
        return replace(plan, tables=[replace(a, name="t_X", blocks=split), replace(b, name="t_X__b0"),
                                     *plan.tables[2:]])


class NumpySource(Relabelled):
    def dimension_plan(self, cfg, spec, counts, out_dir):
        plan = FixedWidth.dimension_plan(self, cfg, spec, counts, out_dir)
        t = plan.tables[0]
        return replace(plan, tables=[replace(t, blocks=[replace(t.blocks[0], source={"w": np.int64(8)})]),
                                     *plan.tables[1:]])


class PolicyNotADict(Relabelled):
    whole = {"policy": "mine"}


class UnknownShardingType(Relabelled):
    change = {"sharding_types": ["banana"]}


class Unpooled(Relabelled):
    change = {"pooled": False}


@pytest.mark.parametrize("method, said", [
    (ChecksBadly, r"check_config\(\) raised RuntimeError: check boom at .*test_method_seam\.py:\d+$"),
    # Each was a traceback from inside TorchRec, torch or json, naming no method or table.
    (DotName, r"dimension_plan\(\): table 't\.C1': a table's name is a non-empty str without '\.'"),
    (NoName, r"dimension_plan\(\): table '': a table's name is a non-empty str without '\.'"),
    (ClashingBlocks, r"dimension_plan\(\): table 't_X__b0': block 0 is TorchRec table 't_X__b0', as table 't_X' "
                     r"block 0 is; rename one of the tables"),
    (NumpySource, r"dimension_plan\(\): table 't_C1' block 0: source: cannot be saved as JSON \(Object of type "
                  r"int64 is not JSON serializable\)"),
    (PolicyNotADict, r"dimension_plan\(\): policy must be a dict, got str 'mine'$"),
    (UnknownShardingType, r"dimension_plan\(\): table 't_C1': sharding_types \['banana'\]: give a non-empty list "
                          r"of data_parallel, table_wise"),
    # Through the planner and the driver: the first forward's "torch.cat(): expected a non-empty list".
    (Unpooled, r"embeddings\(\): table 't_C1' is unpooled \(pooled: false\), and PlannedEmbeddingBags"),
    # Said without the method: "table 't_C1' block 0: dim must be positive, got 0".
    (PlansNoWidth, r"dimension_plan\(\): table 't_C1' block 0: dim must be positive, got 0$"),
    (PlansBadly, r"dimension_plan\(\) raised ValueError: plan boom at .*test_method_seam\.py:\d+$"),
    (PlansNothing, r"dimension_plan\(\) returned NoneType, not a DimensionPlan$"),
])
def test_a_users_method_failing_in_its_own_code_is_one_line_naming_the_hook(dataset, tmp_path, method, said):
    # They were Python's tracebacks on the driver, the last one inside embshard's planning step
    # ("'NoneType' object has no attribute 'notes'").
    register_method(method.__name__, method(8))
    cfg = job(dataset, tmp_path / "run")
    with pytest.raises((ConfigError, PlanError), match=rf"^method '{method.__name__}': {said}"):
        plan_for_training(cfg, method.__name__)


class NoServe(FixedWidth):
    serves = False


class ServesNo(FixedWidth):
    serves = "no"  # type: ignore[assignment]


def test_whether_a_method_serves_is_in_its_plan_for_an_export_where_the_method_cannot_be_imported(
        dataset, tmp_path):
    # `serves = False` was read from the method at export only: where its module was not on the
    # Python path, the checkpoint was exported. And `serves = "no"` read as True.
    from embshard.trainer.export import ExportError, _check_serves

    register_method("no_serve", NoServe(8))
    plan_for_training(job(dataset, tmp_path / "run"), "no_serve")
    plan = PlanBundle.load(tmp_path / "run" / "plan", "rowwise_adagrad").dimension_plan
    assert plan.made_with["serves"] is False
    gone = replace(plan, made_with={**plan.made_with, "method": "gone_module:NoServe"})
    with pytest.raises(ExportError, match=r"a checkpoint of a 'gone_module:NoServe' run, which decides a plan"):
        _check_serves(gone, tmp_path)
    older = replace(gone, made_with={k: v for k, v in gone.made_with.items() if k != "serves"})
    with pytest.raises(ExportError, match=r"its plan does not record whether method 'gone_module:NoServe' trains a "
                                          r"model to serve, and the method cannot be read here \(method "
                                          r"'gone_module:NoServe': cannot import module 'gone_module'"):
        _check_serves(older, tmp_path)
    register_method("serves_no", ServesNo(8))
    with pytest.raises(ConfigError, match=r"method 'serves_no': serves must be True or False, got 'no'"):
        plan_for_training(job(dataset, tmp_path / "other"), "serves_no")


class CallbacksNone(FixedWidth):
    def callbacks(self, worker, sharded):
        return None


def test_a_method_s_callbacks_of_the_wrong_type_are_one_line_naming_it(dataset, tmp_path, process_group):
    # "crashed: rank 0: TypeError: 'NoneType' object is not iterable", naming neither method nor hook.
    register_method("callbacks_none", CallbacksNone(8))
    cfg = job(dataset, tmp_path / "run", max_steps=2)
    cfg.cluster.workers = 1
    plan_for_training(cfg, "callbacks_none")
    with pytest.raises(ConfigError, match=r"^method 'callbacks_none': callbacks\(\) returned NoneType, not a list "
                                          r"of Callbacks$"):
        run_worker(cfg, method="callbacks_none")


class CountsSteps(Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step(self, info) -> None:
        self.steps.append(info.step)


class CallbacksTuple(FixedWidth):
    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.counter = CountsSteps()

    def callbacks(self, worker, sharded):
        return (self.counter,)


def test_a_method_s_callbacks_may_be_a_tuple(dataset, tmp_path, process_group):
    # The type check that made None one line refused a tuple once (a review's catch).
    method = CallbacksTuple(8)
    register_method("callbacks_tuple", method)
    cfg = job(dataset, tmp_path / "run", max_steps=2)
    cfg.cluster.workers = 1
    plan_for_training(cfg, "callbacks_tuple")
    assert run_worker(cfg, method="callbacks_tuple")["steps"] == 2
    assert method.counter.steps == [1, 2]
