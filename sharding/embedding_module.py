"""The one interface every method's embedding module offers the model (trainer/models/)."""

from __future__ import annotations

from torch import nn


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
