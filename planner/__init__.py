"""Decide: data profile + policy (+ decision files) + topology -> DimensionPlan -> TorchRec
ShardingPlan + memory report. Pure functions around TorchRec's own planner; no training."""
