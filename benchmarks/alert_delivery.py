"""Alert delivery latency through the real Prometheus and Alertmanager, with the generated
rules and routing (test timings: 1 s scrape and evaluation, `for:` 2 s, group_wait 1 s).

Each round stops a scrape target (the node exporter: no database needed), measures the time until
the ServiceDown notification reaches the email (a local SMTP sink), Slack and PagerDuty receivers,
then restarts it and measures the time until the resolution reached all three. Prints the figures
and their ratio to the configured waits (for 2 s + group_wait / group_interval 1 s; the 1 s scrape
and evaluation ticks overlap them, so a round can come in slightly under).

Measured (2 cores, load ~5, 5 rounds): firing median 2.99 s, max 4.18 s; resolution median
0.80 s, max 1.77 s.

    .venv/bin/python benchmarks/alert_delivery.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from alerting import generate  # noqa: E402
from mailgenius.settings import load_settings  # noqa: E402
from sender.sink import start_sink  # noqa: E402
from tests.alerting.receivers import Recorder  # noqa: E402
from tests.stack import Stack, free_port, wait_until  # noqa: E402

#: the configured waits before a notification leaves: for (2 s) + group_wait/group_interval (1 s)
CONFIGURED_WAIT_SECONDS = 3.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="stop/start cycles; more gives steadier figures")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="alert-delivery-"))
    stack = Stack(load_settings(os.environ), tmp)
    smtp_port = free_port()
    controller, mailbox = start_sink("127.0.0.1", smtp_port, None)
    with Recorder() as slack, Recorder(status=202) as pagerduty, Recorder() as deadman:
        try:
            stack.start_exporters(("node",))
            secrets = tmp / "secrets"
            secrets.mkdir()
            (secrets / "slack_api_url").write_text(f"{slack.url}/services/bench")
            (secrets / "pagerduty_routing_key").write_text("b" * 32)
            (secrets / "alert_webhook_token").write_text("bench-alert-webhook-token-0123456789")
            variant = generate.local_variant(
                ports={"alertmanager": stack.ports["alertmanager"], "smtp": smtp_port, "exporter": deadman.port},
                targets={"node": [stack.target("node-exporter")]}, scrape_interval="1s", evaluation_interval="1s",
                group_wait="1s", group_interval="1s", for_override="2s", secrets_dir=str(secrets),
                pagerduty_url=f"{pagerduty.url}/v2/enqueue", watchdog_url=f"{deadman.url}/ping")
            paths = generate.render_to(tmp / "configs", variant)
            stack.start_alertmanager(paths["alertmanager"])
            stack.start_prometheus(paths["prometheus"], extra_args=("--rules.alert.resend-delay=1s",))
            stack.wait_targets_up(30)

            def count(status: str) -> tuple[int, int, int]:
                mails = sum(1 for _f, _t, data in mailbox.messages
                            if b"ServiceDown" in data and f"Subject: [{status}".encode() in data)
                slacks = sum(1 for b in slack.bodies() for a in b.get("attachments", [])
                             if "ServiceDown" in a.get("title", "") and a["title"].startswith(f"[{status}"))
                action = "trigger" if status == "FIRING" else "resolve"
                pages = sum(1 for b in pagerduty.bodies() if b.get("event_action") == action)
                return mails, slacks, pages

            fire, resolve = [], []
            for i in range(args.rounds):
                before = count("FIRING")
                stack.stop("node-exporter")
                t0 = time.monotonic()
                wait_until(lambda b=before: all(n > m for n, m in zip(count("FIRING"), b, strict=True)), 60,
                           interval=0.05, what="ServiceDown on email, Slack and PagerDuty")
                fire.append(time.monotonic() - t0)
                before = count("RESOLVED")
                stack.start_exporters(("node",))
                t0 = time.monotonic()
                wait_until(lambda b=before: all(n > m for n, m in zip(count("RESOLVED"), b, strict=True)), 60,
                           interval=0.05, what="ServiceDown resolved on email, Slack and PagerDuty")
                resolve.append(time.monotonic() - t0)
                print(f"round {i + 1}: firing delivered in {fire[-1]:.2f} s, resolution in {resolve[-1]:.2f} s", flush=True)
        finally:
            stack.stop_all()
            controller.stop()

    print(f"\nServiceDown -> email + Slack + PagerDuty, {args.rounds} rounds (load {os.getloadavg()[0]:.1f}):")
    print(f"  firing:     median {statistics.median(fire):.2f} s, max {max(fire):.2f} s "
          f"(configured waits {CONFIGURED_WAIT_SECONDS:.0f} s = for 2 s + group wait 1 s; median/waits {statistics.median(fire) / CONFIGURED_WAIT_SECONDS:.2f})")
    print(f"  resolution: median {statistics.median(resolve):.2f} s, max {max(resolve):.2f} s")
    print("  production timings add the real for: (ServiceDown 1 m), group_wait 30 s and 5 s scrapes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
