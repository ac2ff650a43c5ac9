"""trainer/metrics.py: exact values over a real HTTP scrape, promtool lint, file SD, config."""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_server import promtool

from embshard.config import MetricsConfig
from embshard.errors import ConfigError, EnvironmentProblem
from embshard.trainer.metrics import (
    STEP_BUCKETS,
    WorkerMetrics,
    write_file_sd,
)
from embshard.typed_config import from_dict


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        return r.read().decode()


def samples_by_name(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def one(samples: dict[str, list], name: str, **labels: str) -> float:
    hits = [s for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) == 1, f"{name}{labels}: {len(hits)} samples ({samples.get(name)})"
    return hits[0].value


@pytest.fixture
def worker():
    m = WorkerMetrics("ctr-test", rank=3, world_size=4)
    yield m
    m.stop_server()


def record(m: WorkerMetrics) -> None:
    for seconds in (0.002, 0.004, 0.04, 0.3, 3.0):  # buckets: <=0.0025, <=0.005, <=0.05, <=0.5, <=5
        m.observe_step(seconds, 512, loss=0.5)
    m.observe_step(0.004, 256, loss=0.4375)
    m.add_data_wait(0.25)
    m.add_data_wait(0.5)
    m.set_eval({"auc": 0.8125, "logloss": 0.4375, "recall@10": 0.25})
    m.set_embedding_bytes("t_user", "train", 4_000_000)
    m.set_embedding_bytes("t_user", "serve", 1_000_000)
    m.set_embedding_bytes("t_item", "train", 2_000_000)
    m.set_embedding_bytes("t_user", "train", 8_000_000)  # overwrite
    m.observe_checkpoint(1.5)
    m.observe_collapse(0.02)
    m.observe_collapse(0.2)
    m.set_pep_nonzero("t_user", 123_456)
    m.inc_restarts()
    m.set_device_memory(allocated=3 << 30, reserved=4 << 30, capacity=80 << 30)


def test_scrape_exact_values(worker: WorkerMetrics) -> None:
    record(worker)
    port = worker.start_server(0, 0)  # ephemeral
    assert port > 0 and worker.port == port
    text = scrape(port)
    s = samples_by_name(text)
    job = {"job": "ctr-test", "rank": "3"}

    assert one(s, "embshard_train_samples_total", **job) == 5 * 512 + 256
    assert one(s, "embshard_train_step_seconds_count", **job) == 6
    assert one(s, "embshard_train_step_seconds_sum", **job) == pytest.approx(3.35)
    buckets = {b.labels["le"]: b.value for b in s["embshard_train_step_seconds_bucket"]}
    assert len(buckets) == len(STEP_BUCKETS) + 1
    assert buckets["0.001"] == 0
    assert buckets["0.0025"] == 1
    assert buckets["0.005"] == 3
    assert buckets["0.05"] == 4
    assert buckets["0.5"] == 5
    assert buckets["5.0"] == 6 and buckets["10.0"] == 6 and buckets["+Inf"] == 6
    assert one(s, "embshard_train_loss", **job) == 0.4375
    assert one(s, "embshard_world_size", **job) == 4
    assert one(s, "embshard_data_wait_seconds_total", **job) == 0.75
    assert one(s, "embshard_eval_auc", **job) == 0.8125
    assert one(s, "embshard_eval_logloss", **job) == 0.4375
    assert one(s, "embshard_eval_metric", metric="recall@10", **job) == 0.25
    assert one(s, "embshard_eval_metric", metric="auc", **job) == 0.8125
    assert one(s, "embshard_embedding_bytes", table="t_user", phase="train", **job) == 8_000_000
    assert one(s, "embshard_embedding_bytes", table="t_user", phase="serve", **job) == 1_000_000
    assert one(s, "embshard_embedding_bytes", table="t_item", phase="train", **job) == 2_000_000
    assert len(s["embshard_embedding_bytes"]) == 3
    assert one(s, "embshard_checkpoint_seconds_count", **job) == 1
    assert one(s, "embshard_checkpoint_seconds_sum", **job) == 1.5
    assert one(s, "embshard_mlet_collapse_seconds_count", **job) == 2
    assert one(s, "embshard_pep_nonzero_params", table="t_user", **job) == 123_456
    assert one(s, "embshard_worker_restarts_total", **job) == 1
    assert one(s, "embshard_device_memory_bytes", kind="allocated", **job) == 3 << 30
    assert one(s, "embshard_device_memory_bytes", kind="reserved", **job) == 4 << 30
    assert one(s, "embshard_device_memory_capacity_bytes", **job) == 80 << 30
    # Process collector, labelled with job/rank like everything else (Linux: from /proc).
    rss = one(s, "process_resident_memory_bytes", **job)
    assert rss > 1 << 20
    # Every embshard sample carries job and rank.
    for name, items in s.items():
        for smp in items:
            assert smp.labels.get("job") == "ctr-test" and smp.labels.get("rank") == "3", (name, smp)


def test_fresh_worker_exports_no_fake_values(worker: WorkerMetrics) -> None:
    """Before any eval/step/device reading, the gauges are absent rather than 0."""
    port = worker.start_server(0, 0)
    s = samples_by_name(scrape(port))
    for name in ("embshard_eval_auc", "embshard_eval_logloss", "embshard_eval_metric", "embshard_train_loss",
                 "embshard_device_memory_bytes", "embshard_embedding_bytes"):
        assert name not in s
    assert one(s, "embshard_train_samples_total", job="ctr-test", rank="3") == 0
    assert worker.update_device_memory() in (False, True)  # no CUDA here: False, nothing set


def test_promtool_check_metrics(worker: WorkerMetrics) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (bash deploy/install-prometheus.sh)")
    record(worker)
    text = scrape(worker.start_server(0, 0))
    res = promtool("check", "metrics", input=text)
    assert res.returncode == 0, res.stdout + res.stderr


def test_private_registries_and_ports() -> None:
    a, b = WorkerMetrics("j", 0, 1), WorkerMetrics("j", 1, 2)
    try:
        a.observe_step(0.01, 7)
        pa, pb = a.start_server(0, 0), b.start_server(0, 1)
        assert pa != pb
        assert one(samples_by_name(scrape(pb)), "embshard_train_samples_total", rank="1") == 0
        assert one(samples_by_name(scrape(pa)), "embshard_train_samples_total", rank="0") == 7
        # port_base + local_rank; a taken port is one line naming the knob (a crash, exit 1, before)
        c = WorkerMetrics("j", 2, 3)
        with pytest.raises(EnvironmentProblem, match=r"^metrics\.port_base: cannot serve metrics of rank 2 on "):
            c.start_server(pa - 1, 1)  # = pa, taken by a
        with pytest.raises(RuntimeError, match="already"):
            a.start_server(0, 0)
    finally:
        a.stop_server()
        b.stop_server()


def test_port_base_plus_local_rank() -> None:
    from prometheus_server import free_port

    base = free_port() - 1
    m = WorkerMetrics("j", 5, 6)
    try:
        try:
            port = m.start_server(base, 1)
        except OSError:
            pytest.skip("raced for the free port")
        assert port == base + 1
        assert "embshard_train_samples_total" in scrape(port)
    finally:
        m.stop_server()


def test_bad_inputs() -> None:
    m = WorkerMetrics("j", 0, 1)
    with pytest.raises(ValueError, match="phase"):
        m.set_embedding_bytes("t", "inference", 1)
    with pytest.raises(ValueError):
        WorkerMetrics("", 0, 1)
    with pytest.raises(ValueError):
        WorkerMetrics("j", -1, 1)


def test_metric_names_cover_design() -> None:
    names = WorkerMetrics("j", 0, 1).metric_names()
    for n in (
        "embshard_train_samples_total", "embshard_train_step_seconds_bucket", "embshard_train_loss",
        "embshard_eval_auc", "embshard_eval_logloss", "embshard_embedding_bytes",
        "embshard_device_memory_bytes", "embshard_device_memory_capacity_bytes",
        "process_resident_memory_bytes", "embshard_checkpoint_seconds_sum",
        "embshard_mlet_collapse_seconds_bucket", "embshard_pep_nonzero_params",
        "embshard_worker_restarts_total", "embshard_data_wait_seconds_total",
    ):
        assert n in names, n


def test_file_sd(tmp_path) -> None:
    path = tmp_path / "sd" / "ctr-test.json"
    write_file_sd(path, ["127.0.0.1:9400", "127.0.0.1:9401"], {"embshard_job": "ctr-test", "node": 0})
    data = json.loads(path.read_text())
    assert isinstance(data, list) and len(data) == 1
    group = data[0]
    assert set(group) == {"targets", "labels"}
    assert group["targets"] == ["127.0.0.1:9400", "127.0.0.1:9401"]
    assert group["labels"] == {"embshard_job": "ctr-test", "node": "0"}  # values are strings
    # Rewrite is atomic and leaves no temp files behind.
    write_file_sd(path, ["127.0.0.1:9500"], {})
    assert json.loads(path.read_text())[0]["targets"] == ["127.0.0.1:9500"]
    assert [p.name for p in path.parent.iterdir()] == ["ctr-test.json"]
    with pytest.raises(ValueError, match="host:port"):
        write_file_sd(path, ["nohost"], {})
    with pytest.raises(ValueError, match="host:port"):  # isdigit() let it through to int(): another ValueError
        write_file_sd(path, ["127.0.0.1:\u00b2"], {})
    with pytest.raises(ValueError, match="label"):
        write_file_sd(path, ["127.0.0.1:1"], {"bad-name": "x"})
    yml = write_file_sd(tmp_path / "sd.yml", ["127.0.0.1:9400"], {"a": "b"})
    import yaml

    assert yaml.safe_load(yml.read_text()) == [{"targets": ["127.0.0.1:9400"], "labels": {"a": "b"}}]


def test_file_sd_read_by_promtool(tmp_path) -> None:
    """promtool check config also loads file-SD files: a config pointing at ours must pass."""
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (bash deploy/install-prometheus.sh)")
    write_file_sd(tmp_path / "sd" / "w.json", ["127.0.0.1:9400"], {"env": "test"})
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "scrape_configs:\n"
        "  - job_name: embshard\n"
        "    honor_labels: true\n"
        "    file_sd_configs:\n"
        "      - files: ['sd/*.json']\n"
    )
    res = promtool("check", "config", str(cfg))
    assert res.returncode == 0, res.stdout + res.stderr


def test_metrics_config() -> None:
    c = from_dict(MetricsConfig, {})
    assert (c.enabled, c.port_base, c.bind, c.file_sd) == (False, 9400, "127.0.0.1", None)
    c = from_dict(MetricsConfig, {"port_base": 0, "bind": "0.0.0.0", "file_sd": "outputs/file_sd/j.json"})
    assert c.port_base == 0 and c.file_sd == "outputs/file_sd/j.json"
    for bad, field in (
        ({"port_base": 80}, "port_base"),
        ({"port_base": 70000}, "port_base"),
        ({"port_base": -1}, "port_base"),
        ({"port_base": "x"}, "port_base"),
        ({"bind": ""}, "bind"),
        ({"file_sd": "targets.txt"}, "file_sd"),
        ({"enabled": "yes"}, "enabled"),
    ):
        with pytest.raises(ConfigError, match=f"^{field}:"):
            from_dict(MetricsConfig, bad)
    with pytest.raises(ConfigError, match=r"^metrics\.port_base:"):
        from_dict(MetricsConfig, {"port_base": 1}, where="metrics")


def test_training_reads_device_memory_at_every_logging_step() -> None:
    # The device-memory gauges (two alerts and two dashboard panels read them) were set by tests
    # alone: no training step ever called the CUDA read.
    from embshard.trainer.callbacks import PrometheusCallback, StepInfo

    class CountedReads(WorkerMetrics):
        reads = 0

        def update_device_memory(self, device: object | None = None) -> bool:
            self.reads += 1
            return super().update_device_memory(device)

    metrics = CountedReads(job="j", rank=0, world_size=1)
    callback = PrometheusCallback(metrics)
    for step in range(1, 7):
        callback.on_step(StepInfo(step=step, epoch=0, samples=8, seconds=0.1, data_wait=0.0,
                                  loss=0.5 if step % 3 == 0 else None))
    assert metrics.reads == 2


def test_activity_is_one_while_a_rank_checkpoints_or_evaluates() -> None:
    # The stall alert fired on healthy runs whose checkpoint took over its 15 minutes.
    metrics = WorkerMetrics(job="j", rank=0, world_size=1)
    port = metrics.start_server(0, 0)
    try:
        def activity() -> dict[str, float]:
            found = samples_by_name(scrape(port))["embshard_activity"]
            return {s.labels["activity"]: s.value for s in found}

        assert activity() == {"checkpoint": 0.0, "eval": 0.0}
        with metrics.doing("checkpoint"):
            assert activity() == {"checkpoint": 1.0, "eval": 0.0}
        with pytest.raises(RuntimeError), metrics.doing("eval"):
            raise RuntimeError("an evaluation that fails")
        assert activity() == {"checkpoint": 0.0, "eval": 0.0}
    finally:
        metrics.stop_server()


def test_a_sweep_trial_lists_its_workers_where_prometheus_reads(tmp_path):
    # Each trial's list went to its own run folder, which deploy/prometheus.yml never reads: no
    # sweep trial was ever scraped.
    from embshard.cluster.sweep_methods import TrialRuns
    from embshard.cluster.sweep_plan import Trial
    from embshard.config import JobConfig
    from embshard.datasets.schema import DatasetSpec

    listed = tmp_path / "file_sd" / "sweep.json"
    base = JobConfig(metrics=MetricsConfig(file_sd=str(listed)))
    runs = TrialRuns(base, DatasetSpec("d", [], []), Trial("uniform", seed=0, budget=0.5), [0.5], tmp_path / "trial")
    cfg = runs.run("train")
    assert cfg.name == "sweep-uniform-b0.5-s0-train"
    assert re.fullmatch(r"sweep-uniform-b0\.5-s0-train-[0-9a-f]{8}\.json", Path(cfg.metrics.file_sd).name)
    assert Path(cfg.metrics.file_sd).parent == listed.parent
    # Another sweep of the same config lists the same jobs: in a file of its own.
    other = TrialRuns(base, DatasetSpec("d", [], []), Trial("uniform", seed=0, budget=0.5), [0.5], tmp_path / "other")
    assert other.run("train").metrics.file_sd != cfg.metrics.file_sd
    unlisted = TrialRuns(JobConfig(), DatasetSpec("d", [], []), Trial("uniform", seed=0), [1.0], tmp_path / "trial")
    assert unlisted.run("train").metrics.file_sd is None
