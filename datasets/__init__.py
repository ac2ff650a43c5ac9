"""Datasets: the on-disk Parquet layout (`dataset.json`), synthetic data, converters for real
Criteo / Avazu / MovieLens files, id-frequency profiles and the streaming reader."""
