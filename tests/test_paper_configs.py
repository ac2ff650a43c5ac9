"""configs/papers/: the papers' settings are plain job configs that their methods accept."""

from __future__ import annotations

from pathlib import Path

from embshard.config import load_job_config

PAPERS = Path(__file__).resolve().parents[1] / "configs" / "papers"


def test_autodim_criteo_is_a_search_config():
    from embshard.trainer.autodim import AutodimSearch

    cfg = load_job_config(PAPERS / "autodim-criteo.yaml")
    AutodimSearch().check_config(cfg)
    assert cfg.autodim.candidates == [2, 8, 16, 24, 32] and cfg.autodim.history_every > 0


def test_pep_criteo_is_a_prune_config():
    from embshard.trainer.pep import PepPrune

    cfg = load_job_config(PAPERS / "pep-criteo.yaml")
    PepPrune().check_config(cfg)
    assert cfg.embeddings.dim == 24 and sorted(cfg.pep.targets, reverse=True) == cfg.pep.targets
