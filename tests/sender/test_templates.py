"""Template sandbox limits that only show with real data (the trial render at creation uses a
small sample lead)."""

from __future__ import annotations

import pytest

from sender import templates


def test_render_deadline_stops_a_slow_render(monkeypatch):
    monkeypatch.setattr(templates, "RENDER_MAX_SECONDS", 0.05)
    src = "{% for a in tags %}{% for b in tags %}{{ a.upper() }}{{ lead.email }}{% endfor %}{% endfor %}"
    templates.validate_campaign("s", src, "")  # fine with the sample lead's two tags
    compiled = templates.compile_campaign("s", src, "")
    ctx = templates.sample_context()
    ctx["tags"] = ["x"] * 5000
    with pytest.raises(templates.RenderError, match="longer than"):
        templates.render(compiled, ctx)


def test_output_size_limit_with_big_data():
    compiled = templates.compile_campaign("s", "{% for a in tags %}{{ lead.attributes.blob }}{% endfor %}", "")
    ctx = templates.sample_context()
    ctx["tags"] = ["x"] * 200
    ctx["lead"]["attributes"]["blob"] = "y" * 10_000
    with pytest.raises(templates.RenderError, match="too large"):
        templates.render(compiled, ctx)


def test_subject_is_one_line_and_links_are_rewritten():
    compiled = templates.compile_campaign("Hi\r\nBcc: x@evil.com {{ first_name }}",
                                          '<a href="https://a.example/x?a=1&amp;b=2">x</a>', "t",
                                          {"https://a.example/x?a=1&b=2": 9})
    subject, html, _ = templates.render(compiled, templates.sample_context())
    assert "\n" not in subject and "\r" not in subject
    assert 'href="https://example.invalid/t/c/9"' in html
