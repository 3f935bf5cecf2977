"""The ``mailgenius`` command: migrate, API keys, services, workers, and the commands each
package registers (``COMMAND_MODULES``: a module with ``register(subparsers)``)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import importlib
import os
import shutil
import sys

from .settings import SettingsError, load_settings

#: packages that add subcommands; a module not written yet is skipped
COMMAND_MODULES = ("importer.cli", "sender.cli", "exporter.cli", "alerting.cli", "dashboards.cli", "mailgenius.ops",
                   "console.cli")

#: service -> (settings attribute of its port, its environment variable)
SERVICES = {
    "sender": ("sender_port", "MAILGENIUS_SENDER_PORT"),
    "importer": ("importer_port", "MAILGENIUS_IMPORTER_PORT"),
    "exporter": ("exporter_port", "MAILGENIUS_EXPORTER_PORT"),
}
#: worker group -> (actor module, queue, metrics port attribute, its environment variable)
WORKERS = {
    "sender": ("sender.actors", "email-sending", "sender_worker_metrics_port", "MAILGENIUS_SENDER_WORKER_METRICS_PORT"),
    "importer": ("importer.actors", "lead-import", "importer_worker_metrics_port", "MAILGENIUS_IMPORTER_WORKER_METRICS_PORT"),
}


def _settings():
    try:
        return load_settings()
    except SettingsError as exc:
        print(f"mailgenius: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_migrate(args) -> int:
    from .db import ensure_database, migrate

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

    from . import auth

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


def cmd_serve(args) -> int:
    from aiohttp import web

    from .logs import setup_logging

    settings = _settings()
    port_attr, env_name = SERVICES[args.service]
    port = args.port or getattr(settings, port_attr)
    setup_logging(args.service, settings.log_level)
    from .logstream import attach_log_stream

    attach_log_stream(settings, args.service)  # WARNING+ to the capped Redis stream
    module = importlib.import_module(f"{args.service}.app")
    app = module.create_app(settings)
    try:
        web.run_app(app, host=settings.host, port=port, print=None, access_log=None,
                    handle_signals=True, shutdown_timeout=10)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(f"mailgenius: {args.service}: port {port} is already in use (set {env_name})", file=sys.stderr)
            return 3
        raise
    return 0


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


#: generators run by `mailgenius build`: module exposing build(root: Path, check: bool) -> list[Path]
#: rendered in this order: deploy.k8s reads the rules and dashboards the others wrote
GENERATORS = ("alerting.generate", "dashboards.generate", "mailgenius.catalogue", "deploy.k8s")


def cmd_build(args) -> int:
    """Render every generated artefact (rules, alertmanager.yml, dashboards JSON, provisioning).

    With --check nothing is written; the exit code is 1 when a file would change."""
    from pathlib import Path

    root = Path(args.root).resolve()
    # a root with its own alerting/rules.yml builds from it: the alerts and every other reader of
    # the contract (dashboards...) follow its thresholds and selectors
    from . import contract

    if not os.environ.get(contract.ENV) and (root / "alerting" / "rules.yml").is_file():
        os.environ[contract.ENV] = str(root / "alerting" / "rules.yml")
    changed: list[Path] = []
    for name in GENERATORS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
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


def version() -> str:
    """The installed distribution's version (pyproject.toml ``version``)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("mailgenius-monitor")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailgenius", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mailgenius {version()}")
    sub = parser.add_subparsers(dest="command", required=True)

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

    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name in (name, name.rsplit(".", 1)[0]):
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except SettingsError as exc:
        print(f"mailgenius: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except (ConnectionError, OSError) as exc:
        print(f"mailgenius: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
