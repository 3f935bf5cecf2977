"""SPF, DKIM and DMARC TXT records of a sending domain, looked up with dnspython against the
configured resolver (``MAILGENIUS_DNS_RESOLVER`` / ``MAILGENIUS_DNS_PORT``; empty = system)."""

from __future__ import annotations

import re

import dns.asyncresolver
import dns.exception
import dns.resolver

from mailgenius.errors import ValidationError

DOMAIN_RE = re.compile(r"^(?=.{1,253}$)(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))+$")
SELECTOR_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
#: seconds for each lookup
DNS_TIMEOUT = 3.0


def resolver(settings) -> dns.asyncresolver.Resolver:
    if settings.dns_resolver:
        r = dns.asyncresolver.Resolver(configure=False)
        r.nameservers = [settings.dns_resolver]
        r.port = settings.dns_port
    else:
        r = dns.asyncresolver.Resolver()
    r.timeout = r.lifetime = DNS_TIMEOUT
    return r


async def txt(r, name: str) -> tuple[list[str], str | None]:
    """TXT strings at ``name`` (each record's chunks joined) and an error note, if any."""
    try:
        answer = await r.resolve(name, "TXT")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return [], None
    except dns.exception.Timeout:
        return [], "DNS timeout"
    except dns.exception.DNSException as exc:
        return [], f"DNS error: {type(exc).__name__}"
    return [b"".join(rd.strings).decode("utf-8", "replace") for rd in answer], None


def _finding(status: str, record: str | None, detail: str) -> dict:
    return {"status": status, "record": record, "detail": detail}


def check_spf(records: list[str], err: str | None) -> dict:
    spf = [t for t in records if t.lower().startswith("v=spf1")]
    if err:
        return _finding("error", None, err)
    if not spf:
        return _finding("missing", None, "no TXT record starting with v=spf1")
    if len(spf) > 1:
        return _finding("fail", spf[0], f"{len(spf)} SPF records (RFC 7208 allows one)")
    rec = spf[0]
    terms = rec.split()
    alls = [t for t in terms if t.lstrip("+-~?").lower() == "all"]
    if not alls:
        return _finding("warn", rec, "no 'all' mechanism: the policy for other senders is undefined")
    if alls[-1] in ("all", "+all"):
        return _finding("fail", rec, "'+all' lets anyone send as this domain")
    return _finding("pass", rec, "one SPF record ending in " + alls[-1])


def check_dkim(records: list[str], err: str | None, name: str) -> dict:
    if err:
        return _finding("error", None, err)
    dkim = [t for t in records if "p=" in t.replace(" ", "")]
    if not dkim:
        return _finding("missing", None, f"no DKIM key at {name}")
    rec = dkim[0]
    tags = dict(p.strip().split("=", 1) for p in rec.split(";") if "=" in p)
    if tags.get("v", "DKIM1").strip() != "DKIM1":
        return _finding("fail", rec, "v= must be DKIM1")
    if not tags.get("p", "").strip():
        return _finding("fail", rec, "empty p=: the key is revoked")
    return _finding("pass", rec, f"public key published at {name}")


def check_dmarc(records: list[str], err: str | None) -> dict:
    if err:
        return _finding("error", None, err)
    dmarc = [t for t in records if t.lower().startswith("v=dmarc1")]
    if not dmarc:
        return _finding("missing", None, "no TXT record starting with v=DMARC1 at _dmarc")
    rec = dmarc[0]
    tags = {k.strip().lower(): v.strip() for k, v in (p.split("=", 1) for p in rec.split(";") if "=" in p)}
    policy = tags.get("p", "").lower()
    if policy not in ("none", "quarantine", "reject"):
        return _finding("fail", rec, "p= must be none, quarantine or reject")
    if policy == "none":
        return _finding("warn", rec, "p=none only monitors; quarantine or reject protects the domain")
    return _finding("pass", rec, f"policy {policy}")


async def test_authentication(settings, body) -> dict:
    if not isinstance(body, dict):
        raise ValidationError("expected a JSON object {\"domain\", \"dkim_selector\"}")
    domain = body.get("domain")
    if not isinstance(domain, str) or not DOMAIN_RE.match(domain.strip().rstrip(".")):
        raise ValidationError("domain must be a DNS name like example.com")
    domain = domain.strip().rstrip(".").lower()
    selector = body.get("dkim_selector", "default")
    if not isinstance(selector, str) or not SELECTOR_RE.match(selector):
        raise ValidationError("dkim_selector must be a DNS label like 'default'")
    r = resolver(settings)
    dkim_name = f"{selector}._domainkey.{domain}"
    spf = check_spf(*await txt(r, domain))
    dkim = check_dkim(*await txt(r, dkim_name), dkim_name)
    dmarc = check_dmarc(*await txt(r, f"_dmarc.{domain}"))
    ok = all(f["status"] == "pass" for f in (spf, dkim, dmarc))
    return {"domain": domain, "dkim_selector": selector, "ok": ok, "spf": spf, "dkim": dkim, "dmarc": dmarc}
