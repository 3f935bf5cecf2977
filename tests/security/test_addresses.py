"""One address parser (mailgenius.addresses) for transactional ``to``, suppression and From:
lists, comments and display-name tricks are refused (422 JSON) instead of becoming extra SMTP
recipients, skipping the suppression lookup, or sending from another address."""

from __future__ import annotations

import secrets

import pytest

from mailgenius import addresses
from tests.conftest import bearer


@pytest.mark.parametrize("value", [
    "root,postmaster,x@example.com", "a@example.com, b@example.com", "(comment)victim@example.com",
    "victim(comment)@example.com", "Victim <victim@example.com>", '"a b"@example.com', "a@b@example.com",
    "a@example.com\r\nBcc: b@example.com", "a..b@example.com", ".a@example.com", "a@example", "a@-x.com",
    "a@[127.0.0.1]", "a @example.com", "", "a" * 65 + "@example.com",
])
def test_parser_refuses_anything_but_one_bare_address(value):
    with pytest.raises(addresses.AddressError):
        addresses.parse_address(value)


def test_parser_normalises_domain_with_idna_and_keys_lower_case():
    a = addresses.parse_address("  Ana.Silva+news@MÜNCHEN.de ")
    assert a.addr == "Ana.Silva+news@xn--mnchen-3ya.de"
    assert a.key == "ana.silva+news@xn--mnchen-3ya.de"
    assert addresses.suppression_keys("Ana@München.DE") == ["ana@xn--mnchen-3ya.de", "ana@münchen.de"]


@pytest.mark.parametrize("value", [
    "x@evil.example <news@example.org>", '"x@evil.example" <news@example.org>', "a (b) <news@example.org>",
    "<a@example.org> <news@example.org>", "News <news@example.org>, x@evil.example", "News <news@example.org",
    "News news@example.org>",
])
def test_from_refuses_display_name_tricks(value):
    with pytest.raises(addresses.AddressError):
        addresses.parse_from(value)


def test_from_accepts_plain_and_quoted_names():
    assert str(addresses.parse_from("News Desk <News@Example.ORG>")) == "News Desk <News@example.org>"
    assert str(addresses.parse_from('"Acme, Inc." <n@example.org>')) == '"Acme, Inc." <n@example.org>'
    assert str(addresses.parse_from("n@example.org")) == "n@example.org"


def _email(to: str, from_email: str = "news@example.org") -> dict:
    return {"to": to, "from_email": from_email, "subject": "hi", "text": "hello"}


async def _error(resp) -> dict:
    assert resp.content_type == "application/json", await resp.text()
    return (await resp.json())["error"]


async def test_transactional_to_list_is_422_and_queues_nothing(client_for, make_key, pool):
    # Given the sender and a key with the send scope
    _app, client = await client_for("sender")
    key = await make_key("send")
    tag = secrets.token_hex(4)
    before = await pool.fetchval("SELECT count(*) FROM messages")
    # When the `to` is a list smuggled into one string
    resp = await client.post("/api/emails", json=_email(f"root,postmaster,x{tag}@example.com"), headers=bearer(key))
    # Then it is refused with a JSON 422, and no message is created
    assert resp.status == 422, await resp.text()
    assert "one email address" in (await _error(resp))["message"]
    assert await pool.fetchval("SELECT count(*) FROM messages") == before


@pytest.mark.parametrize("spelling", ["(comment){addr}", "{ADDR}", "{addr_idn}"])
async def test_a_suppressed_address_is_refused_in_every_spelling(spelling, client_for, make_key, pool):
    # Given a lead that bounced (stored with a Unicode domain, as the importer keeps it)
    _app, client = await client_for("sender")
    key = await make_key("send")
    local = f"victim{secrets.token_hex(4)}"
    await pool.execute("INSERT INTO leads (email, status) VALUES ($1, 'bounced')", f"{local}@bücher.example")
    addr = f"{local}@xn--bcher-kva.example"
    to = spelling.format(addr=addr, ADDR=addr.upper(), addr_idn=f"{local}@BÜCHER.example")
    # When a transactional email is sent to another spelling of that mailbox
    resp = await client.post("/api/emails", json=_email(to), headers=bearer(key))
    # Then it is refused (as malformed, or as suppressed), never queued
    assert resp.status == 422, await resp.text()
    assert await pool.fetchval("SELECT count(*) FROM messages WHERE lower(email) LIKE $1", f"%{local}%") == 0


async def test_transactional_to_is_stored_normalised(client_for, make_key, pool):
    _app, client = await client_for("sender")
    key = await make_key("send")
    local = f"Fresh{secrets.token_hex(4)}"
    resp = await client.post("/api/emails", json=_email(f" {local}@MÜNCHEN.de "), headers=bearer(key))
    assert resp.status == 202, await resp.text()
    mid = (await resp.json())["id"]
    assert await pool.fetchval("SELECT email FROM messages WHERE id = $1", mid) == f"{local}@xn--mnchen-3ya.de"


@pytest.mark.parametrize("path", ["/api/emails", "/api/campaigns"])
async def test_from_with_an_address_as_display_name_is_422(path, client_for, make_key):
    _app, client = await client_for("sender")
    key = await make_key("send")
    bad_from = "x@evil.example <news@example.org>"
    body = (_email(f"ok{secrets.token_hex(3)}@example.com", bad_from) if path == "/api/emails"
            else {"name": "c", "subject": "s", "from_email": bad_from, "text": "t"})
    resp = await client.post(path, json=body, headers=bearer(key))
    assert resp.status == 422, await resp.text()
    assert "from_email" in (await _error(resp))["message"]
