"""Hostile campaign templates: deep nesting is a clear 422 (never a RecursionError 500), and
loops whose body calls no sandbox hook still stop at the render deadline."""

from __future__ import annotations

import pytest

from sender import templates
from tests.conftest import bearer

DEEP = {
    "nested ifs": "{% if x %}" * 300 + "y" + "{% endif %}" * 300,
    "nested parentheses": "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}",
    "nested filters": "{{ x" + "|upper" * 3000 + " }}",
    "nested lists": "{{ " + "[" * 2000 + "]" * 2000 + " }}",
}


@pytest.mark.parametrize("name", DEEP)
def test_deep_nesting_is_a_validation_error(name):
    with pytest.raises(templates.ValidationError) as exc:
        templates.validate_campaign("subject", "", DEEP[name])
    assert "nested" in exc.value.message


@pytest.mark.parametrize("name", DEEP)
async def test_deep_nesting_is_422_json_from_the_api(name, client_for, make_key):
    _app, client = await client_for("sender")
    key = await make_key("send")
    resp = await client.post("/api/campaigns", json={"name": "deep", "subject": "s", "from_email": "n@example.org",
                                                      "text": DEEP[name]}, headers=bearer(key))
    assert resp.status == 422, (resp.status, (await resp.text())[:300])
    assert "nested" in (await resp.json())["error"]["message"]


def test_moderate_nesting_still_works():
    src = "{% if first_name %}" * 10 + "{{ ((first_name|upper)) }}" + "{% endif %}" * 10
    templates.validate_campaign("s", "", src)
    subject, _html, text = templates.render(templates.compile_campaign("s", "", src), templates.sample_context())
    assert text == "SAMPLE"


@pytest.mark.parametrize("body", ["", "-", "{{ b }}"])
def test_nested_loops_without_hooks_stop_at_the_deadline(monkeypatch, body):
    # Given a short deadline and two nested loops over literals (9 million iterations) whose body
    # calls no sandbox hook (no attribute, call or operator)
    monkeypatch.setattr(templates, "RENDER_MAX_SECONDS", 0.05)
    lit = "x" * 3000
    src = "{% for a in '" + lit + "' %}{% for b in '" + lit + "' %}" + body + "{% endfor %}{% endfor %}"
    compiled = templates.compile_campaign("s", "", src)
    # When one email is rendered, Then it is refused for taking too long (not rendered in full)
    with pytest.raises(templates.RenderError, match="longer than"):
        templates.render(compiled, templates.sample_context())


def test_loops_over_lead_data_still_render():
    compiled = templates.compile_campaign("s", "{% for t in tags %}<i>{{ t }}</i>{% else %}none{% endfor %}",
                                          "{% for k, v in attributes|dictsort %}{{ loop.index }}{{ k }}={{ v }};{% endfor %}")
    _s, html, text = templates.render(compiled, templates.sample_context())
    assert html == "<i>sample</i><i>newsletter</i>"
    assert text == "1city=Lisbon;2plan=pro;"
