"""What a rank's sharded model really holds, counted from its tensors: the figure the planner's
memory report (`planner/memory.py`) promises, so tests and benchmarks can hold the plan to it."""

from __future__ import annotations

import torch

from embshard.trainer.build import ShardedModel


def held_bytes(sharded: ShardedModel) -> dict[str, int]:
    """Bytes on this rank of its embedding shards (`weights`), the fused sparse optimizer's state
    (`optimizer`) and the replicated MDE / MLET projections (`projections`); `train_bytes` is
    their sum, comparable with `MemoryReport.per_rank[rank]["train_bytes"]`; and the weights and
    buffers of the model's layers outside its embedding module (`dense_layer_weights`,
    `dense_layer_buffers`), which `MemoryReport.dense_bytes` counts with the weights' gradients and
    optimizer state."""
    model = sharded.model
    weights = sum(
        shard.tensor.numel() * shard.tensor.element_size()
        for v in model.state_dict().values()
        if hasattr(v, "local_shards")
        for shard in v.local_shards()
    )
    state = sum(
        t.numel() * t.element_size()
        for per_param in model.fused_optimizer.state_dict()["state"].values()
        for v in per_param.values()
        for t in ([s.tensor for s in v.local_shards()] if hasattr(v, "local_shards") else [v])
        if isinstance(t, torch.Tensor)
    )
    dense = sum(
        p.numel() * p.element_size()
        for name, p in model.named_parameters()
        if ".mlet." in name or ".projections." in name
    )
    own = {id(t) for t in [*sharded.embeddings.parameters(), *sharded.embeddings.buffers()]}
    layers = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in own)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers() if id(b) not in own)
    return {"weights": weights, "optimizer": state, "projections": dense,
            "train_bytes": weights + state + dense, "dense_layer_weights": layers, "dense_layer_buffers": buffers}
