"""`make run` from a fresh clone, in the background, on free ports: every health endpoint
healthy and every Prometheus target up within 60 s; `mailgenius demo` then `mailgenius status`
exits 0; `mailgenius report daily` writes a report whose charts are non-empty; the supervisor
restarts each kind of process killed with -9 while the rest keeps running, ServiceDown reaches a
local Slack receiver while a service cannot come back, a worker killed mid-campaign is replaced
with every message delivered exactly once, the scheduler's backups are scraped, every process
logs JSON lines to <data dir>/log; Ctrl-C stops all within MAILGENIUS_STOP_TIMEOUT, ports free.

The stack runs with the generated alerting configs rendered for a test (every `for:` 2 s, 1 s
group_wait, Slack pointed at a local recorder), like tests/alerting/test_e2e.py.

The clone gets a virtualenv that reuses this one's installed dependencies (a .pth file) instead
of downloading them again: a full `pip install` would take most of this suite's 3-minute budget.
Everything else is the real thing: `make run` runs scripts/setup.sh (package check, Postgres and
Redis check, migrations) and scripts/run.sh (stack-prepare + the supervisor on the Procfile), with the
clone's own code on sys.path ahead of anything else.
"""

from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest
import redis as syncredis

from alerting import generate
from console import stack as console_stack
from console.supervisor import descendants
from mailgenius.queues import STALE_AFTER, workers_key
from tests.alerting.receivers import Recorder
from tests.conftest import free_port
from tests.stack import http_get, wait_until  # tests/stack.py: the lead's helpers

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
#: the issue's bound for health and targets after `make run`
UP_WITHIN = 60.0
#: the issue's bound for ServiceDown at a local channel
ALERT_WITHIN = 120.0
#: Ctrl-C bound given to the stack (MAILGENIUS_STOP_TIMEOUT)
STOP_TIMEOUT = 15
#: SMTP connections of the send worker process (MAILGENIUS_SENDER_SMTP_POOL_SIZE, the default)
SMTP_POOL = 16


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _kill_all(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _make_clone(tmp: Path) -> Path:
    clone = tmp / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    venv = clone / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    # the clone's code first, then this environment's third-party packages
    (site / "_mailgenius_clone.pth").write_text(f"{clone}\n{sysconfig.get_paths()['purelib']}\n")
    py = venv / "bin" / "python"
    for name, entry in (("mailgenius", "console.commands:main"), ("dramatiq", "dramatiq.cli:main")):
        mod, func = entry.split(":")
        script = venv / "bin" / name
        script.write_text(f"#!{py}\nimport sys\nfrom {mod} import {func}\nsys.exit({func}())\n")
        script.chmod(0o755)
    # setup.sh: the project and the lock are installed (see the module docstring); the stamp holds
    # the digest of what was installed, as setup.sh computes it
    digest = hashlib.sha256((clone / "pyproject.toml").read_bytes() + (clone / "requirements/dev.txt").read_bytes())
    (venv / ".installed").write_text(digest.hexdigest() + "\n")
    return clone


def _alert_configs(tmp: Path, ports: dict[str, str], slack_url: str) -> dict[str, Path]:
    """The generated configs for this stack's ports, with short `for:` and Slack at a recorder."""
    secrets = tmp / "secrets"
    secrets.mkdir()
    (secrets / "slack_api_url").write_text(f"{slack_url}/services/T000/B000/makerun")
    job_ports = {c.job: int(ports[c.env]) for c in console_stack.COMPONENTS if c.job}
    variant = generate.local_variant(
        ports={**job_ports, "smtp": int(ports["MAILGENIUS_SINK_PORT"])}, scrape_interval="2s", evaluation_interval="2s",
        group_wait="1s", group_interval="1s", for_override="2s", secrets_dir=str(secrets))
    return generate.render_to(tmp / "alert-configs", variant)


@pytest.fixture(scope="module")
def slack():
    with Recorder() as rec:
        yield rec


@pytest.fixture(scope="module")
def running_stack(tmp_path_factory, database_url, redis_url, redis_prefix, slack):
    tmp = tmp_path_factory.mktemp("makerun")
    clone = _make_clone(tmp)
    ports = {c.env: str(free_port()) for c in console_stack.COMPONENTS}
    configs = _alert_configs(tmp, ports, slack.url)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILGENIUS_", "dramatiq_", "PROMETHEUS_MULTIPROC"))}
    env.update(ports)
    env.update({
        "DATABASE_URL": database_url, "REDIS_URL": redis_url, "BROKER_URL": redis_url,
        "MAILGENIUS_REDIS_PREFIX": redis_prefix, "MAILGENIUS_DATA_DIR": str(tmp / "var"),
        "MAILGENIUS_SCRAPE_INTERVAL": "2s", "MAILGENIUS_WORKER_PROCESSES": "1", "MAILGENIUS_WORKER_THREADS": "2",
        "PYTHONUNBUFFERED": "1", "MAILGENIUS_STOP_TIMEOUT": str(STOP_TIMEOUT),
        "MAILGENIUS_PROMETHEUS_CONFIG": str(configs["prometheus"]),
        "MAILGENIUS_ALERTMANAGER_CONFIG": str(configs["alertmanager"]),
        # the scheduler: a backup and an upload clean-up every 15 s, the rest off
        "MAILGENIUS_SCHEDULE_BACKUP": "@every 15s", "MAILGENIUS_SCHEDULE_CLEANUP_UPLOADS": "@every 15s",
        "MAILGENIUS_SCHEDULE_REPORT_DAILY": "off", "MAILGENIUS_SCHEDULE_REPORT_WEEKLY": "off",
        "MAILGENIUS_SCHEDULE_DB_MAINTENANCE": "off", "MAILGENIUS_RESTART_BACKOFF_MAX": "8",
        # a killed worker's unacknowledged messages are redelivered within seconds (as tests/sender does)
        "MAILGENIUS_BROKER_MAINTENANCE_CHANCE": "1000000", "MAILGENIUS_BROKER_HEARTBEAT_TIMEOUT_MS": "4000",
        # the send worker's SMTP connections (the default, spelled out: the bound on repeats at a kill)
        "MAILGENIUS_SENDER_SMTP_POOL_SIZE": str(SMTP_POOL),
    })
    log_path = tmp / "make-run.log"
    log = open(log_path, "wb")
    started = time.monotonic()
    proc = subprocess.Popen(["make", "run"], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    stack = {"proc": proc, "clone": clone, "env": env, "ports": ports, "tmp": tmp, "started": started,
             "started_wall": time.time(),
             "log": lambda tail=6000: log_path.read_text(errors="replace")[-tail:]}
    try:
        yield stack
    finally:
        if proc.poll() is None:
            # a failed test left the stack up: stop it (every descendant, by pid)
            below = descendants(proc.pid)
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
            _kill_all({p for p in below | descendants(proc.pid) if _alive(p)} | ({proc.pid} if proc.poll() is None else set()))
            proc.wait(10)


def _health(url: str) -> str | None:
    try:
        status, body = http_get(url + "/api/health", timeout=3)
    except OSError:
        return None
    try:
        return json.loads(body).get("status")
    except ValueError:
        return None


def _targets(prom_url: str) -> list[dict]:
    _, body = http_get(prom_url + "/api/v1/targets?state=active", timeout=3)
    return json.loads(body)["data"]["activeTargets"]


def _cli(stack, *args, timeout=120, only_data_dir=False) -> subprocess.CompletedProcess:
    """Run the clone's `mailgenius` as an operator in a second terminal would."""
    env = stack["env"]
    if only_data_dir:  # nothing but where the stack keeps its state: stack.env tells the rest
        env = {k: v for k, v in env.items() if not k.startswith("MAILGENIUS_") and k not in
               ("DATABASE_URL", "REDIS_URL", "BROKER_URL")}
        env["MAILGENIUS_DATA_DIR"] = stack["env"]["MAILGENIUS_DATA_DIR"]
    return subprocess.run([str(stack["clone"] / ".venv/bin/mailgenius"), *args], cwd=stack["clone"], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_make_run_brings_everything_up_within_60s(running_stack):
    s = running_stack
    p = s["ports"]
    services = {n: f"http://127.0.0.1:{p[console_stack.BY_NAME[n].env]}" for n in ("sender", "importer", "exporter")}
    prom = f"http://127.0.0.1:{p['MAILGENIUS_PROMETHEUS_PORT']}"
    jobs = {c.job for c in console_stack.COMPONENTS if c.job}

    def everything_up():
        if s["proc"].poll() is not None:
            raise AssertionError(f"make run exited with {s['proc'].returncode}:\n{s['log']()}")
        states = {n: _health(u) for n, u in services.items()}
        if any(v != "healthy" for v in states.values()):
            return None
        targets = _targets(prom)
        if {t["labels"]["job"] for t in targets} != jobs or any(t["health"] != "up" for t in targets):
            return None
        return states, targets

    deadline = s["started"] + UP_WITHIN
    try:
        states, targets = wait_until(everything_up, max(1.0, deadline - time.monotonic()), interval=0.5,
                                     what="every health endpoint healthy and every target up")
    except TimeoutError:
        detail = {n: _health(u) for n, u in services.items()}
        try:
            down = [(t["labels"]["job"], t["health"], t["lastError"]) for t in _targets(prom) if t["health"] != "up"]
        except Exception as exc:  # Prometheus itself not up
            down = repr(exc)
        pytest.fail(f"not up within {UP_WITHIN:g} s: health {detail}; targets not up {down}\n{s['log']()}")
    elapsed = time.monotonic() - s["started"]
    print(f"make run: everything healthy and {len(targets)} targets up after {elapsed:.1f} s")
    # every target carries service=<job>
    assert all(t["labels"].get("service") == t["labels"]["job"] for t in targets)
    # run.sh printed where each thing is
    out = s["log"](10**7)
    for comp in console_stack.COMPONENTS:
        assert f"127.0.0.1:{p[comp.env]}" in out, f"run.sh did not print where {comp.name} is"


def test_demo_then_status_exits_zero(running_stack):
    s = running_stack
    if s["proc"].poll() is not None:
        pytest.fail(f"make run is not running:\n{s['log']()}")
    # When the operator runs the demo from a second terminal (only the data dir is known)
    demo = _cli(s, "demo", "--leads", "120", "--seed", "7", only_data_dir=True)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "posted signed events" in demo.stdout
    counts = re.search(r"campaign counts now: (.*)", demo.stdout).group(1)
    got = dict((k, int(v)) for k, v in re.findall(r"(\w+) (\d+)", counts))
    # Then the campaign reached every imported lead, and the events were applied
    assert got["recipients"] == 120 and got["sent"] == 120 and got["failed"] == 0
    assert got["delivered"] + got["bounced"] == 120 and got["bounced"] >= 1 and got["opened"] >= 1
    # And the sink holds the messages
    assert len(list((Path(s["env"]["MAILGENIUS_DATA_DIR"]) / "sink").glob("*.eml"))) >= 120
    # When asking for the status
    status = _cli(s, "status", only_data_dir=True)
    assert status.returncode == 0, status.stdout + status.stderr
    for name in ("sender", "importer", "exporter", "sender-worker", "importer-worker", "postgres", "redis",
                 "smtp-sink", "prometheus", "alertmanager", "postgres-exporter", "redis-exporter", "node-exporter"):
        line = next(ln for ln in status.stdout.splitlines() if ln.startswith(name + " "))
        assert "unhealthy" not in line, line
    assert "email-sending" in status.stdout and "lead-import" in status.stdout
    assert "ACTIVE ALERTS" in status.stdout and "unknown" not in status.stdout.split("ACTIVE ALERTS")[1].splitlines()[0]
    check = _cli(s, "check", "workers", only_data_dir=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_report_daily_has_non_empty_charts(running_stack):
    s = running_stack
    prom = f"http://127.0.0.1:{s['ports']['MAILGENIUS_PROMETHEUS_PORT']}"
    # every send scraped, and rates need two scrapes after the counters moved
    # (the worker's dramatiq counters are another target: their rate needs two samples of each series)
    for expr in ("sum(mailgenius_emails_sent_total) >= 120", "sum(rate(mailgenius_emails_sent_total[1m])) > 0",
                 "min(count_over_time(dramatiq_messages_total[10m])) >= 2"):
        wait_until(lambda e=expr: json.loads(http_get(prom + "/api/v1/query?" + urlencode({"query": e}))[1])
                   ["data"]["result"], 30, interval=1, what=f"{expr} in Prometheus")
    out = s["tmp"] / "report-daily.html"
    res = _cli(s, "report", "daily", "--out", str(out), only_data_dir=True)
    assert res.returncode == 0, res.stdout + res.stderr
    html = out.read_text()
    charts = re.findall(r'<figure class="chart" data-title="([^"]+)" data-series="(\d+)" data-points="(\d+)">\s*'
                        r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', html)
    assert len(charts) >= 10
    empty = [title for title, series, points, _ in charts if int(series) == 0 or int(points) == 0]
    assert not empty, f"charts without data: {empty}\n{res.stdout}"
    for title, _, _, b64 in charts:
        png = base64.b64decode(b64)
        assert png.startswith(b"\x89PNG") and len(png) > 5000, title
    for section in ("System performance", "Errors and incidents", "Email delivery", "Queues", "Resource use",
                    "Trends", "Recommendations"):
        assert section in html
    assert "Demo campaign" in html  # the campaign table from Postgres
    # the period's figures count what the demo did (increase() alone misses series born in it)
    email = html.split("3. Email delivery")[1].split("4. Queues")[0]
    figures = dict(re.findall(r'<div class="label">([^<]+)</div><div class="value">([^<]+)</div>', email))
    sent = float(figures["sent"].replace(" ", ""))
    assert sent == 120, figures  # series born in the period count exactly
    events = dict(re.findall(r"<tr><td>(\w+)</td><td>([\d ]+)</td></tr>", email))
    assert float(events["delivered"].replace(" ", "")) >= 100, events

# -- supervision ------------------------------------------------------------------------------


def _sup_state(s) -> dict:
    path = Path(s["env"]["MAILGENIUS_DATA_DIR"]) / "run" / "supervisor.json"
    return json.loads(path.read_text())["processes"]


def _answers(s, name: str) -> bool:
    """The process's port answers: an HTTP answer on its health/ready/metrics path, or the SMTP greeting."""
    comp = console_stack.BY_NAME[name]
    port = int(s["ports"][comp.env])
    if comp.scheme == "smtp":
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                return sock.recv(3) == b"220"
        except OSError:
            return False
    path = {"prometheus": "/-/ready", "alertmanager": "/-/ready", "exporter": "/api/health"}.get(name, comp.path)
    try:
        status, _ = http_get(f"http://127.0.0.1:{port}{path}", timeout=3)
    except OSError:
        return False
    return status > 0  # any HTTP answer: the process is up (health may say degraded)


def _alive_running(s) -> None:
    if s["proc"].poll() is not None:
        raise AssertionError(f"make run exited with {s['proc'].returncode}:\n{s['log']()}")


#: one process of each kind: APIs, the exporter, a worker group (its dramatiq main), the
#: scheduler, the SMTP sink, Prometheus, Alertmanager and an external exporter
KILLED = ("sender", "exporter", "importer-worker", "scheduler", "smtp-sink", "prometheus", "alertmanager",
          "redis-exporter")


def test_each_kind_of_process_killed_comes_back_while_the_rest_keeps_running(running_stack):
    s = running_stack
    _alive_running(s)
    for name in KILLED:
        before = _sup_state(s)
        victim = before[name]["pid"]
        assert victim and _alive(victim), (name, before[name])
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()

        def back(name=name, victim=victim, starts=before[name]["starts"]):
            _alive_running(s)
            now = _sup_state(s)[name]
            return now["pid"] not in (None, victim) and now["starts"] == starts + 1 and _answers(s, name)

        wait_until(back, 45, interval=0.3, what=f"{name} restarted and answering after kill -9")
        took = time.monotonic() - t0
        after = _sup_state(s)
        # the others were neither stopped nor restarted, and still answer
        for other, info in before.items():
            if other == name:
                continue
            assert after[other]["pid"] == info["pid"] and after[other]["starts"] == info["starts"], (name, other)
            assert _alive(info["pid"]), f"{other} died when {name} was killed"
        for comp in console_stack.COMPONENTS:
            if comp.name != name:
                assert _answers(s, comp.name), f"{comp.name} stopped answering when {name} was killed"
        print(f"{name}: back {took:.1f} s after kill -9; nothing else restarted")
    out = s["log"](10**7)
    for name in KILLED:
        assert re.search(rf"{re.escape(name)} was killed by SIGKILL after [\d.]+ s; restarting in [\d.]+ s", out), name
    # and every target is scraped again
    prom = f"http://127.0.0.1:{s['ports']['MAILGENIUS_PROMETHEUS_PORT']}"
    wait_until(lambda: all(t["health"] == "up" for t in _targets(prom)) or None, 60, interval=1,
               what="every target up again")


def _slack_about(rec: Recorder, alertname: str, status: str, since: float) -> list[dict]:
    """Slack attachments about ``alertname`` in ``status`` received after ``since`` (monotonic)."""
    return [a for t, b in rec.timed() if t > since for a in b.get("attachments", [])
            if alertname in a.get("title", "") and a["title"].startswith(f"[{status}")]


def test_service_down_reaches_slack_while_a_crashed_api_cannot_come_back(running_stack, slack):
    s = running_stack
    _alive_running(s)
    port = int(s["ports"]["MAILGENIUS_SENDER_PORT"])
    victim = _sup_state(s)["sender"]["pid"]
    # When the sender API is killed and its port is taken before it can restart (a crash loop)
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def grab():
        try:
            holder.bind(("127.0.0.1", port))
        except OSError:
            return False
        holder.listen(1)
        return True

    try:
        wait_until(grab, 10, interval=0.02, what="the sender's port, before the sender restarts")
        # Then ServiceDown for the sender reaches Slack within the bound, and the rest runs on
        note = wait_until(lambda: [a for a in _slack_about(slack, "ServiceDown", "FIRING", t0) if "sender (" in a["text"]],
                          ALERT_WITHIN, interval=0.5, what="ServiceDown for sender on Slack")[0]
        t_fired = time.monotonic()
        took = t_fired - t0
        print(f"ServiceDown for sender on Slack {took:.1f} s after kill -9")
        assert took <= ALERT_WITHIN
        _alive_running(s)
        assert all(_answers(s, n) for n in ("importer", "exporter", "prometheus", "alertmanager"))
        # and the supervisor keeps retrying with a growing backoff, saying why
        wait_until(lambda: "sender exited with code 3" in s["log"](10**6), 30, what="the failed restart logged")
    finally:
        holder.close()
    # When the port is free again, the sender comes back on the next attempt (backoff <= 8 s here)
    wait_until(lambda: _health(f"http://127.0.0.1:{port}") == "healthy", 30, interval=0.5, what="sender healthy again")
    wait_until(lambda: [a for a in _slack_about(slack, "ServiceDown", "RESOLVED", t_fired) if "sender (" in a["text"]],
               ALERT_WITHIN, interval=0.5, what="ServiceDown resolved on Slack")
    assert note["color"] == "danger"


def _sink_messages(s) -> list[tuple[str, str]]:
    """(recipient, Message-ID) of the campaign messages in the sink (alert notifications go there
    too: skipped)."""
    out = []
    for path in (Path(s["env"]["MAILGENIUS_DATA_DIR"]) / "sink").glob("*.eml"):
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        to = str(msg["To"]).strip().lower()
        if to.endswith("@example.com"):
            out.append((to, str(msg["Message-ID"]).strip()))
    return out


def test_worker_killed_mid_campaign_is_replaced_and_every_lead_gets_one_message(running_stack):
    s = running_stack
    _alive_running(s)
    env = s["env"]
    client = syncredis.Redis.from_url(env["REDIS_URL"], decode_responses=True)
    key = workers_key(env["MAILGENIUS_REDIS_PREFIX"], "email-sending")

    def live() -> set[str]:
        return set(client.zrangebyscore(key, time.time() - STALE_AFTER, "+inf"))

    wait_until(lambda: len(live()) == 1, 30, what="one live send worker (MAILGENIUS_WORKER_PROCESSES=1)")
    before = {to for to, _ in _sink_messages(s)}
    leads = 400
    demo_env = {k: v for k, v in env.items() if not k.startswith("MAILGENIUS_") and k not in ("DATABASE_URL", "REDIS_URL", "BROKER_URL")}
    demo_env["MAILGENIUS_DATA_DIR"] = env["MAILGENIUS_DATA_DIR"]
    demo = subprocess.Popen([str(s["clone"] / ".venv/bin/mailgenius"), "demo", "--leads", str(leads), "--seed", "11",
                             "--timeout", "240"], cwd=s["clone"], env=demo_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        # When the campaign is sending, its worker process is killed with -9
        sink = Path(env["MAILGENIUS_DATA_DIR"]) / "sink"
        already = len(list(sink.glob("*.eml")))
        wait_until(lambda: len(list(sink.glob("*.eml"))) >= already + 20
                   or (demo.poll() is not None and pytest.fail(demo.stdout.read())), 120, interval=0.1,
                   what="the campaign sending")
        (member,) = live()
        pid = int(member.rsplit(":", 1)[1])
        os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        # Then the dead worker stops counting within 15 s, and a new worker process replaces it
        wait_until(lambda: member not in live(), 15, interval=0.2, what="the killed worker no longer counted live")
        dropped = time.monotonic() - t_kill
        replaced = wait_until(lambda: [m for m in live() if m != member], 60, interval=0.2, what="a new send worker")
        print(f"worker {pid} killed: uncounted after {dropped:.1f} s, replaced by {replaced} after "
              f"{time.monotonic() - t_kill:.1f} s")
        assert len(live()) == 1
        out, _ = demo.communicate(timeout=300)
    finally:
        if demo.poll() is None:
            demo.kill()
        client.close()
    assert demo.returncode == 0, out
    counts = dict((k, int(v)) for k, v in re.findall(r"(\w+) (\d+)", re.search(r"campaign counts now: (.*)", out).group(1)))
    assert counts["recipients"] == leads and counts["sent"] == leads and counts["failed"] == 0, counts
    # exactly once in the ledger (above: sent == leads, no failure), and at the relay every new
    # recipient got its message, and only that one: a repeat can only be the same message (same
    # Message-ID) sent again from the one window SMTP leaves open, the messages in flight at the
    # kill (the relay took them, their 250 was not read or written ahead to the worker's journal
    # yet: sender/journal.py), at most one per SMTP connection of the killed process; relays and
    # mailboxes deduplicating on Message-ID drop them
    messages = [(to, mid) for to, mid in _sink_messages(s) if to not in before]
    ids: dict[str, set[str]] = {}
    for to, mid in messages:
        ids.setdefault(to, set()).add(mid)
    assert len(ids) == leads, f"{len(ids)} of {leads} recipients got a message"
    different = {to: m for to, m in ids.items() if len(m) > 1}
    assert not different, f"recipients that got two different messages: {list(different.items())[:3]}"
    repeats = len(messages) - leads
    print(f"relay copies: {len(messages)} for {leads} recipients ({repeats} repeats of the same Message-ID from "
          f"the messages in flight at the kill; bound {SMTP_POOL} connections)")
    assert repeats <= SMTP_POOL, f"{repeats} repeats after one kill: more than the {SMTP_POOL} messages in flight"
    # status agrees: one live send worker again
    status = _cli(s, "status", "--json", only_data_dir=True)
    assert '"email-sending"' in status.stdout


# -- scheduler and logs -----------------------------------------------------------------------


def test_scheduled_backups_are_scraped_and_restorable(running_stack):
    s = running_stack
    prom = f"http://127.0.0.1:{s['ports']['MAILGENIUS_PROMETHEUS_PORT']}"

    def query(expr):
        return json.loads(http_get(prom + "/api/v1/query?" + urlencode({"query": expr}))[1])["data"]["result"]

    started = s["started_wall"]
    wait_until(lambda: query(f"mailgenius_backup_last_success_timestamp_seconds > {started}"), 90, interval=1,
               what="a scheduled backup scraped by Prometheus")
    wait_until(lambda: query('mailgenius_scheduled_task_last_success_timestamp_seconds{task="cleanup-uploads"}'
                             f' > {started}'), 60, interval=1, what="a scheduled clean-up scraped")
    duration = query('mailgenius_scheduled_task_duration_seconds{task="backup"}')
    assert duration and float(duration[0]["value"][1]) > 0
    assert query('mailgenius_scheduled_task_failures_total{task="backup"} == 0')
    backups = sorted((Path(s["env"]["MAILGENIUS_DATA_DIR"]) / "backups").glob("mailgenius-*.tar"))
    assert backups and all(p.stat().st_mode & 0o777 == 0o600 for p in backups)


def test_every_process_logs_json_lines_and_mailgenius_logs_reads_them(running_stack):
    s = running_stack
    log_dir = Path(s["env"]["MAILGENIUS_DATA_DIR"]) / "log"
    names = {p.name for p in log_dir.glob("*.log")}
    procfile = (s["clone"] / "Procfile").read_text()
    expected = {line.split(":", 1)[0] + ".log" for line in procfile.splitlines() if line and not line.startswith("#")}
    assert expected | {"supervisor.log"} <= names, names
    for path in log_dir.glob("*.log"):
        for line in path.read_text().splitlines():
            obj = json.loads(line)  # every line is one JSON object
            assert {"ts", "level", "service", "message"} <= obj.keys(), (path.name, line)
    res = _cli(s, "logs", "--service", "supervisor", "--level", "error", "--lines", "0", "--json", only_data_dir=True)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    assert lines and all(x["level"] in ("error", "critical") for x in lines)
    assert any("sender was killed by SIGKILL" in x["message"] for x in lines)
    res = _cli(s, "logs", "--service", "sender", "--lines", "5", only_data_dir=True)
    assert res.returncode == 0 and 0 < len(res.stdout.splitlines()) <= 5 + res.stdout.count("\nTraceback")


def test_ctrl_c_stops_everything(running_stack):
    s = running_stack
    proc = s["proc"]
    assert proc.poll() is None, s["log"]()
    below = descendants(proc.pid)
    assert len(below) >= len(console_stack.COMPONENTS)
    # Ctrl-C in a terminal: SIGINT to the foreground process group (make, and the supervisor under it)
    stopped_at = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(STOP_TIMEOUT + 15)
    took = time.monotonic() - stopped_at
    # the supervisor's own bound, plus the start of make and the last kills
    assert took <= STOP_TIMEOUT + 5, f"Ctrl-C took {took:.1f} s (MAILGENIUS_STOP_TIMEOUT={STOP_TIMEOUT})"
    listening = []
    for comp in console_stack.COMPONENTS:
        port = int(s["ports"][comp.env])
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                listening.append(comp.name)
    assert not listening, f"still listening after Ctrl-C: {listening}\n{s['log']()}"
    left = {p for p in below if _alive(p)}
    assert not left, f"processes left after Ctrl-C: {left}"
    out = s["log"](10**7)
    assert "SIGINT received" in out
    print(f"Ctrl-C: everything stopped in {took:.1f} s")
