"""Launch the real stack in subprocesses, on free ports, with the test settings.

Used by the end-to-end, live-dashboard, stack and reliability suites::

    stack = Stack(settings, tmp_path)
    stack.start_service("sender"); stack.start_worker("sender"); stack.start_sink()
    stack.start_exporters()                      # postgres, redis, node exporters
    stack.start_prometheus(rule_files=[...])     # scrapes everything started so far (1 s)
    stack.start_alertmanager(config_path)
    stack.prom_query("up")                       # instant query, returns the result list
    stack.stop("sender")                         # SIGTERM (kill=True: SIGKILL)
    stack.stop_all()                             # the `stack` fixture does this in teardown

Every process writes its output to ``<tmp>/logs/<name>.log`` (``stack.log(name)`` reads it back,
handy in assertion messages).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from alerting.generate import SELF_LABELLED_JOBS
from mailgenius.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

#: Debian binaries of the monitoring stack
PROMETHEUS = "/usr/bin/prometheus"
ALERTMANAGER = "/usr/bin/prometheus-alertmanager"
POSTGRES_EXPORTER = "/usr/bin/prometheus-postgres-exporter"
REDIS_EXPORTER = "/usr/bin/prometheus-redis-exporter"
NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"

#: scrape job -> path of its metrics (all others: /metrics)
SERVICES = ("sender", "importer", "exporter")
WORKERS = ("sender", "importer")

#: the incident webhook token of every test stack's exporter (its Alertmanager configs send it)
ALERT_WEBHOOK_TOKEN = "test-stack-alert-webhook-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; return it, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # keep polling; report the last error on timeout
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else ""))


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    port: int | None = None
    popen: subprocess.Popen | None = None

    def start(self) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT),
            start_new_session=True,  # its own process group: stop() reaches dramatiq's children too
        )
        log.close()
        return self

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal_group(self, sig: int) -> None:
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, *, kill: bool = False, timeout: float = 15.0) -> None:
        if not self.alive:
            self.signal_group(signal.SIGKILL)  # reap any child the leader left behind
            return
        if kill:
            self.signal_group(signal.SIGKILL)
        else:
            # SIGTERM to the leader only: dramatiq's main process forwards it to its workers
            # once; a second SIGTERM (from a group-wide signal) makes them die without their
            # shutdown hooks
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal_group(signal.SIGKILL)
            self.popen.wait(5)
        self.signal_group(signal.SIGKILL)  # nothing of the group outlives stop()


@dataclass
class Stack:
    settings: Settings
    tmp: Path
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("sender", "importer", "exporter", "sender-worker", "importer-worker", "sink", "scheduler",
                     "prometheus", "alertmanager", "postgres-exporter", "redis-exporter", "node-exporter"):
            self.ports.setdefault(name, free_port())
        self.tmp = Path(self.tmp)
        (self.tmp / "logs").mkdir(parents=True, exist_ok=True)

    # -- addresses -----------------------------------------------------------------------------
    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def target(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for our own processes: the test settings, every port moved."""
        s = self.settings
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILGENIUS_", "dramatiq_", "PROMETHEUS_MULTIPROC"))}
        env.update({
            "PATH": f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}",
            "PYTHONUNBUFFERED": "1",
            "DATABASE_URL": s.database_url,
            "REDIS_URL": s.redis_url,
            "BROKER_URL": s.broker_url,
            "MAILGENIUS_REDIS_PREFIX": s.redis_prefix,
            "MAILGENIUS_DATA_DIR": str(self.tmp / "var"),
            "MAILGENIUS_UPLOAD_DIR": s.upload_dir,
            "MAILGENIUS_SINK_DIR": str(self.tmp / "sink"),
            "MAILGENIUS_SENDER_PORT": str(self.ports["sender"]),
            "MAILGENIUS_IMPORTER_PORT": str(self.ports["importer"]),
            "MAILGENIUS_EXPORTER_PORT": str(self.ports["exporter"]),
            "MAILGENIUS_SENDER_WORKER_METRICS_PORT": str(self.ports["sender-worker"]),
            "MAILGENIUS_IMPORTER_WORKER_METRICS_PORT": str(self.ports["importer-worker"]),
            "MAILGENIUS_SINK_PORT": str(self.ports["sink"]),
            "MAILGENIUS_SMTP_HOST": "127.0.0.1",
            "MAILGENIUS_SMTP_PORT": str(self.ports["sink"]),
            "MAILGENIUS_SENDER_URL": self.url("sender"),
            "MAILGENIUS_IMPORTER_URL": self.url("importer"),
            "MAILGENIUS_EXPORTER_URL": self.url("exporter"),
            "MAILGENIUS_PUBLIC_URL": self.url("sender"),
            # the exporter refuses the Alertmanager webhook without a token (tests' configs send it)
            "MAILGENIUS_ALERT_WEBHOOK_TOKEN": ALERT_WEBHOOK_TOKEN,
            "MAILGENIUS_PROMETHEUS_URL": self.url("prometheus"),
            "MAILGENIUS_ALERTMANAGER_URL": self.url("alertmanager"),
            "MAILGENIUS_HEALTH_TIMEOUT": str(s.health_timeout),
        })
        for attr, var in (("resend_webhook_secret", "MAILGENIUS_RESEND_WEBHOOK_SECRET"),
                          ("tracking_secret", "MAILGENIUS_TRACKING_SECRET"),
                          ("email_provider", "MAILGENIUS_EMAIL_PROVIDER"),
                          ("resend_base_url", "MAILGENIUS_RESEND_BASE_URL"),
                          ("resend_api_key", "RESEND_API_KEY")):
            value = getattr(s, attr, "")
            if value:
                env[var] = str(value)
        env.update(extra)
        return env

    # -- processes -----------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None, port: int | None = None) -> Proc:
        if name in self.procs and self.procs[name].alive:
            raise RuntimeError(f"{name} is already running")
        proc = Proc(name, argv, env or self.env(), self.tmp / "logs" / f"{name}.log", port).start()
        self.procs[name] = proc
        return proc

    def log(self, name: str, tail: int = 4000) -> str:
        path = self.tmp / "logs" / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def wait_http(self, name: str, path: str, timeout: float = 30.0, ok=(200,)) -> None:
        url = self.url(name) + path
        proc = self.procs.get(name)

        def ready():
            if proc is not None and not proc.alive:
                raise RuntimeError(f"{name} exited with {proc.popen.returncode}: {self.log(name)}")
            try:
                status, _ = http_get(url, timeout=1)
            except OSError:
                return False
            return status in ok

        try:
            wait_until(ready, timeout, what=f"{name} at {url}")
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"{exc}\n--- {name} log ---\n{self.log(name)}") from None

    def start_service(self, name: str, **env: str) -> Proc:
        """`mailgenius serve <name>`; returns once /metrics answers."""
        proc = self._spawn(name, [str(VENV_BIN / "mailgenius"), "serve", name], self.env(**env), self.ports[name])
        self.wait_http(name, "/metrics")
        return proc

    def start_worker(self, name: str, *, processes: int = 1, threads: int = 2, wait: bool = True, **env: str) -> Proc:
        """`mailgenius worker <name>`; with wait, returns once its metrics port answers."""
        key = f"{name}-worker"
        proc = self._spawn(key, [str(VENV_BIN / "mailgenius"), "worker", name, "--processes", str(processes),
                                 "--threads", str(threads), "--metrics-port", str(self.ports[key])],
                           self.env(**env), self.ports[key])
        if wait:
            self.wait_http(key, "/", timeout=60)
        return proc

    def start_sink(self) -> Proc:
        proc = self._spawn("sink", [str(VENV_BIN / "mailgenius"), "sink"], port=self.ports["sink"])
        wait_until(lambda: _port_open(self.ports["sink"]), 20, what="smtp sink")
        return proc

    def start_scheduler(self, **env: str) -> Proc:
        """`mailgenius scheduler` (console/scheduler.py); returns once its metrics port answers.
        Schedules come from ``MAILGENIUS_SCHEDULE_<TASK>`` in ``env`` (``off`` disables one)."""
        proc = self._spawn("scheduler", [str(VENV_BIN / "mailgenius"), "scheduler"],
                           self.env(MAILGENIUS_SCHEDULER_METRICS_PORT=str(self.ports["scheduler"]), **env),
                           self.ports["scheduler"])
        self.wait_http("scheduler", "/metrics", timeout=30)
        return proc

    def sink_messages(self) -> list[Path]:
        d = self.tmp / "sink"
        return sorted(d.glob("*.eml")) if d.exists() else []

    def start_exporters(self, which: tuple[str, ...] = ("postgres", "redis", "node")) -> None:
        from urllib.parse import urlparse

        if "postgres" in which:
            dsn = self.settings.database_url
            dsn += ("&" if "?" in dsn else "?") + "sslmode=disable"
            env = {**os.environ, "DATA_SOURCE_NAME": dsn}
            self._spawn("postgres-exporter", [POSTGRES_EXPORTER, f"--web.listen-address=127.0.0.1:{self.ports['postgres-exporter']}"],
                        env, self.ports["postgres-exporter"])
        if "redis" in which:
            r = urlparse(self.settings.redis_url)
            self._spawn("redis-exporter", [REDIS_EXPORTER, f"-web.listen-address=127.0.0.1:{self.ports['redis-exporter']}",
                                           f"-redis.addr=redis://{r.hostname}:{r.port or 6379}"],
                        dict(os.environ), self.ports["redis-exporter"])
        if "node" in which:
            self._spawn("node-exporter", [NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{self.ports['node-exporter']}"],
                        dict(os.environ), self.ports["node-exporter"])
        for name in which:
            self.wait_http(f"{name}-exporter", "/metrics", timeout=30)

    def scrape_jobs(self) -> dict[str, str]:
        """job -> target of everything started so far that exposes metrics."""
        jobs = {}
        for name in SERVICES:
            if name in self.procs:
                jobs[name] = self.target(name)
        for name in WORKERS:
            if f"{name}-worker" in self.procs:
                jobs[f"{name}-worker"] = self.target(f"{name}-worker")
        if "scheduler" in self.procs:
            jobs["scheduler"] = self.target("scheduler")
        for name in ("postgres", "redis", "node"):
            if f"{name}-exporter" in self.procs:
                jobs[name] = self.target(f"{name}-exporter")
        if "alertmanager" in self.procs:
            jobs["alertmanager"] = self.target("alertmanager")
        return jobs

    def prometheus_config(self, *, jobs: dict[str, str] | None = None, rule_files: list[str] | None = None,
                          interval: str = "1s", alertmanager: bool = True) -> dict:
        jobs = self.scrape_jobs() if jobs is None else jobs
        cfg: dict = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [target], "labels": {"service": job}}],
                 # as the generated config: no clashing service label renamed exported_service
                 **({"honor_labels": True} if job in SELF_LABELLED_JOBS else {})}
                for job, target in sorted(jobs.items())
            ],
        }
        if rule_files:
            cfg["rule_files"] = [str(Path(p).resolve()) for p in rule_files]
        if alertmanager:
            cfg["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [self.target("alertmanager")]}]}]}
        return cfg

    def start_prometheus(self, config: dict | str | Path | None = None, *, extra_args: tuple[str, ...] = (),
                         **config_kw) -> Proc:
        """Start Prometheus with ``config`` (a dict, a YAML string, or a file path); by default
        it scrapes everything started so far every second. ``extra_args`` go to the command line
        (e.g. ``--rules.alert.resend-delay=1s``: alerts reach an Alertmanager discovered late)."""
        if config is None:
            config = self.prometheus_config(**config_kw)
        if isinstance(config, dict):
            path = self.tmp / "prometheus.yml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
        elif isinstance(config, Path) or (isinstance(config, str) and "\n" not in config):
            path = Path(config)
        else:
            path = self.tmp / "prometheus.yml"
            path.write_text(config)
        data = self.tmp / "prometheus-data"
        proc = self._spawn("prometheus", [PROMETHEUS, f"--config.file={path}", f"--storage.tsdb.path={data}",
                                          f"--web.listen-address=127.0.0.1:{self.ports['prometheus']}",
                                          "--web.enable-lifecycle", "--log.level=warn", *extra_args],
                           dict(os.environ), self.ports["prometheus"])
        self.wait_http("prometheus", "/-/ready", timeout=30)
        return proc

    def start_alertmanager(self, config: str | Path) -> Proc:
        data = self.tmp / "alertmanager-data"
        data.mkdir(exist_ok=True)
        proc = self._spawn("alertmanager", [ALERTMANAGER, f"--config.file={config}", f"--storage.path={data}",
                                            f"--web.listen-address=127.0.0.1:{self.ports['alertmanager']}",
                                            "--cluster.listen-address=", "--log.level=warn"],
                           dict(os.environ), self.ports["alertmanager"])
        self.wait_http("alertmanager", "/-/ready", timeout=30)
        return proc

    def stop(self, name: str, *, kill: bool = False) -> None:
        proc = self.procs.get(name)
        if proc is not None:
            proc.stop(kill=kill)

    def stop_all(self) -> None:
        # workers first (they may be mid-message), Prometheus/Alertmanager last
        order = sorted(self.procs, key=lambda n: (0 if n.endswith("-worker") else 2 if n in ("prometheus", "alertmanager") else 1))
        for name in order:
            try:
                self.procs[name].stop()
            except Exception:
                self.procs[name].stop(kill=True)

    # -- Prometheus / Alertmanager APIs ------------------------------------------------------------
    def prom_query(self, expr: str) -> list[dict]:
        url = self.url("prometheus") + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        status, body = http_get(url, timeout=5)
        data = json.loads(body)
        if status != 200 or data.get("status") != "success":
            raise RuntimeError(f"query {expr!r} failed: {status} {body[:300]!r}")
        return data["data"]["result"]

    def wait_targets_up(self, timeout: float = 30.0) -> None:
        def all_up():
            _, body = http_get(self.url("prometheus") + "/api/v1/targets", timeout=2)
            active = json.loads(body)["data"]["activeTargets"]
            return active and all(t["health"] == "up" for t in active)

        wait_until(all_up, timeout, what="every Prometheus target up")

    def alerts(self) -> list[dict]:
        """Active alerts as Alertmanager sees them."""
        _, body = http_get(self.url("alertmanager") + "/api/v2/alerts", timeout=3)
        return json.loads(body)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def require_binaries(*paths: str) -> None:
    import pytest

    missing = [p for p in paths if not (os.path.exists(p) or shutil.which(p))]
    if missing:
        pytest.fail(f"missing binaries {missing}: `make test` installs them from Debian packages")
