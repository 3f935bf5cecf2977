"""docker-compose.yml, Dockerfile and Procfile, checked statically (no Docker engine here:
`docker compose config` cannot run, so the rules it would enforce, and ours, are tested on the
parsed YAML)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from mailgenius import ops

ROOT = Path(__file__).resolve().parents[2]

#: the compose service names every config of the repository relies on (shared contract)
SERVICES = {"postgres", "redis", "sender", "sender-worker", "importer", "importer-worker", "exporter",
            "smtp-sink", "prometheus", "alertmanager", "postgres-exporter", "redis-exporter",
            "node-exporter", "grafana", "loki", "promtail"}
#: host paths (not in the repository) a container may mount, and why
HOST_MOUNTS = {
    "/": "node-exporter reads the host's filesystems under /host",
    "/var/run/docker.sock": "promtail discovers the containers whose logs it ships",
}
#: services without a Docker health check, and why
NO_HEALTHCHECK = {
    "redis-exporter": "its image is FROM scratch: no shell, wget or curl to probe with",
    "promtail": "its image has no HTTP client; Loki's /ready and Grafana show whether logs arrive",
}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _host(target: str) -> str:
    return target.rsplit(":", 1)[0]


def test_services_are_the_shared_names(compose):
    assert set(compose["services"]) == SERVICES


def test_every_mounted_file_exists(compose):
    # Given every volume of every service
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0] if isinstance(vol, str) else vol["source"]
            if source.startswith((".", "/")):
                if source.startswith("/"):
                    # Then host paths are only the few known ones
                    assert source in HOST_MOUNTS, f"{name} mounts unexpected host path {source}"
                    continue
                # Then every repository file or folder it mounts exists
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                # named volumes are declared at the top level
                assert source in (compose.get("volumes") or {}), f"{name} uses undeclared volume {source}"


def test_mounted_configs_are_the_compose_variants(compose):
    mounts = {v.split(":")[1]: v.split(":")[0] for s in compose["services"].values() for v in s.get("volumes", [])
              if isinstance(v, str) and v.startswith("./")}
    assert mounts["/etc/prometheus/prometheus.yml"] == "./prometheus/prometheus.compose.yml"
    assert mounts["/etc/alertmanager/alertmanager.yml"] == "./alertmanager/alertmanager.compose.yml"
    # Grafana's dashboard provider reads the folder we mount the generated JSON into
    provider = yaml.safe_load((ROOT / "dashboards/provisioning/dashboards/mailgenius.yml").read_text())
    paths = {p["options"]["path"] for p in provider["providers"]}
    assert paths <= set(mounts), f"provider paths {paths} are not mounted"
    assert all(mounts[p] == "./dashboards/json" for p in paths)
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    folder, _, fname = home.rpartition("/")
    assert (ROOT / mounts[folder] / fname).exists()
    # Loki and Promtail are started with the files we mount
    for svc in ("loki", "promtail"):
        flag = next(a for a in compose["services"][svc]["command"] if a.startswith("-config.file="))
        assert flag.split("=", 1)[1] in mounts
    # the secrets Alertmanager reads are the ones its compose config names
    am = (ROOT / "alertmanager/alertmanager.compose.yml").read_text()
    wanted = set(re.findall(r"_file: \"?(/etc/alertmanager/secrets/\w+)", am))
    given = {s["target"] for s in compose["services"]["alertmanager"]["secrets"]}
    assert wanted <= given, f"secrets {wanted - given} are read by Alertmanager but not provided"


def test_published_ports_are_unique(compose):
    seen: dict[str, str] = {}
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            parts = str(port).split(":")
            host = ":".join(parts[:-1]) if len(parts) > 1 else parts[0]
            host_port = host.split(":")[-1]
            assert host_port not in seen, f"host port {host_port} published by {name} and {seen[host_port]}"
            seen[host_port] = name
    # the documented ones
    for port, svc in {"8001": "sender", "8002": "importer", "9300": "exporter", "9090": "prometheus",
                      "9093": "alertmanager", "3000": "grafana", "3100": "loki"}.items():
        assert seen.get(port) == svc


def test_replicated_workers_publish_no_port_and_have_replicas(compose):
    for name in ("sender-worker", "importer-worker"):
        svc = compose["services"][name]
        assert "ports" not in svc, f"{name} has replicas: a published port would collide"
        assert "replicas" in svc["deploy"]
        assert "container_name" not in svc


def test_health_checks_restart_policies_and_dependencies(compose):
    for name, svc in compose["services"].items():
        assert svc.get("restart") in ("unless-stopped", "always", "on-failure"), name
        if name not in NO_HEALTHCHECK:
            test = svc.get("healthcheck", {}).get("test")
            assert test, f"{name} has no health check"
        for dep, cond in (svc.get("depends_on") or {}).items() if isinstance(svc.get("depends_on"), dict) else []:
            assert dep in SERVICES, f"{name} depends on unknown {dep}"
            if cond.get("condition") == "service_healthy":
                assert "healthcheck" in compose["services"][dep], f"{name} waits for {dep}'s health, which has no check"
    assert "pg_stat_statements" in " ".join(compose["services"]["postgres"]["command"])


def _urls_hosts(obj) -> set[str]:
    hosts = set()
    if isinstance(obj, dict):
        for v in obj.values():
            hosts |= _urls_hosts(v)
    elif isinstance(obj, list):
        for v in obj:
            hosts |= _urls_hosts(v)
    elif isinstance(obj, str) and re.match(r"^(https?|redis|postgresql)://", obj):
        hosts.add(urlparse(obj).hostname)
    return hosts


def test_prometheus_compose_targets_name_compose_services():
    cfg = yaml.safe_load((ROOT / "prometheus/prometheus.compose.yml").read_text())
    jobs = set()
    for job in cfg["scrape_configs"]:
        jobs.add(job["job_name"])
        for sc in job.get("static_configs", []):
            for target in sc["targets"]:
                if job["job_name"] == "prometheus" and _host(target) == "localhost":
                    continue  # Prometheus scraping itself inside its own container
                assert _host(target) in SERVICES, f"job {job['job_name']} scrapes {target}: not a compose service"
            assert sc.get("labels", {}).get("service") == job["job_name"]
        for dns in job.get("dns_sd_configs", []):
            for n in dns["names"]:
                assert n in SERVICES, f"job {job['job_name']} resolves {n}: not a compose service"
    assert {"sender", "importer", "exporter", "sender-worker", "importer-worker", "postgres", "redis", "node",
            "alertmanager", "prometheus"} <= jobs
    for am in cfg["alerting"]["alertmanagers"]:
        for sc in am["static_configs"]:
            assert all(_host(t) in SERVICES for t in sc["targets"])
    # the rule files it loads are mounted beside it
    assert all(r.startswith("rules/") for r in cfg["rule_files"])
    assert list((ROOT / "prometheus/rules").glob("*.yml"))


def test_other_compose_configs_name_compose_services(compose):
    am = yaml.safe_load((ROOT / "alertmanager/alertmanager.compose.yml").read_text())
    assert _host(am["global"]["smtp_smarthost"]) in SERVICES
    hosts = _urls_hosts(am) - {None}
    internal = {h for h in hosts if "." not in h}
    assert internal <= SERVICES, f"alertmanager.compose.yml names {internal - SERVICES}"
    ds = yaml.safe_load((ROOT / "dashboards/provisioning/datasources/mailgenius.yml").read_text())
    assert {urlparse(d["url"]).hostname for d in ds["datasources"]} <= SERVICES
    promtail = yaml.safe_load((ROOT / "dashboards/logging/promtail.yml").read_text())
    assert {urlparse(c["url"]).hostname for c in promtail["clients"]} <= SERVICES
    # the application's own environment points at compose services
    env = compose["services"]["sender"]["environment"]
    app_hosts = {urlparse(v).hostname for k, v in env.items() if isinstance(v, str) and "://" in v and "PUBLIC" not in k}
    assert app_hosts <= SERVICES | {None}


def test_dockerfile_copies_what_exists_and_dockerignore_keeps_it():
    text = (ROOT / "Dockerfile").read_text()
    sources = []
    for line in text.splitlines():
        if line.startswith("COPY "):
            sources += line.split()[1:-1]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for src in sources:
        assert src.rstrip("/") not in ignored, f".dockerignore drops {src}, which the Dockerfile copies"
    # every top-level package of pyproject is in the image
    import tomllib

    pkgs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for pkg in pkgs:
        assert pkg.rstrip("*") in sources, f"package {pkg} is not copied into the image"


def test_procfile_runs_every_component_with_variables_run_sh_provides():
    procs = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, cmd = line.partition(":")
            procs[name.strip()] = cmd.strip()
    assert set(procs) == {c.name for c in ops.COMPONENTS}
    env = ops.stack_env({"MAILGENIUS_RESEND_WEBHOOK_SECRET": "whsec_dGVzdA=="})
    env.update({"MAILGENIUS_RUN_PROMETHEUS_CONFIG": "x", "MAILGENIUS_RUN_ALERTMANAGER_CONFIG": "x"})
    for name, cmd in procs.items():
        for var in re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)(:-)?", cmd):
            name_, has_default = var
            assert has_default or name_ in env, f"Procfile {name} uses ${name_}, which stack-prepare does not set"
        # every listening port comes from its variable, never a literal
        comp = ops.BY_NAME[name]
        if comp.name in ("sender", "importer", "exporter", "smtp-sink", "sender-worker", "importer-worker", "scheduler"):
            continue  # `mailgenius serve|worker|sink|scheduler` read MAILGENIUS_*_PORT themselves
        assert f"${comp.env}" in cmd, f"{name} does not listen on ${comp.env}"


def test_procfile_lines_and_run_sh_are_valid_shell():
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, cmd = line.partition(":")
            res = subprocess.run(["sh", "-n", "-c", cmd], capture_output=True, text=True)
            assert res.returncode == 0, f"{name}: {res.stderr}"
    for script in ("scripts/run.sh", "scripts/setup.sh"):
        res = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
        assert res.returncode == 0, f"{script}: {res.stderr}"
