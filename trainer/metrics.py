"""Prometheus metrics of one training worker.

Every worker owns a private `CollectorRegistry` (never prometheus-client's global one, so
several workers in one process - tests, a local Ray cluster - do not collide) and serves it
over HTTP on `port_base + local_rank`. The names, units and labels below are an interface:
`deploy/alerts.yml` and the Grafana dashboard query exactly these (tests/test_deploy.py checks
every name they use against this module):

    embshard_train_samples_total                    counter    job, rank
    embshard_train_step_seconds                     histogram  job, rank
    embshard_train_loss                             gauge      job, rank
    embshard_eval_auc / embshard_eval_logloss       gauge      job, rank (a CTR arch's evaluation)
    embshard_eval_metric                            gauge      job, rank, metric (every metric of the arch's evaluation)
    embshard_embedding_bytes                        gauge      job, rank, table, phase=train|serve
    embshard_device_memory_bytes                    gauge      job, rank, kind=allocated|reserved
    embshard_device_memory_capacity_bytes           gauge      job, rank
    process_resident_memory_bytes (+ process_*)     gauge      job, rank
    embshard_checkpoint_seconds                     histogram  job, rank
    embshard_mlet_collapse_seconds                  histogram  job, rank
    embshard_pep_nonzero_params                     gauge      job, rank, table
    embshard_worker_restarts_total                  counter    job, rank
    embshard_data_wait_seconds_total                counter    job, rank
    embshard_activity                               gauge      job, rank, activity=checkpoint|eval
    embshard_world_size                             gauge      job, rank (ranks in the run)

Conventions the dashboard relies on:
- `observe_step(seconds, ...)` gets the time of one step *excluding* the wait for its input
  batch; that wait goes to `add_data_wait`. So `rate(data_wait) / (rate(data_wait) +
  rate(step_seconds_sum))` is the share of wall time the loop was starved of input.
- The metrics carry their own `job` label (the embshard job name). Prometheus' scrape job
  would overwrite it, so the scrape config sets `honor_labels: true` (deploy/prometheus.yml,
  the chart's PodMonitor). The process collector's `process_*` series carry job/rank too.

Hot path: `observe_step` and `add_data_wait` touch pre-bound children only (no label lookups,
no string formatting); labelled children keyed by table are bound once, on first use.
"""

from __future__ import annotations

import errno
import json
import math
import os
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Iterable, Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server as _start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from embshard.errors import EnvironmentProblem

__all__ = [
    "WorkerMetrics",
    "STEP_BUCKETS",
    "CHECKPOINT_BUCKETS",
    "COLLAPSE_BUCKETS",
    "read_file_sd_targets",
    "write_file_sd",
    "exported_names",
    "doing",
]

# 1 ms .. 10 s, roughly 1-2.5-5 per decade: step times of a DLRM step on CPU or GPU.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Checkpoints: 100 ms (small local) .. 30 min (large sharded model to object store).
CHECKPOINT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
# MLET collapse W = W1 @ W2, shard-locally: 1 ms .. 2 min.
COLLAPSE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 120.0)

PHASES = ("train", "serve")
_BASE_LABELS = ("job", "rank")
# What a rank does between steps that the step loop does not count (embshard_activity).
ACTIVITIES = ("checkpoint", "eval")


class _ConstLabelCollector(Collector):
    """Wraps a collector and adds constant labels (job, rank) to every sample it yields."""

    def __init__(self, inner: Collector, labels: Mapping[str, str]) -> None:
        self._inner = inner
        self._labels = dict(labels)

    def collect(self) -> Iterable[Metric]:
        for family in self._inner.collect():
            out = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                out.add_sample(s.name, {**s.labels, **self._labels}, s.value, s.timestamp, s.exemplar)
            yield out


class WorkerMetrics:
    """All metrics of one worker, on a private registry.

    >>> m = WorkerMetrics("ctr-dlrm", rank=0, world_size=8)
    >>> m.observe_step(0.012, 2048, loss=0.45)
    >>> port = m.start_server(0, 0)          # ephemeral port on 127.0.0.1
    """

    def __init__(self, job: str, rank: int, world_size: int, registry: CollectorRegistry | None = None) -> None:
        if not job or not isinstance(job, str):
            raise ValueError(f"job: expected a non-empty string, got {job!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank: expected an integer >= 0, got {rank!r}")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size <= rank:
            raise ValueError(f"world_size: expected an integer above rank {rank}, got {world_size!r}")
        self.job = job
        self.rank = rank
        self.registry = registry if registry is not None else CollectorRegistry()
        self._server: WSGIServer | None = None
        self._server_thread: threading.Thread | None = None
        self.port: int | None = None
        self.bound = "127.0.0.1"  # the address the server binds
        self.listed: list[str] = []  # every rank's target, as the run's file-SD list names them
        r = self.registry
        base = _BASE_LABELS
        lv = (job, str(rank))

        self.train_samples = Counter(
            "embshard_train_samples", "Training samples processed.", base, registry=r
        )
        self.train_step_seconds = Histogram(
            "embshard_train_step_seconds",
            "Time of one training step (forward, backward, optimizer), excluding the input wait.",
            base, buckets=STEP_BUCKETS, registry=r,
        )
        self.train_loss = Gauge("embshard_train_loss", "Training loss of the last step.", base, registry=r)
        self.eval_auc = Gauge("embshard_eval_auc", "ROC AUC of the last evaluation.", base, registry=r)
        self.eval_logloss = Gauge(
            "embshard_eval_logloss", "Log loss of the last evaluation.", base, registry=r
        )
        self.eval_metric = Gauge(
            "embshard_eval_metric", "Each metric of the last evaluation (auc, recall@10, ...).",
            base + ("metric",), registry=r,
        )
        self.embedding_bytes = Gauge(
            "embshard_embedding_bytes",
            "Bytes of embedding parameters held by this rank; phase=train (incl. MLET factors and "
            "optimizer state) or serve (collapsed).",
            base + ("table", "phase"), registry=r,
        )
        self.device_memory_bytes = Gauge(
            "embshard_device_memory_bytes",
            "Accelerator memory of this rank's device (kind=allocated|reserved by the allocator).",
            base + ("kind",), registry=r,
        )
        self.device_memory_capacity_bytes = Gauge(
            "embshard_device_memory_capacity_bytes",
            "Total memory of this rank's accelerator.", base, registry=r,
        )
        self.checkpoint_seconds = Histogram(
            "embshard_checkpoint_seconds", "Time to write one checkpoint (incl. MLET collapse).",
            base, buckets=CHECKPOINT_BUCKETS, registry=r,
        )
        self.mlet_collapse_seconds = Histogram(
            "embshard_mlet_collapse_seconds", "Time to collapse the MLET factors W1*W2 of this rank.",
            base, buckets=COLLAPSE_BUCKETS, registry=r,
        )
        self.pep_nonzero_params = Gauge(
            "embshard_pep_nonzero_params", "Non-zero (surviving) PEP embedding parameters.",
            base + ("table",), registry=r,
        )
        self.worker_restarts = Counter(
            "embshard_worker_restarts", "Times this worker was restarted (resumed after a failure).",
            base, registry=r,
        )
        self.activity = Gauge(
            "embshard_activity",
            "1 while this rank checkpoints (activity=checkpoint) or evaluates (activity=eval): work "
            "between training steps, during which no samples count.",
            base + ("activity",), registry=r,
        )
        for name in ACTIVITIES:
            self.activity.labels(*lv, name).set(0)
        # How many ranks should report: the alert on ranks that stop reporting compares with it,
        # not with how many reported before (a rerun of the job on fewer workers is no loss).
        Gauge("embshard_world_size", "Ranks in this run.", base, registry=r).labels(*lv).set(world_size)
        self.data_wait_seconds = Counter(
            "embshard_data_wait_seconds", "Time the step loop waited for input batches.",
            base, registry=r,
        )
        # Process metrics (process_resident_memory_bytes, ...), labelled with job and rank.
        proc = ProcessCollector(registry=None)
        r.register(_ConstLabelCollector(proc, {"job": job, "rank": str(rank)}))

        # Pre-bound children: the hot path never resolves labels.
        self._samples = self.train_samples.labels(*lv)
        self._step = self.train_step_seconds.labels(*lv)
        self._ckpt = self.checkpoint_seconds.labels(*lv)
        self._collapse = self.mlet_collapse_seconds.labels(*lv)
        self._restarts = self.worker_restarts.labels(*lv)
        self._wait = self.data_wait_seconds.labels(*lv)
        self._lv = lv
        # Bound on first use (tables are known only once the model is built; no CUDA on CPU).
        self._emb: dict[tuple[str, str], object] = {}
        self._pep: dict[str, object] = {}
        self._devmem: tuple[object, object, object] | None = None
        # Loss and eval gauges appear only once set: a 0.0 AUC before the first eval would lie.
        self._loss: Gauge | None = None

    # ----------------------------------------------------------------- training loop calls

    def observe_step(self, seconds: float, samples: int, loss: float | None = None) -> None:
        """One training step: its time (without the input wait), its samples, its loss."""
        self._samples.inc(samples)
        self._step.observe(seconds)
        if loss is not None:
            child = self._loss
            if child is None:
                child = self._loss = self.train_loss.labels(*self._lv)
            child.set(loss)

    def add_data_wait(self, seconds: float) -> None:
        """Time the step loop spent waiting for its next input batch."""
        self._wait.inc(seconds)

    def set_eval(self, metrics: Mapping[str, float]) -> None:
        """Result of the last evaluation pass: every metric by name; AUC and logloss (what the
        dashboard and alerts read) also under their own names."""
        for name, value in metrics.items():
            self.eval_metric.labels(*self._lv, name).set(value)
        if "auc" in metrics:
            self.eval_auc.labels(*self._lv).set(metrics["auc"])
        if "logloss" in metrics:
            self.eval_logloss.labels(*self._lv).set(metrics["logloss"])

    def set_embedding_bytes(self, table: str, phase: str, nbytes: int | float) -> None:
        """Bytes of table `table` on this rank, for phase "train" or "serve"."""
        child = self._emb.get((table, phase))
        if child is None:
            if phase not in PHASES:
                raise ValueError(f"phase: expected one of {PHASES}, got {phase!r}")
            child = self._emb[(table, phase)] = self.embedding_bytes.labels(*self._lv, table, phase)
        child.set(nbytes)  # type: ignore[attr-defined]

    @contextmanager
    def doing(self, activity: str) -> Iterator[None]:
        """`embshard_activity{activity}` is 1 for the block (the stall alert leaves such time be)."""
        gauge = self.activity.labels(*self._lv, activity)
        gauge.set(1)
        try:
            yield
        finally:
            gauge.set(0)

    def observe_checkpoint(self, seconds: float) -> None:
        self._ckpt.observe(seconds)

    def observe_collapse(self, seconds: float) -> None:
        self._collapse.observe(seconds)

    def set_pep_nonzero(self, table: str, n: int) -> None:
        child = self._pep.get(table)
        if child is None:
            child = self._pep[table] = self.pep_nonzero_params.labels(*self._lv, table)
        child.set(n)  # type: ignore[attr-defined]

    def inc_restarts(self, n: int = 1) -> None:
        """Count a restart of this worker (call once after resuming from a failure)."""
        self._restarts.inc(n)

    def set_device_memory(self, allocated: int, reserved: int, capacity: int | None = None) -> None:
        """Explicit device-memory figures (bytes); `update_device_memory` reads them from CUDA."""
        if self._devmem is None:
            self._devmem = (
                self.device_memory_bytes.labels(*self._lv, "allocated"),
                self.device_memory_bytes.labels(*self._lv, "reserved"),
                self.device_memory_capacity_bytes.labels(*self._lv),
            )
        a, r, c = self._devmem
        a.set(allocated)  # type: ignore[attr-defined]
        r.set(reserved)  # type: ignore[attr-defined]
        if capacity is not None:
            c.set(capacity)  # type: ignore[attr-defined]

    def update_device_memory(self, device: object | None = None) -> bool:
        """Read allocated/reserved/total memory of the current (or given) CUDA device.

        Returns False, and exports nothing, when CUDA is not in use (CPU training; the process
        RSS is exported regardless). torch is not imported by this module: if the trainer has
        not imported it, there is no device memory to report. Call it every N steps, not every
        step: it is cheap, but not free.
        """
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return False
        if device is None:
            device = torch.cuda.current_device()
        capacity = None
        if self._devmem is None:
            capacity = int(torch.cuda.get_device_properties(device).total_memory)
        self.set_device_memory(
            int(torch.cuda.memory_allocated(device)), int(torch.cuda.memory_reserved(device)), capacity
        )
        return True

    # ----------------------------------------------------------------- serving

    def start_server(self, port_base: int, local_rank: int, addr: str = "127.0.0.1") -> int:
        """Serve this registry on http://addr:(port_base + local_rank)/metrics; returns the port.

        port_base 0 binds an ephemeral port. Raises EnvironmentProblem naming the port if it is taken.
        """
        if self._server is not None:
            raise RuntimeError(f"metrics server of rank {self.rank} already runs on port {self.port}")
        if port_base < 0 or local_rank < 0:
            raise ValueError(f"port_base and local_rank must be >= 0, got {port_base}, {local_rank}")
        port = 0 if port_base == 0 else port_base + local_rank
        if port > 65535:
            raise ValueError(f"metrics port {port_base} + {local_rank} is above 65535")
        try:
            server, thread = _start_http_server(port, addr=addr, registry=self.registry)
        except OSError as e:
            # The machine's, not the code's: one line naming the knob it is about.
            knob = "metrics.port_base" if e.errno == errno.EADDRINUSE else "metrics.bind"
            raise EnvironmentProblem(f"{knob}: cannot serve metrics of rank {self.rank} on {addr}:{port}: "
                                     f"{e.strerror or e}") from None
        self._server, self._server_thread = server, thread
        self.port = int(server.server_address[1])
        self.bound = addr
        return self.port

    def stop_server(self) -> None:
        """Stop the HTTP server (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._server_thread is not None:
            self._server_thread.join(timeout=5)
            self._server_thread = None

    def target(self) -> str:
        """`host:port` where Prometheus reaches the running server, for `write_file_sd`: the address
        it is bound to, or for a wildcard bind (every interface) this node's address. Always
        127.0.0.1 was a target where nothing listened, under any other bind."""
        if self.port is None:
            raise RuntimeError("metrics server not started")
        host = _node_address() if self.bound in ("0.0.0.0", "::", "") else self.bound
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def metric_names(self) -> set[str]:
        """Every sample name this registry can export (see `exported_names`)."""
        return exported_names(self.registry)

    def __enter__(self) -> "WorkerMetrics":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_server()


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
}


def doing(metrics: WorkerMetrics | None, activity: str) -> AbstractContextManager[None]:
    """`metrics.doing(activity)`, or nothing where a run serves no metrics."""
    return metrics.doing(activity) if metrics is not None else nullcontext()


def exported_names(registry: CollectorRegistry) -> set[str]:
    """Sample names a registry exports, whether or not a labelled child has a value yet."""
    names: set[str] = set()
    for family in registry.collect():
        for suffix in _SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
        names.update(s.name for s in family.samples)
    return names


def _node_address() -> str:
    """This node's address as the cluster knows it (Ray's, inside a Ray worker)."""
    import ray

    if ray.is_initialized():
        return str(ray.util.get_node_ip_address())
    return socket.gethostbyname(socket.gethostname())


_LABEL_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def read_file_sd_targets(path: str | os.PathLike[str]) -> list[str] | None:
    """The targets of a file-SD list as `write_file_sd` writes it (one group: targets and
    labels); None for a file of any other content: not embshard's to replace or remove."""
    import yaml

    try:
        groups = yaml.safe_load(Path(path).read_text())  # YAML reads the JSON form too
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if (isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict)
            and set(groups[0]) == {"targets", "labels"} and isinstance(groups[0]["targets"], list)):
        return [str(t) for t in groups[0]["targets"]]
    return None


def write_file_sd(path: str | os.PathLike[str], targets: list[str], labels: Mapping[str, object]) -> Path:
    """Write a Prometheus file-based service discovery file listing `targets` (host:port).

    The file is written atomically (temp file in the same folder, then rename), so a
    Prometheus watching it never reads half a file. A `.json` path gets JSON, `.yml`/`.yaml`
    YAML, both in the `[{"targets": [...], "labels": {...}}]` shape.
    """
    path = Path(path)
    for t in targets:
        host, sep, port = str(t).rpartition(":")
        if not sep or not host or not port.isdecimal() or not 0 < int(port) < 65536:
            raise ValueError(f"file_sd target {t!r}: expected host:port")
    clean: dict[str, str] = {}
    for k, v in labels.items():
        if not k or k[0].isdigit() or not set(k) <= _LABEL_OK or k.startswith("__"):
            raise ValueError(f"file_sd label {k!r}: not a valid Prometheus label name")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"file_sd label {k!r}: value {v!r} is not finite")
        clean[k] = str(v)
    groups = [{"targets": [str(t) for t in targets], "labels": clean}]
    if path.suffix == ".json":
        text = json.dumps(groups, indent=2) + "\n"
    elif path.suffix in (".yml", ".yaml"):
        import yaml

        text = yaml.safe_dump(groups, sort_keys=False)
    else:
        raise ValueError(f"file_sd {path}: must end in .json, .yml or .yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
