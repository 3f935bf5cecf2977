"""Metric hygiene under data volume, on the real running stack (services, workers, SMTP sink):

after an import of 10,000 leads and a campaign to all of them, no label value on any /metrics
page (sender, importer, exporter, both workers) holds an ``@`` (no email address leaks into a
series), and the number of series is the same as after the same steps with 10 leads — data
volume never creates series. The only per-entity label, ``campaign`` on
``mailgenius_campaign_messages``, is bounded (recent campaigns only) and holds ids, not names.
"""

from __future__ import annotations

import asyncio
import io
import time
import urllib.request

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import bearer
from tests.reliability.conftest import _stack_class

pytestmark = pytest.mark.slow

PAGES = ("sender", "importer", "exporter", "sender-worker", "importer-worker")
#: exporter setting bounding the campaign label (settings.exporter.campaign_limit default)
CAMPAIGN_LIMIT = 20


def scrape(stack) -> dict[str, list[tuple[str, dict]]]:
    out = {}
    for name in PAGES:
        path = "/" if name.endswith("-worker") else "/metrics"
        with urllib.request.urlopen(stack.url(name) + path, timeout=10) as resp:
            text = resp.read().decode()
        out[name] = [(s.name, s.labels) for fam in text_string_to_metric_families(text) for s in fam.samples]
    return out


def without_campaign_label(samples):
    return {(n, tuple(sorted(lbl.items()))) for n, lbl in samples if "campaign" not in lbl}


async def run_round(stack, pool, key, tag: str, n: int) -> int:
    """Import ``n`` leads tagged ``tag`` through the API, then mail them all; returns the campaign id."""
    csv = "email,first_name\n" + "".join(f"{tag}{i}@example.com,Person{i}\n" for i in range(n))
    async with aiohttp.ClientSession() as s:
        form = aiohttp.FormData()
        form.add_field("file", io.BytesIO(csv.encode()), filename=f"{tag}.csv", content_type="text/csv")
        form.add_field("tags", tag)
        r = await s.post(stack.url("importer") + "/api/upload", data=form, headers=bearer(key))
        assert r.status == 202, await r.text()
        import_id = (await r.json())["id"]
        end = time.monotonic() + 90
        while (st := await pool.fetchval("SELECT status FROM imports WHERE id = $1", import_id)) not in ("completed", "failed"):
            assert time.monotonic() < end, "import did not finish\n" + stack.log("importer-worker")
            await asyncio.sleep(0.3)
        assert st == "completed"
        assert await pool.fetchval("SELECT count(*) FROM leads WHERE $1 = ANY(tags)", tag) == n
        r = await s.post(stack.url("sender") + "/api/campaigns", headers=bearer(key), json={
            "name": f"volume {tag}", "subject": "Hi {{ lead.first_name }}", "from_email": "news@example.com",
            "html": '<p>Hello {{ lead.first_name }} <a href="https://example.com/x">x</a></p>', "text": "Hello",
            "segment": {"tags": [tag]}})
        assert r.status == 201, await r.text()
        cid = (await r.json())["id"]
        assert (await s.post(stack.url("sender") + f"/api/campaigns/{cid}/send", headers=bearer(key))).status == 202
        end = time.monotonic() + 150
        while True:
            c = await (await s.get(stack.url("sender") + f"/api/campaigns/{cid}", headers=bearer(key))).json()
            if c["status"] in ("sent", "failed", "cancelled"):
                break
            assert time.monotonic() < end, f"campaign stuck: {c}\n" + stack.log("sender-worker")
            await asyncio.sleep(0.5)
        assert c["status"] == "sent" and c["sent"] == n, c
        # the same reads in every round, so the same route series exist
        for base, path in (("sender", f"/api/campaigns/{cid}"), ("importer", f"/api/imports/{import_id}"),
                           ("exporter", "/api/health"), ("sender", "/api/health"), ("importer", "/api/health")):
            await s.get(stack.url(base) + path, headers=bearer(key))
    return cid


async def test_no_address_in_labels_and_series_independent_of_volume(settings, pool, make_key, tmp_path):
    from sender.testing import start_fake

    # the provider: the repo's fake Resend (batch API, in this process), so 10,000 emails take
    # seconds rather than the minutes the SMTP sink needs on a shared 2-core machine
    fake, runner, url = await start_fake(api_key="re_test")
    stack = _stack_class()(settings.replace(email_provider="resend", resend_base_url=url,
                                            resend_api_key="re_test"), tmp_path)
    try:
        key = await make_key("send", "import", "read")
        for svc in ("sender", "importer", "exporter"):
            stack.start_service(svc, MAILGENIUS_EXPORTER_REFRESH_SECONDS="0.5")
        stack.start_worker("sender", threads=4)
        stack.start_worker("importer")
        # Given one small round (10 leads) and its series
        await run_round(stack, pool, key, "small", 10)
        await asyncio.sleep(1.5)  # an exporter refresh
        small = scrape(stack)
        # When a round with 10,000 leads runs
        await run_round(stack, pool, key, "big", 10_000)
        await asyncio.sleep(1.5)
        big = scrape(stack)
        assert sum(fake.counts.values()) == 10_010 and max(fake.counts.values()) == 1
    finally:
        stack.stop_all()
        await runner.cleanup()
    # Then no label value anywhere holds an address
    leaks = [(page, n, lbl) for page, samples in big.items() for n, lbl in samples
             if any("@" in v for v in lbl.values())]
    assert not leaks, f"email addresses in labels: {leaks[:5]}"
    # And data volume created no series (the per-campaign gauge aside, checked separately)
    for page in PAGES:
        a, b = without_campaign_label(small[page]), without_campaign_label(big[page])
        assert b == a, f"{page}: series appeared {sorted(b - a)[:10]} / vanished {sorted(a - b)[:10]}"
        assert len(b) > 0
    campaigns = {lbl["campaign"] for samples in big.values() for _, lbl in samples if "campaign" in lbl}
    assert len(campaigns) <= CAMPAIGN_LIMIT and all(c.isdigit() for c in campaigns), campaigns
