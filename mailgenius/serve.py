"""Run one HTTP service in the foreground: what ``mailgenius serve NAME`` and each service's
``python -m NAME`` share. The service hands in its own ``create_app``; the kernel never looks a
service up. :func:`run_command` maps the errors every command shares (configuration,
connection, Ctrl-C) to exit codes, for the services and the ``mailgenius`` command alike."""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable

from .components import SERVICES
from .logs import setup_logging
from .logstream import attach_log_stream
from .settings import Settings, SettingsError, settings_or_exit


def run_service(service: str, create_app: Callable[[Settings], object], *, port: int | None = None,
                settings: Settings | None = None) -> int:
    """Serve ``create_app(settings)`` on ``port`` (default: the service's MAILGENIUS_*_PORT);
    exit code 3 with the variable to change when the port is taken."""
    from aiohttp import web

    settings = settings or settings_or_exit()
    port_attr, env_name = SERVICES[service]
    port = port or getattr(settings, port_attr)
    setup_logging(service, settings.log_level)
    attach_log_stream(settings, service)  # WARNING+ to the capped Redis stream
    app = create_app(settings)
    try:
        web.run_app(app, host=settings.host, port=port, print=None, access_log=None,
                    handle_signals=True, shutdown_timeout=10)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(f"mailgenius: {service}: port {port} is already in use (set {env_name})", file=sys.stderr)
            return 3
        raise
    return 0


def service_main(service: str, create_app: Callable[[Settings], object], argv: list[str] | None = None) -> int:
    """``python -m <service> [--port N]``: the same as ``mailgenius serve <service>``."""
    parser = argparse.ArgumentParser(prog=f"python -m {service}", description=f"run the {service} service",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--port", type=int, default=None,
                        help="listen port (default: the service's MAILGENIUS_*_PORT); change it when the port is taken")
    args = parser.parse_args(argv)
    return run_command(lambda: run_service(service, create_app, port=args.port))


def run_command(command: Callable[[], int | None]) -> int:
    """Run a command and map the errors every command shares to its exit code, with one line on
    stderr and no traceback: a configuration error 2 (the message names the variable), Ctrl-C
    130, an unreachable dependency or another OS error 1. ``mailgenius`` (console/commands.py)
    and each service's ``python -m NAME`` exit through this one mapping."""
    try:
        return command() or 0
    except SettingsError as exc:
        print(f"mailgenius: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except (ConnectionError, OSError) as exc:
        print(f"mailgenius: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
