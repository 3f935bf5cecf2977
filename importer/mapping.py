"""Which CSV column feeds which lead field: header detection for the exports people really have,
an explicit ``columns`` override, and the per-value helpers (tag lists, full-name split).

Detection compares headers after :func:`norm_header` (lower case, accents dropped, only letters
and digits kept), so ``E-mail 1 - Value`` becomes ``email1value`` and ``Correo electrónico``
becomes ``correoelectronico``. When several columns could feed one field, the alias listed first
in :data:`ALIASES` wins (``Celular`` before ``WhatsApp`` before ``Telefone``); the others are
kept in ``attributes`` under their header name, like every column no alias knows.

Layouts covered (docs/importer.md has the table): Mailchimp, HubSpot, Outlook, Google Contacts
(old and new), listmonk, Brevo/Sendinblue, RD Station and spreadsheet exports in pt-BR, es, en.
"""

from __future__ import annotations

import csv
import json
import re
import unicodedata
from dataclasses import dataclass, field

#: lead fields a column can feed; ``full_name`` is split into first/last (and kept whole in
#: attributes); ``source`` wins over the upload's ``source`` where not empty; ``attributes_json``
#: is a JSON object merged into attributes (listmonk)
FIELDS = ("email", "first_name", "last_name", "full_name", "company", "phone", "tags", "source",
          "attributes_json")
#: what an explicit mapping may also say: keep in attributes under the header name, or drop
TARGETS = (*FIELDS, "attribute", "ignore")
#: most columns a header may have (an Outlook or Google Contacts export has about 90)
MAX_COLUMNS = 2000

#: aliases by field, best first, as :func:`norm_header` spells them
ALIASES: dict[str, tuple[str, ...]] = {
    "email": ("email", "emailaddress", "email1value", "emailaddress1", "primaryemail", "emailprincipal",
              "enderecodeemail", "correo", "correoelectronico", "direcciondecorreo",
              "direcciondecorreoelectronico", "emailadresse", "courriel", "mail", "email1"),
    "first_name": ("firstname", "first", "givenname", "forename", "fname", "prenom", "primeironome",
                   "primernombre", "nomeproprio"),
    "last_name": ("lastname", "last", "surname", "familyname", "lname", "sobrenome", "ultimonome",
                  "apellido", "apellidos", "nom"),
    "full_name": ("fullname", "nomecompleto", "nombrecompleto", "name", "nome", "nombre", "contactname",
                  "displayname", "nomedocontato", "nombredecontacto"),
    "company": ("company", "companyname", "organization", "organisation", "organizationname",
                "organization1name", "org", "empresa", "nomedaempresa", "compania", "employer"),
    "phone": ("mobile", "mobilephone", "mobilephonenumber", "mobilenumber", "cell", "cellphone", "celular",
              "telefonecelular", "numerodecelular", "telefonomovil", "movil", "sms", "whatsapp", "phone",
              "phonenumber", "phone1value", "primaryphone", "telephone", "tel", "telefone", "telefono",
              "businessphone", "homephone"),
    "tags": ("tags", "tag", "labels", "etiquetas", "marcadores", "categories", "categorias",
             "groupmembership"),
    "source": ("source", "leadsource", "origem", "origemdolead", "origemdaprimeiraconversao", "origen",
               "fuente", "fonte"),
    "attributes_json": ("attributes",),
}
_RANK = {alias: (canon, rank) for canon, aliases in ALIASES.items() for rank, alias in enumerate(aliases)}
#: a bare "name" column means the first name when the file also has a last-name column
#: (``Nome;Sobrenome``, ``Nombre;Apellidos``), the full name otherwise (listmonk, RD Station)
_GENERIC_NAMES = {"name", "nome", "nombre"}

_NON_ALNUM = re.compile(r"[^0-9a-z]+")


def norm_header(name: str) -> str:
    s = unicodedata.normalize("NFKD", name.strip().lstrip("\ufeff").lower())
    s = "".join(c for c in s if not unicodedata.combining(c))
    return _NON_ALNUM.sub("", s)


def display_name(name: str, index: int) -> str:
    return name.strip().lstrip("\ufeff") or f"column_{index + 1}"


class MappingProblem(ValueError):
    """An explicit mapping that cannot apply to this header; the message names the problem."""


@dataclass
class Mapping:
    header: list[str]
    columns: dict[str, int]  #: field -> column index (email always present)
    #: columns kept in attributes: (index, key); the full-name column is one of them
    extra: list[tuple[int, str]] = field(default_factory=list)
    ignored: list[tuple[int, str]] = field(default_factory=list)  #: (index, header) dropped
    explicit: bool = False  #: an upload's ``columns`` decided at least one column
    #: other phone columns, best first: where the phone column is empty, the first non-empty
    #: one of these fills it (``Celular`` empty, ``WhatsApp`` set); they stay in attributes too
    phone_fallbacks: list[int] = field(default_factory=list)

    @property
    def split_name(self) -> bool:
        """Whether the full-name column fills first/last (only when neither has its own column)."""
        return "full_name" in self.columns and "first_name" not in self.columns and "last_name" not in self.columns

    def describe(self) -> list[dict]:
        """One entry per column, in header order: what it feeds (stored in ``imports.mapping``)."""
        by_index: dict[int, str] = {i: f for f, i in self.columns.items()}
        ignored = {i for i, _ in self.ignored}
        out = []
        for i, name in enumerate(self.header):
            f = by_index.get(i)
            if i in ignored:
                f = "ignore"
            elif f is None:
                f = "attribute"
            entry = {"column": display_name(name, i), "field": f}
            if f == "full_name":
                entry["split"] = self.split_name
            out.append(entry)
        return out


def detect(header: list[str], override: dict[str, str] | None = None) -> Mapping:
    """The mapping of ``header``: detection, then ``override`` ({header name: target}) on top.

    Raises :class:`MappingProblem` for an override naming a column the header lacks, an unknown
    target, or one field fed by two columns; and when no column feeds ``email``."""
    if len(header) > MAX_COLUMNS:
        raise MappingProblem(f"the header has {len(header):,} columns; at most {MAX_COLUMNS:,} are accepted")
    norms = [norm_header(h) for h in header]
    chosen: dict[int, str] = {}
    forced: dict[int, str] = {}
    if override:
        names = {}
        for i, h in enumerate(header):
            names.setdefault(display_name(h, i), i)
            names.setdefault(h, i)
        seen_fields: dict[str, str] = {}
        for col, target in override.items():
            if target not in TARGETS:
                raise MappingProblem(f"column {col!r}: unknown target {target!r}; use one of {', '.join(TARGETS)}")
            i = names.get(col)
            if i is None:
                shown = ", ".join(repr(display_name(h, j)) for j, h in enumerate(header[:30]))
                raise MappingProblem(f"column {col!r} is not in the file's header (found {shown})")
            if target in FIELDS:
                if target in seen_fields:
                    raise MappingProblem(f"columns {seen_fields[target]!r} and {col!r} both map to {target!r}; "
                                         "a field takes one column")
                seen_fields[target] = col
            forced[i] = target
    taken = {t for t in forced.values() if t in FIELDS}
    best: dict[str, tuple[int, int]] = {}  # field -> (rank, index)
    for i, n in enumerate(norms):
        if i in forced or n not in _RANK:
            continue
        canon, rank = _RANK[n]
        if canon in taken:
            continue
        if canon not in best or rank < best[canon][0]:
            best[canon] = (rank, i)
    detected = {f: i for f, (_, i) in best.items()}
    phones = sorted((_RANK[n][1], i) for i, n in enumerate(norms)
                    if i not in forced and n in _RANK and _RANK[n][0] == "phone")
    # "Nome" next to "Sobrenome" is the first name
    fi = detected.get("full_name")
    if (fi is not None and norms[fi] in _GENERIC_NAMES and "first_name" not in detected
            and "first_name" not in taken and ("last_name" in detected or "last_name" in taken)):
        detected["first_name"] = detected.pop("full_name")
    for f, i in detected.items():
        chosen[i] = f
    for i, t in forced.items():
        chosen[i] = t
    columns = {t: i for i, t in chosen.items() if t in FIELDS}
    if "email" not in columns:
        shown = ", ".join(repr(h) for h in header[:20])
        raise MappingProblem(
            f"no email column in the header (found {shown}); name one 'email', 'e-mail', "
            "'Email Address' or 'correo', or map one with the upload's 'columns' field")
    extra, ignored = [], []
    for i, h in enumerate(header):
        t = chosen.get(i)
        if t == "ignore":
            ignored.append((i, display_name(h, i)))
        elif t is None or t in ("attribute", "full_name"):
            extra.append((i, display_name(h, i)))
    fallbacks = [i for _, i in phones if i != columns.get("phone")] if "phone" in columns else []
    return Mapping(list(header), columns, extra, ignored, explicit=bool(forced), phone_fallbacks=fallbacks)


def parse_override(raw: str) -> dict[str, str]:
    """The upload's ``columns`` field: a JSON object {header name: target}."""
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise MappingProblem(f"'columns' is not valid JSON: {exc}") from None
    if not isinstance(value, dict) or not value:
        raise MappingProblem("'columns' must be a non-empty JSON object {\"<header>\": \"<field>\"}")
    if len(value) > MAX_COLUMNS:
        raise MappingProblem(f"'columns' names more than {MAX_COLUMNS} columns")
    for k, v in value.items():
        if not isinstance(v, str):
            raise MappingProblem(f"column {k!r}: the target must be a string, one of {', '.join(TARGETS)}")
        if v not in TARGETS:
            raise MappingProblem(f"column {k!r}: unknown target {v!r}; use one of {', '.join(TARGETS)}")
    return value


# -- values ------------------------------------------------------------------------------------

#: tags kept per lead from one cell, and characters per tag
MAX_FILE_TAGS, MAX_TAG_LEN = 100, 200
_QUOTES = "\"'“”‘’"


def parse_tags(raw: str) -> list[str]:
    """Tags of one cell, in the shapes exports write, sorted and unique:

    ``"Customer","VIP"`` (Mailchimp), ``Customer, VIP``, ``Customer;VIP`` (Outlook categories),
    ``a|b``, ``["a","b"]`` (JSON), ``{a,b}`` (Postgres arrays), ``* myContacts ::: Friends``
    (Google Contacts labels: the ``* ...`` system groups are dropped)."""
    s = raw.strip()
    if not s:
        return []
    parts: list[str] | None = None
    if s[0] == "[" and s[-1] == "]":
        try:
            v = json.loads(s)
            if isinstance(v, list):
                parts = [x if isinstance(x, str) else json.dumps(x) for x in v]
        except ValueError:
            pass
    if parts is None:
        if s[0] == "{" and s[-1] == "}":
            s = s[1:-1]
        if ":::" in s:
            parts = s.split(":::")
        else:
            delim = max(",;|", key=s.count)
            if s.count(delim) == 0:
                parts = [s]
            else:
                try:
                    parts = next(csv.reader([s], delimiter=delim, skipinitialspace=True), [])
                except csv.Error:
                    parts = s.split(delim)
    out = set()
    for p in parts:
        t = p.strip().strip(_QUOTES).strip()
        if t and not t.startswith("* "):  # Google's system groups: "* myContacts", "* starred"
            out.add(t[:MAX_TAG_LEN])
        if len(out) >= MAX_FILE_TAGS:
            break
    return sorted(out)


def pg_array(tags) -> str:
    """A text[] literal for COPY: every element quoted, backslash and quote escaped."""
    if not tags:
        return "{}"
    return "{" + ",".join('"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"' for t in tags) + "}"


def split_name(full: str) -> tuple[str, str]:
    """``Maria da Silva`` -> (``Maria``, ``da Silva``); ``Silva, Maria`` -> (``Maria``, ``Silva``)."""
    s = " ".join(full.split())
    if not s:
        return "", ""
    if s.count(",") == 1:
        last, first = (p.strip() for p in s.split(","))
        if first and last:
            return first, last
    first, _, last = s.partition(" ")
    return first, last
