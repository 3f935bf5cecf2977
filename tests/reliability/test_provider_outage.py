"""The email provider failing (HTTP 500 on every call) for a sustained period mid-campaign, with
the real worker, the real Prometheus and the generated rules:

* the sender keeps retrying: a few quick attempts per delivery, then the batch goes back to
  dramatiq and is redelivered with growing delays; recipients stay ``sending`` (nothing failed,
  the retry budget is far from used up);
* every failed call is counted once in ``mailgenius_provider_errors_total`` and Prometheus,
  scraping the worker, sees ``EmailProviderFailing`` FIRING during the outage;
* once the provider is back the campaign completes (every lead mailed exactly once, nothing
  failed, campaign ``sent``) and the alert resolves.

"Several minutes" is scaled down to PROVIDER_OUTAGE seconds (default 15; env
MAILGENIUS_TEST_PROVIDER_OUTAGE); the worker's redelivery delays are shortened with the
sender's env knobs, and the rules' ``for:`` to 2 s (as the alerting end-to-end test does) — the
expressions, windows and thresholds are the committed ones. The figures (outage start -> alert
firing, recovery -> campaign sent, recovery -> alert resolved, counts) are printed (pytest -s).
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import aiohttp
import pytest

from alerting import generate
from tests.conftest import bearer
from tests.reliability.sender_stack import add_leads, poll, send_campaign, sender_stack

pytestmark = pytest.mark.slow

PROVIDER_OUTAGE = float(os.environ.get("MAILGENIUS_TEST_PROVIDER_OUTAGE", "15"))
N_LEADS = 500
ALERT = "EmailProviderFailing"


async def worker_samples(session: aiohttp.ClientSession, stack, name: str) -> dict[tuple, float]:
    """Samples of one metric on the sender worker's metrics page, by sorted label items."""
    from prometheus_client.parser import text_string_to_metric_families

    async with session.get(stack.url("sender-worker") + "/") as resp:
        text = await resp.text()
    return {tuple(sorted(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name}


async def alert_state(session: aiohttp.ClientSession, stack) -> str | None:
    """State of EmailProviderFailing{provider="resend"} in Prometheus (/api/v1/alerts)."""
    async with session.get(stack.url("prometheus") + "/api/v1/alerts") as resp:
        body = json.loads(await resp.text())
    states = [a["state"] for a in body["data"]["alerts"]
              if a["labels"].get("alertname") == ALERT and a["labels"].get("provider") == "resend"]
    return states[0] if states else None


async def test_provider_outage_fires_the_alert_and_the_campaign_completes_exactly_once(
        settings, pool, make_key, tmp_path):
    from sender.testing import start_fake

    fake, runner, url = await start_fake(api_key="re_test")
    try:
        # Given the sender, its worker (short redelivery delays, the default 900 s retry budget)
        # and Prometheus scraping them every second with the generated rules
        with sender_stack(settings.replace(email_provider="resend", resend_base_url=url, resend_api_key="re_test"),
                          tmp_path, threads=2, MAILGENIUS_SENDER_BACKOFF_BASE="0.2",
                          MAILGENIUS_SENDER_MAX_ATTEMPTS="2", MAILGENIUS_SENDER_REDELIVERY_MIN="0.5",
                          MAILGENIUS_SENDER_REDELIVERY_MAX="3", MAILGENIUS_LOG_LEVEL="warning") as stack:
            key = await make_key("send", "read")
            jobs = {job: [target] for job, target in stack.scrape_jobs().items()}
            variant = generate.local_variant(targets=jobs, scrape_interval="1s", evaluation_interval="1s",
                                             for_override="2s")
            paths = generate.render_to(stack.tmp / "configs", variant)
            await asyncio.to_thread(stack.start_prometheus, paths["prometheus"])
            await asyncio.to_thread(stack.wait_targets_up, 30)
            await add_leads(pool, N_LEADS, "prov", "p")
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
                h = bearer(key)
                # When the provider answers 500 to every call for the whole outage, mid-campaign
                fake.script = [{"status": 500, "message": "provider outage"}] * 100_000
                outage_start = time.monotonic()
                cid = await send_campaign(stack, s, h, "provider outage", "prov")

                # Then Prometheus sees EmailProviderFailing firing while it lasts
                async def firing():
                    return await alert_state(s, stack) == "firing"

                await poll(firing, PROVIDER_OUTAGE + 30, f"{ALERT} firing\n{stack.log('sender-worker')}",
                           interval=0.5)
                t_fire = time.monotonic() - outage_start
                while time.monotonic() - outage_start < PROVIDER_OUTAGE:
                    await asyncio.sleep(0.5)
                # ...the sender kept retrying, handing batches back, and nothing failed
                refused = fake.stats()["statuses"].get(500, 0)
                assert refused >= 10, f"the sender did not keep retrying: {fake.stats()}"
                c = await (await s.get(stack.url("sender") + f"/api/campaigns/{cid}", headers=h)).json()
                assert c["sent"] == 0 and c["failed"] == 0 and c["status"] == "sending", c
                rows = await pool.fetchrow(
                    """SELECT count(*) FILTER (WHERE status = 'sending' AND retry_since IS NOT NULL) AS retrying,
                              count(*) FILTER (WHERE status = 'failed') AS failed
                       FROM messages WHERE campaign_id = $1""", cid)
                assert rows["failed"] == 0 and rows["retrying"] > 0, dict(rows)

                # When the provider is back
                fake.script.clear()
                t_recover = time.monotonic()

                # Then the campaign completes: all sent, exactly once, nothing failed
                async def finished():
                    c = await (await s.get(stack.url("sender") + f"/api/campaigns/{cid}", headers=h)).json()
                    return c if c["status"] in ("sent", "failed", "cancelled") else None

                c = await poll(finished, 60, f"campaign finished\n{stack.log('sender-worker')}", interval=0.5)
                t_sent = time.monotonic() - t_recover
                st = fake.stats()
                assert c["status"] == "sent" and c["sent"] == N_LEADS and c["failed"] == 0, c
                assert st["unique_recipients"] == N_LEADS and st["duplicates"] == 0, st

                # ...every refused call was counted once, as a server error of resend
                errors = await worker_samples(s, stack, "mailgenius_provider_errors_total")
                assert errors[(("provider", "resend"), ("reason", "server_error"))] == st["statuses"][500], (errors, st)
                assert sum(errors.values()) == st["statuses"][500], errors

                # ...and the alert resolves (no error in the last minute)
                async def resolved():
                    return await alert_state(s, stack) is None

                await poll(resolved, 90, f"{ALERT} resolved", interval=0.5)
                t_resolved = time.monotonic() - t_recover
            print(f"\nprovider outage {PROVIDER_OUTAGE:g} s, {N_LEADS} leads, {st['statuses'][500]} refused calls: "
                  f"{ALERT} firing {t_fire:.1f} s after the outage began; after recovery the campaign was sent in "
                  f"{t_sent:.1f} s and the alert resolved in {t_resolved:.1f} s; total "
                  f"{time.monotonic() - outage_start:.1f} s; sent {c['sent']}, failed {c['failed']}, "
                  f"duplicates {st['duplicates']}")
    finally:
        await runner.cleanup()
