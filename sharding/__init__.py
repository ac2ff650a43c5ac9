"""Torch modules over TorchRec collections that realise a DimensionPlan: mixed-dimension blocks
with projections, MLET factorised tables and their collapse. No Ray here."""
