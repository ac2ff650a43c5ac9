"""How the loop steps: through TorchRec's train pipelines (`train.pipeline`), or one batch at a
time.

`sparse_dist` is TorchRec's `TrainPipelineSparseDist`: while batch i trains, the ids of batch
i+1 are already on their way to the ranks that hold their rows (the input dist) and batch i+2 is
fetched. Lookups still happen in batch i+1's own forward, after step i: the result is the
unpipelined loop's, step for step. `semi_sync` (`TrainPipelineSemiSync`) also runs batch i+1's
lookups before step i's update, so from `SEMI_SYNC_START` steps on it trains on embeddings one
step old: faster where all-to-alls are slow, not equal to the other two.

Either pipeline owns fetching: it takes batches from the iterator up to two ahead of the one it
trains, so the loop counts what was trained from the steps it gets back, never from the reader.
The pipeline rewrites the sharded collections' forwards to serve the batches it prefetched, so
anything else that runs the model (evaluation) does so inside `paused()`, with the original
forwards back.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from traceback import extract_tb
from typing import Any

import torch
from torch import nn

from embshard.config import PipelineKind

# TorchRec's own default: the first steps train synchronously, which keeps early training
# stable (its docstring: "reduces early stage NEX").
SEMI_SYNC_START = 900


@dataclass
class Step:
    loss: torch.Tensor  # detached
    rows: int  # examples in the batch this step trained


class TrainSteps:
    """Steps `model` (whose `forward(batch) -> (loss, output)`) with `optimizer` over batches.
    `kind="none"`: forward, backward and step one batch at a time, no pipeline. `note` gets the
    one line a user should read when a pipelined run trains (partly) unpipelined."""

    def __init__(self, kind: PipelineKind, model: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, note: Callable[[str], None] = print) -> None:
        self.kind = kind
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.note = note
        self._pipeline = _make_pipeline(kind, model, optimizer, device) if kind != "none" else None
        self._checked = False

    def run(self, batches: Iterator[Any]) -> Generator[Step, None, None]:
        """One Step per batch trained, in order. Stopping early leaves the batches the pipeline
        fetched ahead untrained (and uncounted)."""
        if self._pipeline is None:
            yield from self._plain(batches)
            return
        fetched: deque[int] = deque()

        def counted() -> Iterator[Any]:
            for batch in batches:
                fetched.append(batch.labels.numel())
                yield batch

        source = counted()
        while True:
            try:
                loss, _ = self._pipeline.progress(source)
            except StopIteration:
                return
            except Exception as e:
                # The first step traces the model, before the pipeline changed anything: what it
                # fetched trains unpipelined, then the rest.
                if self._checked or not _raised_in_trace(e):
                    raise
                self.note(f"train.pipeline {self.kind}: training unpipelined, TorchRec cannot trace "
                          f"the model to find its collections' input ({type(e).__name__}: {e})")
                pending = [b for b in self._pipeline.batches if b is not None]
                self._pipeline = None
                yield from self._plain(chain(pending, source))
                return
            if not self._checked:
                self._checked = True
                self._note_unpipelined()
            # The pipeline trains batches in the order it fetched them.
            yield Step(loss, fetched.popleft())

    @contextmanager
    def paused(self) -> Iterator[nn.Module]:
        """The model with its own forwards (TorchRec's detach / attach); batches in flight stay
        in the pipeline and train next, as they would have."""
        if self._pipeline is None:
            yield self.model
            return
        model = self._pipeline.detach()
        try:
            yield model
        finally:
            self._pipeline.attach(model)

    def _plain(self, batches: Iterable[Any]) -> Iterator[Step]:
        for batch in batches:
            yield Step(train_step(self.model, self.optimizer, batch.to(self.device, non_blocking=True)),
                       batch.labels.numel())

    def _note_unpipelined(self) -> None:
        """TorchRec runs a collection whose input is computed in the model (not read from the
        batch, nor by a parameter-free module) unpipelined: correct, but say which."""
        from torchrec.distributed.types import ShardedModule

        assert self._pipeline is not None
        pipelined = {id(m) for m in self._pipeline._pipelined_modules}
        left = [name for name, m in self.model.named_modules()
                if isinstance(m, ShardedModule) and id(m) not in pipelined]
        if left:
            self.note(f"train.pipeline {self.kind}: {', '.join(left)} trains unpipelined (its input "
                      f"is computed in the model, not read from the batch)")


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any) -> torch.Tensor:
    """One unpipelined step; -> the detached loss."""
    loss, _ = model(batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def _raised_in_trace(error: BaseException) -> bool:
    """Whether `error` came out of torch.fx's symbolic trace (TorchRec tracing the model), not out
    of a batch or a step."""
    return any(frame.filename.endswith(("fx/_symbolic_trace.py", "fx/proxy.py"))
               for frame in extract_tb(error.__traceback__))


def _make_pipeline(kind: PipelineKind, model: nn.Module, optimizer: torch.optim.Optimizer,
                   device: torch.device) -> Any:
    from torchrec.distributed.train_pipeline.train_pipelines import TrainPipelineSemiSync, TrainPipelineSparseDist

    def forward(batch: Any) -> tuple[torch.Tensor, tuple[torch.Tensor, Any]]:
        # progress() hands back only the output: carry the loss out beside it.
        loss, output = model(batch)
        return loss, (loss.detach(), output)

    # pipeline_postproc: a parameter-free module between the batch and a collection (MDE's block
    # split, AutoDim's per-candidate repeat) runs ahead with the input dist instead of keeping
    # that collection out of the pipeline.
    if kind == "semi_sync":
        return TrainPipelineSemiSync(model, optimizer, device, start_batch=SEMI_SYNC_START,
                                     pipeline_postproc=True, custom_model_fwd=forward)
    return TrainPipelineSparseDist(model, optimizer, device, pipeline_postproc=True, custom_model_fwd=forward)
