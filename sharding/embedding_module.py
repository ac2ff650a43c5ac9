"""The one interface every method's embedding module offers the model (trainer/model.py)."""

from __future__ import annotations

from torch import nn


class EmbeddingModule(nn.Module):
    """Maps a KeyedJaggedTensor to a KeyedTensor of `base_dim` columns per feature, in the order
    of `feature_names`. Subclasses set both in their __init__; declaring them here types them for
    the model (nn.Module's __getattr__ would type them `Tensor | Module`)."""

    feature_names: list[str]
    base_dim: int
