"""A check, on the first step a run trains, that the loss reaches the embedding tables.

A model that detaches its embeddings' output, or never calls its embedding module, trains its
dense layers alone: the run exits 0 with an AUC, checkpoints and an export, and every table as it
was initialised (the sparse optimizer's state stays all zeros). Only a gradient arriving at the
module's output tells the two apart, so a hook watches for one on the first training forward.

Per feature too, as a warning: a model that reads some of the features never trains the others'
tables, yet they are planned and counted in the serving size. A feature whose columns got an
exactly zero gradient in each of the first `WATCH_STEPS` steps, while some other feature's did
not, is named. A warning, not a refusal: a feature that is read can see a zero gradient too, where
what multiplies it is zero (FM's other features when their bags are all empty, a table a lottery
ticket pruned whole); a gradient zero everywhere (a zero-initialised last layer) says nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle
from torchrec.distributed.types import Awaitable
from torchrec.sparse.jagged_tensor import KeyedTensor

from embshard.errors import ConfigError
from embshard.trainer.callbacks import Callback, StepInfo

WATCH_STEPS = 8  # steps a feature's columns may see a zero gradient before it is named


class EmbeddingGradientCheck(Callback):
    def __init__(self, embeddings: nn.Module, arch: str) -> None:
        self.arch = arch
        self.called = False
        self.unread = False  # a sharded collection's lookups never waited for
        self.watched = False  # an output took part in autograd: a method may freeze its tables
        self.reached = False
        self.read: set[str] = set()  # features whose columns have had a non-zero gradient
        self._columns: dict[str, tuple[int, int]] = {}  # a KeyedTensor output's: feature -> its columns
        self._steps = 0
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
            self.read |= {key for key, (a, b) in self._columns.items() if key not in self.read and grad[:, a:b].any()}

    def on_step(self, info: StepInfo) -> None:
        if self._handle is None:
            return
        self._steps += 1
        if self._steps == 1:
            self._first_step()
        unread = [key for key in self._columns if key not in self.read]
        if not unread or not self.read or self._steps >= WATCH_STEPS:
            self._handle.remove()
            self._handle = None
        if unread and self.read and self._steps >= WATCH_STEPS and _rank() == 0:
            shown = ", ".join(unread[:5]) + (f" and {len(unread) - 5} more" if len(unread) > 5 else "")
            print(f"warning: model.arch {self.arch!r}: the loss of its first {WATCH_STEPS} training steps did not "
                  f"depend on {len(unread)} of the {len(self._columns)} features the embedding module gave it "
                  f"({shown}): if the model does not read them, their tables are planned, counted in the serving "
                  "size and never trained; read them in forward, or leave them out of the dataset", flush=True)

    def _first_step(self) -> None:
        if not self.called:
            raise ConfigError(f"model.arch {self.arch!r}: the model did not call its embedding module in the first "
                              "training step, so its tables would never train; call it on the batch's sparse "
                              "features in forward")
        if not self.reached and (self.unread or self.watched):
            raise ConfigError(f"model.arch {self.arch!r}: no gradient reached the embedding module's output in the "
                              "first training step (detached, unused, or the loss does not depend on it), so its "
                              "tables would never train")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
