"""``mailgenius demo``: realistic traffic through the real APIs (import, campaign, signed events)."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import secrets
import time
from typing import Any

from mailgenius.settings import Settings

from .base import OpsError
from .stack import ops_env, ops_settings

# -- demo: realistic traffic through the real APIs --------------------------------------------

FIRST_NAMES = ("Ana", "Bruno", "Carla", "Diego", "Elisa", "Felipe", "Gabriela", "Henrique", "Isabel", "João",
               "Larissa", "Marcos", "Natália", "Otávio", "Paula", "Rafael", "Sofia", "Tiago", "Vitória", "Yuri")
LAST_NAMES = ("Silva", "Santos", "Oliveira", "Souza", "Lima", "Pereira", "Costa", "Almeida", "Ferreira", "Rocha")
COMPANIES = ("Acme Ltda", "Globex", "Initech", "Umbrella SA", "Stark Comércio", "Wayne Serviços", "Hooli")
#: share of sent messages the demo reports as bounced; kept under the 5 % BounceRateHigh and
#: the 95 % EmailDeliveryRateLow thresholds so a demo alone never pages anybody
DEMO_BOUNCE_RATIO = 0.02
#: of the delivered: opened; of the opened: clicked (the guide's 24.5 % / 3.2 % are per delivered)
DEMO_OPEN_RATIO = 0.35
DEMO_CLICK_RATIO = 0.25


def demo_csv(run: str, n: int, rng) -> tuple[bytes, int]:
    """A CSV of ``n`` valid synthetic leads plus three bad rows (a malformed email, an empty one
    and a duplicate of the first lead) so the validation panels have data. Returns the bytes and
    the number of bad rows."""
    import unicodedata

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["email", "first_name", "last_name", "company", "phone"])
    first_email = ""
    for i in range(n):
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        slug = unicodedata.normalize("NFKD", f"{first}.{last}").encode("ascii", "ignore").decode().lower()
        email = f"{slug}.{i}.{run}@example.com"
        first_email = first_email or email
        w.writerow([email, first, last, rng.choice(COMPANIES), f"+55 11 9{rng.randrange(10**7, 10**8)}"])
    bad = [["not-an-email", "Bad", "Row", "", ""], ["", "No", "Email", "", ""]]
    if first_email:
        bad.append([first_email.upper(), "Dup", "Licate", "", ""])
    for row in bad:
        w.writerow(row)
    return buf.getvalue().encode(), len(bad)


class DemoError(OpsError):
    pass


async def _demo_key(settings: Settings, revoke: str | None = None) -> str | None:
    """A key with only the scopes the demo uses (import, send), or with ``revoke``: that key
    revoked (each run revokes its own, so no key is left behind)."""
    import asyncpg

    from mailgenius import auth

    conn = await asyncpg.connect(settings.database_url, timeout=10)
    try:
        if revoke is not None:
            await auth.revoke_key(conn, revoke)
            return None
        _id, key = await auth.create_key(conn, ["import", "send"], "mailgenius demo (revoked after the run)")
        return key
    finally:
        await conn.close()


async def _request(session, method: str, url: str, *, expect: tuple[int, ...], **kw) -> Any:
    async with session.request(method, url, **kw) as resp:
        text = await resp.text()
        try:
            body = json.loads(text) if text else None
        except ValueError:
            body = text
        if resp.status not in expect:
            raise DemoError(f"{method} {url} answered HTTP {resp.status}: {text[:300]}")
        return body


async def _poll(fetch, done, *, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await fetch()
        if done(last):
            return last
        await asyncio.sleep(interval)
    raise DemoError(f"timed out after {timeout:g} s waiting for {what}; last state: {json.dumps(last, default=str)[:300]}")


def resend_event(kind: str, provider_id: str | None, to: str, subject: str, now: dt.datetime, *, link: str = "",
                 message_id: int | None = None) -> dict:
    """One Resend webhook event (the shape of Resend's event types), carrying our message id in
    the ``mg_message_id`` tag as the Resend provider sends it."""
    data: dict[str, Any] = {"email_id": provider_id or "", "from": "MailGenius Demo <demo@example.com>", "to": [to],
                            "subject": subject, "created_at": now.isoformat().replace("+00:00", "Z")}
    if message_id is not None:
        data["tags"] = {"mg_message_id": str(message_id)}
    if kind == "email.bounced":
        data["bounce"] = {"type": "Permanent", "subType": "General",
                          "message": "The recipient's mailbox does not exist (demo)."}
    if kind == "email.clicked":
        data["click"] = {"link": link, "ipAddress": "192.0.2.10", "userAgent": "MailGenius demo",
                         "timestamp": now.isoformat().replace("+00:00", "Z")}
    if kind == "email.opened":
        data["open"] = {"ipAddress": "192.0.2.10", "userAgent": "MailGenius demo",
                        "timestamp": now.isoformat().replace("+00:00", "Z")}
    return {"type": kind, "created_at": now.isoformat().replace("+00:00", "Z"), "data": data}


def sign_event(secret: str, body: str, msg_id: str, when: dt.datetime) -> dict[str, str]:
    from svix.webhooks import Webhook

    return {"svix-id": msg_id, "svix-timestamp": str(int(when.timestamp())),
            "svix-signature": Webhook(secret).sign(msg_id, when, body), "Content-Type": "application/json"}


async def run_demo(settings: Settings, *, leads: int = 200, api_key: str | None = None, seed: int | None = None,
                   timeout: float = 120.0, say=print) -> dict:
    """Drive the real APIs: import leads, send a campaign to the sink, post signed events. Without
    ``api_key`` a key (import, send) is created for the run and revoked at its end."""
    if api_key is not None or not settings.resend_webhook_secret:
        return await _run_demo(settings, leads=leads, api_key=api_key, seed=seed, timeout=timeout, say=say)
    key = await _demo_key(settings)
    try:
        return await _run_demo(settings, leads=leads, api_key=key, seed=seed, timeout=timeout, say=say)
    finally:
        await _demo_key(settings, revoke=key)


async def _run_demo(settings: Settings, *, leads: int, api_key: str | None, seed: int | None,
                    timeout: float, say) -> dict:
    import random

    import aiohttp
    import asyncpg

    rng = random.Random(seed)
    run = f"{int(time.time()):x}{rng.randrange(16**4):04x}"
    tag = f"demo-{run}"
    if not settings.resend_webhook_secret:
        raise DemoError("MAILGENIUS_RESEND_WEBHOOK_SECRET is not set (scripts/run.sh sets one); "
                        "the sender rejects unsigned webhook events")
    key = api_key
    auth = {"Authorization": f"Bearer {key}"}
    summary: dict[str, Any] = {"tag": tag}
    link = "https://example.com/offer?utm_source=mailgenius-demo"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        # 1. import
        data, bad = demo_csv(run, leads, rng)
        form = aiohttp.FormData()
        form.add_field("file", data, filename=f"{tag}.csv", content_type="text/csv")
        form.add_field("tags", tag)
        form.add_field("source", "mailgenius-demo")
        form.add_field("mode", "skip")
        up = await _request(session, "POST", settings.importer_url + "/api/upload", expect=(200, 201, 202),
                            data=form, headers=auth)
        say(f"demo: uploaded {leads + bad} rows ({bad} of them bad on purpose) as import {up['id']}")
        imp = await _poll(lambda: _request(session, "GET", f"{settings.importer_url}/api/imports/{up['id']}",
                                           expect=(200,), headers=auth),
                          lambda s: s.get("status") in ("completed", "failed", "cancelled"),
                          timeout=timeout, what=f"import {up['id']}")
        if imp["status"] != "completed":
            raise DemoError(f"import {up['id']} ended {imp['status']}: {imp.get('error')}")
        say(f"demo: import {up['id']} completed: {imp.get('inserted')} inserted, {imp.get('duplicates')} duplicates, "
            f"{imp.get('invalid')} invalid")
        summary["import"] = imp
        # 2. campaign
        body = {
            "name": f"Demo campaign {run}",
            "subject": "Novidades da MailGenius para {{ first_name }}",
            "from_email": "demo@example.com",
            "html": f"<p>Olá {{{{ first_name }}}},</p><p>Veja a <a href=\"{link}\">oferta da semana</a>.</p>",
            "text": f"Olá {{{{ first_name }}}}, veja a oferta da semana: {link}",
            "segment": {"tags": [tag]},
        }
        camp = await _request(session, "POST", settings.sender_url + "/api/campaigns", expect=(200, 201),
                              json=body, headers=auth)
        cid = camp["id"]
        await _request(session, "POST", f"{settings.sender_url}/api/campaigns/{cid}/send", expect=(200, 202),
                       headers=auth)
        camp = await _poll(lambda: _request(session, "GET", f"{settings.sender_url}/api/campaigns/{cid}",
                                            expect=(200,), headers=auth),
                           lambda c: c.get("status") in ("sent", "failed", "cancelled")
                           or (c.get("recipients") and c.get("sent", 0) + c.get("failed", 0) >= c["recipients"]),
                           timeout=timeout, what=f"campaign {cid} to be sent")
        say(f"demo: campaign {cid} {camp.get('status')}: {camp.get('sent')} of {camp.get('recipients')} sent "
            f"to the SMTP sink, {camp.get('failed')} failed")
        summary["campaign"] = camp
        # 3. provider events, Svix-signed as Resend signs them
        conn = await asyncpg.connect(settings.database_url, timeout=10)
        try:
            msgs = await conn.fetch(
                "SELECT id, email, provider_message_id FROM messages "
                "WHERE campaign_id = $1 AND status = 'sent' ORDER BY id", cid)
        finally:
            await conn.close()
        events: list[tuple[str, dict]] = []
        now = dt.datetime.now(dt.UTC)
        n_bounce = max(1, round(len(msgs) * DEMO_BOUNCE_RATIO)) if len(msgs) >= 20 else 0
        for i, m in enumerate(msgs):
            pid, to, mid = m["provider_message_id"], m["email"], m["id"]
            kinds = ["email.bounced"] if i < n_bounce else ["email.delivered"]
            if i >= n_bounce and rng.random() < DEMO_OPEN_RATIO:
                kinds.append("email.opened")
                if rng.random() < DEMO_CLICK_RATIO:
                    kinds.append("email.clicked")
            for kind in kinds:
                events.append((kind, resend_event(kind, pid, to, body["subject"], now, link=link, message_id=mid)))
        sem = asyncio.Semaphore(8)
        counts: dict[str, int] = {}

        async def post(kind: str, event: dict):
            payload = json.dumps(event, separators=(",", ":"))
            headers = sign_event(settings.resend_webhook_secret, payload, f"msg_demo_{secrets.token_hex(10)}",
                                 dt.datetime.now(dt.UTC))
            async with sem:
                await _request(session, "POST", settings.sender_url + "/webhooks/resend", expect=(200, 202, 204),
                               data=payload.encode(), headers=headers)
            counts[kind] = counts.get(kind, 0) + 1

        # in the order a provider reports them: deliveries and bounces, then opens, then clicks
        for phase in (("email.delivered", "email.bounced"), ("email.opened",), ("email.clicked",)):
            await asyncio.gather(*(post(k, e) for k, e in events if k in phase))
        say("demo: posted signed events: " + (", ".join(f"{v} {k.split('.')[1]}" for k, v in sorted(counts.items())) or "none"))
        summary["events"] = counts
        final = await _request(session, "GET", f"{settings.sender_url}/api/campaigns/{cid}", expect=(200,), headers=auth)
        summary["campaign"] = final
        say("demo: campaign counts now: " + ", ".join(
            f"{k} {final.get(k)}" for k in ("recipients", "sent", "delivered", "bounced", "opened", "clicked", "failed")))
    return summary


def cmd_demo(args) -> int:
    env = ops_env()
    settings = ops_settings(env)
    api_key = args.api_key or env.get("MAILGENIUS_API_KEY") or None
    summary = asyncio.run(run_demo(settings, leads=args.leads, api_key=api_key, seed=args.seed, timeout=args.timeout))
    print(f"demo: done (tag {summary['tag']}); see `mailgenius status` and the dashboards")
    return 0
