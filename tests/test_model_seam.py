"""The model seam: `model.arch` names a built-in or a user's builder / ModelArch, the one builder
and loop train it without asking which it is, and a bad model config is one clear line."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import profiled_synth
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embshard.cluster.cli import main
from embshard.cluster.launch import plan_for_training
from embshard.config import (
    CheckpointConfig,
    ClusterConfig,
    DataConfig,
    EmbeddingsConfig,
    JobConfig,
    ModelConfig,
    TrainConfig,
)
from embshard.datasets.schema import DatasetSpec
from embshard.errors import ConfigError
from embshard.sharding.embedding_module import EmbeddingModule
from embshard.trainer.checkpoint import complete_checkpoints
from embshard.trainer.evaluate import EvalResult
from embshard.trainer.loop import run_worker
from embshard.trainer.models import ModelArch, get_arch
from embshard.trainer.models.dlrm import DlrmArch


class NestedLinear(nn.Module):
    """A user's model that keeps the embeddings two levels down (not at `.embeddings`)."""

    def __init__(self, embeddings: EmbeddingModule, num_dense: int, squeeze: bool) -> None:
        super().__init__()
        self.parts = nn.ModuleDict({"lookup": nn.ModuleDict({"tables": embeddings})})
        width = sum(embeddings.feature_dims.values()) + num_dense
        self.head = nn.Linear(width, 1)
        self.squeeze = squeeze

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        embedded = self.parts["lookup"]["tables"](sparse)
        out = self.head(torch.cat([dense, embedded.values()], dim=1))
        return out.squeeze(-1) if self.squeeze else out


def nested_builder(embeddings: EmbeddingModule, spec: DatasetSpec, options: Mapping[str, Any]) -> nn.Module:
    return NestedLinear(embeddings, len(spec.dense), squeeze=True)


class SigmoidLinear(NestedLinear):
    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return torch.sigmoid(super().forward(dense, sparse))


def sigmoid_builder(embeddings: EmbeddingModule, spec: DatasetSpec, options: Mapping[str, Any]) -> nn.Module:
    return SigmoidLinear(embeddings, len(spec.dense), squeeze=True)


def value_reading_builder(embeddings: EmbeddingModule, spec: DatasetSpec, options: Mapping[str, Any]) -> nn.Module:
    model = NestedLinear(embeddings, len(spec.dense), squeeze=True)
    model.scale = float(torch.ones(1).item())  # a value: a meta tensor has none
    return model


def numpy_reading_builder(embeddings: EmbeddingModule, spec: DatasetSpec, options: Mapping[str, Any]) -> nn.Module:
    model = NestedLinear(embeddings, len(spec.dense), squeeze=True)
    model.start = torch.zeros(3).numpy()  # a TypeError on the meta device, where a RuntimeError was caught only
    return model


def missing_feature_builder(embeddings: EmbeddingModule, spec: DatasetSpec, options: Mapping[str, Any]) -> nn.Module:
    return nn.Linear({f.name: 1 for f in spec.sparse}["C99"], 1)  # a bug of its own, on any device


def own_collection_builder(embeddings: EmbeddingModule, spec: DatasetSpec, options: Mapping[str, Any]) -> nn.Module:
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    model = NestedLinear(embeddings, len(spec.dense), squeeze=True)
    # TorchRec's idiom, outside the module embshard gave it: replicated untrained, exported on meta.
    model.extra = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="x", embedding_dim=4, num_embeddings=10,
                                                                    feature_names=["x"])], device="meta")
    return model


def buffered_builder(embeddings: EmbeddingModule, spec: DatasetSpec, options: Mapping[str, Any]) -> nn.Module:
    model = NestedLinear(embeddings, len(spec.dense), squeeze=True)
    model.register_buffer("table", torch.zeros(1000, 250))  # 1 MB: no parameter, on every rank all the same
    return model


def unsqueezed_builder(embeddings: EmbeddingModule, spec: DatasetSpec, options: Mapping[str, Any]) -> nn.Module:
    return NestedLinear(embeddings, len(spec.dense), squeeze=False)  # [B, 1]: the wrong shape


def detached_builder(embeddings: EmbeddingModule, spec: DatasetSpec, options: Mapping[str, Any]) -> nn.Module:
    return nn.Linear(len(spec.dense), 1)  # never looks the ids up


class EmbeddingsCutOff(NestedLinear):
    """Its head trains; its tables never would (`detach`): a run that exited 0 with an AUC."""

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        embedded = self.parts["lookup"]["tables"](sparse).values().detach()
        return self.head(torch.cat([dense, embedded], dim=1)).squeeze(-1)


def cut_off_builder(embeddings: EmbeddingModule, spec: DatasetSpec, options: Mapping[str, Any]) -> nn.Module:
    return EmbeddingsCutOff(embeddings, len(spec.dense), squeeze=True)


class EmbeddingsUnread(NestedLinear):
    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        self.parts["lookup"]["tables"](sparse)  # looked up, never used
        return self.head(torch.cat([dense, dense.new_zeros(len(dense), self.head.in_features - dense.shape[1])],
                                   dim=1)).squeeze(-1)


class FeatureMissingFromData(NestedLinear):
    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        embedded = self.parts["lookup"]["tables"](sparse)
        return self.head(torch.cat([dense, embedded["C99"]], dim=1)).squeeze(-1)  # the data has C1..C26


def feature_missing_builder(embeddings: EmbeddingModule, spec: DatasetSpec, options: Mapping[str, Any]) -> nn.Module:
    return FeatureMissingFromData(embeddings, len(spec.dense), squeeze=True)


class OwnKeyError(NestedLinear):
    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return super().forward(dense, sparse) * {"dim": 8}["dropout"]  # a bug of its own, not of the data


def own_key_error_builder(embeddings: EmbeddingModule, spec: DatasetSpec, options: Mapping[str, Any]) -> nn.Module:
    return OwnKeyError(embeddings, len(spec.dense), squeeze=True)


def unread_builder(embeddings: EmbeddingModule, spec: DatasetSpec, options: Mapping[str, Any]) -> nn.Module:
    return EmbeddingsUnread(embeddings, len(spec.dense), squeeze=True)


class IntegerLogits(NestedLinear):
    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return super().forward(dense, sparse).long()


def integer_builder(embeddings: EmbeddingModule, spec: DatasetSpec, options: Mapping[str, Any]) -> nn.Module:
    return IntegerLogits(embeddings, len(spec.dense), squeeze=True)


class OutputCutOff(NestedLinear):
    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return super().forward(dense, sparse).detach()


def output_cut_off_builder(embeddings: EmbeddingModule, spec: DatasetSpec, options: Mapping[str, Any]) -> nn.Module:
    return OutputCutOff(embeddings, len(spec.dense), squeeze=True)


class EmbeddingsOnly(nn.Module):
    """Every parameter an embedding's: the sum of each row's embeddings is its logit."""

    def __init__(self, embeddings: EmbeddingModule) -> None:
        super().__init__()
        self.embeddings = embeddings

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return self.embeddings(sparse).values().sum(dim=1)


def embeddings_only_builder(embeddings: EmbeddingModule, spec: DatasetSpec, options: Mapping[str, Any]) -> nn.Module:
    return EmbeddingsOnly(embeddings)


class FailingEvaluation(DlrmArch):
    """A user's arch whose evaluation fails: the run's steps were trained all the same."""

    def evaluate(self, model, reader, device, max_batches) -> EvalResult:
        raise RuntimeError("a bug in my evaluate")


class LooseMetrics(DlrmArch):
    """Metrics as a tensor of one element and a numpy float: `.item()` forgotten."""

    def evaluate(self, model, reader, device, max_batches) -> EvalResult:
        result = super().evaluate(model, reader, device, max_batches)
        return dataclasses.replace(result, metrics={"auc": torch.tensor([result.metrics["auc"]]),
                                                    "logloss": np.float32(result.metrics["logloss"])})


class TextMetric(DlrmArch):
    def evaluate(self, model, reader, device, max_batches) -> EvalResult:
        result = super().evaluate(model, reader, device, max_batches)
        return dataclasses.replace(result, metrics={**result.metrics, "note": "fine"})


class OutputsByName(DlrmArch):
    """A forward of named outputs, its loss taken from one of them, its evaluation left as DLRM's."""

    def forward(self, model, batch):
        logits = super().forward(model, batch)
        return {"logits": logits, "aux": logits.detach()}

    def loss(self, output, batch) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(output["logits"], batch.labels)


class PerExampleLoss(DlrmArch):
    def loss(self, output, batch) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(output, batch.labels, reduction="none")


class WithOptions(ModelArch):
    options = ("hidden",)

    def build(self, embeddings: EmbeddingModule, spec: DatasetSpec, cfg: ModelConfig,
              device: torch.device | None) -> nn.Module:
        return NestedLinear(embeddings, len(spec.dense), squeeze=True)


class NeedsArguments(ModelArch):
    def __init__(self, width: int) -> None:
        self.width = width


class BuildsNothing(ModelArch):
    pass


class RaisesInInit(ModelArch):
    def __init__(self) -> None:
        self.hidden = {}["hidden"]


def builder_of_one_argument(embeddings: EmbeddingModule) -> nn.Module:
    return nn.Linear(1, 1)


NOT_A_BUILDER = 42


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return profiled_synth(tmp_path_factory.mktemp("models") / "data", rows=2000, max_cardinality=200, seed=5)


def job(dataset: Path, out: Path, arch: str = "dlrm", **options: Any) -> JobConfig:
    return JobConfig(
        output_dir=str(out),
        cluster=ClusterConfig(workers=1),
        data=DataConfig(path=str(dataset), batch_size=128, eval_batch_size=512, prefetch=1),
        model=ModelConfig(arch=arch, options=options, dense_arch=[8], over_arch=[8]),
        embeddings=EmbeddingsConfig(dim=8),
        train=TrainConfig(progress=False, log_every=1, eval_max_batches=1, max_steps=4),
        checkpoint=CheckpointConfig(enabled=False),
    )


def test_builtins_are_found_by_name_and_unknown_names_are_one_line() -> None:
    assert isinstance(get_arch("dlrm"), DlrmArch)
    assert get_arch(ModelConfig()).name == "dlrm"
    cases = [
        ("nope", "model.arch: unknown architecture 'nope'"),
        ("no_such_package.models:build", "model.arch: cannot import module 'no_such_package.models'"),
        ("test_model_seam:missing_builder",
         "model.arch: cannot import 'missing_builder' from module 'test_model_seam'"),
        ("test_model_seam:NOT_A_BUILDER", "neither a ModelArch nor a builder function"),
        ("test_model_seam", "unknown architecture"),
        # a dot where the colon goes: said which reference was meant
        ("test_model_seam.value_reading_builder", r"package\.module:attr\); did you mean "
                                                  r"'test_model_seam:value_reading_builder'\?$"),
    ]
    for name, message in cases:
        with pytest.raises(ConfigError, match=message) as e:
            get_arch(name)
        assert "\n" not in str(e.value)


def test_a_model_the_driver_cannot_make_is_one_line_naming_where(tmp_path, monkeypatch) -> None:
    # Each was a Python traceback on the console, or a crash in every worker after Ray had started.
    (tmp_path / "fails_at_import.py").write_text("import os\n\nraise RuntimeError('no GPU here')\n")
    (tmp_path / "bad_syntax.py").write_text("def build(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = [
        ("fails_at_import:build", "model.arch: importing module 'fails_at_import' failed: RuntimeError: no GPU here "
                                  f"at {tmp_path / 'fails_at_import.py'}:3"),
        ("bad_syntax:build", "model.arch: importing module 'bad_syntax' failed: SyntaxError: "),
        ("test_model_seam:NeedsArguments", "model.arch 'test_model_seam:NeedsArguments': NeedsArguments(width) needs "
                                           "arguments, and a class a config names is made with none"),
        ("test_model_seam:RaisesInInit", "model.arch 'test_model_seam:RaisesInInit': RaisesInInit() raised KeyError: "
                                         f"'hidden' at {__file__}:"),
        ("test_model_seam:builder_of_one_argument",
         "model.arch 'test_model_seam:builder_of_one_argument': builder_of_one_argument(embeddings) cannot be "
         "called as build(embeddings, spec, options)"),
        # Was "crashed: rank 0: NotImplementedError: " (an empty message) in every worker.
        ("test_model_seam:BuildsNothing", "model.arch 'test_model_seam:BuildsNothing': BuildsNothing does not "
                                          "implement build(embeddings, spec, cfg, device)"),
    ]
    (tmp_path / "exits_at_import.py").write_text("import sys\n\nsys.exit(3)\n")
    # Printed nothing and exited 3: SystemExit is no Exception.
    cases.append(("exits_at_import:build", "model.arch: importing module 'exits_at_import' failed: SystemExit: 3 "
                                           f"at {tmp_path / 'exits_at_import.py'}:3"))
    for name, message in cases:
        with pytest.raises(ConfigError) as e:
            get_arch(name)
        assert str(e.value).startswith(message) and "\n" not in str(e.value)


class ChecksBadly(DlrmArch):
    def check(self, cfg: JobConfig, spec: DatasetSpec) -> None:
        raise KeyError("hidden")


class BuildsNone(DlrmArch):
    def build(self, embeddings, spec, cfg, device):  # type: ignore[no-untyped-def]
        return None


def builder_that_exits(embeddings, spec, options):  # type: ignore[no-untyped-def]
    raise SystemExit("bye")


def builder_that_raises(embeddings, spec, options):  # type: ignore[no-untyped-def]
    raise ValueError("boom in build")


def builder_that_raises_off_meta(embeddings, spec, options):  # type: ignore[no-untyped-def]
    if next(embeddings.parameters()).device.type != "meta":
        raise ValueError("boom in build")
    return NestedLinear(embeddings, len(spec.dense), squeeze=True)


def test_a_builder_raising_as_a_worker_builds_is_one_line_naming_the_arch(dataset, tmp_path) -> None:
    # Each worker "crashed: rank 0: ValueError: boom in build", naming neither model.arch nor where.
    # The driver says it before Ray starts where the build fails on the meta device as well.
    from embshard.trainer.build import build_unsharded

    said = r"its build raised ValueError: boom in build at " + re.escape(__file__) + r":\d+$"
    with pytest.raises(ConfigError, match=r"^model\.arch 'test_model_seam:builder_that_raises': " + said):
        plan_for_training(job(dataset, tmp_path / "run", arch="test_model_seam:builder_that_raises"))
    cfg = job(dataset, tmp_path / "run", arch="test_model_seam:builder_that_raises_off_meta")
    bundle = plan_for_training(cfg)
    with pytest.raises(ConfigError, match=r"^model\.arch 'test_model_seam:builder_that_raises_off_meta': " + said):
        build_unsharded(cfg, bundle, DatasetSpec.load(dataset), torch.device("cpu"))


@pytest.mark.parametrize("arch, message", [
    # A traceback from the driver's planning step.
    ("test_model_seam:ChecksBadly", "model.arch 'test_model_seam:ChecksBadly': check() raised KeyError: 'hidden' at "),
    # An AttributeError traceback where the plan counts the dense layers.
    ("test_model_seam:BuildsNone", "model.arch 'test_model_seam:BuildsNone': its build returned a NoneType, not a "
                                   "torch.nn.Module"),
    # Printed "bye" and exited 1.
    ("test_model_seam:builder_that_exits", "model.arch 'test_model_seam:builder_that_exits': its build exited "
                                           "(SystemExit: bye) at "),
])
def test_an_arch_failing_in_its_own_code_is_one_line(dataset, tmp_path, arch, message) -> None:
    with pytest.raises(ConfigError) as e:
        plan_for_training(job(dataset, tmp_path / "run", arch=arch))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_builder_trains_click_labels_only(dataset, tmp_path) -> None:
    # On ratings 1-5 it trained BCE for the whole run and crashed at the first evaluation.
    spec = DatasetSpec.load(dataset)
    arch = get_arch("test_model_seam:nested_builder")
    arch.check(job(dataset, tmp_path, anything=1), spec)  # its options are its own to check
    with pytest.raises(ConfigError, match=r"model.arch 'test_model_seam:nested_builder': .* has 'rating' labels"):
        arch.check(job(dataset, tmp_path), dataclasses.replace(spec, target="rating"))


def test_a_model_arch_class_is_instantiated_and_checks_its_own_options(dataset, tmp_path) -> None:
    arch = get_arch("test_model_seam:WithOptions")
    assert isinstance(arch, WithOptions) and arch.name == "test_model_seam:WithOptions"
    spec = DatasetSpec.load(dataset)
    arch.check(job(dataset, tmp_path, hidden=4), spec)
    with pytest.raises(ConfigError, match=r"model.options.depth: not an option of model.arch 'test_model_seam:Wi"):
        arch.check(job(dataset, tmp_path, depth=2), spec)
    with pytest.raises(ConfigError, match=r"model.options.depth: .* \(valid: none\)"):
        get_arch("dlrm").check(job(dataset, tmp_path, depth=2), spec)


def test_the_driver_refuses_a_bad_model_config_before_planning(dataset, tmp_path, capsys) -> None:
    with pytest.raises(ConfigError, match="model.options.layers"):
        plan_for_training(job(dataset, tmp_path / "run", layers=2))
    assert not (tmp_path / "run" / "plan").exists()
    # TorchRec's OverArch takes a hidden layer at least: a ValueError traceback in the driver.
    for arch in ("dlrm", "dlrm_dcn"):
        cfg = job(dataset, tmp_path / "run", arch=arch)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, over_arch=[]))
        with pytest.raises(ConfigError, match=rf"^model\.over_arch: model\.arch '{arch}' needs at least one hidden"):
            plan_for_training(cfg)
    config = tmp_path / "job.yaml"
    config.write_text(f"data:\n  path: {dataset}\nmodel:\n  arch: no_such_package.models:build\n")
    assert main(["plan", str(config), "--world-size", "1", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("embshard: error: model.arch: cannot import module 'no_such_package.models'")
    assert len(err.splitlines()) == 1


def gpu_asking_builder(embeddings: EmbeddingModule, spec: DatasetSpec, options: Mapping[str, Any]) -> nn.Module:
    assert torch.cuda.is_available(), "Torch not compiled with CUDA enabled"  # as torch.cuda's calls say it
    return NestedLinear(embeddings, len(spec.dense), squeeze=True)


def test_a_builder_that_needs_a_gpu_the_driver_lacks_plans_without_its_dense_count(dataset, tmp_path) -> None:
    # A build that asks for the GPU it will run on was refused on a driver without one, before
    # workers that have one could build it.
    assert plan_for_training(job(dataset, tmp_path / "run", arch="test_model_seam:gpu_asking_builder")) \
        .memory.dense_bytes is None


@pytest.mark.parametrize("builder", ["value_reading_builder", "numpy_reading_builder"])
def test_a_builder_that_cannot_run_on_meta_plans_without_its_dense_count(dataset, tmp_path, caplog, builder) -> None:
    # The plan counts the dense layers on a copy built on the meta device; a builder that reads a
    # value there cannot be counted, which is said, and its plan is made all the same.
    import logging

    with caplog.at_level(logging.WARNING):
        bundle = plan_for_training(job(dataset, tmp_path / "run", arch=f"test_model_seam:{builder}"))
    assert bundle.memory.dense_bytes is None
    assert f"dense layers not counted in the memory report: model.arch 'test_model_seam:{builder}' " \
           "cannot be built on the meta device" in caplog.text


def test_a_build_that_fails_on_any_device_fails_on_the_driver_naming_the_arch_or_the_method(dataset, tmp_path,
                                                                                          caplog) -> None:
    # Planning warned "cannot be built on the meta device" (blaming the arch for the method's
    # embeddings too), then Ray started and every worker failed the same way ~20 s later.
    import logging

    from embshard.trainer.method import EmbeddingMethod, register_method

    class EmbeddingsRaise(EmbeddingMethod):
        def embeddings(self, cfg, plan, spec, device):
            raise ValueError("no module today")

    register_method("embeddings_raise", EmbeddingsRaise())
    with caplog.at_level(logging.WARNING):
        with pytest.raises(ConfigError, match=r"^model\.arch 'test_model_seam:missing_feature_builder': its build "
                                              r"raised KeyError: 'C99' at .*test_model_seam\.py:\d+$"):
            plan_for_training(job(dataset, tmp_path / "run", arch="test_model_seam:missing_feature_builder"))
        with pytest.raises(ConfigError, match=r"^method 'embeddings_raise': embeddings\(\) raised ValueError: no "
                                              r"module today at .*test_model_seam\.py:\d+$"):
            plan_for_training(job(dataset, tmp_path / "run2"), "embeddings_raise")
    assert "meta device" not in caplog.text


def test_a_model_with_a_torchrec_collection_of_its_own_is_refused_on_the_driver(dataset, tmp_path) -> None:
    # It trained, exit 0, its tables replicated as data-parallel (never updated on CPU), and its
    # export failed: "Default process group has not been initialized".
    with pytest.raises(ConfigError, match=r"^model\.arch 'test_model_seam:own_collection_builder': the model holds "
                                          r"a TorchRec collection of its own \('extra'\), outside the embedding "
                                          r"module it was given"):
        plan_for_training(job(dataset, tmp_path / "run", arch="test_model_seam:own_collection_builder"))


def test_a_models_buffers_are_counted_with_its_dense_layers(dataset, tmp_path) -> None:
    plain = plan_for_training(job(dataset, tmp_path / "run", arch="test_model_seam:nested_builder"))
    buffered = plan_for_training(job(dataset, tmp_path / "run2", arch="test_model_seam:buffered_builder"))
    assert plain.memory.dense_bytes and buffered.memory.dense_bytes == plain.memory.dense_bytes + 1000 * 250 * 4


def test_a_builder_keeping_the_embeddings_anywhere_trains_sharded(dataset, tmp_path, process_group) -> None:
    # The sharding plan is found by the collection's identity, not at model.embeddings.
    cfg = job(dataset, tmp_path / "run", arch="test_model_seam:nested_builder")
    plan_for_training(cfg)
    summary = run_worker(cfg)
    assert summary["steps"] == 4
    assert math.isfinite(summary["last_loss"]) and summary["valid_primary"] == "auc"
    assert 0.0 <= summary["valid_auc"] <= 1.0 and summary["valid_logloss"] > 0


def test_a_builder_returning_probabilities_trains_with_a_note(dataset, tmp_path, process_group, capsys) -> None:
    # BCE with logits on a sigmoid's output trains without an error and means little: it was silent.
    for builder, notes in (("sigmoid_builder", 1), ("nested_builder", 0)):
        cfg = job(dataset, tmp_path / builder, arch=f"test_model_seam:{builder}")
        plan_for_training(cfg)
        assert run_worker(cfg)["steps"] == 4
        out = capsys.readouterr().out
        said = f"note: model.arch 'test_model_seam:{builder}': every output of the first batch lies in [0, 1]"
        assert out.count(said) == notes, out


@pytest.mark.parametrize(("builder", "message"), [
    ("unsqueezed_builder", r"model.arch 'test_model_seam:unsqueezed_builder': the model returned \(128, 1\) "
                           r"for a batch of 128; a pointwise model returns one logit per example \(\(128,\)\)"),
    # Each of these trained its dense layers alone and exited 0, every table as initialised.
    ("cut_off_builder", r"model.arch 'test_model_seam:cut_off_builder': no gradient reached the embedding "
                        r"module's output in the first training step \(detached, unused"),
    ("unread_builder", r"model.arch 'test_model_seam:unread_builder': no gradient reached the embedding module's"),
    # Torch's "log_sigmoid_cpu not implemented for 'Long'" and "element 0 of tensors does not
    # require grad", as crashes naming no arch.
    ("integer_builder", r"model.arch 'test_model_seam:integer_builder': the model returned torch.int64 logits"),
    ("output_cut_off_builder", r"model.arch 'test_model_seam:output_cut_off_builder': the loss depends on no "
                               r"parameter \(the model's output was detached"),
    # TorchRec's KeyedTensor raised it in its own frame: "crashed: rank 0: KeyError: 'C99'", retried.
    ("feature_missing_builder", r"model.arch 'test_model_seam:feature_missing_builder': its forward looked up "
                                r"feature 'C99', which the dataset lacks \(its 26 sparse features: C1, C2, .*\) "
                                r"at .*test_model_seam.py:\d+$"),
])
def test_a_builder_of_the_wrong_model_is_one_line(dataset, tmp_path, process_group, builder, message) -> None:
    cfg = job(dataset, tmp_path / builder, arch=f"test_model_seam:{builder}")
    plan_for_training(cfg)
    with pytest.raises(ConfigError, match=message) as e:
        run_worker(cfg)
    assert "\n" not in str(e.value)


def test_a_key_error_of_the_model_s_own_is_not_said_as_a_feature_the_data_lacks(dataset, tmp_path,
                                                                                process_group) -> None:
    cfg = job(dataset, tmp_path / "run", arch="test_model_seam:own_key_error_builder")
    plan_for_training(cfg)
    with pytest.raises(KeyError, match="^'dropout'$"):
        run_worker(cfg)


def test_a_model_of_embeddings_alone_trains(dataset, tmp_path, process_group) -> None:
    # "optimizer got an empty parameter list": the dense optimizer was made of no parameter.
    cfg = job(dataset, tmp_path / "run", arch="test_model_seam:embeddings_only_builder")
    plan_for_training(cfg)
    assert run_worker(cfg)["steps"] == 4


def test_a_failing_final_evaluation_keeps_the_trained_steps(dataset, tmp_path, process_group) -> None:
    # The only checkpoint of a run without checkpoint.every_steps was written after the final
    # evaluation, the test and Ray's report: a failure in any of them lost the whole run.
    cfg = dataclasses.replace(job(dataset, tmp_path / "run", arch="test_model_seam:FailingEvaluation"),
                              checkpoint=CheckpointConfig(enabled=True))
    plan_for_training(cfg)
    with pytest.raises(RuntimeError, match="a bug in my evaluate"):
        run_worker(cfg)
    [saved] = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert saved.name == "step-000004"


def test_an_arch_s_metrics_are_numbers_in_the_summary(dataset, tmp_path, process_group) -> None:
    # A tensor failed in Ray's report, a numpy float in summary.json: after the run had trained.
    cfg = job(dataset, tmp_path / "loose", arch="test_model_seam:LooseMetrics")
    plan_for_training(cfg)
    summary = run_worker(cfg)
    assert type(summary["valid_auc"]) is float and type(summary["valid_logloss"]) is float
    assert (tmp_path / "loose" / "summary.json").is_file()
    cfg = job(dataset, tmp_path / "text", arch="test_model_seam:TextMetric")
    plan_for_training(cfg)
    with pytest.raises(ConfigError, match=r"model.arch 'test_model_seam:TextMetric': evaluate\(\) returned metric "
                                          r"'note' = 'fine'; metrics are named by strings and are numbers"):
        run_worker(cfg)


def test_an_output_the_default_evaluation_cannot_score_is_one_line_naming_the_arch(dataset, tmp_path,
                                                                                     process_group) -> None:
    # It trained, then was "crashed: AttributeError: 'dict' object has no attribute 'float'".
    cfg = job(dataset, tmp_path / "run", arch="test_model_seam:OutputsByName")
    plan_for_training(cfg)
    with pytest.raises(ConfigError, match=r"^model.arch 'test_model_seam:OutputsByName': evaluate\(\): the model's "
                                          r"output for a batch of \d+ rows is a dict, where the default evaluate\(\) "
                                          r"takes one score per row"):
        run_worker(cfg)


def test_a_loss_per_example_is_one_line_naming_the_arch(dataset, tmp_path, process_group) -> None:
    # It was autograd's "grad can be implicitly created only for scalar outputs", as a crash.
    cfg = job(dataset, tmp_path / "run", arch="test_model_seam:PerExampleLoss")
    plan_for_training(cfg)
    with pytest.raises(ConfigError, match=r"model.arch 'test_model_seam:PerExampleLoss': loss\(\) returned a tensor "
                                          r"of shape \(128,\); it must be the batch's loss as one number"):
        run_worker(cfg)


def test_a_model_without_the_embeddings_it_was_given_is_refused_on_the_driver(dataset, tmp_path) -> None:
    # Said by every worker once Ray had started.
    with pytest.raises(ConfigError, match="the model does not hold the embedding module it was given"):
        plan_for_training(job(dataset, tmp_path / "run", arch="test_model_seam:detached_builder"))


def test_eval_result_names_its_primary_metric() -> None:
    result = EvalResult({"logloss": 0.5, "recall@10": 0.25}, "recall@10", 100)
    assert result.text() == "recall@10 0.2500, logloss 0.5000"
    assert result.auc is None and result.logloss == 0.5
    with pytest.raises(ValueError, match="ndcg"):
        EvalResult({"auc": 0.7}, "ndcg", 1)


def test_a_primary_metric_named_as_a_loss_is_lower_is_better_unless_said() -> None:
    # A user's arch returning "logloss" as its primary had best_valid pick its worst step.
    assert EvalResult({"logloss": 0.5}, "logloss", 1).lower_is_better is True
    assert EvalResult({"val_error": 0.5, "x": 1.0}, "val_error", 1).lower_is_better is True
    assert EvalResult({"RMSE": 0.5}, "RMSE", 1).lower_is_better is True
    assert EvalResult({"auc": 0.7}, "auc", 1).lower_is_better is False
    assert EvalResult({"logloss": 0.5}, "logloss", 1, lower_is_better=False).lower_is_better is False
    assert EvalResult({"logloss": 0.4}, "logloss", 1).better_than(EvalResult({"logloss": 0.5}, "logloss", 1))


def test_an_evaluation_s_nan_metric_is_one_line_naming_the_arch() -> None:
    # NaN beat nothing and nothing beat it: best_valid kept the first NaN for good, and
    # summary.json held a bare NaN, which is no JSON.
    from embshard.trainer.evaluate import reportable

    with pytest.raises(ConfigError, match=r"^model\.arch 'mine': evaluate\(\) returned metric 'auc' = nan; a metric "
                                          r"is a finite number \(a model diverged, or a bug in evaluate\)$"):
        reportable(EvalResult({"auc": float("nan")}, "auc", 10), "mine")


def test_auc_is_of_the_logits_with_ties_counted_half_and_undefined_for_one_class() -> None:
    from embshard.errors import DataError
    from embshard.trainer.evaluate import binary_auc

    # Confident logits: sigmoid in float32 is 1.0 for all four, and the AUC was 0.5.
    assert binary_auc(torch.tensor([20.0, 21, 22, 23]), torch.tensor([0.0, 1, 0, 1]), "x") == 0.75
    # Positives {1, 2} against negatives {1, 0}: a tie (1/2), then three wins, of 4 pairs.
    assert binary_auc(torch.tensor([1.0, 1, 2, 0]), torch.tensor([1.0, 0, 1, 0]), "x") == 0.875
    scores = torch.randn(5000, generator=torch.Generator().manual_seed(0)).round(decimals=1)
    labels = (torch.rand(5000, generator=torch.Generator().manual_seed(1)) < torch.sigmoid(scores)).float()
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = (pos[:, None] > neg[None, :]).double().sum() + 0.5 * (pos[:, None] == neg[None, :]).double().sum()
    assert binary_auc(scores, labels, "x") == pytest.approx(float(pairs) / (len(pos) * len(neg)), abs=1e-12)
    # Ratings 1-5 as click labels: thresholded, or said to be all of label 1.
    with pytest.raises(DataError, match=r"^x: label 3 is no click \(0 or 1\)"):
        binary_auc(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 3.0]), "x")
    # Ranks exact past 2**24 rows (float32 ranks were not): 2**24 + 2 rows, one positive on top.
    many = torch.zeros(2**24 + 2)
    many[-1] = 1.0
    assert binary_auc(torch.arange(2**24 + 2, dtype=torch.float64), many, "x") == 1.0
    # torchmetrics said 0.0.
    with pytest.raises(DataError, match=r"^the valid split: every one of the 3 rows evaluated has label 0, so its "
                                        r"AUC is undefined"):
        binary_auc(torch.tensor([0.1, 0.2, 0.3]), torch.zeros(3), "the valid split")


def test_settings_no_part_of_the_run_reads_are_said_in_the_plan(dataset, tmp_path, capsys) -> None:
    # An FM's or a builder's config with DLRM's layers, or MDE's knobs under the uniform policy,
    # planned and trained without a word about them.
    def notes(arch: str, *sets: str) -> list[str]:
        out = tmp_path / f"plan-{len(list(tmp_path.iterdir()))}"
        config = tmp_path / "job.yaml"
        config.write_text(f"data:\n  path: {dataset}\nmodel:\n  arch: {arch}\n  dense_arch: [8]\n"
                          "  over_arch: [8, 4]\nembeddings:\n  dim: 8\n")
        assert main(["plan", str(config), "--world-size", "1", "--out", str(out),
                     *[a for s in sets for a in ("--set", s)]]) == 0
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]

    assert notes("dlrm") == []
    assert notes("fm") == [
        "note: model.dense_arch [8] is not read by model.arch 'fm': it changes nothing in this run",
        "note: model.over_arch [8, 4] is not read by model.arch 'fm': it changes nothing in this run",
    ]
    assert len(notes("test_model_seam:nested_builder")) == 2
    assert notes("dlrm", "embeddings.mde.alpha=0.5") == [
        "note: embeddings.mde is read by policy mde only (policy is uniform): it changes nothing in this run"]
    mde = notes("dlrm", "embeddings.mde.alpha=0.5", "embeddings.policy=mde", "embeddings.mde.mode=within")
    assert not any("embeddings.mde is read" in note for note in mde)
    # MDE within tables notes one or two roundings per block: the console shows ten (it printed 162).
    assert len(mde) == 11 and re.fullmatch(r"note: \d+ more in .*plan-\d+/plan.json \(`notes`\)", mde[-1])
    # Blocks per table under one block per table, planned without a word.
    across = notes("dlrm", "embeddings.policy=mde", "embeddings.mde.blocks=5")
    assert ("note: embeddings.mde.blocks 5 is read in mode within only (mode is across: one block per table): it "
            "changes nothing in this run") in across


def test_the_gradient_check_takes_a_module_called_in_any_form() -> None:
    # An output neither tensor, KeyedTensor nor awaitable was "did not call its embedding module".
    from embshard.trainer.callbacks import StepInfo
    from embshard.trainer.embedding_gradient import EmbeddingGradientCheck

    class DictOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"x": self.lin(x)}

    module = DictOut()
    check = EmbeddingGradientCheck(module, "mine")
    module(torch.ones(1, 2))["x"].sum().backward()
    check.on_step(StepInfo(1, 0, 1, 0.0, 0.0, None))
    unused = DictOut()
    check = EmbeddingGradientCheck(unused, "mine")
    with pytest.raises(ConfigError, match=r"^model\.arch 'mine': the model did not call its embedding module"):
        check.on_step(StepInfo(1, 0, 1, 0.0, 0.0, None))


def test_the_gradient_check_names_the_features_a_model_does_not_read(capsys) -> None:
    # A user's model that read C1 and C2 of 26 features trained without the other 24, exit 0.
    from torchrec.sparse.jagged_tensor import KeyedTensor

    from embshard.trainer.callbacks import StepInfo
    from embshard.trainer.embedding_gradient import WATCH_STEPS, EmbeddingGradientCheck

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.randn(4, 6))

        def forward(self, x: torch.Tensor) -> KeyedTensor:
            return KeyedTensor(keys=["a", "b", "c"], length_per_key=[2, 2, 2], values=x @ self.table)

    def steps(*losses) -> str:
        module = Pooled()
        check = EmbeddingGradientCheck(module, "mine")
        for step, loss_of in enumerate(losses, 1):
            loss_of(module(torch.ones(3, 4)).to_dict()).backward()
            check.on_step(StepInfo(step, 0, 3, 0.0, 0.0, None))
        return capsys.readouterr().out

    reads_a = [lambda kt: kt["a"].sum()] * WATCH_STEPS
    assert steps(*reads_a).strip() == (
        f"warning: model.arch 'mine': the loss of its first {WATCH_STEPS} training steps did not depend on 2 of the 3 "
        "features the embedding module gave it (b, c): if the model does not read them, their tables are planned, "
        "counted in the serving size and never trained; read them in forward, or leave them out of the dataset")
    assert steps(*reads_a[:-1]) == ""  # not before the last watched step
    # A feature read in a later step (its first batches' gradient zero where it is read: FM's other
    # features with every bag empty) is not named; nor is anything where no feature has a gradient.
    everything = lambda kt: sum(v.sum() for v in kt.values())  # noqa: E731
    assert steps(*reads_a[:-1], everything) == ""
    assert steps(*[lambda kt: 0 * everything(kt)] * WATCH_STEPS) == ""
