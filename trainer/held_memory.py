"""What a rank's sharded model really holds, counted from its tensors: the figure the planner's
memory report (`planner/memory.py`) promises, so tests and benchmarks can hold the plan to it."""

from __future__ import annotations

import torch

from embshard.trainer.build import ShardedModel, dense_layers


def held_bytes(sharded: ShardedModel) -> dict[str, int]:
    """Bytes on this rank of its embedding shards (`weights`), the fused sparse optimizer's state
    (`optimizer`) and the replicated MDE / MLET projections (`projections`); `train_bytes` is
    their sum, comparable with `MemoryReport.per_rank[rank]["train_bytes"]`."""
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
    return {"weights": weights, "optimizer": state, "projections": dense,
            "train_bytes": weights + state + dense}


def held_dense_bytes(sharded: ShardedModel) -> dict[str, int]:
    """Bytes on this rank of the model's layers outside its embedding module: weights, gradients,
    the dense optimizer's state (its scalar step counters left out) and buffers; their sum is what
    `MemoryReport.dense_bytes` promises once a step has made the gradients and the state."""
    params, buffers = dense_layers(sharded.model, sharded.method.collections(sharded.embeddings))
    state = [t for p in params for t in sharded.optimizer.state.get(p, {}).values()
             if isinstance(t, torch.Tensor) and t.dim() > 0]
    return {"weights": sum(p.numel() * p.element_size() for p in params),
            "gradients": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
            "optimizer": sum(t.numel() * t.element_size() for t in state),
            "buffers": sum(b.numel() * b.element_size() for b in buffers)}
