"""``mailgenius alerting``: write Alertmanager's secret files, render configs elsewhere."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mailgenius.secretfiles import write_secret

#: secret file -> environment variable it is read from
SECRETS = {
    "slack_api_url": "MAILGENIUS_SLACK_WEBHOOK_URL",
    "pagerduty_routing_key": "MAILGENIUS_PAGERDUTY_ROUTING_KEY",
    "smtp_password": "MAILGENIUS_ALERT_SMTP_PASSWORD",
    # the exporter checks the same variable when it is set
    "alert_webhook_token": "MAILGENIUS_ALERT_WEBHOOK_TOKEN",
}


def write_secrets(directory: Path, environ=None) -> dict[str, str]:
    """Write each secret present in the environment to ``directory/<name>`` (mode 0600).

    Returns name -> "written" | "kept" (file already there, variable unset) | "missing"."""
    env = os.environ if environ is None else environ
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    status = {}
    for name, var in SECRETS.items():
        path = directory / name
        value = (env.get(var) or "").strip()
        if value:
            write_secret(path, value)  # mode 0600 from creation, atomically replaced
            status[name] = "written"
        else:
            status[name] = "kept" if path.exists() else "missing"
    return status


def cmd_secrets(args) -> int:
    status = write_secrets(Path(args.dir))
    for name, state in status.items():
        note = {"written": "written from $" + SECRETS[name],
                "kept": "kept (file exists, $" + SECRETS[name] + " unset)",
                "missing": "MISSING: set $" + SECRETS[name] + " or that channel's notifications fail"}[state]
        if name == "smtp_password" and state == "missing":
            note = "not set (needed only with channels.email.auth_username in alerting/rules.yml)"
        if name == "alert_webhook_token" and state == "missing":
            note = "not set here (`mailgenius stack-prepare` generates it; the exporter refuses the webhook without it)"
        print(f"{Path(args.dir) / name}: {note}")
    return 0


def cmd_render(args) -> int:
    from . import generate

    ports = {}
    for item in args.port:
        job, _, port = item.partition("=")
        if job not in {*generate.LOCAL_PORTS, "smtp"} or not port.isdigit():
            print(f"mailgenius: --port expects JOB=PORT with JOB one of "
                  f"{', '.join(sorted({*generate.LOCAL_PORTS, 'smtp'}))}; got {item!r}", file=sys.stderr)
            return 2
        ports[job] = int(port)
    variant = generate.local_variant(host=args.host, ports=ports, scrape_interval=args.interval,
                                     evaluation_interval=args.interval, secrets_dir=os.path.abspath(args.secrets_dir),
                                     pagerduty_url=args.pagerduty_url)
    paths = generate.render_to(Path(args.out), variant)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("alerting", help="Alertmanager secrets and config rendering",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    asub = p.add_subparsers(dest="alerting_command", required=True)

    s = asub.add_parser("secrets", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        help="write Slack / PagerDuty / SMTP secrets from the environment into files "
                             "Alertmanager reads at send time")
    s.add_argument("--dir", default="var/secrets",
                   help="where alertmanager.yml expects them (compose: /etc/alertmanager/secrets)")
    s.set_defaults(func=cmd_secrets)

    r = asub.add_parser("render", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        help="render prometheus.yml, rules and alertmanager.yml with moved ports into a directory")
    r.add_argument("--out", required=True, help="output directory (gets prometheus/ and alertmanager/)")
    r.add_argument("--port", action="append", default=[], metavar="JOB=PORT",
                   help="move one scrape job (or smtp) to another port; repeat as needed")
    r.add_argument("--host", default="127.0.0.1", help="host of every target")
    r.add_argument("--interval", default="5s", help="scrape and evaluation interval; tests use 1s")
    r.add_argument("--secrets-dir", default="var/secrets",
                   help="directory of the secret files (made absolute in the output)")
    r.add_argument("--pagerduty-url", default="",
                   help="PagerDuty Events API v2 URL (empty: rules.yml, else PagerDuty's own); e.g. a local test receiver")
    r.set_defaults(func=cmd_render)
