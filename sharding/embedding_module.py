"""The one interface every method's embedding module offers the model (trainer/models/)."""

from __future__ import annotations

from typing import TypeVar

from torch import nn

M = TypeVar("M", bound=nn.Module)


def inner_module(model: nn.Module, kind: type[M]) -> M | None:
    """The first module of type `kind` inside `model`, wherever its arch put it and whatever wraps
    it (DMP, DDP, the training loss): None if it has none."""
    return next((m for m in model.modules() if isinstance(m, kind)), None)


class EmbeddingModule(nn.Module):
    """Maps a KeyedJaggedTensor to a KeyedTensor of `feature_dims[f]` columns per feature f, in the
    order of `feature_names`. Subclasses set `feature_names` and `base_dim` in their __init__;
    declaring them here types them for the model (nn.Module's __getattr__ would type them
    `Tensor | Module`)."""

    feature_names: list[str]
    base_dim: int

    @property
    def feature_dims(self) -> dict[str, int]:
        """Output width per feature, in feature order: every feature at `base_dim` unless a
        subclass says otherwise (a plan trained for an arch without `uniform_width`)."""
        return {f: self.base_dim for f in self.feature_names}
