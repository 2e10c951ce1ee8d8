"""Every manifest in k8s/ and every overlay's rendered result validates: core kinds with
kubernetes-validate (strict: unknown fields fail), RayService and monitoring CRDs against the
vendored schemas in k8s/schemas; overlays name only files that exist; alerts and the dashboard
use only metrics the service exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from serving.autoscaling import generator_scaling_options
from serving.metrics import WORKER_METRICS
from serving.observability.spend import SPEND_METRICS
from serving.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
SCHEMAS = K8S / "schemas"
KUBERNETES_VERSION = "1.32.0"  # the oldest version we support; newer ones accept these too
KUSTOMIZATIONS = sorted(p.parent for p in K8S.rglob("kustomization.yaml"))
# Components are rendered inside an overlay (`with_components`), never on their own.
COMPONENTS = [d for d in KUSTOMIZATIONS if yaml.safe_load((d / "kustomization.yaml").read_text())["kind"] == "Component"]
BUILDABLE = [d for d in KUSTOMIZATIONS if d not in COMPONENTS]
CRD_SCHEMAS = {
    ("ray.io/v1", "RayService"): "rayservice_ray_v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor_monitoring_v1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor_monitoring_v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule_monitoring_v1.json",
    ("karpenter.sh/v1", "NodePool"): "nodepool_karpenter_v1.json",
    ("karpenter.k8s.aws/v1", "EC2NodeClass"): "ec2nodeclass_karpenter_v1.json",
}
# Exported by the ingress itself (serving.metrics, serving.observability.queue_gauges, /metrics)
INGRESS_METRICS = {
    "svd_submissions_total", "svd_cancellations_total", "svd_http_request_duration_seconds",
    "svd_queue_depth_jobs", "svd_queue_oldest_job_age_seconds", "svd_queue_jobs", "svd_metrics_redis_up",
    *SPEND_METRICS,
}


@cache
def crd_validator(file_name: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads((SCHEMAS / file_name).read_text()))


def validate(doc: dict[str, Any]) -> None:
    """Raise unless `doc` is a valid resource of a kind we know."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CRD_SCHEMAS:
        errors = sorted(crd_validator(CRD_SCHEMAS[key]).iter_errors(doc), key=lambda e: list(e.path))
        if errors:
            raise AssertionError("; ".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:5]))
        return
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def kustomize(directory: Path, *flags: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) must be on the PATH to render the overlays"
    result = subprocess.run([kubectl, "kustomize", *flags, str(directory)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def with_components(tmp_path: Path, overlay: Path, *components: str) -> list[dict[str, Any]]:
    """`overlay` rendered with `components` (names under k8s/components), as a user's own overlay
    that adds them would be."""
    def relative(path: Path) -> str:  # kustomize takes no absolute roots
        return os.path.relpath(path, tmp_path)

    spec = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [relative(overlay)], "components": [relative(K8S / "components" / c) for c in components]}
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(spec))
    return kustomize(tmp_path, "--load-restrictor=LoadRestrictionsNone")


def manifest_files() -> list[Path]:
    """Plain resource files (not kustomizations, patches or generator inputs)."""
    return sorted(
        p for p in K8S.rglob("*.yaml")
        if p.name != "kustomization.yaml" and "patches" not in p.parts
    )


def label(path: Path) -> str:
    return str(path.relative_to(K8S))


@pytest.mark.parametrize("path", manifest_files(), ids=label)
def test_every_manifest_file_validates(path: Path) -> None:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert docs
    for doc in docs:
        validate(doc)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=label)
def test_kustomization_names_only_existing_files(directory: Path) -> None:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    named: list[str] = list(spec.get("resources", [])) + list(spec.get("components", []))
    named += [p["path"] for p in spec.get("patches", []) if "path" in p]
    for generator in spec.get("configMapGenerator", []) + spec.get("secretGenerator", []):
        named += [f.split("=", 1)[-1] for f in generator.get("files", [])]
    assert named or spec.get("patches")
    for name in named:
        target = (directory / name).resolve()
        assert target.exists(), f"{label(directory)} names {name}, which does not exist"
        if target.is_dir():
            assert (target / "kustomization.yaml").is_file(), f"{name} is a directory without a kustomization"
    # every patch file in the directory is used (a forgotten patch silently changes nothing)
    for patch in (directory / "patches").glob("*.yaml") if (directory / "patches").is_dir() else []:
        assert f"patches/{patch.name}" in named, f"{label(patch)} is not applied"


@pytest.mark.parametrize("directory", BUILDABLE, ids=label)
def test_rendered_kustomization_validates(directory: Path) -> None:
    docs = kustomize(directory)
    assert docs
    for doc in docs:
        try:
            validate(doc)
        except Exception as exc:
            raise AssertionError(f"{label(directory)}: {doc['kind']}/{doc['metadata']['name']}: {exc}") from exc


def by_kind(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def test_validators_reject_misspelt_fields() -> None:
    deployment = next(d for d in kustomize(K8S / "base") if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    rayservice = by_kind(kustomize(K8S / "base"), "RayService", "svd-serve")
    rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(AssertionError, match="maxReplica"):
        validate(rayservice)
    with pytest.raises(kubernetes_validate.utils.SchemaNotFoundError):
        validate({"apiVersion": "example.com/v1", "kind": "Unknown", "metadata": {"name": "x"}})


def gpu_group(docs: list[dict[str, Any]]) -> dict[str, Any]:
    groups = by_kind(docs, "RayService", "svd-serve")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == ["gpu"]
    return groups[0]


def worker_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return gpu_group(docs)["template"]["spec"]["containers"][0]


def prestop_deadline(docs: list[dict[str, Any]]) -> float:
    command = worker_container(docs)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["svd-serve", "drain-node"], command
    return float(command[command.index("--deadline-s") + 1])


def assert_drain_fits(docs: list[dict[str, Any]]) -> None:
    """The preStop's drain ends before the kubelet kills the pod; Ray's own SIGTERM drain agrees."""
    worker = gpu_group(docs)["template"]["spec"]
    deadline = prestop_deadline(docs)
    assert 0 < deadline < worker["terminationGracePeriodSeconds"]
    env = {e["name"]: e.get("value") for e in worker_container(docs)["env"]}
    assert float(env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"]) == deadline


def test_prod_spot_places_head_on_demand_and_gpus_on_spot() -> None:
    docs = kustomize(K8S / "overlays" / "prod-spot")
    cluster = by_kind(docs, "RayService", "svd-serve")["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["template"]["spec"]["nodeSelector"] == {"karpenter.sh/capacity-type": "on-demand"}
    worker = gpu_group(docs)["template"]["spec"]
    assert worker["nodeSelector"] == {"karpenter.sh/capacity-type": "spot",
                                      "karpenter.k8s.aws/instance-gpu-manufacturer": "nvidia"}
    assert {t["key"] for t in worker["tolerations"]} == {"nvidia.com/gpu"}
    limits = worker["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1
    # AWS's two-minute spot notice: 120 s for the pod, the Ray node drained within 100 s.
    assert worker["terminationGracePeriodSeconds"] == 120 and prestop_deadline(docs) == 100
    assert_drain_fits(docs)
    # The Dispatcher drains on the head, inside the head pod's default 30 s grace period.
    config = by_kind(docs, "ConfigMap", "svd-serve-config")["data"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert float(config["SVD_SERVE_DRAIN_GRACE_S"]) + 5 < head.get("terminationGracePeriodSeconds", 30)
    policy = by_kind(docs, "NetworkPolicy", "allow-backing-services")
    cidrs = [rule["to"][0].get("ipBlock", {}).get("cidr") for rule in policy["spec"]["egress"]]
    assert not any(c and c.startswith("10.20.") for c in cidrs)  # the base's placeholders were replaced
    assert all(img["image"].startswith("registry.example.com/") for img in worker["containers"])


def config_settings(docs: list[dict[str, Any]]) -> Settings:
    """The Settings a pod of the overlay gets from its ConfigMap (secrets aside)."""
    data = by_kind(docs, "ConfigMap", "svd-serve-config")["data"]
    overrides = {"SVD_SERVE_ENVIRONMENT": "development", "SVD_SERVE_URL_SIGNING_SECRET": "x"}
    with pytest.MonkeyPatch.context() as env:
        for name, value in {**data, **overrides}.items():
            env.setenv(name, value)
        return Settings()


def test_prod_spot_turns_scaling_and_batching_on() -> None:
    docs = kustomize(K8S / "overlays" / "prod-spot")
    settings = config_settings(docs)
    group = gpu_group(docs)
    # The policy's bound is the GPU group's: one Generator per one-GPU pod.
    assert settings.autoscale_max_replicas == group["maxReplicas"] == 8
    assert settings.autoscale_min_replicas == 1
    options = generator_scaling_options(settings)
    assert options["autoscaling_config"]["max_replicas"] == 8
    assert options["graceful_shutdown_timeout_s"] > settings.job_deadline_s  # scale-down lets a job finish
    # Batching and overlap: enough jobs in hand to fill a batch on every replica.
    assert settings.max_batch_size > 1
    assert settings.dispatcher_concurrency >= settings.max_batch_size * settings.autoscale_max_replicas
    assert settings.dispatcher_resources == {"svd-dispatcher": 0.01}
    head = by_kind(docs, "RayService", "svd-serve")["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert json.loads(yaml.safe_load(head["rayStartParams"]["resources"])) == {"svd-dispatcher": 1}
    # A laptop (no overlay) keeps one fixed Generator.
    assert "autoscaling_config" not in generator_scaling_options(Settings())


def test_scale_to_zero_component(tmp_path: Path) -> None:
    docs = with_components(tmp_path, K8S / "overlays" / "prod-spot", "scale-to-zero")
    assert config_settings(docs).autoscale_min_replicas == 0
    group = gpu_group(docs)
    assert (group["replicas"], group["minReplicas"]) == (0, 0)
    assert generator_scaling_options(config_settings(docs))["autoscaling_config"]["min_replicas"] == 0


def test_gke_spot_fits_its_15_second_grace() -> None:
    docs = kustomize(K8S / "overlays" / "prod-spot-gke")
    worker = gpu_group(docs)["template"]["spec"]
    assert worker["nodeSelector"]["cloud.google.com/gke-spot"] == "true"
    assert worker["terminationGracePeriodSeconds"] == 15
    assert_drain_fits(docs)
    head = by_kind(docs, "RayService", "svd-serve")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert "nodeSelector" not in head and "cloud.google.com/gke-spot" in json.dumps(head["affinity"])


def test_spot_watch_component_reaches_only_the_metadata_service(tmp_path: Path) -> None:
    docs = with_components(tmp_path, K8S / "overlays" / "prod-spot", "spot-watch")
    containers = {c["name"]: c for c in gpu_group(docs)["template"]["spec"]["containers"]}
    assert containers["spot-watch"]["args"] == ["svd-serve", "spot-watch"]
    policy = by_kind(docs, "NetworkPolicy", "svd-serve-gpu-metadata")
    assert policy["spec"]["egress"] == [{"to": [{"ipBlock": {"cidr": "169.254.169.254/32"}}],
                                         "ports": [{"protocol": "TCP", "port": 80}]}]


def test_gpu_pods_select_labels_karpenter_provisions() -> None:
    """Karpenter only provisions for labels it knows: every key the GPU pods select on is one of
    the NodePool's requirements (or its template labels), with a value the NodePool allows, and
    the NodePool's taints are tolerated."""
    worker = gpu_group(kustomize(K8S / "overlays" / "prod-spot"))["template"]["spec"]
    (pool,) = [d for d in kustomize(K8S / "karpenter") if d["kind"] == "NodePool"]
    template = pool["spec"]["template"]
    allowed = {r["key"]: set(r.get("values", [])) for r in template["spec"]["requirements"] if r["operator"] == "In"}
    allowed |= {k: {v} for k, v in template.get("metadata", {}).get("labels", {}).items()}
    for key, value in worker["nodeSelector"].items():
        assert key in allowed and value in allowed[key], (key, value)
    tolerated = {(t["key"], t.get("effect")) for t in worker["tolerations"]}
    for taint in template["spec"].get("taints", []):
        assert (taint["key"], taint["effect"]) in tolerated, taint
    assert int(pool["spec"]["limits"]["nvidia.com/gpu"]) == gpu_group(kustomize(K8S / "overlays" / "prod-spot"))["maxReplicas"]


def test_ray_pods_probe_with_what_the_image_has() -> None:
    """KubeRay's default probes call wget, which the GPU image lacks: ours use curl."""
    dockerfile = (ROOT / "Dockerfile.gpu").read_text()
    assert re.search(r"apt-get install[^\n]*\bcurl\b", dockerfile) and "wget" not in dockerfile
    cluster = by_kind(kustomize(K8S / "overlays" / "prod-spot"), "RayService", "svd-serve")["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]["spec"], gpu_group([{"kind": "RayService", "metadata": {"name": "svd-serve"},
                                                                      "spec": {"rayClusterConfig": cluster}}])["template"]["spec"]]
    for pod in pods:
        ray = pod["containers"][0]
        for probe in ("readinessProbe", "livenessProbe"):
            command = " ".join(ray[probe]["exec"]["command"])
            assert "curl" in command and "wget" not in command


def test_redis_held_metrics_have_one_exporter() -> None:
    docs = kustomize(K8S / "overlays" / "prod-spot")
    exporter = by_kind(docs, "Deployment", "svd-serve-exporter")
    assert exporter["spec"]["replicas"] == 1 and exporter["spec"]["strategy"]["type"] == "Recreate"
    assert config_settings(docs).metrics_shared_on_ingress is False  # the ingress pods export their own only
    monitor = by_kind(docs, "ServiceMonitor", "svd-serve-exporter")
    service = by_kind(docs, "Service", "svd-serve-exporter")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


def test_dev_runs_without_gpus_with_in_cluster_services() -> None:
    docs = kustomize(K8S / "overlays" / "dev")
    worker = gpu_group(docs)["template"]["spec"]
    resources = worker["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in {**resources.get("limits", {}), **resources.get("requests", {})}
    assert "tolerations" not in worker
    for name in ("redis", "postgres", "minio"):
        by_kind(docs, "Service", name)
    secret = by_kind(docs, "Secret", "svd-serve")
    assert "REDIS_URL" in secret["data"]


def test_serve_config_points_at_our_app_builder() -> None:
    rayservice = by_kind(kustomize(K8S / "base"), "RayService", "svd-serve")
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    module, _, attribute = app["import_path"].partition(":")
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file()
    assert re.search(rf"^def {attribute}\(", (ROOT / (module.replace(".", "/") + ".py")).read_text(), re.MULTILINE)


def test_secret_example_holds_no_values() -> None:
    (secret,) = yaml.safe_load_all((K8S / "secrets" / "svd-serve.example.yaml").read_text())
    assert secret["stringData"] and all(value == "" for value in secret["stringData"].values())
    assert "data" not in secret


def test_service_monitor_selects_the_api_service() -> None:
    docs = kustomize(K8S / "base")
    monitor = by_kind(docs, "ServiceMonitor", "svd-serve-api")
    service = by_kind(docs, "Service", "svd-serve-api")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}


def exported_metric_names() -> set[str]:
    return INGRESS_METRICS | {m.name for m in WORKER_METRICS}


def used_metrics(text: str) -> set[str]:
    names = set(re.findall(r"\bsvd_[a-z0-9_]+", text))
    return {re.sub(r"_(bucket|sum|count)$", "", n) if not n.endswith("_total") else n for n in names}


def test_alerts_and_dashboard_use_exported_metrics() -> None:
    rules = yaml.safe_load((K8S / "monitoring" / "alerts.yaml").read_text())
    exprs = " ".join(r["expr"] for g in rules["spec"]["groups"] for r in g["rules"])
    dashboard = json.loads((K8S / "monitoring" / "dashboard.json").read_text())
    queries = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    exported = exported_metric_names()
    assert used_metrics(exprs) <= exported, used_metrics(exprs) - exported
    assert used_metrics(queries) <= exported, used_metrics(queries) - exported
    # every alert has a runbook section
    runbook = (ROOT / "docs" / "operations.md").read_text().lower()
    for group in rules["spec"]["groups"]:
        for rule in group["rules"]:
            assert f"### {rule['alert'].lower()}" in runbook, rule["alert"]
    # the issue's alerts are all there
    alerts = {r["alert"] for g in rules["spec"]["groups"] for r in g["rules"]}
    assert {"SvdQueueAgeOverSla", "SvdJobErrorRate", "SvdWebhookFailures", "SvdNoReadyGpuReplica",
            "SvdOwnerMonthlyBudget", "SvdOwnerBudgetSoftLimit"} <= alerts


def _svd_serve_commands(pod_spec: dict[str, Any]) -> dict[str, list[str]]:
    """container name -> its `svd-serve ...` arguments, init containers included."""
    containers = pod_spec.get("initContainers", []) + pod_spec["containers"]
    return {c["name"]: c["args"][1:] for c in containers if c.get("args", [""])[0] == "svd-serve"}


def test_migration_runs_before_the_ingress_and_the_dispatcher_waits_for_it() -> None:
    from serving.cli import build_parser

    for overlay in BUILDABLE:
        docs = kustomize(overlay)
        if not any(d["kind"] == "Deployment" and d["metadata"]["name"] == "svd-serve-api" for d in docs):
            continue
        api = by_kind(docs, "Deployment", "svd-serve-api")["spec"]["template"]["spec"]
        assert [c["name"] for c in api["initContainers"]] == ["migrate"], label(overlay)
        assert _svd_serve_commands(api)["migrate"] == ["migrate"]
        assert api["initContainers"][0]["image"] == api["containers"][0]["image"]  # the same release
        head = by_kind(docs, "RayService", "svd-serve")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
        check = _svd_serve_commands(head["spec"])["schema"]
        args = build_parser().parse_args(check)  # the CLI accepts what the manifest runs
        assert args.check and args.wait >= 600, label(overlay)


def test_bootstrap_job_creates_an_admin_key_in_the_database_and_is_never_applied_with_a_release() -> None:
    from serving.cli import build_parser

    path = K8S / "jobs" / "bootstrap-admin-key.yaml"
    (job,) = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    pod = job["spec"]["template"]
    commands = _svd_serve_commands(pod["spec"])
    assert commands["migrate"] == ["migrate"]
    create = build_parser().parse_args(commands["keys"])
    assert (create.keys_command, create.scopes) == ("create", "admin")
    # It reaches PostgreSQL through the backing-services policy and reads the same settings.
    assert pod["metadata"]["labels"]["app.kubernetes.io/part-of"] == "svd-serve"
    for container in pod["spec"]["initContainers"] + pod["spec"]["containers"]:
        assert {"configMapRef": {"name": "svd-serve-config"}} in container["envFrom"]
        assert {"secretRef": {"name": "svd-serve"}} in container["envFrom"]
    for directory in KUSTOMIZATIONS:
        assert "bootstrap-admin-key" not in (directory / "kustomization.yaml").read_text()
