"""The ``mailgenius`` command. Every command group is listed here with a plain import:

* the stack's own commands (migrate, apikey, serve, worker, build, the sender's sink): :mod:`console.basics`
* the exporter's (queue, incidents...): :mod:`exporter.cli`
* the alerting and dashboards tools': :mod:`alerting.cli`, :mod:`dashboards.cli`
* the operator tools' (stack-prepare, status, check, demo, report, maintenance, backup, restore,
  scheduler, logs): :mod:`console.cli`

(The importer and the sender have no subcommands of their own besides ``serve``/``worker``/``sink``.)
"""

from __future__ import annotations

import argparse
import sys

from alerting import cli as alerting_cli
from dashboards import cli as dashboards_cli
from exporter import cli as exporter_cli
from mailgenius.serve import run_command

from . import basics
from . import cli as console_cli

DESCRIPTION = ("The mailgenius command: migrate, API keys, services, workers, build, and the commands of the "
               "exporter, the alerting and dashboards tools and the operator console.")
#: every command group, in the order ``mailgenius --help`` lists them
COMMAND_GROUPS = (basics.register, exporter_cli.register, alerting_cli.register, dashboards_cli.register,
                  console_cli.register)


def version() -> str:
    """The installed distribution's version (pyproject.toml ``version``)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("mailgenius-monitor")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailgenius", description=DESCRIPTION,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mailgenius {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in COMMAND_GROUPS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # the exit codes of configuration, connection and OS errors: the kernel's one mapping
    return run_command(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
