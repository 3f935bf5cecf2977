"""Hostile input against the sender, through its real app and the real Postgres:

* the known Jinja2 sandbox escapes and template bombs are refused at campaign creation
  (422 JSON, quickly), in every part (subject, HTML, text);
* forged provider webhooks (unsigned, wrong secret, tampered body, stale or future timestamp)
  are 401 and change nothing; a replayed genuine one is applied once;
* forged tracking and unsubscribe tokens are 404 and change nothing; clicks only ever redirect
  to the campaign's own stored http(s) links.
"""

from __future__ import annotations

import base64
import json
import time

import pytest
from prometheus_client import CollectorRegistry

from tests.conftest import bearer

sender_app = pytest.importorskip("sender.app")
Tracker = pytest.importorskip("sender.tracking").Tracker

WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"reliability-suite-webhook-secret!").decode()
TRACKING_SECRET = "reliability-suite-tracking-secret"

#: seconds a refused template may take (a bomb must be refused, not rendered)
REFUSE_DEADLINE = 2.0

SANDBOX_ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ().__class__.__bases__[0].__subclasses__() }}",
    "{{ [].__class__.__base__.__subclasses__()[40]('/etc/passwd').read() }}",
    "{{ ''['__class__'] }}",
    "{{ ''|attr('__class__') }}",
    "{{ ''|attr('\\x5f\\x5fclass\\x5f\\x5f') }}",
    "{{ ''|attr(['_','_class_','_']|join) }}",
    "{{ self.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__.os.popen('id').read() }}",
    "{{ namespace.__init__.__globals__.os.popen('id').read() }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ range.__self__ }}",
    "{{ config.items() }}",
    "{{ request.application.__globals__.__builtins__.__import__('os').popen('id').read() }}",
    "{{ '{0.__class__.__mro__}'.format('') }}",
    "{{ '{0.__init__.__globals__}'.format(lead) }}",
    "{{ '{x.__class__.__mro__}'.format_map({'x': ''}) }}",
    "{{ '%s'|format(lead.__class__) }}",
    "{{ lead.__class__ }}",
    "{{ lead.update({'email': 'x@evil.example'}) }}",
    "{{ lead.pop('email') }}",
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}{{ os }}",
    "{% extends '/etc/passwd' %}",
    "{% from 'x' import y %}",
    "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}",
    "{% set x = ''.__class__ %}{{ x }}",
    "{% with x = ''.__class__ %}{{ x }}{% endwith %}",
    "{{ 'a' * 1000000000 }}",
    "{{ 'ab' * 99999 * 99999 }}",
    "{{ 9 ** (9 ** 9) }}",  # Jinja's ** is left-associative: 9 ** 9 ** 9 is only (9**9)**9
    "{{ 10 ** 100000 }}",
    "{% for i in range(1000000000) %}x{% endfor %}",
    "{{ ''.ljust(1000000000) }}",
    "{{ 'x'.center(2000000000) }}",
    "{{ '%999999999s' % 'x' }}",
    "{% for a in 'x' * 1000 %}{% for b in 'x' * 1000 %}{% for c in 'x' * 1000 %}.{% endfor %}{% endfor %}{% endfor %}",
    "{% for x in lead recursive %}{{ loop(lead) }}{% endfor %}",
    "{{ 'x'|indent(1000000000) }}",
    "{{ ('x' ~ 'y') * 2147483647 }}",
]


@pytest.fixture
async def sender(aiohttp_client, settings, pool, make_key):
    s = settings.replace(resend_webhook_secret=WEBHOOK_SECRET, tracking_secret=TRACKING_SECRET)
    client = await aiohttp_client(sender_app.create_app(s, registry=CollectorRegistry()))
    client.key = await make_key("send", "read")
    client.pool = pool
    return client


def campaign(**parts) -> dict:
    body = {"name": "hostile", "subject": "Hello {{ lead.first_name }}", "from_email": "news@example.com",
            "html": "<p>Hi</p>", "text": "Hi", "segment": {"tags": ["x"]}}
    body.update(parts)
    return body


async def test_a_plain_campaign_is_accepted(sender):
    resp = await sender.post("/api/campaigns", json=campaign(), headers=bearer(sender.key))
    assert resp.status == 201, await resp.text()


@pytest.mark.parametrize("part", ["html", "text", "subject"])
async def test_known_sandbox_escapes_are_refused(sender, part):
    accepted, slow = [], []
    for payload in SANDBOX_ESCAPES:
        start = time.monotonic()
        resp = await sender.post("/api/campaigns", json=campaign(**{part: payload}), headers=bearer(sender.key))
        elapsed = time.monotonic() - start
        body = await resp.text()
        if elapsed > REFUSE_DEADLINE:
            slow.append(f"{elapsed:.1f}s {payload}")
        if resp.status != 422:
            accepted.append(f"{resp.status} {payload} -> {body[:200]}")
        else:
            err = json.loads(body)["error"]
            assert err["code"] and err["message"]
            assert "Traceback" not in body
    assert not accepted, f"{part}: not refused:\n" + "\n".join(accepted)
    assert not slow, f"{part}: slow refusals:\n" + "\n".join(slow)
    # nothing was stored
    assert await sender.pool.fetchval("SELECT count(*) FROM campaigns") == 0


# -- webhooks -----------------------------------------------------------------------------------

def sign(secret: str, msg_id: str, ts: int, body: bytes) -> str:
    from svix.webhooks import Webhook

    return Webhook(secret).sign(msg_id, _dt(ts), body.decode())


def _dt(ts: int):
    import datetime as dt

    return dt.datetime.fromtimestamp(ts, tz=dt.UTC)


def event_body(event_type: str = "email.delivered", email_id: str = "re_forged_1") -> bytes:
    return json.dumps({"type": event_type, "created_at": "2026-11-29T12:00:00Z",
                       "data": {"email_id": email_id, "to": ["a@b.co"]}}).encode()


async def post_webhook(client, body: bytes, msg_id: str, ts: int, signature: str | None):
    headers = {"svix-id": msg_id, "svix-timestamp": str(ts), "Content-Type": "application/json"}
    if signature is not None:
        headers["svix-signature"] = signature
    return await client.post("/webhooks/resend", data=body, headers=headers)


async def test_genuine_webhook_is_applied_once_even_when_replayed(sender):
    body, now = event_body(), int(time.time())
    sig = sign(WEBHOOK_SECRET, "msg_genuine", now, body)
    first = await post_webhook(sender, body, "msg_genuine", now, sig)
    assert first.status == 200, await first.text()
    again = await post_webhook(sender, body, "msg_genuine", now, sig)
    assert again.status == 200 and (await again.json())["duplicate"] is True
    assert await sender.pool.fetchval("SELECT count(*) FROM email_events") == 1


async def test_forged_webhooks_are_refused(sender):
    body, now = event_body(), int(time.time())
    other = "whsec_" + base64.b64encode(b"some-other-secret-not-ours-12345").decode()
    good = sign(WEBHOOK_SECRET, "msg_1", now, body)
    forgeries = {
        "unsigned": (body, "msg_1", now, None),
        "empty signature": (body, "msg_1", now, ""),
        "garbage signature": (body, "msg_1", now, "v1,AAAA"),
        "other secret": (body, "msg_1", now, sign(other, "msg_1", now, body)),
        "tampered body": (event_body("email.complained"), "msg_1", now, good),
        "other message id": (body, "msg_2", now, good),
        "stale (replayed 10 min later)": (body, "msg_3", now - 600, sign(WEBHOOK_SECRET, "msg_3", now - 600, body)),
        "future timestamp": (body, "msg_4", now + 600, sign(WEBHOOK_SECRET, "msg_4", now + 600, body)),
        "v2 scheme": (body, "msg_1", now, "v2," + good.split(",", 1)[1]),
    }
    wrong = []
    for name, (b, mid, ts, sig) in forgeries.items():
        resp = await post_webhook(sender, b, mid, ts, sig)
        text = await resp.text()
        if resp.status != 401 or resp.content_type != "application/json":
            wrong.append(f"{name}: {resp.status} {text[:200]}")
    assert not wrong, "\n".join(wrong)
    assert await sender.pool.fetchval("SELECT count(*) FROM email_events") == 0


async def test_signed_but_malformed_or_huge_webhooks_are_4xx(sender):
    now = int(time.time())
    for i, body in enumerate([b"not json", b"[]", b'{"type": 5}', b'{"type": "email.delivered", "data": []}',
                              b'{"type": "email.delivered", "data": {"email_id": "\\u0000"}}']):
        resp = await post_webhook(sender, body, f"msg_bad_{i}", now, sign(WEBHOOK_SECRET, f"msg_bad_{i}", now, body))
        assert 400 <= resp.status < 500, (body, resp.status, await resp.text())
    huge = b'{"type": "email.delivered", "data": {"x": "' + b"a" * (300 * 1024) + b'"}}'
    resp = await post_webhook(sender, huge, "msg_huge", now, sign(WEBHOOK_SECRET, "msg_huge", now, huge))
    assert resp.status == 413, await resp.text()


# -- tracking -----------------------------------------------------------------------------------

@pytest.fixture
async def tracked(sender):
    """Two campaigns, each with one message and one link; plus a javascript: link."""
    pool = sender.pool
    lead = await pool.fetchval("INSERT INTO leads (email) VALUES ('reader@example.com') RETURNING id")
    ids = {}
    # message ids with hex letters (0xabc, 0xdef), so an upper-cased token is a real forgery
    for name, msg_id in (("a", 0xABC), ("b", 0xDEF)):
        cid = await pool.fetchval(
            "INSERT INTO campaigns (name, subject, from_email, status) VALUES ($1, 's', 'f@example.com', 'sent') RETURNING id", name)
        mid = await pool.fetchval(
            "INSERT INTO messages (id, campaign_id, lead_id, email, status) VALUES ($3, $1, $2, 'reader@example.com', 'sent') RETURNING id",
            cid, lead if name == "a" else None, msg_id)
        link = await pool.fetchval("INSERT INTO links (campaign_id, url) VALUES ($1, $2) RETURNING id",
                                   cid, f"https://example.com/{name}")
        ids[name] = (cid, mid, link)
    js = await pool.fetchval("INSERT INTO links (campaign_id, url) VALUES ($1, 'javascript:alert(1)') RETURNING id",
                             ids["a"][0])
    return {"ids": ids, "js": js, "lead": lead, "tracker": Tracker(TRACKING_SECRET.encode(), "http://x")}


async def test_genuine_tracking_links_work(sender, tracked):
    t, (_cid, mid, link) = tracked["tracker"], tracked["ids"]["a"]
    resp = await sender.get(f"/t/o/{t.token('o', mid)}")
    assert resp.status == 200 and resp.content_type == "image/gif"
    resp = await sender.get(f"/t/c/{t.token('c', mid, link)}", allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"] == "https://example.com/a"


async def test_forged_tracking_tokens_are_404_and_change_nothing(sender, tracked):
    t = tracked["tracker"]
    (ca, ma, la), (_cb, mb, lb) = tracked["ids"]["a"], tracked["ids"]["b"]
    other = Tracker(b"not-the-secret", "http://x")
    good_open = t.token("o", ma)
    mac = good_open.split(".")[2]
    forged = {
        "/t/o/": [f"{ma:x}.0.{'A' * 16}", f"{mb:x}.0.{mac}", other.token("o", ma), t.token("c", ma, 0),
                  t.token("u", ma), f"0{ma:x}.0.{mac}", f"{ma:X}.0.{mac}", f"{ma:x}.0.{mac}.x",
                  f"{ma:x}.0", "", "%00", "a" * 5000, f"-{ma:x}.0.{mac}", f"{ma:x}.00.{mac}"],
        "/t/c/": [t.token("o", ma), other.token("c", ma, la), t.token("c", ma, lb),  # b's link from a's message
                  t.token("c", ma, tracked["js"]), t.token("c", ma + 1000, la), t.token("c", ma, la + 1000)],
        "/u/": [other.token("u", ma), t.token("o", ma), f"{ma:x}.0.{mac}"],
    }
    wrong = []
    for prefix, tokens in forged.items():
        for token in tokens:
            for method in ("GET", "POST") if prefix == "/u/" else ("GET",):
                resp = await sender.request(method, prefix + token, allow_redirects=False)
                if resp.status != 404:
                    wrong.append(f"{method} {prefix}{token[:60]}: {resp.status} {resp.headers.get('Location', '')}")
    assert not wrong, "\n".join(wrong)
    row = await sender.pool.fetchrow("SELECT opened, clicked FROM campaigns WHERE id = $1", ca)
    assert (row["opened"], row["clicked"]) == (0, 0)
    assert await sender.pool.fetchval("SELECT status FROM leads WHERE id = $1", tracked["lead"]) == "active"


async def test_unsubscribe_get_never_unsubscribes_post_does(sender, tracked):
    t, (_cid, mid, _link) = tracked["tracker"], tracked["ids"]["a"]
    token = t.token("u", mid)
    resp = await sender.get(f"/u/{token}")
    assert resp.status == 200
    assert await sender.pool.fetchval("SELECT status FROM leads WHERE id = $1", tracked["lead"]) == "active"
    resp = await sender.post(f"/u/{token}", data={"List-Unsubscribe": "One-Click"})
    assert resp.status == 200
    assert await sender.pool.fetchval("SELECT status FROM leads WHERE id = $1", tracked["lead"]) == "unsubscribed"
