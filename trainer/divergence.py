"""A watch on the training loss for NaN and infinity that costs no device sync per step.

Every step folds `isfinite(loss)` into one flag on the device; the flag is read (a sync, and an
all-reduce so every rank stops together) only where the loop syncs anyway or is about to keep
something of the weights: a logging step, a checkpoint, an evaluation. A diverged run then ends
with one line instead of exiting 0 with a NaN loss, an AUC of noise, and NaN weights saved as its
newest checkpoint.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from embshard.errors import TrainingDiverged

# A later NaN is most often a step too large, but a model's own log or division of a value
# training drives to 0 reads alike: the advice names both.
ADVICE = ("lower train.dense_lr or train.sparse_lr; if it recurs at lower rates, look in the model for a log, "
          "division or exp of a value training can drive to 0 or overflow")


class LossWatch:
    def __init__(self, device: torch.device, step: int) -> None:
        self._finite = torch.ones((), dtype=torch.int32, device=device)
        self.checked_step = step  # the last step at which every rank's loss so far was finite

    def observe(self, loss: torch.Tensor) -> None:
        self._finite.mul_(torch.isfinite(loss).to(torch.int32))

    def check(self, step: int, what: str) -> None:
        """TrainingDiverged, on every rank, when a loss of any rank since the last check was not
        finite; `what` is what was about to happen (a checkpoint, an evaluation, a log line).
        Collective: every rank calls it at the same steps."""
        finite = self._finite.clone()
        if dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():
            if self.checked_step == 0 and step == 1:  # a fresh run's first loss is always read
                raise TrainingDiverged(
                    "the loss of the first step is NaN or infinite, on the initial weights: before any update, so "
                    "no learning rate's doing; look at what the model computes (a log of 0, a division by 0), "
                    "NaN features being refused as they are read")
            raise TrainingDiverged(
                f"training diverged: the loss became NaN or infinite between step {self.checked_step} and "
                f"step {step}, found before {what}; nothing of it was checkpointed ({ADVICE})")
        self.checked_step = step
