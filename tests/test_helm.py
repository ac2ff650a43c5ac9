"""The Helm chart, offline: lint + render (helm-python-sdk, Helm's Go SDK), the RayJob and its
embedded RayCluster spec against the KubeRay CRD schemas (jsonschema Draft 7), core objects
and pod templates against the Kubernetes API schemas (kubernetes-validate), the PodMonitor and
dashboard wiring, and a broken values file that must be rejected."""

from __future__ import annotations

import functools
import json
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "embshard"
SCHEMAS = REPO.parent / "shared" / "schemas"
GPU_VALUES = CHART / "ci" / "gpu-values.yaml"
BROKEN_VALUES = REPO / "tests" / "data" / "broken-values.yaml"
KUBE_VERSION = "1.30"

helm = pytest.importorskip(
    "helm_python", reason="helm-python-sdk not installed (pip install -r requirements/test.txt)"
)


def load_values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def render(values: dict[str, Any] | None = None, name: str = "demo", namespace: str = "ml") -> list[dict]:
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values, name=name, namespace=namespace, is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("metadata", {}).setdefault("namespace", namespace)
                docs.append(doc)
    return docs


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def the(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


@pytest.fixture(scope="module", params=["default", "gpu"])
def rendered(request) -> tuple[str, dict, list[dict]]:
    values = {} if request.param == "default" else load_values(GPU_VALUES)
    return request.param, values, render(values)


# ----------------------------------------------------------------------------- lint


@pytest.mark.parametrize("values_file", [None, GPU_VALUES], ids=["default", "gpu"])
def test_lint_clean(values_file: Path | None) -> None:
    values = load_values(values_file) if values_file else None
    report = helm.lint(str(CHART), values, kube_version=f"v{KUBE_VERSION}.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert not problems and not report["errors"], report


def test_broken_values_rejected() -> None:
    broken = load_values(BROKEN_VALUES)
    report = helm.lint(str(CHART), broken)
    errors = "\n".join(report["errors"])
    assert errors, "lint accepted tests/data/broken-values.yaml"
    for needle in ("/workers/replicas", "/workers/gpusPerWorker", "/podSecurityContext/runAsNonRoot",
                   "/metrics/portBase", "/image/tag", "typoedKey"):
        assert needle in errors, needle
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError, match="runAsNonRoot"):
            chart.validate_schema(broken)
        with pytest.raises(helm.HelmError):
            chart.render(broken, name="demo")


@pytest.mark.parametrize("override", [
    {"workers": {"gpusPerWorker": -1}},
    {"metrics": {"portBase": 70000}},
    {"job": {"submissionMode": "InteractiveMode"}},
    {"checkpoints": {"persistence": {"accessModes": ["ReadWriteSometimes"]}}},
    {"containerSecurityContext": {"allowPrivilegeEscalation": True}},
    {"networkPolicy": {"prometheus": {"namespaceSelector": {"matchLabel": {"name": "monitoring"}}}}},
    {"networkPolicy": {"operator": {"namespace": "Not A Namespace"}}},
], ids=["gpus", "port", "mode", "access", "privesc", "netpol-selector", "netpol-namespace"])
def test_schema_rejects_single_mistakes(override: dict) -> None:
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(chart.merge_values(override))


def test_the_metrics_port_range_is_embshards_own() -> None:
    # The chart refused portBase 65280, which embshard takes (port_base + local rank up to 65535).
    from embshard.config import MetricsConfig
    from embshard.errors import ConfigError

    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["metrics"]["properties"]["portBase"]
    lowest, highest = schema["minimum"], schema["maximum"]
    for port in (lowest, highest):
        MetricsConfig(port_base=port)
        with helm.Chart.load(CHART) as chart:
            chart.validate_schema(chart.merge_values({"metrics": {"portBase": port}}))
    for port in (lowest - 1, highest + 1):
        with pytest.raises(ConfigError, match="out of range"):
            MetricsConfig(port_base=port)


# ----------------------------------------------------------------------------- CRD schemas


def crd_schema(name: str, version: str = "v1") -> dict:
    path = SCHEMAS / "kuberay" / name
    if not path.is_file():
        pytest.skip(f"KubeRay CRD schemas not available: {path} is missing")
    return _crd_schema(path, version)


@functools.lru_cache(maxsize=None)
def _crd_schema(path: Path, version: str) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(path.read_text(), Loader=loader)
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise AssertionError(f"{path.name} has no version {version}")


def unknown_fields(obj: Any, schema: dict, where: str = "") -> Iterator[str]:
    """Fields the API server would silently prune (not in a structural schema's properties)."""
    if not isinstance(schema, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(obj, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for k, v in obj.items():
            if props is not None and k in props:
                yield from unknown_fields(v, props[k], f"{where}.{k}")
            elif isinstance(extra, dict):
                yield from unknown_fields(v, extra, f"{where}.{k}")
            elif props is not None and extra is not True:
                yield f"{where}.{k}"
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(obj):
            yield from unknown_fields(v, schema["items"], f"{where}[{i}]")


def check_against(obj: dict, schema: dict, what: str) -> None:
    from jsonschema import Draft7Validator

    errors = sorted(Draft7Validator(schema).iter_errors(obj), key=lambda e: list(e.absolute_path))
    assert not errors, f"{what}: " + "; ".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in errors[:10]
    )
    pruned = list(unknown_fields(obj, schema))
    assert not pruned, f"{what}: fields unknown to the CRD (would be pruned): {pruned}"


def test_rayjob_matches_kuberay_crd(rendered) -> None:
    _, _, docs = rendered
    job = the(docs, "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    check_against(job, crd_schema("ray.io_rayjobs.yaml"), "RayJob")
    # The embedded cluster spec is also a valid RayCluster spec.
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "x"},
               "spec": job["spec"]["rayClusterSpec"]}
    check_against(cluster, crd_schema("ray.io_rayclusters.yaml"), "RayCluster")


def test_crd_check_catches_mistakes() -> None:
    """The CRD check is not vacuous: a wrong type and a misspelt field are both caught."""
    job = the(render(), "RayJob")
    schema = crd_schema("ray.io_rayjobs.yaml")
    bad = json.loads(json.dumps(job))
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(AssertionError, match="replicas"):
        check_against(bad, schema, "RayJob")
    bad = json.loads(json.dumps(job))
    bad["spec"]["rayClusterSpec"]["authOptions"]["mdoe"] = "token"
    with pytest.raises(AssertionError, match="mdoe"):
        check_against(bad, schema, "RayJob")


# ----------------------------------------------------------------------------- core objects


def kube_validate(obj: dict) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    try:
        kv.validate(obj, KUBE_VERSION, strict=True)
    except kv.ValidationError as e:
        raise AssertionError(f"{obj['kind']} {obj['metadata'].get('name')}: {e.message[:300]} "
                             f"at {'/'.join(map(str, e.absolute_path))}") from None


def pod_templates(job: dict) -> dict[str, dict]:
    spec = job["spec"]
    out = {"head": spec["rayClusterSpec"]["headGroupSpec"]["template"]}
    for g in spec["rayClusterSpec"]["workerGroupSpecs"]:
        out[g["groupName"]] = g["template"]
    if "submitterPodTemplate" in spec:
        out["submitter"] = spec["submitterPodTemplate"]
    return out


def test_core_objects_valid(rendered) -> None:
    _, _, docs = rendered
    core = [d for d in docs if d["apiVersion"] in ("v1", "apps/v1", "batch/v1", "policy/v1", "networking.k8s.io/v1")]
    assert {d["kind"] for d in core} >= {"ConfigMap", "PersistentVolumeClaim", "NetworkPolicy"}
    for obj in core:
        kube_validate(obj)
    # Every pod template inside the RayJob is a valid Pod spec.
    for name, tpl in pod_templates(the(docs, "RayJob")).items():
        kube_validate({"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": f"demo-{name}", **tpl.get("metadata", {})},
                       "spec": tpl["spec"]})


def test_kube_validate_catches_mistakes() -> None:
    cm = by_kind(render(), "ConfigMap")[0]
    bad = json.loads(json.dumps(cm))
    bad["data"]["x"] = 3
    with pytest.raises(AssertionError, match="ConfigMap"):
        kube_validate(bad)


# ----------------------------------------------------------------------------- chart behaviour


def test_extra_args_reach_the_job_as_given() -> None:
    # Double-quoted for the job's shell, `$HOME` and `id` in backquotes were expanded there.
    job = the(render({"job": {"extraArgs": ["--set", "name=run$HOME`id`", "--verbose"]}}), "RayJob")
    assert job["spec"]["entrypoint"].endswith(" '--set' 'name=run$HOME`id`' '--verbose'")


def test_rayjob_shape(rendered) -> None:
    which, values, docs = rendered
    job = the(docs, "RayJob")
    spec = job["spec"]
    gpus = (values.get("workers") or {}).get("gpusPerWorker", 1)
    replicas = (values.get("workers") or {}).get("replicas", 2)
    assert spec["entrypoint"].startswith("embshard train /etc/embshard/config.yaml --address auto")
    assert f"--workers {replicas * max(1, gpus)}" in spec["entrypoint"]
    rc = spec["rayClusterSpec"]
    assert rc["authOptions"] == {"mode": "token"}
    head = rc["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and head["enableIngress"] is False
    # `embshard stop` gives the driver time to have the workers checkpoint (Ray's default is 3 s).
    (head_container,) = head["template"]["spec"]["containers"]
    assert {"name": "RAY_JOB_STOP_WAIT_TIME_S", "value": "120"} in head_container["env"]
    (group,) = rc["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == replicas
    for name, tpl in pod_templates(job).items():
        psc = tpl["spec"]["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0, name
        for c in tpl["spec"]["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert c["resources"]["requests"] and c["resources"]["limits"], (name, c["name"])
    worker = group["template"]["spec"]
    (c,) = worker["containers"]
    assert c["resources"]["requests"]["nvidia.com/gpu"] == str(gpus)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {f"metrics-{r}": 9400 + r for r in range(max(1, gpus))}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    # The file alone: a mount of its folder would hide whatever the image keeps there.
    assert mounts["job-config"]["mountPath"] == "/etc/embshard/config.yaml"
    assert mounts["job-config"]["subPath"] == "config.yaml"
    assert mounts["checkpoints"]["mountPath"] == "/checkpoints"
    # Ranks go to worker pods only, as many per pod as it has GPUs: a resource only they hold.
    slots = json.loads(shlex.split(group["rayStartParams"]["resources"])[0])
    assert slots == {"embshard_rank": max(1, gpus)}
    assert head["rayStartParams"] == {"dashboard-host": "0.0.0.0", "num-gpus": "0"}
    if which == "gpu":
        assert worker["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert worker["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert {"name": "registry-credentials"} in worker["imagePullSecrets"]


def test_config_map_carries_job_config(rendered) -> None:
    which, values, docs = rendered
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-config")]
    cfg = yaml.safe_load(cm["data"]["config.yaml"])
    gpus = (values.get("workers") or {}).get("gpusPerWorker", 1)
    chart_set = {"sharding": {"device": "cuda", "local_world_size": gpus}}
    assert cfg["metrics"] == {"enabled": True, "port_base": 9400, "bind": "0.0.0.0"}
    assert cfg["output_dir"] == "/checkpoints/demo"
    expected = values.get("config") or load_values(CHART / "values.yaml")["config"]
    for k, v in expected.items():
        assert cfg[k] == {**v, **chart_set.get(k, {})}
    # the metrics section parses as the trainer's MetricsConfig
    from embshard.config import MetricsConfig
    from embshard.typed_config import from_dict

    assert from_dict(MetricsConfig, cfg["metrics"], "metrics").bind == "0.0.0.0"
    pvc = the(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_podmonitor_selects_worker_metrics_ports(rendered) -> None:
    _, values, docs = rendered
    pm = the(docs, "PodMonitor")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    tpl = the(docs, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]
    labels = tpl["metadata"]["labels"]
    sel = pm["spec"]["selector"]["matchLabels"]
    assert sel.items() <= labels.items(), (sel, labels)
    head_labels = the(docs, "RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert not sel.items() <= head_labels.items(), "PodMonitor must not select the head"
    port_names = {p["name"] for p in tpl["spec"]["containers"][0]["ports"]}
    endpoints = pm["spec"]["podMetricsEndpoints"]
    assert {e["port"] for e in endpoints} == port_names
    assert all(e["honorLabels"] is True and e["path"] == "/metrics" for e in endpoints)
    if values.get("metrics", {}).get("podMonitor", {}).get("labels"):
        assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def _admits(rule: dict, labels: dict[str, str]) -> bool:
    return any(peer.get("podSelector", {}).get("matchLabels", {}).items() <= labels.items()
               and "namespaceSelector" not in peer for peer in rule.get("from", []))


def test_network_policy_admits_ray_and_prometheus_only(rendered) -> None:
    _, _, docs = rendered
    policy = the(docs, "NetworkPolicy")
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    rc = the(docs, "RayJob")["spec"]["rayClusterSpec"]
    worker = rc["workerGroupSpecs"][0]["template"]
    head = rc["headGroupSpec"]["template"]
    submitter = the(docs, "RayJob")["spec"]["submitterPodTemplate"]
    selected = spec["podSelector"]["matchLabels"]
    pods = {"worker": worker, "head": head, "submitter": submitter}
    for name, tpl in pods.items():
        assert selected.items() <= tpl["metadata"]["labels"].items(), f"the policy must cover the {name}"
    # Ray's own traffic: every pod of the job reaches every port of every other (no port list).
    (intra,) = [r for r in spec["ingress"] if _admits(r, worker["metadata"]["labels"])]
    assert "ports" not in intra
    assert all(_admits(intra, tpl["metadata"]["labels"]) for tpl in pods.values())
    # Prometheus' namespace reaches the metrics ports and nothing else.
    (scrape,) = [r for r in spec["ingress"]
                 if r["from"][0].get("namespaceSelector", {}).get("matchLabels") ==
                 {"kubernetes.io/metadata.name": "monitoring"}]
    metrics_ports = {p["name"] for p in worker["spec"]["containers"][0]["ports"] if p["name"].startswith("metrics-")}
    assert {p["port"] for p in scrape["ports"]} == metrics_ports
    # The operator polls the head's dashboard: a port the head container really names.
    (op,) = [r for r in spec["ingress"]
             if r["from"][0].get("namespaceSelector", {}).get("matchLabels") ==
             {"kubernetes.io/metadata.name": "kuberay"}]
    head_ports = {p["name"] for p in head["spec"]["containers"][0]["ports"]}
    assert [p["port"] for p in op["ports"]] == ["dashboard"] and "dashboard" in head_ports
    assert len(spec["ingress"]) == 3


def test_network_policy_options() -> None:
    selector = {"matchLabels": {"team": "observability"}}
    prom = {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
    docs = render({"networkPolicy": {"prometheus": {"namespaceSelector": selector, "podSelector": prom}}})
    spec = the(docs, "NetworkPolicy")["spec"]
    (scrape,) = [r for r in spec["ingress"] if r.get("ports") and r["ports"][0]["port"] == "metrics-0"]
    assert scrape["from"] == [{"namespaceSelector": selector, "podSelector": prom}]
    kube_validate(the(docs, "NetworkPolicy"))
    spec = the(render({"networkPolicy": {"operator": {"namespace": "ray-system"}}}), "NetworkPolicy")["spec"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ray-system"}}} in \
        [peer for r in spec["ingress"] for peer in r["from"]]
    # Without metrics there is nothing to scrape: no Prometheus rule.
    spec = the(render({"metrics": {"enabled": False}}), "NetworkPolicy")["spec"]
    assert all(not r.get("ports") or r["ports"][0]["port"] == "dashboard" for r in spec["ingress"])
    assert not by_kind(render({"networkPolicy": {"enabled": False}}), "NetworkPolicy")


def test_dashboard_configmap_is_the_one_dashboard(rendered) -> None:
    _, _, docs = rendered
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    chart_copy = (CHART / "dashboards" / "embshard.json").read_text()
    assert json.loads(cm["data"]["embshard.json"]) == json.loads(chart_copy)
    deploy_copy = REPO / "deploy" / "grafana" / "embshard.json"
    assert deploy_copy.resolve() == (CHART / "dashboards" / "embshard.json").resolve(), \
        "deploy/grafana/embshard.json must be a link to the chart's dashboard, not a second copy"


def test_object_store_holds_data_and_checkpoints() -> None:
    """URIs go to data.path and checkpoint.dir; the run folder, which the head and the workers
    share (plan.json, summary.json), stays on the volume; the credentials Secret reaches every
    Ray container as environment variables."""
    docs = render({"checkpoints": {"uri": "s3://bucket/embshard"}, "metrics": {"podMonitor": {"enabled": False}},
                   "objectStorage": {"dataUri": "s3://bucket/criteo", "credentialsSecret": "s3-creds",
                                     "endpoint": "http://minio.storage:9000", "region": "eu-west-1"},
                   "dashboard": {"enabled": False}, "workers": {"gpusPerWorker": 0}, "auth": {"secretName": "tok"}})
    assert by_kind(docs, "PersistentVolumeClaim")
    assert not by_kind(docs, "PodMonitor")
    (cm,) = by_kind(docs, "ConfigMap")
    cfg = yaml.safe_load(cm["data"]["config.yaml"])
    assert cfg["checkpoint"]["dir"] == "s3://bucket/embshard" and cfg["data"]["path"] == "s3://bucket/criteo"
    assert cfg["output_dir"] == "/checkpoints/demo" and cfg["data"]["batch_size"] == 8192
    # No GPUs: gloo on CPU, one rank per pod (each pod a host of one)
    assert cfg["sharding"] == {"device": "cpu", "local_world_size": 1}
    job = the(docs, "RayJob")
    assert job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token", "secretName": "tok"}
    c = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    for name, tpl in pod_templates(job).items():
        if name == "submitter":
            continue
        (container,) = [x for x in tpl["spec"]["containers"] if x["name"].startswith("ray-")]
        assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}], name
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["AWS_ENDPOINT_URL"] == "http://minio.storage:9000" and env["AWS_REGION"] == "eu-west-1", name
        kube_validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": tpl["spec"]})
    check_against(job, crd_schema("ray.io_rayjobs.yaml"), "RayJob")


def test_no_object_storage_means_no_credentials() -> None:
    job = the(render(), "RayJob")
    for tpl in pod_templates(job).values():
        for container in tpl["spec"]["containers"]:
            assert "envFrom" not in container
            assert not [e for e in container.get("env", []) if e["name"].startswith("AWS_")]


# ----------------------------------------------------------------------------- the training config


def test_the_shipped_values_are_configs_the_trainer_takes(rendered) -> None:
    """values.yaml and ci/gpu-values.yaml set `train.batch_size` and a `plan:` section, neither of
    them a config key: `helm install` took them, and the job failed when its driver started."""
    from embshard.config import JobConfig
    from embshard.typed_config import from_dict, parse_yaml

    which, values, docs = rendered
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-config")]
    cfg = from_dict(JobConfig, parse_yaml(cm["data"]["config.yaml"]))
    gpus = (values.get("workers") or {}).get("gpusPerWorker", 1)
    # The chart's world: one rank per GPU, each worker pod a host; the GPUs are used (they sat
    # idle under gloo on CPU: nothing set sharding.device).
    assert cfg.sharding.device == "cuda" and cfg.sharding.local_world_size == gpus
    assert cfg.cluster.worker_resources == {"embshard_rank": 1.0}
    assert cfg.name == "demo"  # the metrics' job label: one per release, not "embshard" for all


def test_config_keys_the_trainer_refuses_are_refused_at_install() -> None:
    report = helm.lint(str(CHART), {"config": {"train": {"batch_size": 8192}, "plan": {"device": "cuda"}}})
    errors = "\n".join(report["errors"])
    assert "/config/train" in errors and "batch_size" in errors and "'plan' not allowed" in errors, errors
    report = helm.lint(str(CHART), {"config": {"sharding": {"device": "tpu"}, "train": {"epochs": "3"}}})
    errors = "\n".join(report["errors"])
    assert "/config/sharding/device" in errors and "/config/train/epochs" in errors, errors


def test_the_config_schema_is_generated_from_the_config_dataclasses() -> None:
    from embshard.config import JobConfig
    from embshard.config_reference import SCHEMAS_COMMAND, chart_values_schema

    current = json.loads((CHART / "values.schema.json").read_text())
    assert current == chart_values_schema(current, JobConfig), f"values.schema.json is stale: run `{SCHEMAS_COMMAND}`"


@pytest.mark.parametrize(("values", "release", "message"), [
    ({}, "2024-criteo", "KubeRay refuses"),
    ({}, "run.v2", "KubeRay refuses"),
    ({"checkpoints": {"persistence": {"create": False}}}, "demo", "no existingClaim is given"),
    ({"job": {"extraArgs": ["--workers", "3"]}}, "demo", "job.extraArgs: --workers is the chart's to set"),
    ({"job": {"extraArgs": ["--address=10.0.0.1:6379"]}}, "demo", "job.extraArgs: --address=10.0.0.1:6379"),
    ({"job": {"extraArgs": ["--work", "3"]}}, "demo", "job.extraArgs: --work is the chart's to set"),  # a prefix
    ({"workers": {"rayStartParams": {"resources": '"{\\"ssd\\": 1}"'}}}, "demo",
     "workers.rayStartParams.resources: the chart sets it"),
    ({"workers": {"resources": {"requests": {"cpu": "8", "nvidia.com/gpu": "2"}, "limits": {"cpu": "8"}}}}, "demo",
     "workers.resources.requests.nvidia.com/gpu: set workers.gpusPerWorker instead"),
    ({"metrics": {"portBase": 12000}}, "demo", "overlap Ray's worker ports"),
    ({"metrics": {"portBase": 9995}, "workers": {"gpusPerWorker": 8}}, "demo", "include Ray's 10001"),
    ({"checkpoints": {"uri": "file:///x"}}, "demo", "/checkpoints/uri"),
    ({"image": {"repository": "ghcr.io/x/y:1.0"}}, "demo", "/image/repository"),
    ({"job": {"configPath": "/etc/x y/config.yaml"}}, "demo", "/job/configPath"),
    ({"head": {"resources": {"requests": {"cpu": "4", "memory": "8Gi"}, "limits": {"cpu": "2", "memory": "8Gi"}}}},
     "demo", "head.resources: requests.cpu 4 is above limits.cpu 2"),
    ({"workers": {"resources": {"requests": {"cpu": 8, "memory": "64Gi"}, "limits": {"cpu": 8, "memory": "32Gi"}}}},
     "demo", "workers.resources: requests.memory 64Gi is above limits.memory 32Gi"),
    ({"job": {"submitter": {"resources": {"requests": {"cpu": "1500m"}, "limits": {"cpu": "1"}}}}}, "demo",
     "job.submitter.resources: requests.cpu 1500m is above limits.cpu 1"),
    ({"head": {"resources": {"requests": {"cpu": "2", "memory": "1e10"}, "limits": {"cpu": "2", "memory": "8Gi"}}}},
     "demo", "requests.memory 1e10 is above limits.memory 8Gi"),
    ({"metrics": {"podMonitor": {"enabled": True, "interval": "15s", "scrapeTimeout": "1m"}}}, "demo",
     "metrics.podMonitor.scrapeTimeout 1m is longer than its interval 15s"),
    # Served, kept or reached where nothing scrapes, keeps or reaches it.
    ({"job": {"extraArgs": ["--set", "metrics.port_base=9500"]}}, "demo",
     "job.extraArgs: metrics.port_base=9500 is the chart's to set"),
    ({"job": {"extraArgs": ["--set=output_dir=/tmp/x"]}}, "demo", "job.extraArgs: --set=output_dir=/tmp/x is the"),
    # Each read by embshard as those keys, and rendered: served on 9500 where the PodMonitor scrapes 9400.
    ({"job": {"extraArgs": ["--set", "metrics={enabled: true, port_base: 9500}"]}}, "demo",
     "job.extraArgs: metrics={enabled: true, port_base: 9500} is the chart's to set"),
    ({"job": {"extraArgs": ["--set", " output_dir=/tmp/x"]}}, "demo", "job.extraArgs:  output_dir=/tmp/x is the"),
    ({"job": {"extraArgs": ["--set", "metrics.port_base =9500"]}}, "demo", "job.extraArgs: metrics.port_base =9500"),
    ({"job": {"extraArgs": ["--s=output_dir=/tmp/x"]}}, "demo", "job.extraArgs: --s=output_dir=/tmp/x is the"),
    ({"job": {"extraArgs": ["--set", "name=it's"]}}, "demo", "job.extraArgs: name=it's holds a single quote"),
    # Two volumes at one path: Kubernetes refused every pod, and the RayJob waited for good.
    ({"checkpoints": {"mountPath": "/etc/embshard/config.yaml"}, "job": {"configPath": "/etc/embshard/config.yaml"}},
     "demo", "/checkpoints/mountPath"),
    ({"checkpoints": {"mountPath": "/srv/ckpt"}, "job": {"configPath": "/srv/ckpt/config.yaml"}}, "demo",
     "checkpoints.mountPath /srv/ckpt: holds job.configPath /srv/ckpt/config.yaml"),
    ({"checkpoints": {"mountPath": "/usr/local"}}, "demo", "/checkpoints/mountPath"),  # hides the interpreter's
    ({"head": {"rayStartParams": {"dashboard-host": "127.0.0.1"}}}, "demo",
     "head.rayStartParams.dashboard-host: the chart sets it"),
    ({"head": {"rayStartParams": {"dashboard-port": "8000"}}}, "demo", "head.rayStartParams.dashboard-port"),
    # Pods Kubernetes refuses (two volumes at one path, a resource name without its domain), or
    # whose volume hides the image's code.
    ({"checkpoints": {"mountPath": "/tmp/ray"}}, "demo", "/checkpoints/mountPath"),
    ({"checkpoints": {"mountPath": "/dev/shm/x"}}, "demo", "/checkpoints/mountPath"),
    ({"checkpoints": {"mountPath": "/home/embshard"}}, "demo", "/checkpoints/mountPath"),
    ({"checkpoints": {"mountPath": "/"}}, "demo", "/checkpoints/mountPath"),
    ({"workers": {"gpuResourceName": "gpu"}}, "demo", "/workers/gpuResourceName"),
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_values_kuberay_or_ray_would_refuse_fail_at_install(values, release, message) -> None:
    # Each installed cleanly and left a RayJob that never ran: pods pending for a claim, a name
    # the operator refuses, a world size the pods cannot hold, a port Ray takes.
    with pytest.raises(Exception, match=re.escape(message)):
        render(values, name=release)


def test_integer_quantities_and_user_ray_start_params_render_once() -> None:
    resources = {"cpu": 8, "memory": "32Gi"}
    values = {"workers": {"resources": {"requests": resources, "limits": resources}},
              "head": {"rayStartParams": {"num-cpus": "0", "object-store-memory": "1000000000"}}}
    with helm.Chart.load(CHART) as chart:
        text = chart.render(values, name="demo", namespace="ml", is_install=True)["embshard/templates/rayjob.yaml"]
    assert text.count("dashboard-host:") == 1  # YAML readers differ on which of two they keep
    rc = the(render(values), "RayJob")["spec"]["rayClusterSpec"]
    # each key once, the user's beside the chart's (which a user's may not replace)
    assert rc["headGroupSpec"]["rayStartParams"] == {"dashboard-host": "0.0.0.0", "num-cpus": "0", "num-gpus": "0",
                                                     "object-store-memory": "1000000000"}



def test_equal_quantities_in_other_units_are_within_limits() -> None:
    # The check compares amounts, not strings: 1024Mi is 1Gi, 0.5 CPU is 500m, 2k bytes are 2000.
    values = {"head": {"resources": {"requests": {"cpu": "500m", "memory": "1024Mi", "ephemeral-storage": "2000"},
                                     "limits": {"cpu": 0.5, "memory": "1Gi", "ephemeral-storage": "2k"}}},
              "metrics": {"podMonitor": {"enabled": True, "interval": "1m", "scrapeTimeout": "60s"}}}
    assert the(render(values), "RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]


@pytest.mark.parametrize(("mode", "follow"), [("K8sJobMode", "logs -f -l job-name=demo-embshard"),
                                               ("HTTPMode", "ray job logs -f --address http://127.0.0.1:8265")])
def test_notes_follow_the_job_where_its_output_is(mode, follow) -> None:
    # In HTTPMode there is no submitter Job, so `kubectl logs -l job-name=...` matched no pod.
    with helm.Chart.load(CHART) as chart:
        notes = chart.render({"job": {"submissionMode": mode}}, name="demo", namespace="ml",
                             is_install=True)["embshard/templates/NOTES.txt"]
    assert follow in notes and ("job-name=" in notes) == (mode == "K8sJobMode")
