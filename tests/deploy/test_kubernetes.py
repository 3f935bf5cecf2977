"""deploy/kubernetes/: current with its sources, valid against the Kubernetes API schema
(offline, kubernetes-validate's bundled schemas, strict: unknown fields are errors), and the
custom resources (ServiceMonitor, PrometheusRule, ScaledObject) checked structurally and against
the objects they point at."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from deploy import k8s
from mailgenius.components import BY_NAME

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "deploy" / "kubernetes"
#: the oldest and the newest Kubernetes minor the manifests must be valid for
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule"),
             ("keda.sh/v1alpha1", "ScaledObject")}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def resources() -> list[dict]:
    kust = yaml.safe_load((OUT / "kustomization.yaml").read_text())
    docs = []
    for rel in kust["resources"]:
        docs += _docs(OUT / rel)
    return docs


def _by_kind(resources, kind):
    return {d["metadata"]["name"]: d for d in resources if d["kind"] == kind}


def test_generated_manifests_are_current():
    res = subprocess.run([sys.executable, "-m", "console", "build", "--check", "--root", str(ROOT)],
                         capture_output=True, text=True)
    stale = [line for line in res.stdout.splitlines() if "deploy/kubernetes" in line]
    assert not stale, "run `mailgenius build`: " + "; ".join(stale)


def test_render_matches_committed_files():
    for rel, text in k8s.render(ROOT).items():
        assert (ROOT / rel).read_text() == text, f"{rel} is stale: run `mailgenius build`"


def test_kustomization_lists_every_manifest_but_the_secret_example():
    kust = yaml.safe_load((OUT / "kustomization.yaml").read_text())
    on_disk = {str(p.relative_to(OUT)) for p in OUT.rglob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == on_disk - {"secret.example.yaml"}
    assert kust["images"] == [{"name": k8s.IMAGE, "newTag": k8s.project_version(ROOT)}]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_resources_validate_against_the_kubernetes_schema(resources, version):
    secret = _docs(OUT / "secret.example.yaml")
    checked = 0
    for doc in resources + secret:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        # strict: a misspelt or misplaced field is an error, not silently ignored
        kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 10


def test_schema_validation_catches_a_bad_manifest():
    # the validator really runs: a probe port of the wrong type and an unknown field fail
    doc = _docs(OUT / "sender.yaml")[0]
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = [8001]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
    doc = _docs(OUT / "sender.yaml")[0]
    doc["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


def test_every_process_has_a_deployment_with_probes_on_its_health_endpoints(resources):
    deployments = _by_kind(resources, "Deployment")
    services = _by_kind(resources, "Service")
    assert set(deployments) == {f"mailgenius-{c}" for c in ("sender", "importer", "exporter",
                                                            "sender-worker", "importer-worker")}
    for name, dep in deployments.items():
        component = name.removeprefix("mailgenius-")
        pod = dep["spec"]["template"]
        # the selector selects the pod template, and the Service selects the same pods
        assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        assert services[name]["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        (container,) = pod["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        # the documented port of that process (one table with make run and compose)
        assert list(ports.values()) == [BY_NAME[component].default]
        assert services[name]["spec"]["ports"][0]["targetPort"] in ports
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert container[probe]["httpGet"]["port"] in ports, (name, probe)
        if component in ("sender", "importer", "exporter"):
            assert container["readinessProbe"]["httpGet"]["path"] == "/api/health"
            assert container["args"] == ["serve", component]
        else:
            assert container["args"][:2] == ["worker", component.removesuffix("-worker")]
        # non-root, read-only root filesystem, secrets as files
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["DATABASE_URL_FILE"].startswith(k8s.SECRET_DIR)
        assert not any(e in env for e in ("DATABASE_URL", "REDIS_URL")), "secrets never as plain env"


def test_secret_example_holds_every_key_the_pods_read():
    (secret,) = _docs(OUT / "secret.example.yaml")
    assert set(secret["stringData"]) == set(k8s.SECRET_KEYS)


def test_migrate_job_runs_migrations():
    (job,) = _docs(OUT / "migrate-job.yaml")
    assert job["kind"] == "Job"
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"]


def test_service_monitors_scrape_every_service_with_the_job_label_of_the_rules(resources):
    services = _by_kind(resources, "Service")
    monitors = _by_kind(resources, "ServiceMonitor")
    assert set(monitors) == set(services)
    for name, sm in monitors.items():
        assert sm["apiVersion"] == "monitoring.coreos.com/v1"
        svc = services[name]
        assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        (ep,) = sm["spec"]["endpoints"]
        assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]}
        job = BY_NAME[name.removeprefix("mailgenius-")].job
        labels = {r["targetLabel"]: r["replacement"] for r in ep["relabelings"]}
        assert labels == {"job": job, "service": job}


def test_prometheus_rule_holds_every_rule_file(resources):
    (rule,) = _by_kind(resources, "PrometheusRule").values()
    groups = rule["spec"]["groups"]
    expected = []
    for path in sorted((ROOT / "prometheus" / "rules").glob("*.yml")):
        expected += yaml.safe_load(path.read_text())["groups"]
    assert groups == expected
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names)), "group names must be unique in one PrometheusRule"
    for g in groups:
        assert g["rules"]
        for r in g["rules"]:
            assert ("alert" in r) != ("record" in r) and r["expr"], r


def test_a_new_rule_file_is_picked_up(tmp_path):
    (tmp_path / "prometheus" / "rules").mkdir(parents=True)
    (tmp_path / "prometheus" / "rules" / "extra.yml").write_text(
        "groups:\n  - name: extra\n    rules:\n      - record: x:y\n        expr: vector(1)\n")
    rule = k8s.prometheus_rule(tmp_path)
    assert [g["name"] for g in rule["spec"]["groups"]] == ["extra"]


def test_dashboard_config_maps_are_labelled_for_the_grafana_sidecar(resources):
    maps = {n: d for n, d in _by_kind(resources, "ConfigMap").items() if "dashboard" in n}
    on_disk = sorted(p.name for p in (ROOT / "dashboards" / "json").glob("*.json"))
    assert sorted(k for cm in maps.values() for k in cm["data"]) == on_disk
    for cm in maps.values():
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        (name, text), = cm["data"].items()
        assert json.loads(text) == json.loads((ROOT / "dashboards" / "json" / name).read_text())
        # client-side `kubectl apply` keeps a copy in an annotation limited to 256 KiB
        assert len(text) < 250_000


def test_scaled_object_scales_the_send_workers_on_queue_depth(resources):
    (so,) = _by_kind(resources, "ScaledObject").values()
    target = so["spec"]["scaleTargetRef"]
    assert target["kind"] == "Deployment" and target["name"] in _by_kind(resources, "Deployment")
    assert target["name"] == "mailgenius-sender-worker"
    assert 1 <= so["spec"]["minReplicaCount"] < so["spec"]["maxReplicaCount"]
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert 'queue="email-sending"' in trigger["metadata"]["query"]
    assert "mailgenius_queue_messages" in trigger["metadata"]["query"]
    assert int(trigger["metadata"]["threshold"]) > 0
