"""deploy/: Prometheus config and alert rules pass promtool, every PromQL expression of the
rules and the Grafana dashboard parses on a real Prometheus server (127.0.0.1), and every
embshard_* metric they name is one trainer/metrics.py exports. The Dockerfile is linted."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from prometheus_server import (
    PrometheusServer,
    PromQLError,
    promtool,
    require_prometheus,
)

from embshard.trainer.metrics import WorkerMetrics

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "embshard.json"
ALERTS = DEPLOY / "alerts.yml"

# Grafana's variables, replaced by something PromQL accepts in the same position.
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "${datasource}": "prometheus",
}


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, expr) for every panel target, nested row panels included."""
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((f"panel {p.get('title')!r} {t.get('refId')}", t["expr"]))
            walk(p.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return out


def template_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for v in dash["templating"]["list"]:
        if v.get("type") == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            out.append((f"variable {v['name']}", q))
    return out


def alert_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [(f"rule {r.get('alert') or r.get('record')}", r["expr"])
            for g in rules["groups"] for r in g["rules"]]


def to_promql(expr: str) -> str:
    for var, repl in GRAFANA_VARS.items():
        expr = expr.replace(var, repl)
    # remaining $var / ${var} are label-matcher values (job=~"$job"): any regex will do
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", expr)


def metric_names_in(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:embshard|process)_[a-zA-Z0-9_]+)", expr))


# ----------------------------------------------------------------------------- names


def test_dashboard_and_alerts_use_only_exported_metrics() -> None:
    exported = WorkerMetrics("names", 0, 1).metric_names()
    used: dict[str, str] = {}
    for where, expr in dashboard_exprs() + template_queries() + alert_exprs():
        for name in metric_names_in(expr):
            used.setdefault(name, where)
    assert used, "no metric names found"
    unknown = {n: w for n, w in used.items() if n not in exported}
    assert not unknown, f"names not exported by trainer/metrics.py: {unknown}"
    # The dashboard covers the figures it promises.
    dash_names = {n for _, e in dashboard_exprs() for n in metric_names_in(e)}
    for must in ("embshard_train_samples_total", "embshard_train_step_seconds_bucket",
                 "embshard_data_wait_seconds_total", "embshard_train_loss", "embshard_eval_auc",
                 "embshard_embedding_bytes", "embshard_device_memory_bytes",
                 "embshard_device_memory_capacity_bytes", "embshard_worker_restarts_total",
                 "embshard_checkpoint_seconds_sum"):
        assert must in dash_names, must


def test_dashboard_json_shape() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
    assert any(v["name"] == "datasource" and v["type"] == "datasource" for v in dash["templating"]["list"])


# ----------------------------------------------------------------------------- promtool


def test_promtool_check_rules() -> None:
    require_prometheus("promtool")
    res = promtool("check", "rules", str(ALERTS))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_promtool_test_rules() -> None:
    """Unit tests of the alerts (stall, restart, memory) with synthetic series."""
    require_prometheus("promtool")
    res = promtool("test", "rules", str(DEPLOY / "alerts_test.yml"))
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_check_config() -> None:
    require_prometheus("promtool")
    res = promtool("check", "config", str(DEPLOY / "prometheus.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    cfg = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "embshard"]
    assert job["honor_labels"] is True and job["file_sd_configs"]


def test_kubernetes_example_config() -> None:
    require_prometheus("promtool")
    path = DEPLOY / "prometheus-kubernetes.yml"
    cfg = yaml.safe_load(path.read_text())
    (job,) = cfg["scrape_configs"]
    assert job["honor_labels"] is True and job["kubernetes_sd_configs"] == [{"role": "pod"}]
    keep = {r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
    assert {"embshard", "gpu-worker", "metrics-[0-9]+"} <= keep
    res = promtool("check", "config", str(path))
    if res.returncode != 0 and "kubernetes_sd_configs not found" in res.stdout + res.stderr:
        pytest.skip("this promtool is built without Kubernetes SD (Debian's package); structure checked")
    assert res.returncode == 0, res.stdout + res.stderr


# ----------------------------------------------------------------------------- real server


def test_every_expression_parses_on_a_real_prometheus() -> None:
    require_prometheus("prometheus")
    exprs = dashboard_exprs() + alert_exprs()
    assert len(exprs) > 20
    with PrometheusServer(DEPLOY / "prometheus.yml", files={"alerts.yml": ALERTS}) as prom:
        # The negative control: a broken expression comes back as bad_data.
        with pytest.raises(PromQLError) as err:
            prom.query("sum by (job (rate(embshard_train_samples_total[5m]))")
        assert err.value.error_type == "bad_data"
        failures = []
        for where, expr in exprs:
            try:
                prom.query(to_promql(expr))
            except PromQLError as e:
                failures.append(f"{where}: {e}")
        # Grafana's label_values(metric, label) is not PromQL; its selector is.
        for where, q in template_queries():
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", q.strip())
            assert m, f"{where}: unexpected variable query {q!r}"
            try:
                prom.query(to_promql(m.group(1)))
            except PromQLError as e:
                failures.append(f"{where}: {e}")
        assert not failures, "\n".join(failures)
        # The server loaded deploy/alerts.yml: all its rules are there.
        groups = prom.api("rules")["groups"]
        loaded = {r["name"] for g in groups for r in g["rules"]}
        assert loaded == {w.split(" ", 1)[1] for w, _ in alert_exprs()}


# ----------------------------------------------------------------------------- Dockerfile


def test_dockerfile_lint() -> None:
    dfp = pytest.importorskip("dockerfile_parse", reason="dockerfile-parse not installed")
    df = dfp.DockerfileParser(path=str(DEPLOY / "Dockerfile"))
    instrs = df.structure
    kinds = [i["instruction"] for i in instrs]
    assert kinds.count("FROM") == 1
    assert "nvidia/cuda" in df.baseimage
    runs = " ".join(i["value"] for i in instrs if i["instruction"] == "RUN")
    assert df.args["TORCH_CUDA"].startswith("cu")
    assert "download.pytorch.org/whl/${TORCH_CUDA}" in runs
    assert "torch==${TORCH_VERSION}" in runs and "fbgemm-gpu==${FBGEMM_VERSION}" in runs
    assert "fbgemm-gpu-cpu" not in runs
    assert re.search(r"--no-deps torchrec==\$\{TORCHREC_VERSION\}", runs)
    assert re.search(r"pip install --no-deps (--no-build-isolation )?-e \.", runs)
    assert "COPY" in kinds
    users = [i["value"].strip() for i in instrs if i["instruction"] == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must end as a non-root user"
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN"), "USER after the last RUN"
    # uid matches the chart's default podSecurityContext
    chart_values = yaml.safe_load((REPO / "helm" / "embshard" / "values.yaml").read_text())
    assert users[-1].split(":")[0] == str(chart_values["podSecurityContext"]["runAsUser"])


# The image installs the CUDA build of what requirements/ pins as a CPU build.
CUDA_BUILD_OF = {"fbgemm-gpu": "fbgemm-gpu-cpu"}
# What `python3 -m venv` needs before anything else; pyproject.toml's build-system names them.
VENV_BOOTSTRAP = {"setuptools", "wheel"}
# Installed into the image: everything the product needs to run (tests and benchmarks are not).
RUNTIME_REQUIREMENTS = ("torch.txt", "nodeps.txt", "base.txt")


def requirement_lines(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def dockerfile_installs(df) -> tuple[list[str], list[str]]:
    """(requirement specs named on `pip install` lines with the ARGs filled in, -r files)."""
    import shlex

    specs, files = [], []
    for instr in df.structure:
        if instr["instruction"] != "RUN":
            continue
        value = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: df.args.get(m[1] or m[2], m[0]), instr["value"])
        for command in value.split("&&"):
            words = shlex.split(command)
            if words[:2] != ["pip", "install"]:
                continue
            rest = iter(words[2:])
            for word in rest:
                if word in ("-r", "--requirement"):
                    files.append(next(rest))
                elif word in ("--index-url", "-i", "--extra-index-url", "-e", "--editable", "-c"):
                    next(rest)
                elif not word.startswith("-"):
                    specs.append(word)
    return specs, files


def test_dockerfile_pins_are_the_ones_in_requirements() -> None:
    """Every package the image installs by name carries exactly the pin requirements/ gives it,
    and every runtime requirement reaches the image (by name or through its -r file)."""
    dfp = pytest.importorskip("dockerfile_parse", reason="dockerfile-parse not installed")
    from packaging.requirements import Requirement

    df = dfp.DockerfileParser(path=str(DEPLOY / "Dockerfile"))
    pinned = {}  # name -> (file, requirement)
    for path in sorted((REPO / "requirements").glob("*.txt")):
        for line in requirement_lines(path):
            req = Requirement(line)
            pinned[req.name] = (path.name, req)
    specs, files = dockerfile_installs(df)
    copied = " ".join(i["value"] for i in df.structure if i["instruction"] == "COPY")
    problems = [f"-r {f}: not copied from requirements/{Path(f).name}"
                for f in files if f"requirements/{Path(f).name}" not in copied]
    by_name = set()
    for spec in specs:
        req = Requirement(spec)
        if req.name in VENV_BOOTSTRAP:
            continue
        name = CUDA_BUILD_OF.get(req.name, req.name)
        by_name.add(name)
        if name not in pinned:
            problems.append(f"{spec}: installed by deploy/Dockerfile but in no requirements/*.txt")
            continue
        where, want = pinned[name]
        if (str(req.specifier), req.extras) != (str(want.specifier), want.extras):
            problems.append(f"{spec}: deploy/Dockerfile says {req}, requirements/{where} says {want}")
    by_file = {Path(f).name for f in files}
    for file in RUNTIME_REQUIREMENTS:
        for line in requirement_lines(REPO / "requirements" / file):
            if file not in by_file and Requirement(line).name not in by_name:
                problems.append(f"{line} (requirements/{file}): not installed by deploy/Dockerfile")
    assert not problems, "deploy/Dockerfile disagrees with requirements/:\n" + "\n".join(problems)


def test_install_script_is_idempotent_when_present() -> None:
    """With promtool installed the script is a quick no-op that exits 0."""
    import subprocess

    if shutil.which("promtool") is None or shutil.which("prometheus") is None:
        pytest.skip("promtool not installed; the script would try apt-get")
    res = subprocess.run(["bash", str(DEPLOY / "install-prometheus.sh")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "already installed" in res.stdout, res.stdout + res.stderr


@pytest.mark.slow  # ~6 s: waits for real scrapes
def test_prometheus_scrapes_a_worker_via_file_sd(tmp_path) -> None:
    """End to end on 127.0.0.1: WorkerMetrics -> file-SD file -> Prometheus (honor_labels) ->
    the dashboard's throughput query and the alert's memory ratio return the worker's series."""
    require_prometheus("prometheus")
    from embshard.trainer.metrics import write_file_sd

    jobs = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]
    (job,) = [j for j in jobs if j["job_name"] == "embshard"]
    job = {**job, "scrape_interval": "1s", "scrape_timeout": "1s",
           "file_sd_configs": [{"files": ["sd/*.json"], "refresh_interval": "1s"}]}
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "scrape_configs": [job]}
    m = WorkerMetrics("e2e-job", 1, 2)
    try:
        m.observe_step(0.01, 100, loss=0.5)
        m.set_device_memory(allocated=10, reserved=95, capacity=100)
        port = m.start_server(0, 0)
        with PrometheusServer(config) as prom:
            # As the trainer writes it: the file names its run as `job`
            write_file_sd(prom.dir / "sd" / "e2e-job.json", [m.target()], {"node": "local", "job": "e2e-job"})
            res = prom.wait_for('embshard_train_samples_total{job="e2e-job", rank="1"}', timeout=30)
            (series,) = res
            assert series["metric"]["node"] == "local"
            assert series["metric"]["instance"] == f"127.0.0.1:{port}"
            assert float(series["value"][1]) == 100
            ratio = prom.query('max by (job, rank) (embshard_device_memory_bytes{kind="reserved"})'
                               ' / max by (job, rank) (embshard_device_memory_capacity_bytes)')["result"]
            assert [float(r["value"][1]) for r in ratio] == [0.95]
            # EmbshardMetricsTargetDown's selector finds the target, whose `up` carries the run's
            # job (it read up{job="embshard"}, which no file-SD target has)
            (up,) = prom.query('up{discovery="file_sd"}')["result"]
            assert up["metric"]["job"] == "e2e-job" and float(up["value"][1]) == 1
            rss = prom.query('process_resident_memory_bytes{job="e2e-job"}')["result"]
            assert rss and float(rss[0]["value"][1]) > 0
    finally:
        m.stop_server()
