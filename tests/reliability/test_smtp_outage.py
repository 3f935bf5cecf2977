"""Postgres cut mid-campaign on SMTP (the default provider), with the real sender worker and a
real aiosmtpd relay counting deliveries per recipient:

* the worker keeps the relay's answers and records them once Postgres is back: every recipient
  is delivered exactly once (before: every batch in flight was redelivered and sent again);
* the worker killed (-9) during the outage, after its answers were journaled, and a new worker
  started after recovery: the new worker replays the journal before claiming, so again no
  recipient is mailed twice.

Postgres goes through the fault proxy (the machine's cluster is shared, so it is not stopped):
``down`` refuses new connections and cuts the open ones. The outage lasts PG_OUTAGE seconds
(default 8; env MAILGENIUS_TEST_PG_OUTAGE).
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from sender.journal import read_entries
from sender.testing import TestRelay
from tests.reliability.sender_stack import (
    N_LEADS,
    WORKER_ENV,
    finished,
    poll,
    sender_stack,
    start_campaign,
)

pytestmark = pytest.mark.slow

PG_OUTAGE = float(os.environ.get("MAILGENIUS_TEST_PG_OUTAGE", "8"))


@pytest.mark.parametrize("kill_worker", [False, True], ids=["worker-rides-it-out", "worker-killed-journal-replayed"])
async def test_postgres_cut_mid_campaign_on_smtp_sends_each_recipient_once(
        settings, pool, make_key, tmp_path, pg_proxy, kill_worker):
    # a relay taking 20 ms a message: every batch spends ~0.25 s talking to it (8 connections per
    # worker process), so the cut always lands on batches the relay is accepting
    with TestRelay(smtputf8=True, rules={}, delay=0.02) as relay:
        worker_db = pg_proxy.url_for(settings.database_url)
        worker_env = {**WORKER_ENV, "DATABASE_URL": worker_db, "MAILGENIUS_SMTP_HOST": "127.0.0.1",
                      "MAILGENIUS_SMTP_PORT": str(relay.port)}
        # Given the sender API (direct to Postgres), its worker through the proxy, a relay
        with sender_stack(settings.replace(email_provider="smtp"), tmp_path, threads=4, **worker_env) as stack:
            cid = await start_campaign(stack, pool, make_key, f"pgcut{int(kill_worker)}x{time.time_ns() % 10**6}")

            # When Postgres is cut for the worker while the campaign is being sent
            await poll(lambda: asyncio.sleep(0, len(relay.delivered) >= N_LEADS // 5), 60,
                       f"a fifth of the campaign delivered\n{stack.log('sender-worker')}")
            pg_proxy.set_mode("down")
            at_cut = len(relay.delivered)
            t_cut = time.monotonic()
            journal_dir = tmp_path / "var" / "sender-journal"
            if kill_worker:
                # the relay's answers for the batches in flight are journaled (fsync'd outcome entries,
                # not only the write-ahead of accepted messages) within moments
                await poll(lambda: asyncio.sleep(0, any(not e.get("open") for p in journal_dir.glob("*.jsonl")
                                                         for e in read_entries(p.read_bytes()))),
                           PG_OUTAGE, f"the journal written\n{stack.log('sender-worker')}", interval=0.05)
                # batches already talking to the relay finish theirs and journal it; no new one starts
                await asyncio.sleep(2.0)
                stack.stop("sender-worker", kill=True)
            while time.monotonic() - t_cut < PG_OUTAGE:
                await asyncio.sleep(0.2)
            pg_proxy.set_mode("pass")
            if kill_worker:
                stack.start_worker("sender", threads=4, **worker_env)

            # Then the campaign completes: every recipient delivered exactly once, nothing failed
            done = await poll(lambda: finished(pool, cid), 120, f"campaign finished\n{stack.log('sender-worker')}")
            assert relay.duplicates() == 0, (relay.duplicates(), stack.log("sender-worker"))
            assert len(relay.delivered) == N_LEADS
            assert done == {"status": "sent", "sent": N_LEADS, "failed": 0, "queued": 0}, done
            log = stack.log("sender-worker", tail=200_000)
            if kill_worker:
                assert "replayed a journal left by a stopped worker" in log, log[-4000:]
            else:
                assert "journaled" in log, log[-4000:]
            print(f"\npostgres cut {PG_OUTAGE:g} s mid-campaign ({at_cut} of {N_LEADS} delivered at the cut), "
                  f"worker {'killed -9 and replaced' if kill_worker else 'kept running'}: "
                  f"{len(relay.delivered)} delivered, {relay.duplicates()} duplicates")
