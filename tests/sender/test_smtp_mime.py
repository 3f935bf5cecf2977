"""The SMTP message builder (sender.providers.mime_bytes) against the standard library's email
package: both parse back to the same headers and parts, for ASCII, non-ASCII, SMTPUTF8, hostile
(CR/LF) and long values; and the send journal (sender/journal.py) keeps and retires entries."""

from __future__ import annotations

import email
import os
import subprocess
import sys
from email import policy

import pytest

from sender.journal import Journal, decode_outcomes, encode_outcomes, read_entries
from sender.providers import OutEmail, mime_bytes, mime_bytes_slow, smtp_recipient

CASES = [
    OutEmail(1, "ana@example.com", "News <news@example.com>", "Hello Ana", "<p>Hi</p>", "Hi",
             {"List-Unsubscribe": "<https://x.test/u/1>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}),
    OutEmail(2, "joão@example.com", "Notícias Ltda <news@example.com>", "Olá João, promoção ✓",
             "<p>Olá ção</p>\n<p>.leading dot</p>", "Olá\n.leading dot\r\nend", {}),
    OutEmail(3, "bob@exämple.com", "news@example.com", "x" * 1200, "", "only text, " * 200, {}),
    OutEmail(4, "eve@example.com", "news@example.com", "evil\r\nBcc: victim@example.com", "<b>x</b>", "", {}),
    OutEmail(5, "tab@example.com", "news@example.com", "tabs\tand = signs", "a=b\t\n" * 50, "=" * 300, {}),
]


def parsed(raw: bytes):
    return email.message_from_bytes(raw, policy=policy.default)


def parts(msg) -> dict[str, str]:
    out = {}
    for kind in ("plain", "html"):
        body = msg.get_body((kind,))
        if body is not None:
            out[kind] = body.get_content().replace("\r\n", "\n")
    return out


@pytest.mark.parametrize("e", CASES, ids=[str(c.message_id) for c in CASES])
@pytest.mark.parametrize("utf8", [False, True], ids=["ascii", "smtputf8"])
def test_fast_mime_matches_the_email_package(e, utf8):
    if not utf8 and smtp_recipient(e.to)[1]:
        pytest.skip("a non-ASCII local part is only ever sent with SMTPUTF8")
    raw = mime_bytes(e, utf8=utf8)
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    if not utf8:
        assert raw.isascii()
    fast = parsed(raw)
    expected = parsed(mime_bytes_slow(OutEmail(e.message_id, e.to, e.from_email, " ".join(e.subject.splitlines()),
                                               e.html, e.text, e.headers), utf8=utf8))
    assert str(fast["Subject"]) == str(expected["Subject"])
    assert fast["Message-ID"] == expected["Message-ID"]
    assert fast["From"].addresses[0].addr_spec == expected["From"].addresses[0].addr_spec
    assert fast["From"].addresses[0].display_name == expected["From"].addresses[0].display_name
    for k in e.headers:
        assert fast[k] == expected[k]
    assert fast["Bcc"] is None  # a CR/LF in a value never makes a header
    got, want = parts(fast), parts(expected)
    assert set(got) == set(want)
    for kind in got:
        assert got[kind].rstrip("\n") == want[kind].rstrip("\n"), kind


def test_fast_mime_to_header_of_an_idna_domain():
    raw = mime_bytes(CASES[2], utf8=False)
    assert parsed(raw)["To"].addresses[0].domain == "xn--exmple-cua.com"


def test_journal_keeps_entries_until_done(tmp_path):
    j = Journal(str(tmp_path / "j"))
    a = j.write(encode_outcomes("smtp", 7, {1: "<mg-1@x>"}, {2: ("bounced", "550 5.1.1")}, {2}, {2: ("RCPT", 550)}))
    b = j.write(encode_outcomes("smtp", 7, {3: "<mg-3@x>"}, {}, set(), {}))
    with open(j.path, "rb") as fh:
        entries = read_entries(fh.read())
    assert [e["key"] for e in entries] == [a, b]
    assert decode_outcomes(entries[0]) == ("smtp", 7, {1: "<mg-1@x>"}, {2: ("bounced", "550 5.1.1")}, {2},
                                           {2: ("RCPT", 550)})
    j.done(a)
    with open(j.path, "rb") as fh:
        assert [e["key"] for e in read_entries(fh.read() + b'{"torn": ')] == [b]  # a torn line is skipped
    assert [e["key"] for e in j.pending()] == [b]
    j.abandon(b)
    j.done(b)
    assert os.path.getsize(j.path) == 0 and not j.pending()
    j.close()
    assert not os.path.exists(j.path)


def test_a_dead_processes_journal_is_found_a_live_ones_is_not(tmp_path):
    directory = str(tmp_path / "j")
    # a process that journals and dies without retiring its entry (like kill -9)
    code = ("import sys; sys.path.insert(0, '.'); from sender.journal import Journal, encode_outcomes; "
            f"j = Journal({directory!r}); j.write(encode_outcomes('smtp', 1, {{5: 'p'}}, {{}}, set(), {{}})); "
            "import os; os._exit(0)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(
        os.path.dirname(os.path.abspath(__file__)))))
    me = Journal(directory)
    me.write(encode_outcomes("smtp", 1, {9: "q"}, {}, set(), {}))  # our own, alive: never "foreign"
    found, busy = me.foreign()
    assert busy == 0 and len(found) == 1
    path, fh, entries = found[0]
    assert [decode_outcomes(e)[2] for e in entries] == [{5: "p"}]
    me.finish_foreign(path, fh)
    assert me.foreign() == ([], 0)
    me.close()
