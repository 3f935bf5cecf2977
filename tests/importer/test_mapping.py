"""Header mapping on the exports people really have (fixtures in the column layout each tool
writes), tag cells in the shapes those tools write, full-name splitting, the explicit
``columns`` override and ``POST /api/upload/preview``."""

from __future__ import annotations

import io
import json

import aiohttp
import pytest

from importer.mapping import MappingProblem, detect, parse_tags, split_name

from .conftest import FIXTURES, upload

EXPORTS = FIXTURES / "exports"

# fixture -> (encoding, delimiter, {email: {column: value}}) ; attributes: a subset that must be there
CASES = {
    "mailchimp_audience.csv": ("utf-8", ",", {
        "ana@example.com": {"first_name": "Ana", "last_name": "Souza", "phone": "+55 11 91234-5678",
                            "tags": ["Customer", "VIP"], "attributes": {"MEMBER_RATING": "2", "LEID": "123456"}},
        "bob@example.com": {"tags": ["Newsletter"]},
        "cara@example.com": {"first_name": "Cara", "last_name": None, "tags": []},
        "dan@example.com": {"tags": ["Black Friday, 2023", "VIP"]},
    }),
    "hubspot_contacts.csv": ("utf-8", ",", {
        "dana@example.com": {"first_name": "Dana", "last_name": "Kim", "company": "Globex",
                             "phone": "+1 555 0199", "attributes": {"Record ID": "101", "Phone Number": "+1 555 0100"}},
        "eli@example.com": {"company": "Initech", "phone": "+1 555 0101"},  # no mobile: the landline
    }),
    "outlook_contacts.csv": ("utf-8", ",", {
        "fiona@example.ie": {"first_name": "Fiona", "last_name": "Gallagher", "company": "Hooli",
                             "phone": "+353 87 555 0002", "tags": ["Customer", "VIP"],
                             "attributes": {"E-mail 2 Address": "fiona.home@example.ie", "Job Title": "CTO"}},
        "gus@example.com": {"tags": ["Suppliers"], "attributes": {"Notes": "met at the fair"}},
    }),
    "google_contacts.csv": ("utf-8", ",", {
        "joao@example.com.br": {"first_name": "João", "last_name": "Pereira", "company": "Padaria Boa",
                                "phone": "+55 21 99876-5432", "tags": ["Clientes", "VIP"]},
        "helga@example.de": {"first_name": "Helga", "tags": []},
    }),
    "google_contacts_legacy.csv": ("utf-8", ",", {
        "iris@example.nl": {"first_name": "Iris", "last_name": "van Dijk", "company": "Tulip BV",
                            "phone": "+31 6 5550 0004", "tags": ["Friends"],
                            "attributes": {"Name": "Iris van Dijk"}},
    }),
    "listmonk_subscribers.csv": ("utf-8", ",", {
        "lia@example.com": {"first_name": "Lia", "last_name": "Maria Costa",
                            "attributes": {"name": "Lia Maria Costa", "city": "Recife", "plan": "pro",
                                           "status": "enabled"}},
        "max@example.com": {"first_name": "Max", "last_name": None},
    }),
    "brevo_contacts.csv": ("utf-8", ";", {
        "kai@example.com": {"first_name": "Kai", "last_name": "Nakamura", "phone": "+81 90 5550 0005",
                            "attributes": {"WHATSAPP": "+81 90 5550 0006", "CONTACT ID": "1"}},
    }),
    "brevo_contacts_ptbr.csv": ("utf-8", ";", {
        "luiza@example.com.br": {"first_name": "Luíza", "last_name": "Araújo", "company": "Café Mineiro",
                                 "phone": "+55 31 95550-0007"},
    }),
    "rdstation_leads.csv": ("utf-8", ",", {
        "maria@example.com.br": {"first_name": "Maria", "last_name": "da Silva Santos", "company": "Loja X",
                                 "phone": "(11) 98888-7777", "tags": ["cliente", "vip"], "source": "Landing page",
                                 "attributes": {"Nome": "Maria da Silva Santos", "Cargo": "Gerente",
                                                "Telefone": "(11) 3333-4444"}},
        "pedro@example.com.br": {"first_name": "Pedro", "last_name": None, "phone": "(21) 3333-5555", "tags": []},
    }),
    "excel_ptbr.csv": ("cp1252", ";", {
        "joao.conceicao@exemplo.com.br": {"first_name": "João", "last_name": "Conceição",
                                          "phone": "(11) 91234-5678",
                                          "attributes": {"WhatsApp": "(11) 91234-0000"}},
        # Celular empty: the WhatsApp number fills the phone (and stays in attributes)
        "angela@exemplo.com.br": {"first_name": "Ângela", "last_name": "Magalhães", "phone": "(48) 99999-1111",
                                  "attributes": {"WhatsApp": "(48) 99999-1111"}},
    }),
    "excel_ptbr_nome_completo.csv": ("cp1252", ";", {
        "tom@exemplo.com.br": {"first_name": "Antônio", "last_name": "Carlos Jobim", "phone": "(21) 98765-4321",
                               "tags": ["bossa nova", "música"],
                               "attributes": {"Nome completo": "Antônio Carlos Jobim"}},
    }),
    "excel_es.csv": ("cp1252", ";", {
        "inigo@ejemplo.es": {"first_name": "Íñigo", "last_name": "Martínez Peña", "phone": "+34 600 555 008",
                             "company": "Ñandú SL"},
    }),
    "excel_en.csv": ("utf-8-sig", ",", {
        "olivia@example.co.uk": {"first_name": "Olivia", "last_name": "Brown", "phone": "+44 7700 900123",
                                 "company": "Acme Ltd", "tags": ["customer", "newsletter"]},
    }),
}


@pytest.mark.parametrize("name", sorted(CASES))
async def test_exports_of_real_tools_map_their_columns(api, job_runner, pool, name):
    # Given an export in the column layout of the tool it is named after; When it is imported
    encoding, delimiter, leads = CASES[name]
    resp = await upload(api, EXPORTS / name, filename=name)
    assert resp.status == 202, await resp.text()
    import_id = (await resp.json())["id"]
    assert await job_runner(import_id) == "completed"
    # Then every lead is there with its fields in the right columns
    imp = await pool.fetchrow("SELECT * FROM imports WHERE id = $1", import_id)
    assert (imp["encoding"], imp["delimiter"]) == (encoding, delimiter)
    assert imp["invalid"] == 0 and imp["inserted"] == len(leads)
    got = {r["email"]: r for r in await pool.fetch("SELECT * FROM leads WHERE import_id = $1", import_id)}
    assert set(got) == set(leads)
    for email, want in leads.items():
        row = got[email]
        for col, value in want.items():
            if col == "attributes":
                attrs = json.loads(row["attributes"])
                assert {k: attrs.get(k) for k in value} == value, (email, attrs)
            else:
                assert row[col] == value, (email, col, row[col])
    # and the import records the mapping it applied
    mapping = {m["column"]: m["field"] for m in json.loads(imp["mapping"])}
    assert "email" in mapping.values()


@pytest.mark.parametrize("cell, tags", [
    ('"Customer","VIP"', ["Customer", "VIP"]),           # Mailchimp
    ('"Customer", "VIP"', ["Customer", "VIP"]),
    ('"One, with comma","Two"', ["One, with comma", "Two"]),
    ("Customer;VIP", ["Customer", "VIP"]),               # Outlook categories
    ("vip, news", ["news", "vip"]),
    ("a|b|a", ["a", "b"]),
    ('["x", "y"]', ["x", "y"]),                          # JSON list
    ("{x,y}", ["x", "y"]),                               # Postgres array
    ("* myContacts ::: Friends ::: Work", ["Friends", "Work"]),  # Google labels
    ("* myContacts", []),
    ("single", ["single"]),
    ("  ", []),
    ("'quoted'", ["quoted"]),
])
def test_tag_cells_in_the_shapes_exports_write(cell, tags):
    assert parse_tags(cell) == tags


def test_full_names_split_into_first_and_last():
    assert split_name("Maria da Silva") == ("Maria", "da Silva")
    assert split_name("  Cher ") == ("Cher", "")
    assert split_name("Silva, Maria") == ("Maria", "Silva")
    assert split_name("") == ("", "")


def test_detection_priorities_and_generic_name():
    # Nome next to Sobrenome is the first name; alone it is the full name (split)
    m = detect(["Nome", "Sobrenome", "E-mail"])
    assert m.columns == {"first_name": 0, "last_name": 1, "email": 2}
    m = detect(["Nome", "E-mail"])
    assert m.columns == {"full_name": 0, "email": 1} and m.split_name
    # a mobile number wins over the landline whatever the order
    m = detect(["email", "Telefone", "WhatsApp", "Celular"])
    assert m.columns["phone"] == 3
    assert m.phone_fallbacks == [2, 1]
    # Google's label columns are not the address
    assert detect(["E-mail 1 - Label", "E-mail 1 - Value"]).columns["email"] == 1


def test_explicit_override_problems_name_the_column():
    header = ["Correio", "Quem", "Notes"]
    with pytest.raises(MappingProblem, match="no email column"):
        detect(header)
    m = detect(header, {"Correio": "email", "Quem": "full_name", "Notes": "ignore"})
    assert m.columns == {"email": 0, "full_name": 1} and m.ignored == [(2, "Notes")]
    with pytest.raises(MappingProblem, match="'Nope' is not in the file's header"):
        detect(header, {"Nope": "email"})
    with pytest.raises(MappingProblem, match="unknown target 'mail'"):
        detect(header, {"Correio": "mail"})
    with pytest.raises(MappingProblem, match="both map to 'email'"):
        detect(header, {"Correio": "email", "Quem": "email"})


# -- columns override on upload -------------------------------------------------------------------

async def test_columns_override_beats_detection(api, job_runner, pool):
    body = (b"Email,Contato,Other mail,Notes\n"
            b"a@example.com,Ana Lima,real@example.com,x\n")
    columns = json.dumps({"Other mail": "email", "Contato": "full_name", "Email": "attribute", "Notes": "ignore"})
    resp = await upload(api, body, columns=columns)
    assert resp.status == 202, await resp.text()
    assert (await resp.json())["columns"] == json.loads(columns)
    import_id = (await resp.json())["id"]
    assert await job_runner(import_id) == "completed"
    lead = await pool.fetchrow("SELECT * FROM leads")
    assert lead["email"] == "real@example.com"
    assert (lead["first_name"], lead["last_name"]) == ("Ana", "Lima")
    assert json.loads(lead["attributes"]) == {"Email": "a@example.com", "Contato": "Ana Lima"}
    view = await (await api.get(f"/api/imports/{import_id}", headers=api.headers_)).json()
    assert {m["column"]: m["field"] for m in view["mapping"]} == {
        "Email": "attribute", "Contato": "full_name", "Other mail": "email", "Notes": "ignore"}


@pytest.mark.parametrize("columns, message", [
    ("{not json", "not valid JSON"),
    ('["email"]', "non-empty JSON object"),
    ('{"Mail": "email"}', "'Mail' is not in the file's header"),
    ('{"email": "e-mail"}', "unknown target 'e-mail'"),
    ('{"email": "email", "name": "email"}', "both map to 'email'"),
    ('{"email": "ignore"}', "no email column"),
])
async def test_bad_columns_mapping_is_422_naming_the_problem(api, pool, settings, columns, message):
    resp = await upload(api, b"email,name\na@example.com,Ann\n", columns=columns)
    assert resp.status == 422, await resp.text()
    body = await resp.json()
    assert message in json.dumps(body), body
    assert await pool.fetchval("SELECT count(*) FROM imports") == 0
    import os

    assert [f for f in os.listdir(settings.upload_dir)] == []


# -- preview --------------------------------------------------------------------------------------

async def _preview(api, body: bytes, **fields) -> aiohttp.ClientResponse:
    data = aiohttp.FormData()
    for k, v in fields.items():
        data.add_field(k, v)
    data.add_field("file", io.BytesIO(body), filename="x.csv", content_type="text/csv")
    return await api.post("/api/upload/preview", data=data, headers=api.headers_)


async def test_preview_shows_encoding_mapping_rows_and_creates_nothing(api, pool, settings):
    resp = await _preview(api, (EXPORTS / "excel_ptbr.csv").read_bytes() + b"x;y;not-an-email;;\r\n")
    assert resp.status == 200, await resp.text()
    p = await resp.json()
    assert (p["encoding"], p["delimiter"]) == ("cp1252", ";")
    assert p["header"] == ["Nome", "Sobrenome", "E-mail", "Celular", "WhatsApp"]
    assert [m["field"] for m in p["mapping"]] == ["first_name", "last_name", "email", "phone", "attribute"]
    assert p["fields"] == {"first_name": "Nome", "last_name": "Sobrenome", "email": "E-mail", "phone": "Celular"}
    assert p["attributes"] == ["WhatsApp"]
    assert p["rows"][0] == {"line": 2, "email": "joao.conceicao@exemplo.com.br", "first_name": "João",
                            "last_name": "Conceição", "company": None, "phone": "(11) 91234-5678", "tags": [],
                            "source": None, "attributes": {"WhatsApp": "(11) 91234-0000"}}
    assert p["rejected"] == [{"line": 4, "reason": "invalid_syntax", "raw": "x;y;not-an-email;;"}]
    assert await pool.fetchval("SELECT count(*) FROM imports") == 0
    import os

    assert os.listdir(settings.upload_dir) == []


async def test_preview_with_columns_and_ignored(api):
    body = b'Correio,Who,Labels,Secret\nann@example.com,Ann Lee,"""a"",""b""",s3cret\n'
    resp = await _preview(api, body, columns=json.dumps({"Correio": "email", "Who": "full_name", "Secret": "ignore"}))
    p = await resp.json()
    assert resp.status == 200, p
    assert p["ignored_columns"] == ["Secret"]
    assert p["rows"][0]["first_name"] == "Ann" and p["rows"][0]["tags"] == ["a", "b"]
    assert "s3cret" not in json.dumps(p["rows"])
    resp = await _preview(api, body)
    assert resp.status == 422
    assert "no email column" in (await resp.json())["error"]["message"]


async def test_preview_reads_only_the_first_mib(api):
    # a 3 MiB file: the preview answers from its first MiB, rows cut at a whole line
    line = b"someone.%07d@example.com,Name\n"
    body = b"email,name\n" + b"".join(line % i for i in range(3 * (1 << 20) // len(line % 0)))
    resp = await _preview(api, body, rows="200")
    p = await resp.json()
    assert resp.status == 200, p
    assert p["truncated"] is True and p["bytes_read"] == 1 << 20
    assert len(p["rows"]) == 200 and p["rejected"] == []


async def test_preview_needs_import_scope(api, make_key):
    data = aiohttp.FormData()
    data.add_field("file", b"email\na@b.co\n", filename="x.csv")
    key = await make_key("read")
    resp = await api.post("/api/upload/preview", data=data, headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 403


async def test_source_column_wins_over_the_upload_source_where_not_empty(api, job_runner, pool):
    body = b"email,Origem\na@example.com,webinar\nb@example.com,\n"
    import_id = (await (await upload(api, body, source="planilha")).json())["id"]
    assert await job_runner(import_id) == "completed"
    got = {r["email"]: r["source"] for r in await pool.fetch("SELECT email, source FROM leads")}
    assert got == {"a@example.com": "webinar", "b@example.com": "planilha"}
