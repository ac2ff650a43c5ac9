"""embshard: sharded mixed-dimension embedding training on TorchRec and Ray.

The layers live in their own folders and install as `embshard.planner`, `embshard.sharding`,
`embshard.trainer`, `embshard.cluster` and `embshard.datasets`; imports point one way:
cluster -> trainer -> sharding -> planner, with `datasets` and this package at the bottom.
"""

__version__ = "0.1.0"
