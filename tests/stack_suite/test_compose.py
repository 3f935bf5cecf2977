"""docker-compose.yml, Dockerfile and Procfile, checked statically: on the parsed YAML, after
interpolating it the way Compose does (``${VAR:?err}`` refuses, ``${VAR:-default}``), and with
``docker compose config`` where a Compose client is installed (without one that test skips)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from console import stack

ROOT = Path(__file__).resolve().parents[2]

#: the compose service names every config of the repository relies on (shared contract)
SERVICES = {"postgres", "redis", "migrate", "sender", "sender-worker", "importer", "importer-worker", "exporter", "scheduler",
            "smtp-sink", "prometheus", "alertmanager", "postgres-exporter", "redis-exporter",
            "node-exporter", "grafana", "loki", "alloy"}
#: host paths (not in the repository) a container may mount, and why
HOST_MOUNTS = {
    "/": "node-exporter reads the host's filesystems under /host",
    "/var/lib/docker/containers": "alloy reads the containers' json-file logs (read-only)",
}
#: services without a Docker health check, and why
NO_HEALTHCHECK = {
    "redis-exporter": "its image is FROM scratch: no shell, wget or curl to probe with",
    "alloy": "its image has no HTTP client; Loki's /ready and Grafana show whether logs arrive",
    "migrate": "a one-shot job: the others wait for it to exit 0, not for a health state",
}
#: the secrets `docker compose up` refuses to start without (no default passwords)
REQUIRED = {"POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD", "MAILGENIUS_TRACKING_SECRET", "MAILGENIUS_ALERT_WEBHOOK_TOKEN"}
#: UIs and stores: published on loopback only
LOOPBACK_ONLY = {"prometheus", "alertmanager", "grafana", "loki", "exporter", "postgres", "redis"}

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])((?:[^{}]|\{[^{}]*\})*))?\}")


class InterpolationError(ValueError):
    pass


def interpolate(value, env: dict[str, str]):
    """Compose's variable syntax on every string: ${VAR}, ${VAR:-default}, ${VAR-default},
    ${VAR:?error}, ${VAR?error}; $$ is a literal $."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        have = env.get(name)
        unset = have is None or (have == "" and op and op.startswith(":"))
        if op in (":?", "?") and unset:
            raise InterpolationError(f"{name}: {arg}")
        if op in (":-", "-") and unset:
            return interpolate(arg, env)
        return have or ""

    return _VAR.sub(one, value.replace("$$", "\0")).replace("\0", "$")


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
    # Loki and Alloy are started with the files we mount
    flag = next(a for a in compose["services"]["loki"]["command"] if a.startswith("-config.file="))
    assert flag.split("=", 1)[1] in mounts
    assert compose["services"]["alloy"]["command"][-1] in mounts
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
        if name == "migrate":
            assert svc["restart"] == "on-failure", "a finished migration must not be restarted"
        if name not in NO_HEALTHCHECK:
            test = svc.get("healthcheck", {}).get("test")
            assert test, f"{name} has no health check"
        for dep, cond in (svc.get("depends_on") or {}).items() if isinstance(svc.get("depends_on"), dict) else []:
            assert dep in SERVICES, f"{name} depends on unknown {dep}"
            if cond.get("condition") == "service_healthy":
                assert "test" in compose["services"][dep].get("healthcheck", {}), \
                    f"{name} waits for {dep}'s health, which has no check"
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
    assert {"sender", "importer", "exporter", "sender-worker", "importer-worker", "scheduler", "postgres", "redis",
            "node", "alertmanager", "prometheus"} <= jobs
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
    from tests.dashboards.alloy_config import parse

    alloy = parse((ROOT / "dashboards/logging/config.alloy").read_text())
    urls = [e.attrs["url"] for w in alloy.find("loki.write") for e in w.find("endpoint")]
    assert urls and {urlparse(u).hostname for u in urls} <= SERVICES
    # the application's own environment points at compose services
    env = compose["services"]["sender"]["environment"]
    app_hosts = {urlparse(v).hostname for k, v in env.items() if isinstance(v, str) and "://" in v and "PUBLIC" not in k}
    assert app_hosts <= SERVICES | {None}


def test_dockerfile_copies_what_exists_and_dockerignore_keeps_it():
    text = (ROOT / "Dockerfile").read_text()
    sources = []
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += line.split()[1:-1]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for src in sources:
        assert src.rstrip("/") not in ignored, f".dockerignore drops {src}, which the Dockerfile copies"
    # the image installs the lock, hashes checked, and runs as the non-root user of the last stage
    assert "--require-hashes -r requirements/runtime.txt" in text
    stages = re.split(r"^FROM ", text, flags=re.M)
    assert len(stages) >= 3, "multi-stage: a build stage and a runtime stage"
    users = re.findall(r"^USER (\S+)", stages[-1], flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
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
    assert set(procs) == {c.name for c in stack.COMPONENTS}
    env = stack.stack_env({"MAILGENIUS_RESEND_WEBHOOK_SECRET": "whsec_" + "c3RhY2stc3VpdGUtd2ViaG9vay1zZWNyZXQ="})
    env.update({"MAILGENIUS_RUN_PROMETHEUS_CONFIG": "x", "MAILGENIUS_RUN_ALERTMANAGER_CONFIG": "x"})
    for name, cmd in procs.items():
        for var in re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)(:-)?", cmd):
            name_, has_default = var
            assert has_default or name_ in env, f"Procfile {name} uses ${name_}, which stack-prepare does not set"
        # every listening port comes from its variable, never a literal
        comp = stack.BY_NAME[name]
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


def _env_with_secrets() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in REQUIRED}
    env.update({k: f"test-{k.lower()}-0123456789abcdef0123456789" for k in REQUIRED})
    return env


def test_compose_refuses_to_start_without_each_secret(compose):
    interpolate(compose, _env_with_secrets())  # with all of them: fine
    for var in sorted(REQUIRED):
        env = _env_with_secrets()
        del env[var]
        with pytest.raises(InterpolationError, match=var):
            interpolate(compose, env)
        env[var] = ""
        with pytest.raises(InterpolationError, match=var):
            interpolate(compose, env)


def test_no_default_passwords(compose):
    text = (ROOT / "docker-compose.yml").read_text()
    for var in REQUIRED:
        assert not re.search(r"\$\{" + var + r"(:?-)", text), f"{var} has a default"
    cfg = interpolate(compose, _env_with_secrets())
    grafana = cfg["services"]["grafana"]["environment"]
    assert "GF_SECURITY_ADMIN_PASSWORD" not in grafana
    assert grafana["GF_SECURITY_ADMIN_PASSWORD__FILE"].startswith("/run/secrets/")
    assert "POSTGRES_PASSWORD" not in cfg["services"]["postgres"]["environment"]
    # secrets reach the containers as files, through the *_FILE variables
    env = cfg["services"]["sender"]["environment"]
    assert "MAILGENIUS_TRACKING_SECRET" not in env
    assert env["MAILGENIUS_TRACKING_SECRET_FILE"] == "/run/secrets/tracking_secret"
    assert "tracking_secret" in cfg["services"]["sender"]["secrets"]
    # no secret's value appears anywhere in any container's environment (the database password
    # reaches the services as DATABASE_PASSWORD_FILE, which load_settings quotes into the URL)
    secrets = _env_with_secrets()
    for name, service in cfg["services"].items():
        for key, value in (service.get("environment") or {}).items():
            for var in REQUIRED:
                assert secrets[var] not in str(value), f"{name}: {key} carries {var}"
        environment = service.get("environment") or {}
        if "DATABASE_URL" in environment:
            assert environment["DATABASE_PASSWORD_FILE"] == "/run/secrets/postgres_password", name
        # every secret file a container is told to read is mounted in it (a missing one stops
        # load_settings: the smtp-sink inherited two it did not have)
        mounted = {s if isinstance(s, str) else s["source"] for s in service.get("secrets") or []}
        for key, value in environment.items():
            if key.endswith("_FILE") and str(value).startswith("/run/secrets/"):
                assert str(value).removeprefix("/run/secrets/") in mounted, f"{name}: {key} names an unmounted secret"


def test_published_ports_listen_on_loopback(compose):
    cfg = interpolate(compose, _env_with_secrets() | {"MAILGENIUS_PUBLISH_HOST": ""})
    for name, svc in cfg["services"].items():
        for port in svc.get("ports", []):
            parts = str(port).split(":")
            assert len(parts) == 3, f"{name} publishes {port} on every interface"
            if name in LOOPBACK_ONLY:
                assert parts[0] == "127.0.0.1", f"{name} publishes {port} beyond loopback"
            else:
                assert parts[0] in ("127.0.0.1", ""), port
                assert parts[0] == "127.0.0.1" or "MAILGENIUS_PUBLISH_HOST" in str(
                    compose["services"][name]["ports"])
    cfg = interpolate(compose, _env_with_secrets())
    assert cfg["services"]["sender"]["ports"] == ["127.0.0.1:8001:8001"]


def test_one_migrate_job_that_every_app_service_waits_for(compose):
    commands = {n: " ".join(map(str, s.get("command") or [])) for n, s in compose["services"].items()}
    assert [n for n, c in commands.items() if "migrate" in c] == ["migrate"]
    assert compose["services"]["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("sender", "sender-worker", "importer", "importer-worker", "exporter"):
        deps = compose["services"][name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name


def test_prometheus_and_alertmanager_know_their_external_url(compose):
    cfg = interpolate(compose, _env_with_secrets() | {"PROMETHEUS_EXTERNAL_URL": "https://prom.example.com",
                                                      "ALERTMANAGER_EXTERNAL_URL": ""})
    prom = cfg["services"]["prometheus"]["command"]
    assert "--web.external-url=https://prom.example.com" in prom
    assert "--web.enable-lifecycle" not in prom, "the lifecycle API lets anyone who reaches :9090 stop it"
    assert "--web.external-url=http://127.0.0.1:9093" in cfg["services"]["alertmanager"]["command"]


def _compose_cli() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) and subprocess.run(cmd + ["version"], capture_output=True).returncode == 0:
            return cmd
    return None


def test_docker_compose_config_accepts_the_file_and_refuses_without_secrets(tmp_path):
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no Docker Compose client on this machine (the interpolation tests above still run)")
    base = cli + ["-f", str(ROOT / "docker-compose.yml"), "--project-directory", str(ROOT), "config", "-q"]
    res = subprocess.run(base, capture_output=True, text=True, env=_env_with_secrets(), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    env = _env_with_secrets()
    del env["POSTGRES_PASSWORD"]
    res = subprocess.run(base, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode != 0 and "POSTGRES_PASSWORD" in res.stderr


def test_no_container_mounts_the_docker_socket(compose):
    # the socket is root on the host: nothing in the stack needs it (Alloy reads log files)
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0] if isinstance(vol, str) else vol["source"]
            assert "docker.sock" not in source, f"{name} mounts the Docker socket"
    # and every host path is mounted read-only
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            if isinstance(vol, str) and vol.startswith("/"):
                assert vol.split(":")[2].startswith("ro"), f"{name} mounts {vol} writable"
    # the json-file driver copies the compose service label Alloy names streams by
    assert compose["x-app"]["logging"]["options"]["labels"] == "com.docker.compose.service"
