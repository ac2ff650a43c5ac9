"""`ModelArch`: what `model.arch` names, and `TrainModel`, the one module the loop and DMP see.

The builder (trainer/build.py) asks the arch for its model over the method's embedding module and
wraps the pair in a `TrainModel` (batch -> (loss, output), the contract TorchRec's
TrainPipelineSparseDist expects); the loop trains that and evaluates through `arch.evaluate`, so
neither asks which architecture it holds. The defaults are pointwise CTR: one logit per example,
BCE with the label, AUC and logloss.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from embshard.config import JobConfig, ModelConfig
from embshard.datasets.reader import Batch, ParquetBatchReader
from embshard.datasets.schema import DatasetSpec
from embshard.errors import ConfigError, EmbshardError, first_line
from embshard.sharding.embedding_module import EmbeddingModule
from embshard.trainer.evaluate import EvalResult, evaluate_pointwise
from embshard.trainer.reference import raised_at

# build(embeddings, spec, options) -> model: a user's plain builder (pointwise, uniform width).
Builder = Callable[[EmbeddingModule, DatasetSpec, Mapping[str, Any]], nn.Module]


class ModelArch:
    """A model architecture. `name` is what `model.arch` called it (error messages use it)."""

    name: str = "?"
    # True: every feature reaches the model at embeddings.base_dim (MDE/MLET blocks projected).
    # False: each feature at its own width (`EmbeddingModule.feature_dims`: the widest of its
    # blocks; narrower blocks of the same table project to it), no other projections; the plan
    # records it so the memory report counts only the projections that exist.
    uniform_width: bool = True
    # The `model.options` keys this arch takes; None: any (a builder checks its own).
    options: tuple[str, ...] | None = ()
    # Whether the arch reads `model.dense_arch` and `model.over_arch`. False: setting them is
    # said as a plan note (they change nothing), not refused: a preset keeps them for its DLRM.
    reads_layers: bool = True
    # Whether its model reads the dataset's dense features. False: a dataset that has some is said
    # as a plan note (they change nothing), as the layers are.
    reads_dense: bool = True
    # What the dataset's labels must be (dataset.json `target`): a BCE model on ratings 1-5, or a
    # regression on 0/1 clicks, would train without an error and mean nothing.
    targets: tuple[str, ...] = ("click",)

    def check(self, cfg: JobConfig, spec: DatasetSpec) -> None:
        """ConfigError for a config this arch cannot train (the driver calls it before planning)."""
        unknown = sorted(set(cfg.model.options) - set(self.options)) if self.options is not None else []
        if unknown:
            valid = ", ".join(self.options or ()) or "none"
            raise ConfigError(f"model.options.{unknown[0]}: not an option of model.arch {self.name!r} (valid: {valid})")
        if spec.target not in self.targets:
            raise ConfigError(f"model.arch {self.name!r}: dataset {spec.name!r} ({cfg.data.path}) has {spec.target!r} "
                              f"labels; this arch trains on {' or '.join(map(repr, self.targets))} labels")

    def build(self, embeddings: EmbeddingModule, spec: DatasetSpec, cfg: ModelConfig,
              device: torch.device | None) -> nn.Module:
        """The model around `embeddings` (built on meta: DMP materialises its tables); its dense
        layers go on `device`."""
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: Batch) -> Any:
        """How the arch's model is called on a batch (its own contract)."""
        return model(batch.dense, batch.sparse)

    def loss(self, output: Any, batch: Batch) -> torch.Tensor:
        if not isinstance(output, torch.Tensor) or output.shape != batch.labels.shape:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ConfigError(f"model.arch {self.name!r}: the model returned {shape} for a batch of "
                              f"{batch.labels.numel()}; a pointwise model returns one logit per example "
                              f"({tuple(batch.labels.shape)})")
        if not output.is_floating_point():  # else torch's "log_sigmoid_cpu not implemented for 'Long'"
            raise ConfigError(f"model.arch {self.name!r}: the model returned {output.dtype} logits; a logit is a "
                              "floating-point number")
        return F.binary_cross_entropy_with_logits(output, batch.labels)

    def evaluate(self, model: nn.Module, reader: ParquetBatchReader, device: torch.device,
                 max_batches: int | None) -> EvalResult:
        """`model`: the TrainModel (DMP-wrapped on workers); collective over its process group."""
        return evaluate_pointwise(model, reader, device, max_batches)


class BuilderArch(ModelArch):
    """A user's plain builder function as a pointwise, uniform-width arch; `model.options` go to
    the builder as they are (it checks its own). Pointwise CTR: BCE on click labels, as the
    defaults it inherits train and evaluate."""

    options = None
    reads_layers = False  # a builder is given the embeddings, the dataset and `model.options` only

    def __init__(self, builder: Builder, name: str) -> None:
        self.builder = builder
        self.name = name
        self._outputs_seen = False

    def loss(self, output: Any, batch: Batch) -> torch.Tensor:
        loss = super().loss(output, batch)
        if not self._outputs_seen:
            self._outputs_seen = True
            _note_probabilities(output, self.name)
        return loss

    def build(self, embeddings: EmbeddingModule, spec: DatasetSpec, cfg: ModelConfig,
              device: torch.device | None) -> nn.Module:
        # DMP moves its dense layers to the device (the tables may still be on meta here).
        return self.builder(embeddings, spec, dict(cfg.options))


def _note_probabilities(output: torch.Tensor, arch: str) -> None:
    """A note, on rank 0, when every output of a model's first batch lies in [0, 1]: a model that
    ends in a sigmoid trains under BCE with logits without an error, on sigmoid(p), and its
    logloss never falls far. A logit model's first batch holds values on both sides of 0."""
    probabilities = output.numel() >= 32 and bool(((output >= 0) & (output <= 1)).all())
    if probabilities and (not dist.is_initialized() or dist.get_rank() == 0):
        print(f"note: model.arch {arch!r}: every output of the first batch lies in [0, 1], as probabilities "
              "do; the loss takes logits (BCE with logits): return the logit, not its sigmoid", flush=True)


class ModelBuildFailed(ConfigError):
    """An arch's build raised in its own code (on the meta device, perhaps only there)."""


def build_model(arch: ModelArch, embeddings: EmbeddingModule, spec: DatasetSpec, cfg: ModelConfig,
                device: torch.device | None) -> nn.Module:
    """`arch.build`, and ConfigError unless it gave a module: every later step (the plan's count of
    the dense layers, DMP) failed on anything else with a traceback of its own. What the build
    raises itself is ModelBuildFailed naming the arch and where: in a worker it was a "crashed:
    rank 0: ValueError: ..." line that said neither."""
    try:
        model = arch.build(embeddings, spec, cfg, device)
    except EmbshardError:
        raise
    except SystemExit as e:  # not an error Python reports: the process just ended, saying nothing of where
        raise ConfigError(f"model.arch {arch.name!r}: its build exited ({first_line(e)}){raised_at(e)}") from None
    except Exception as e:
        if isinstance(e, (MemoryError, OSError)) or "out of memory" in str(e):
            raise  # the machine's, said as such (errors.environment_problem), not the arch's
        raise ModelBuildFailed(f"model.arch {arch.name!r}: its build raised {first_line(e)}{raised_at(e)}") from e
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.arch {arch.name!r}: its build returned a {type(model).__name__}, not a "
                          "torch.nn.Module")
    return model


class TrainModel(nn.Module):
    """(arch, model) as one module: forward(batch) -> (loss, output). DMP wraps this."""

    def __init__(self, arch: ModelArch, model: nn.Module) -> None:
        super().__init__()
        self.arch = arch
        self.model = model

    def forward(self, batch: Batch) -> tuple[torch.Tensor, Any]:
        try:
            output = self.arch.forward(self.model, batch)
        except KeyError as e:
            missing = _feature_not_in_data(self.arch.name, e, batch)
            if missing is None:
                raise
            raise missing from e
        return _arch_loss(self, output, batch), output


_TORCHREC_LOOKUP = re.compile(r"torchrec[/\\]sparse[/\\]jagged_tensor\.py$")


def _feature_not_in_data(arch: str, e: KeyError, batch: Batch) -> ConfigError | None:
    """ConfigError for a model that looked up a feature by a name the data has not: TorchRec's
    KeyedTensor and KeyedJaggedTensor raise the KeyError in their own frame, and every rank said
    "crashed: rank 0: KeyError: 'C99'", naming neither the arch nor the data, and was retried."""
    key = e.args[0] if len(e.args) == 1 else None
    features = batch.sparse.keys()
    frames = traceback.extract_tb(e.__traceback__)
    # Only TorchRec's lookup by feature name: the model's own dicts raise KeyErrors of other keys.
    if not isinstance(key, str) or key in features or not frames or not _TORCHREC_LOOKUP.search(frames[-1].filename):
        return None
    shown = ", ".join(features[:6]) + (f", ..., {features[-1]}" if len(features) > 6 else "")
    return ConfigError(f"model.arch {arch!r}: its forward looked up feature {key!r}, which the dataset lacks "
                       f"(its {len(features)} sparse features: {shown}){raised_at(e)}")


@torch.fx.wrap
def _arch_loss(train: TrainModel, output: Any, batch: Batch) -> torch.Tensor:
    # One opaque node when TorchRec's train pipeline traces the model to find its collections'
    # input: an arch's loss may check its output's type and shape, which a trace cannot follow.
    loss = train.arch.loss(output, batch)
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        if train.training and torch.is_grad_enabled() and not loss.requires_grad:
            # Else autograd's "element 0 of tensors does not require grad", naming nobody.
            raise ConfigError(f"model.arch {train.arch.name!r}: the loss depends on no parameter (the model's "
                              "output was detached, or computed under torch.no_grad)")
        return loss.reshape(())  # (1,), say: autograd took it
    # Else autograd's "grad can be implicitly created only for scalar outputs", naming nobody.
    got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
    raise ConfigError(f"model.arch {train.arch.name!r}: loss() returned {got}; it must be the batch's loss as "
                      "one number, a 0-d tensor (say, the mean over its examples)")
