"""A real Prometheus scrapes a real training job found through the file-SD file it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from prometheus_server import PrometheusServer, require_prometheus

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
JOB = "embshard-prom-test"


def _embshard(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
           "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "embshard.cluster.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_prometheus_scrapes_every_worker_of_a_training_job(tmp_path):
    require_prometheus()
    data, run, sd = tmp_path / "data", tmp_path / "run", tmp_path / "sd" / f"{JOB}.json"
    assert _embshard("data", "synth", "--out", str(data), "--rows", "80000",
                     "--max-cardinality", "5000").returncode == 0
    config = {
        "global": {"scrape_interval": "200ms", "evaluation_interval": "1s"},
        "scrape_configs": [{
            "job_name": "embshard",
            "honor_labels": True,  # keep the workers' own `job` label
            "file_sd_configs": [{"files": [str(tmp_path / "sd" / "*.json")], "refresh_interval": "1s"}],
        }],
    }
    with PrometheusServer(config) as prom:
        train = _embshard(
            "train", "configs/default.yaml", "--workers", "2",
            "--set", f"name={JOB}", "--set", f"data.path={data}", "--set", f"output_dir={run}",
            "--set", "data.batch_size=128", "--set", "train.epochs=3",
            "--set", "metrics.enabled=true", "--set", "metrics.port_base=0",
            "--set", f"metrics.file_sd={sd}", "--set", "metrics.linger_seconds=4",
        )
        assert train.returncode == 0, train.stderr[-3000:]
        summary = json.loads((run / "summary.json").read_text())
        # Prometheus found both workers through the file (by_rank below), which the finished run
        # took back: listed, its closed ports read as down for good.
        assert not sd.exists()

        # Samples: the last scraped counter of each rank adds up to the trainer's own count.
        total = prom.query(f'sum(max_over_time(embshard_train_samples_total{{job="{JOB}"}}[10m]))')
        assert float(total["result"][0]["value"][1]) == summary["samples"]
        rate = prom.query(f'max(max_over_time(rate(embshard_train_samples_total{{job="{JOB}"}}[2s])[10m:200ms]))')
        assert float(rate["result"][0]["value"][1]) > 0

        # Embedding bytes per rank equal the planner's figures for that rank.
        scraped = prom.query(
            f'sum by (rank) (max_over_time(embshard_embedding_bytes{{job="{JOB}",phase="train"}}[10m]))')
        by_rank = {int(r["metric"]["rank"]): float(r["value"][1]) for r in scraped["result"]}
        planned: dict[int, int] = defaultdict(int)
        for shard in json.loads((run / "plan" / "plan.json").read_text())["memory"]["shards"]:
            planned[shard["rank"]] += shard["weight_bytes"] + shard["optimizer_bytes"]
        assert by_rank == {r: float(b) for r, b in planned.items()}
