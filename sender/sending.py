"""The send path: claim a batch of the ledger, render, rate-limit, call the provider, record.

Exactly once per recipient:

* a batch is processed under a Postgres session advisory lock on (campaign, batch): two
  deliveries of the same batch (dramatiq redelivery, a resume racing an old message) never run
  at once, and the lock dies with a killed worker's connection;
* under the lock, rows still ``sending`` can only be leftovers of a dead attempt; they are sent
  again with the *same* provider idempotency key (derived from campaign, batch and the message
  ids), so a provider that already accepted them (Resend keeps keys 24 h) does not send twice;
* outcomes are written after every provider call, in one transaction with the campaign's
  counters (set-based updates over ``unnest`` arrays), so a redelivered batch skips what was sent.

SMTP has no idempotency key: each relay 250 is written ahead to a local journal the moment it is
read (sender/journal.py), and the answers are kept until recorded through a Postgres outage
(retried on a fresh connection, journaled and fsync'd if the worker must stop first:
sender/ledger.py ``record_durably``). A ``kill -9`` mid-batch can still send twice only the
messages in flight at that instant (at most one per open SMTP connection).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import aiohttp

from mailgenius.cache import rkey

from . import dsn, ledger, templates
from .delivery import deliver
from .email_settings import RateLimiter, SettingsCache
from .journal import Journal
from .ledger import Lease, Outcome, replay_journal
from .metrics import SenderMetrics
from .providers import OutEmail, ResendProvider, SmtpProvider
from .tracking import Tracker, load_secret

log = logging.getLogger(__name__)

#: compiled campaigns kept per worker process
COMPILED_CACHE_SIZE = 64
#: the health check's send statistics reach Redis at most this late, seconds
STATS_FLUSH_SECONDS = 1.0

#: one round trip opens a batch: take the batch's advisory lock, read the campaign, claim the
#: batch's unsent rows (pending -> sending) and read their leads. The UPDATE joins ``camp``, which
#: is empty unless the lock was taken, so no row is claimed without the lock; a row that another
#: worker recorded after this statement's snapshot is re-checked on its latest version by the
#: UPDATE (READ COMMITTED), so a sent row is never claimed again. Always returns >= 1 row: the
#: first carries ``locked`` and the campaign's status; ``id`` is NULL when nothing was claimed.
CLAIM_SQL = """
WITH lk AS MATERIALIZED (SELECT pg_try_advisory_lock($1::int, $2::int) AS locked),
camp AS MATERIALIZED (
    SELECT c.id, c.name, c.from_email, c.status FROM campaigns c, lk WHERE c.id = $1 AND lk.locked),
claimed AS (
    UPDATE messages m SET status = 'sending', attempts = m.attempts + 1, updated_at = now()
    FROM camp c
    WHERE c.status = 'sending' AND m.campaign_id = $1 AND m.batch = $2 AND m.status IN ('pending', 'sending')
    RETURNING m.id, m.lead_id, m.email)
SELECT lk.locked, camp.id AS campaign_id, camp.name AS campaign_name, camp.from_email, camp.status AS campaign_status,
       x.id, x.email, x.lead_id, x.first_name, x.last_name, x.company, x.phone, x.tags, x.attributes, x.lead_status
FROM lk LEFT JOIN camp ON true
LEFT JOIN (SELECT cl.id, cl.email, l.id AS lead_id, l.first_name, l.last_name, l.company, l.phone, l.tags,
                  l.attributes, l.status AS lead_status
           FROM claimed cl LEFT JOIN leads l ON l.id = cl.lead_id) x ON true
"""

@dataclass
class SendContext:
    """Everything the send path needs in one worker process (or one test)."""

    pool: object
    redis: object
    settings: object
    metrics: SenderMetrics
    tracker: Tracker | None = None
    #: the tracking secret, which also signs VERP return paths (the mailbox poller checks them)
    verp_secret: bytes | None = None
    http: aiohttp.ClientSession | None = None
    settings_cache: SettingsCache | None = None
    limiter: RateLimiter | None = None
    #: the relay answers Postgres could not take yet (sender/journal.py); under the data dir
    journal: Journal | None = None
    _providers: dict = field(default_factory=dict)
    _compiled: dict = field(default_factory=dict)
    #: per-minute [sent, failed] not yet written to Redis, and the task that will write them
    _stats: dict = field(default_factory=dict)
    _stats_task: asyncio.Task | None = None

    def return_path(self, message_id: int) -> str:
        """The envelope sender of one message: the signed VERP address under
        ``settings.bounce_domain`` (a DSN then names its message by the address it comes back to,
        which nobody else can forge), or "" (the From address) when no bounce domain is set."""
        domain = self.settings.bounce_domain
        if not domain or self.verp_secret is None:
            return ""
        return dsn.verp_address(self.verp_secret, message_id, domain)

    async def start(self) -> SendContext:
        if self.tracker is None:
            secret = await load_secret(self.pool, self.settings.tracking_secret)
            self.tracker = Tracker(secret, self.settings.public_url)
            self.verp_secret = secret
        if self.http is None:
            self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        self.settings_cache = self.settings_cache or SettingsCache(self.redis, self.pool, self.settings)
        self.limiter = self.limiter or RateLimiter(self.redis, self.settings)
        self.journal = self.journal or Journal.for_data_dir(self.settings.data_dir)
        return self

    async def close(self) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
            self._stats_task = None
        await self.flush_stats()
        for p in self._providers.values():
            if hasattr(p, "close"):
                await p.close()
        if self.http is not None:
            await self.http.close()
        if self.journal is not None:
            self.journal.close()

    def observe(self, provider: str):
        hist = self.metrics.provider_duration

        def obs(operation: str, seconds: float) -> None:
            hist.labels(provider, operation).observe(seconds)

        return obs

    async def provider(self, conn=None):
        name = (await self.settings_cache.get(conn)).get("provider") or self.settings.email_provider
        p = self._providers.get(name)
        if p is None:
            s = self.settings
            if name == "resend":
                p = ResendProvider(self.http, s.resend_base_url, s.resend_api_key, observe=self.observe("resend"),
                                   timeout=s.sender.provider_timeout)
            else:
                gauge = self.metrics.smtp_connections
                p = SmtpProvider(s.smtp_host, s.smtp_port, starttls=s.smtp_starttls, username=s.smtp_username,
                                 password=s.smtp_password, observe=self.observe("smtp"),
                                 pool_size=s.sender.smtp_pool_size, timeout=s.sender.provider_timeout,
                                 opportunistic_tls=s.sender.smtp_opportunistic_tls,
                                 verify_tls=s.smtp_starttls or s.sender.smtp_tls_verify,
                                 on_connections=lambda relay, n: gauge.labels("smtp", relay).set(n))
            self._providers[name] = p
        return p

    async def compiled(self, conn, campaign_id: int) -> templates.CompiledCampaign:
        """The campaign's compiled templates (a campaign's content never changes once created)."""
        c = self._compiled.get(campaign_id)
        if c is None:
            camp = await conn.fetchrow("SELECT subject, html, text FROM campaigns WHERE id = $1", campaign_id)
            links = {r["url"]: r["id"] for r in await conn.fetch(
                "SELECT id, url FROM links WHERE campaign_id = $1", campaign_id)}
            c = templates.compile_campaign(camp["subject"], camp["html"], camp["text"], links)
            if len(self._compiled) >= COMPILED_CACHE_SIZE:
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[campaign_id] = c
        return c

    async def count_stats(self, sent: int, failed: int) -> None:
        """Per-minute sent/failed counts in Redis for the email health check's failure ratio.
        Added up in the process and written at most every STATS_FLUSH_SECONDS (one Redis round
        trip per second instead of one per batch)."""
        if not sent and not failed:
            return
        counts = self._stats.setdefault(int(time.time() // 60), [0, 0])
        counts[0] += sent
        counts[1] += failed
        if self._stats_task is None:
            self._stats_task = asyncio.get_running_loop().create_task(self._flush_stats_later())

    async def _flush_stats_later(self) -> None:
        await asyncio.sleep(STATS_FLUSH_SECONDS)
        self._stats_task = None
        await self.flush_stats()

    async def flush_stats(self) -> None:
        pending, self._stats = self._stats, {}
        if not pending:
            return
        pipe = self.redis.pipeline(transaction=False)
        for minute, (sent, failed) in pending.items():
            key = rkey(self.settings, "sender", "stats", str(minute))
            if sent:
                pipe.hincrby(key, "sent", sent)
            if failed:
                pipe.hincrby(key, "failed", failed)
            pipe.expire(key, 3600)
        try:
            await pipe.execute()
        except Exception:  # statistics only: never fail a send for them
            log.warning("could not record send statistics", exc_info=True)


def list_headers(unsubscribe_url: str) -> dict[str, str]:
    return {"List-Unsubscribe": f"<{unsubscribe_url}>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}


CAMPAIGN_LOCK_SQL = "SELECT pg_try_advisory_lock($1::int, $2::int)"
CAMPAIGN_UNLOCK_SQL = "SELECT pg_advisory_unlock($1::int, $2::int)"
TX_LOCK_SQL = "SELECT pg_try_advisory_lock($1::bigint)"
TX_UNLOCK_SQL = "SELECT pg_advisory_unlock($1::bigint)"


async def _replay(ctx: SendContext, conn) -> None:
    """Before claiming: record what a journal still holds (sender/journal.py), so that a row the
    relay accepted (during a Postgres outage, or in a batch of a worker killed mid-send) is never
    claimed and sent again by this host. Every claim looks for a dead sibling's journal (one
    directory scan): a killed process's batches are redelivered to whichever process is left."""
    journal = ctx.journal
    if journal is not None and (journal.live or journal.dead_sibling()):
        await replay_journal(ctx, conn)


async def send_campaign_batch(ctx: SendContext, campaign_id: int, batch: int) -> Outcome:
    outcome = Outcome()
    async with Lease(ctx.pool, CAMPAIGN_LOCK_SQL, CAMPAIGN_UNLOCK_SQL, (campaign_id, batch)) as lease:
        await _replay(ctx, lease.conn)
        rows = await lease.conn.fetch(CLAIM_SQL, campaign_id, batch)
        head = rows[0]
        if not head["locked"]:
            outcome.detail = "locked"  # a live worker holds this batch; it will finish it
            return outcome
        lease.locked = True  # released by the lease (on whichever connection holds it by then)
        if head["campaign_id"] is None or head["campaign_status"] != "sending":
            outcome.detail = f"campaign {head['campaign_status'] or 'missing'}"
            return outcome
        if head["id"] is None:
            outcome.detail = "nothing to send"
            return outcome
        conn = lease.conn
        compiled = await ctx.compiled(conn, campaign_id)
        campaign_view = {"id": campaign_id, "name": head["campaign_name"]}
        from_email = head["from_email"]
        tracker = ctx.tracker
        emails: list[OutEmail] = []
        failed: dict[int, tuple[str, str]] = {}
        cancelled: list[int] = []
        render, add_pixel, lead_context = templates.render, templates.add_open_pixel, templates.lead_context
        click = tracker.click_url
        for r in rows:
            mid = r["id"]
            if r["lead_id"] is None or r["lead_status"] != "active":
                cancelled.append(mid)  # unsubscribed / bounced / deleted since the ledger was written
                continue
            unsub = tracker.unsubscribe_url(mid)
            ctx_vars = lead_context(r, lead_id=r["lead_id"], campaign=campaign_view, unsubscribe_url=unsub,
                                    click_url=lambda link_id, _m=mid: click(_m, int(link_id)))
            try:
                subject, html, text = render(compiled, ctx_vars)
            except templates.RenderError as exc:
                failed[mid] = ("render_error", str(exc)[:500])
                continue
            html = add_pixel(html, tracker.open_url(mid))
            emails.append(OutEmail(mid, r["email"], from_email, subject, html, text, list_headers(unsub),
                                   ctx.return_path(mid)))
        if failed or cancelled:
            provider = await ctx.provider(conn)
            await ledger.record(ctx, conn, provider.name, campaign_id, {}, failed, cancelled, outcome)
        if emails:
            await deliver(ctx, lease, campaign_id, emails, "c", campaign_id, batch, outcome)
        return outcome


async def send_transactional(ctx: SendContext, message_id: int) -> Outcome:
    outcome = Outcome()
    lock = -int(message_id)  # negative: never one of the kernel's positive bigint lock keys
    async with Lease(ctx.pool, TX_LOCK_SQL, TX_UNLOCK_SQL, (lock,)) as lease:
        await _replay(ctx, lease.conn)
        if not await lease.conn.fetchval(TX_LOCK_SQL, lock):
            outcome.detail = "locked"
            return outcome
        lease.locked = True
        row = await lease.conn.fetchrow(
            """UPDATE messages m SET status = 'sending', attempts = m.attempts + 1, updated_at = now()
               FROM transactional_emails t
               WHERE m.id = $1 AND t.message_id = m.id AND m.campaign_id IS NULL
                 AND m.status IN ('pending', 'sending')
               RETURNING m.id, m.email, t.from_email, t.subject, t.html, t.text""", message_id)
        if row is None:
            outcome.detail = "nothing to send"
            return outcome
        e = OutEmail(row["id"], row["email"], row["from_email"], row["subject"], row["html"], row["text"],
                     return_path=ctx.return_path(row["id"]))
        await deliver(ctx, lease, None, [e], "t", message_id, 0, outcome)
        return outcome
