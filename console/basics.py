"""The stack's own commands: migrate, API keys, serve a service, run a worker group, build the
generated files, and the sender's local SMTP sink. Every service and generator is named here
with a plain import (taken when its command runs, so a role without the build or sink extras
still starts)."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys

from mailgenius.components import SERVICES, WORKERS
from mailgenius.serve import run_service
from mailgenius.settings import settings_or_exit as _settings


def cmd_migrate(args) -> int:
    from mailgenius.db import ensure_database, migrate

    settings = _settings()

    async def run():
        created = await ensure_database(settings.database_url)
        applied = await migrate(settings.database_url)
        return created, applied

    created, applied = asyncio.run(run())
    if created:
        print("created database")
    print(f"migrations applied: {len(applied)}" + (f" ({', '.join(map(str, applied))})" if applied else " (up to date)"))
    return 0


def cmd_apikey(args) -> int:
    import asyncpg

    from mailgenius import auth

    settings = _settings()

    async def run():
        conn = await asyncpg.connect(settings.database_url)
        try:
            if args.action == "create":
                try:
                    scopes = auth.parse_scopes(args.scopes)
                except ValueError as exc:
                    print(f"mailgenius: {exc}", file=sys.stderr)
                    return 2
                key_id, key = await auth.create_key(conn, scopes, args.name)
                print(f"created API key {key_id} with scopes {','.join(scopes)}; it is shown once:")
                print(key)
                return 0
            if args.action == "revoke":
                ok = await auth.revoke_key(conn, args.key)
                print("revoked" if ok else "no such active key")
                return 0 if ok else 1
            rows = await conn.fetch("SELECT id, prefix, name, scopes, created_at, revoked_at FROM api_keys ORDER BY id")
            for r in rows:
                state = "revoked" if r["revoked_at"] else "active"
                print(f"{r['id']}\tmg_{r['prefix']}_…\t{','.join(r['scopes'])}\t{state}\t{r['name']}")
            return 0
        finally:
            await conn.close()

    return asyncio.run(run())


def _create_app(service: str):
    """The service's ``create_app`` (imported when that service is served)."""
    if service == "sender":
        from sender.app import create_app
    elif service == "importer":
        from importer.app import create_app
    elif service == "exporter":
        from exporter.app import create_app
    else:
        raise ValueError(f"unknown service {service!r}")
    return create_app


def cmd_serve(args) -> int:
    return run_service(args.service, _create_app(args.service), port=args.port, settings=_settings())


def cmd_worker(args) -> int:
    settings = _settings()
    module, queue, port_attr, _env = WORKERS[args.service]
    prom_dir = os.path.abspath(os.path.join(settings.data_dir, "prometheus", f"{args.service}-worker"))
    shutil.rmtree(prom_dir, ignore_errors=True)
    os.makedirs(prom_dir, exist_ok=True)
    env = dict(os.environ)
    env.update({
        "MAILGENIUS_WORKER": "1",
        "PROMETHEUS_MULTIPROC_DIR": prom_dir,
        "prometheus_multiproc_dir": prom_dir,
        "dramatiq_prom_db": prom_dir,
        "dramatiq_prom_port": str(args.metrics_port or getattr(settings, port_attr)),
        "dramatiq_prom_host": settings.host,
        "PROMETHEUS_DISABLE_CREATED_SERIES": "True",
    })
    dramatiq = shutil.which("dramatiq", path=os.path.dirname(sys.executable)) or shutil.which("dramatiq")
    argv = [dramatiq, module, "--queues", queue, "--processes", str(args.processes),
            "--threads", str(args.threads)]
    os.execve(argv[0], argv, env)
    return 0  # not reached


def _generators():
    """What `mailgenius build` renders, in this order: deploy.k8s reads the rules and dashboards
    the others wrote. Each module exposes ``build(root: Path, check: bool) -> list[Path]``."""
    from alerting import generate as alerting_generate
    from dashboards import generate as dashboards_generate
    from deploy import k8s
    from mailgenius import catalogue

    return (alerting_generate, dashboards_generate, catalogue, k8s)


def cmd_build(args) -> int:
    """Render every generated artefact (rules, alertmanager.yml, dashboards JSON, provisioning).

    With --check nothing is written; the exit code is 1 when a file would change."""
    from pathlib import Path

    from mailgenius import contract

    root = Path(args.root).resolve()
    # a root with its own alerting/rules.yml builds from it: the alerts and every other reader of
    # the contract (dashboards...) follow its thresholds and selectors
    if not os.environ.get(contract.ENV) and (root / "alerting" / "rules.yml").is_file():
        os.environ[contract.ENV] = str(root / "alerting" / "rules.yml")
    changed: list[Path] = []
    for mod in _generators():
        changed += mod.build(root, check=args.check)
    for path in changed:
        print(("would change: " if args.check else "wrote: ") + str(path.relative_to(root)))
    if args.check and changed:
        return 1
    print("generated files are up to date" if not changed else f"{len(changed)} file(s) written")
    return 0


def cmd_sink(args) -> int:
    from sender.sink import run_sink

    settings = _settings()
    return run_sink(settings)


def register(sub) -> None:
    p = sub.add_parser("migrate", help="create the database if needed and apply SQL migrations")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("apikey", help="create, revoke or list API keys")
    p.add_argument("action", choices=("create", "revoke", "list"))
    p.add_argument("key", nargs="?", help="revoke: the key, its prefix or its id")
    p.add_argument("--scopes", default="read",
                   help="comma-separated scopes (read, send, import, admin); writes need their area's scope")
    p.add_argument("--name", default="", help="a label to recognise the key by in listings")
    p.set_defaults(func=cmd_apikey)

    p = sub.add_parser("serve", help="run one HTTP service in the foreground",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("service", choices=sorted(SERVICES))
    p.add_argument("--port", type=int, default=None,
                   help="listen port (default: the service's MAILGENIUS_*_PORT); change it when the port is taken")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run a dramatiq worker group in the foreground",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("service", choices=sorted(WORKERS))
    p.add_argument("--processes", type=int, default=2,
                   help="worker processes; raise on hosts with more cores")
    p.add_argument("--threads", type=int, default=4,
                   help="threads per process; async actors share one event loop per process")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="dramatiq Prometheus exposition port (default 9191 sender, 9192 importer)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("build", help="render Prometheus rules, alertmanager.yml and dashboards",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 when a generated file is out of date (CI uses this)")
    p.add_argument("--root", default=".", help="repository root to write into")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("sink", help="run the local SMTP sink (the default provider's relay)")
    p.set_defaults(func=cmd_sink)

