"""A send worker killed with -9 mid-batch (Postgres up), on SMTP (the default provider), with the
real `mailgenius worker sender` and a real aiosmtpd relay that takes 20 ms a message and counts
deliveries per recipient:

the relay's 250s the killed process had read are in its journal (sender/journal.py, one line per
accepted message, written ahead of the record); the replacement worker replays that journal
before it claims, so the redelivered batches send only what the relay never accepted. Repeats
are at most the messages in flight at the kill: one per open connection of the killed process
(its SMTP pool). Before the write-ahead, every answer of the batches in flight was lost with the
process and those batches were sent again whole (about 100 repeats per kill here).

The helpers (stack, campaign, polling, worker environment) are tests/reliability/sender_stack.py's.
"""

from __future__ import annotations

import asyncio
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

#: SMTP connections of the worker process (MAILGENIUS_SENDER_SMTP_POOL_SIZE): the bound on repeats
POOL = 8


async def test_worker_killed_mid_batch_resends_at_most_the_messages_in_flight(settings, pool, make_key, tmp_path):
    # a relay taking 20 ms a message: 4 batches of 100 share 8 connections, each batch spends
    # about a second talking to the relay, so a kill always lands on batches half sent
    journal_dir = tmp_path / "var" / "sender-journal"
    with TestRelay(smtputf8=True, rules={}, delay=0.02) as relay:
        worker_env = {**WORKER_ENV, "MAILGENIUS_SMTP_HOST": "127.0.0.1", "MAILGENIUS_SMTP_PORT": str(relay.port),
                      "MAILGENIUS_SENDER_SMTP_POOL_SIZE": str(POOL)}
        # Given the sender API, one worker process (4 concurrent batches) and the relay
        with sender_stack(settings.replace(email_provider="smtp"), tmp_path, threads=4, **worker_env) as stack:
            cid = await start_campaign(stack, pool, make_key, f"kill9x{time.time_ns() % 10**6}")

            # When the worker is killed with -9 while the campaign is being sent
            # (0.3: between two waves of batch records, so many answers are read and not recorded)
            await poll(lambda: asyncio.sleep(0, len(relay.delivered) >= N_LEADS * 3 // 10), 60,
                       f"30 % of the campaign delivered\n{stack.log('sender-worker')}", interval=0.02)
            stack.stop("sender-worker", kill=True)  # SIGKILL to the whole group, no shutdown hook runs
            at_kill = len(relay.delivered)
            # what the killed process had written ahead and not recorded (read before any replay)
            left = [e for p in journal_dir.glob("journal-*.jsonl") for e in read_entries(p.read_bytes())]
            written_ahead = sum(len(e.get("sent", [])) for e in left)
            stack.start_worker("sender", threads=4, **worker_env)

            # Then the campaign completes, every recipient delivered, and repeats are at most the
            # killed process's connections (the messages in flight at the kill)
            done = await poll(lambda: finished(pool, cid), 120, f"campaign finished\n{stack.log('sender-worker')}")
            dups = relay.duplicates()
            print(f"\nworker killed -9 with {at_kill} of {N_LEADS} delivered ({written_ahead} accepted messages "
                  f"written ahead, not recorded yet): {len(relay.delivered)} delivered, {dups} duplicates "
                  f"(bound: {POOL} connections)")
            assert at_kill < N_LEADS, "the kill came after the campaign was sent"
            assert len(relay.delivered) == N_LEADS
            assert done == {"status": "sent", "sent": N_LEADS, "failed": 0, "queued": 0}, done
            assert dups <= POOL, (dups, {r: n for r, n in relay.delivered.items() if n > 1})
            # the kill was mid-batch: the killed process held accepted answers, and they were replayed
            assert written_ahead > 0, left
            log = stack.log("sender-worker", tail=200_000)
            assert "replayed a journal left by a stopped worker" in log, log[-4000:]
