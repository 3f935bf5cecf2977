"""Campaign templates: Jinja2's ImmutableSandboxedEnvironment, checked when a campaign is
created and compiled once per campaign per worker process.

What a template may do is deliberately small, so that a template that passes the check at
creation cannot blow up mid-send:

* no names or attributes starting with ``_`` (``{{ ''.__class__ }}``), no ``attr`` filter;
* an allow-list of filters (no ``format``, ``center``, ``indent``, ``map``...), no ``range``,
  ``lipsum``, ``cycler``, ``namespace`` globals;
* no ``{% set %}``, ``{% with %}``, macros, includes, imports or recursive loops, loops nested
  at most two deep (output then grows at most linearly with the template and the lead data);
* ``*``, ``**``, ``+`` and ``%`` are intercepted: string/list growth is charged to a per-render
  budget, big exponents and %-formatting of strings are refused; method calls with huge integer
  arguments and the padding/formatting string methods are refused;
* each rendered part is limited in size, and a trial render with a sample lead must pass.

Literal ``href="http..."`` links of the HTML part are stored per campaign (the ``links`` table)
and rewritten at compile time to signed click-tracking URLs.
"""

from __future__ import annotations

import contextvars
import html as htmllib
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from typing import Any

from jinja2 import TemplateSyntaxError, nodes, pass_context
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.filters import do_replace
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import escape

from mailgenius.errors import ValidationError

#: RFC 5322 line limit for the subject line
MAX_SUBJECT_CHARS = 998
#: largest accepted HTML / text template sources
MAX_HTML_BYTES = 512 * 1024
MAX_TEXT_BYTES = 256 * 1024
#: largest rendered part (subject, html or text) of one email
MAX_OUTPUT_CHARS = 1024 * 1024
#: characters that intercepted operations may produce during one render
RENDER_BUDGET_CHARS = 2 * 1024 * 1024
#: a trial render slower than this is refused at creation, seconds
TRIAL_RENDER_MAX_SECONDS = 0.25
#: largest integer argument of a method call and largest exponent
MAX_INT_ARG = 100_000
MAX_EXPONENT = 64
#: deepest nesting of {% for %} loops
MAX_LOOP_DEPTH = 2
#: deepest nesting of the template's syntax tree (blocks, parentheses, filters...): deeper ones
#: are refused with a 422 instead of exhausting Python's recursion limit (a 500) when parsed,
#: checked or compiled
MAX_NESTING = 40

ALLOWED_FILTERS = frozenset({
    "abs", "capitalize", "count", "d", "default", "dictsort", "e", "escape", "filesizeformat",
    "first", "float", "forceescape", "int", "join", "last", "length", "list", "lower", "max",
    "min", "replace", "reverse", "round", "safe", "sort", "string", "striptags", "sum", "title",
    "tojson", "trim", "truncate", "unique", "upper", "urlencode", "urlize", "wordcount",
})
FORBIDDEN_NAMES = frozenset({"range", "lipsum", "cycler", "joiner", "namespace", "self",
                             "varargs", "kwargs", "caller", "dict"})
FORBIDDEN_METHODS = frozenset({"format", "format_map", "expandtabs", "ljust", "rjust", "center",
                               "zfill", "encode", "translate", "maketrans", "mro"})
FORBIDDEN_NODES: dict[type, str] = {
    nodes.Macro: "macros", nodes.CallBlock: "call blocks", nodes.Include: "includes",
    nodes.Import: "imports", nodes.FromImport: "imports", nodes.Extends: "extends",
    nodes.Assign: "{% set %}", nodes.AssignBlock: "{% set %}", nodes.With: "{% with %}",
    nodes.Block: "blocks",
}

#: the longest one email may take to render (checked in the sandbox's hooks), seconds
RENDER_MAX_SECONDS = 0.5

#: per render: [characters produced by guarded operations, hook calls, deadline]
_budget: contextvars.ContextVar[list | None] = contextvars.ContextVar("mg_render_budget", default=None)

LINK_RE = re.compile(r"""(href\s*=\s*)(["'])(https?://[^"'\s<>{}]+)\2""", re.IGNORECASE)


def _new_budget() -> list:
    return [0, 0, time.perf_counter() + RENDER_MAX_SECONDS]


def _charge(n: int) -> None:
    b = _budget.get()
    if b is None:
        b = _new_budget()
        _budget.set(b)
    b[0] += n
    if n > MAX_OUTPUT_CHARS or b[0] > RENDER_BUDGET_CHARS:
        raise SecurityError("the template exceeds its render budget")


@pass_context  # never folded into a constant at compile time (it must run at render time)
def _guard_loop(_context, iterable):
    """Wraps the iterable of every ``{% for %}`` (see :func:`_guard_loops`): loop bodies that
    call no hook (``{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}``) still meet the
    render deadline, checked every 256 iterations (items are handed on in slices of 256, so the
    guard costs little per iteration)."""
    b = _budget.get()
    if b is None:
        return iterable
    return _guarded_items(iter(iterable), b)


def _guarded_items(it, b: list):
    while True:
        chunk = tuple(islice(it, 256))
        if not chunk:
            return
        yield from chunk
        if time.perf_counter() > b[2]:
            raise SecurityError(f"the template took longer than {RENDER_MAX_SECONDS}s to render")


#: the name the loop guard is registered under: random per process, so no template can name it
#: (and not in ALLOWED_FILTERS, so the check refuses it anyway)
_LOOP_FILTER = f"mgloop{secrets.token_hex(6)}"


def _tick() -> None:
    """Called from the sandbox's hooks: every 256 calls, check the render's deadline."""
    b = _budget.get()
    if b is None:
        return
    b[1] += 1
    if not b[1] & 0xFF and time.perf_counter() > b[2]:
        raise SecurityError(f"the template took longer than {RENDER_MAX_SECONDS}s to render")


def _guarded_replace(eval_ctx, s, old, new, count=None):
    s_, old_, new_ = str(s), str(old), str(new)
    n = (len(s_) + 1) if old_ == "" else s_.count(old_)
    if count is not None:
        n = min(n, int(count))
    _charge(len(s_) + n * len(new_))
    return do_replace(eval_ctx, s, old, new, count)


_guarded_replace.jinja_pass_arg = do_replace.jinja_pass_arg  # type: ignore[attr-defined]


class MailSandbox(ImmutableSandboxedEnvironment):
    """The sandbox with growth-limiting operators and calls (see the module docstring)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, *, autoescape: bool):
        super().__init__(autoescape=autoescape, auto_reload=False, cache_size=0)
        self.globals.clear()
        self.filters = {k: v for k, v in self.filters.items() if k in ALLOWED_FILTERS}
        self.filters["replace"] = _guarded_replace
        self.filters[_LOOP_FILTER] = _guard_loop

    def getattr(self, obj, attribute):
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _tick()
        return super().getitem(obj, argument)

    def call_binop(self, context, operator, left, right):
        _tick()
        if operator == "**":
            if isinstance(right, int | float) and abs(right) > MAX_EXPONENT:
                raise SecurityError("exponent too large")
        elif operator == "%":
            if isinstance(left, str):
                raise SecurityError("%-formatting of strings is not allowed")
        elif operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(n, int):
                    _charge(len(seq) * max(n, 0))
        elif operator == "+" and isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple):
            _charge(len(left) + len(right))
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's signature
        _tick()
        name = getattr(__obj, "__name__", "")
        if name in FORBIDDEN_METHODS:
            raise SecurityError(f"calling {name}() is not allowed in templates")
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_INT_ARG:
                raise SecurityError("integer argument too large")
        if name == "replace" and isinstance(getattr(__obj, "__self__", None), str) and len(args) >= 2:
            s, old, new = __obj.__self__, str(args[0]), str(args[1])
            n = (len(s) + 1) if old == "" else s.count(old)
            _charge(len(s) + n * len(new))
        out = super().call(__context, __obj, *args, **kwargs)
        if isinstance(out, str | list | tuple):
            _charge(len(out))
        return out


HTML_ENV = MailSandbox(autoescape=True)
TEXT_ENV = MailSandbox(autoescape=False)


def _check_ast(tree: nodes.Template, part: str) -> list[str]:
    problems: list[str] = []

    def walk(node: nodes.Node, depth: int, level: int = 0) -> None:
        if level > MAX_NESTING:
            problems.append(f"{part}: the template is nested deeper than {MAX_NESTING} levels "
                            f"(line {node.lineno})")
            return
        for kind, what in FORBIDDEN_NODES.items():
            if isinstance(node, kind):
                problems.append(f"{part}: {what} are not allowed (line {node.lineno})")
        if isinstance(node, nodes.For):
            if node.recursive:
                problems.append(f"{part}: recursive loops are not allowed (line {node.lineno})")
            depth += 1
            if depth > MAX_LOOP_DEPTH:
                problems.append(f"{part}: loops nested deeper than {MAX_LOOP_DEPTH} (line {node.lineno})")
        if isinstance(node, nodes.Getattr) and node.attr.startswith("_"):
            problems.append(f"{part}: attribute {node.attr!r} is not allowed (line {node.lineno})")
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) \
                and isinstance(node.arg.value, str) and node.arg.value.startswith("_"):
            problems.append(f"{part}: item {node.arg.value!r} is not allowed (line {node.lineno})")
        if isinstance(node, nodes.Name) and (node.name in FORBIDDEN_NAMES or node.name.startswith("_")):
            problems.append(f"{part}: name {node.name!r} is not allowed (line {node.lineno})")
        if isinstance(node, nodes.Filter) and node.name not in ALLOWED_FILTERS:
            problems.append(f"{part}: filter {node.name!r} is not allowed (line {node.lineno})")
        for child in node.iter_child_nodes():
            walk(child, depth, level + 1)

    walk(tree, 0)
    return problems


def extract_links(html: str) -> list[str]:
    """The distinct literal http(s) links of an HTML template, in order of appearance."""
    seen: dict[str, None] = {}
    for m in LINK_RE.finditer(html):
        seen.setdefault(htmllib.unescape(m.group(3)), None)
    return list(seen)


#: stands for a tracked link in compiled HTML (random per process, so neither a template nor lead
#: data can contain it); render() swaps it for the recipient's click URL, which is cheaper than a
#: sandboxed ``click_url()`` call per link per email
_LINK_MARK = f"mglink{secrets.token_hex(8)}x"


def _link_marker(link_id: int) -> str:
    return f"{_LINK_MARK}{link_id}x"


def rewrite_links(html: str, link_ids: dict[str, int]) -> tuple[str, tuple[int, ...]]:
    """The campaign's stored links replaced by markers; returns the HTML and the link ids used."""
    used: dict[int, None] = {}

    def sub(m: re.Match) -> str:
        link_id = link_ids.get(htmllib.unescape(m.group(3)))
        if link_id is None:
            return m.group(0)
        used[link_id] = None
        return f"{m.group(1)}{m.group(2)}{_link_marker(link_id)}{m.group(2)}"

    return LINK_RE.sub(sub, html), tuple(used)


@dataclass
class CompiledCampaign:
    subject: Any
    html: Any
    text: Any
    #: ids of the tracked links whose markers the HTML holds
    links: tuple[int, ...] = ()


def _parse(env: MailSandbox, source: str, part: str) -> nodes.Template:
    try:
        return env.parse(source)
    except TemplateSyntaxError as exc:
        raise ValidationError(f"{part}: template syntax error at line {exc.lineno}: {exc.message}",
                              code="template_error") from None
    except RecursionError:  # Jinja's parser recurses once per nesting level
        raise ValidationError(f"{part}: the template is nested too deeply (at most {MAX_NESTING} levels)",
                              code="template_refused") from None


def _guard_loops(tree: nodes.Template, env: MailSandbox) -> nodes.Template:
    """Every ``{% for x in <iter> %}`` becomes ``{% for x in <iter>|<loop guard> %}``."""
    for loop in tree.find_all(nodes.For):
        guarded = nodes.Filter(loop.iter, _LOOP_FILTER, [], [], None, None, lineno=loop.iter.lineno)
        guarded.set_environment(env)
        loop.iter = guarded
    return tree


def _compile(env: MailSandbox, source: str, part: str):
    try:
        return env.from_string(_guard_loops(_parse(env, source, part), env))
    except RecursionError:
        raise ValidationError(f"{part}: the template is nested too deeply (at most {MAX_NESTING} levels)",
                              code="template_refused") from None


def compile_campaign(subject: str, html: str, text: str, link_ids: dict[str, int] | None = None) -> CompiledCampaign:
    """Compile the three parts (no checks: :func:`validate_campaign` ran at creation); every
    loop is guarded by the render deadline (:func:`_guard_loop`)."""
    html_src, links = rewrite_links(html, link_ids or {})
    return CompiledCampaign(_compile(TEXT_ENV, subject, "subject"), _compile(HTML_ENV, html_src, "html"),
                            _compile(TEXT_ENV, text, "text"), links)


SAMPLE_LEAD = {
    "id": 1, "email": "sample.recipient@example.com", "first_name": "Sample", "last_name": "Recipient",
    "company": "Example Inc", "phone": "+1 555 0100", "tags": ["sample", "newsletter"],
    "attributes": {"plan": "pro", "city": "Lisbon"},
}


def validate_campaign(subject: str, html: str, text: str) -> list[str]:
    """Refuse (ValidationError 422) a template that is too big, unsafe, or fails a trial
    render; return the literal links of the HTML part."""
    if not subject.strip():
        raise ValidationError("subject must not be empty", code="template_error")
    if len(subject) > MAX_SUBJECT_CHARS:
        raise ValidationError(f"subject longer than {MAX_SUBJECT_CHARS} characters", code="template_error")
    if len(html.encode()) > MAX_HTML_BYTES:
        raise ValidationError(f"html larger than {MAX_HTML_BYTES} bytes", code="template_error")
    if len(text.encode()) > MAX_TEXT_BYTES:
        raise ValidationError(f"text larger than {MAX_TEXT_BYTES} bytes", code="template_error")
    if not html.strip() and not text.strip():
        raise ValidationError("html or text is required", code="template_error")
    problems: list[str] = []
    for env, src, part in ((TEXT_ENV, subject, "subject"), (HTML_ENV, html, "html"), (TEXT_ENV, text, "text")):
        try:
            problems += _check_ast(_parse(env, src, part), part)
        except RecursionError:
            problems.append(f"{part}: the template is nested too deeply (at most {MAX_NESTING} levels)")
    if problems:
        raise ValidationError("template refused: " + "; ".join(problems[:5]), code="template_refused",
                              details=problems[:50])
    links = extract_links(html)
    try:
        compiled = compile_campaign(subject, html, text, {u: i + 1 for i, u in enumerate(links)})
        start = time.perf_counter()
        render(compiled, sample_context())
        elapsed = time.perf_counter() - start
    except ValidationError:
        raise
    except (TemplateError, RenderError) as exc:
        raise ValidationError(f"template refused: {exc}", code="template_refused") from None
    except Exception as exc:  # any runtime error of the trial render is the template's fault
        raise ValidationError(f"template refused: {type(exc).__name__}: {exc}", code="template_refused") from None
    if elapsed > TRIAL_RENDER_MAX_SECONDS:
        raise ValidationError(f"template refused: a trial render took {elapsed:.2f}s", code="template_refused")
    return links


class RenderError(Exception):
    """One recipient's email could not be rendered (recorded as a failure of that recipient)."""


def sample_context() -> dict:
    return lead_context(SAMPLE_LEAD, campaign={"id": 0, "name": "sample"},
                        unsubscribe_url="https://example.invalid/u/sample",
                        click_url=lambda link_id: f"https://example.invalid/t/c/{link_id}")


def _attributes(raw) -> dict:
    if isinstance(raw, str):  # asyncpg returns jsonb as text
        if raw == "{}":
            return {}
        try:
            raw = json.loads(raw)
        except ValueError:
            return {}
        return raw if isinstance(raw, dict) else {}
    return dict(raw) if isinstance(raw, dict) else {}


_MISSING = object()


def lead_context(lead, *, campaign: dict, unsubscribe_url: str, click_url: Callable[[int], str],
                 lead_id=_MISSING) -> dict:
    """The variables a template sees for one recipient: the lead's fields (also under ``lead``),
    ``campaign``, ``unsubscribe_url`` and ``click_url``. ``lead`` is a dict or a claimed row
    (asyncpg Record, jsonb attributes as text; pass ``lead_id`` when its ``id`` is the message's).
    Runs once per email: built in one pass, lists and dicts fresh so no template sees another's."""
    get = lead.get
    view = {"id": get("id") if lead_id is _MISSING else lead_id, "email": get("email"),
            "first_name": get("first_name"), "last_name": get("last_name"), "company": get("company"),
            "phone": get("phone"), "tags": list(get("tags") or []), "attributes": _attributes(get("attributes"))}
    ctx = view.copy()
    ctx["lead"] = view
    ctx["campaign"] = campaign
    ctx["unsubscribe_url"] = unsubscribe_url
    ctx["click_url"] = click_url
    return ctx


def render(compiled: CompiledCampaign, ctx: dict) -> tuple[str, str, str]:
    """(subject, html, text) for one recipient; RenderError when the template misbehaves."""
    token = _budget.set(_new_budget())
    try:
        # Template.render without its per-call overhead: one shared (uncopied) context per
        # environment, the sandboxed root render function called directly. The sandbox lives in
        # the compiled code and the environment's hooks, so nothing here weakens it; ``ctx`` is
        # ours (built per recipient), and templates cannot assign ({% set %} is refused).
        sub_t, html_t, text_t = compiled.subject, compiled.html, compiled.text
        tctx = sub_t.new_context(ctx, shared=True)
        subject = "".join(sub_t.root_render_func(tctx))
        text = "".join(text_t.root_render_func(tctx))
        html = "".join(html_t.root_render_func(html_t.new_context(ctx, shared=True)))
        if compiled.links:
            click_url = ctx["click_url"]
            for link_id in compiled.links:
                marker = _link_marker(link_id)
                if marker in html:
                    html = html.replace(marker, str(escape(click_url(link_id))))
    except SecurityError as exc:
        raise RenderError(f"security: {exc}") from None
    except TemplateError as exc:
        raise RenderError(f"{type(exc).__name__}: {exc}") from None
    except (ArithmeticError, ValueError, TypeError, RecursionError, MemoryError) as exc:
        raise RenderError(f"{type(exc).__name__}: {exc}") from None
    finally:
        _budget.reset(token)
    if len(subject) > MAX_SUBJECT_CHARS or len(html) > MAX_OUTPUT_CHARS or len(text) > MAX_OUTPUT_CHARS:
        raise RenderError("rendered email too large")
    # header injection: a subject is one line
    subject = " ".join(subject.split())
    if not subject:
        raise RenderError("rendered subject is empty")
    return subject, html, text


def add_open_pixel(html: str, url: str) -> str:
    if not html:
        return html
    tag = f'<img src="{url}" width="1" height="1" alt="" style="display:none">'
    i = html.rfind("</body>")
    if i < 0:
        return html + tag
    return html[:i] + tag + html[i:]
