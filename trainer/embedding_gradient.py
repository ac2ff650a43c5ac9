"""A check, on the first step a run trains, that the loss reaches the embedding tables.

A model that detaches its embeddings' output, or never calls its embedding module, trains its
dense layers alone: the run exits 0 with an AUC, checkpoints and an export, and every table as it
was initialised (the sparse optimizer's state stays all zeros). Only a gradient arriving at the
module's output tells the two apart, so a hook watches for one on the first training forward.

Per feature too: a model that reads some of the features trains the others' tables never, yet
they are planned and counted in the serving size. Where the gradient reaches some features' columns
and is exactly zero on others', those others were not read (a model whose gradient is zero
everywhere at its first step, a zero-initialised last layer, says nothing of any feature).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from torchrec.distributed.types import Awaitable
from torchrec.sparse.jagged_tensor import KeyedTensor

from embshard.errors import ConfigError
from embshard.trainer.callbacks import Callback, StepInfo


class EmbeddingGradientCheck(Callback):
    def __init__(self, embeddings: nn.Module, arch: str) -> None:
        self.arch = arch
        self.called = False
        self.unread = False  # a sharded collection's lookups never waited for
        self.watched = False  # an output took part in autograd: a method may freeze its tables
        self.reached = False
        self.unreached: list[str] = []  # features whose columns got an all-zero gradient while others' did not
        self._columns: dict[str, tuple[int, int]] = {}  # a KeyedTensor output's: feature -> its columns
        self._handle: RemovableHandle | None = embeddings.register_forward_hook(self._on_forward)

    def _on_forward(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()) or isinstance(output, torch.fx.Proxy):
            return  # an evaluation, or TorchRec's trace of the model
        self.called = True
        if isinstance(output, Awaitable):  # a sharded collection's: the model waits for its lookups
            self.unread = True
            output.callbacks.append(self._on_result)
        else:
            self._on_result(output)

    def _on_result(self, output: Any) -> Any:
        self.unread = False
        values = output.values() if isinstance(output, KeyedTensor) else output
        if isinstance(output, KeyedTensor) and output.key_dim() == 1:
            offsets = output.offset_per_key()
            self._columns = {key: (offsets[i], offsets[i + 1]) for i, key in enumerate(output.keys())}
        if isinstance(values, torch.Tensor) and values.requires_grad:
            self.watched = True
            values.register_hook(self._on_gradient)
        return output

    def _on_gradient(self, grad: torch.Tensor) -> None:
        self.reached = True
        if self._columns and grad.dim() == 2:
            read = {key: bool(grad[:, a:b].any()) for key, (a, b) in self._columns.items()}
            if any(read.values()):
                self.unreached = [key for key, got in read.items() if not got]

    def on_step(self, info: StepInfo) -> None:
        if self._handle is None:
            return
        self._handle.remove()
        self._handle = None
        if not self.called:
            raise ConfigError(f"model.arch {self.arch!r}: the model did not call its embedding module in the first "
                              "training step, so its tables would never train; call it on the batch's sparse "
                              "features in forward")
        if not self.reached and (self.unread or self.watched):
            raise ConfigError(f"model.arch {self.arch!r}: no gradient reached the embedding module's output in the "
                              "first training step (detached, unused, or the loss does not depend on it), so its "
                              "tables would never train")
        if self.unreached:
            shown = ", ".join(self.unreached[:5]) + (f" and {len(self.unreached) - 5} more" if len(self.unreached) > 5
                                                     else "")
            raise ConfigError(f"model.arch {self.arch!r}: the loss of the first training step does not depend on "
                              f"{len(self.unreached)} of the {len(self._columns)} features the embedding module gave "
                              f"it ({shown}), so their tables would be planned, counted in the serving size and "
                              "never trained; read them in forward, or leave them out of the dataset")
