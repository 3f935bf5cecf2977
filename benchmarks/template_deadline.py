"""Render time of hostile campaign templates against the render deadline (RENDER_MAX_SECONDS).

    .venv/bin/python benchmarks/template_deadline.py [--size 8000]

Renders each template once (compiled as the send path compiles it, i.e. without the creation
check) and prints how long one email took and how it ended. With the deadline enforced inside
every loop, no email takes much longer than the limit; a body that calls no sandbox hook used to
run to completion whatever the limit. Also prints the cost of the loop guard on an ordinary
template (a 50-tag loop), per email. Run it against another checkout with
``PYTHONPATH=/path/to/checkout`` to compare."""

from __future__ import annotations

import argparse
import time

from sender import templates


def one(src: str) -> tuple[float, str]:
    compiled = templates.compile_campaign("s", "", src)
    ctx = templates.sample_context()
    start = time.perf_counter()
    try:
        templates.render(compiled, ctx)
        outcome = "rendered"
    except templates.RenderError as exc:
        outcome = f"refused ({exc})"[:70]
    return time.perf_counter() - start, outcome


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=8000, help="characters of each looped literal")
    args = ap.parse_args()
    lit = "x" * args.size
    hostile = {
        "nested loops, empty body": "{% for a in '" + lit + "' %}{% for b in '" + lit + "' %}{% endfor %}{% endfor %}",
        "nested loops, constant body": "{% for a in '" + lit + "' %}{% for b in '" + lit + "' %}-{% endfor %}{% endfor %}",
    }
    print(f"RENDER_MAX_SECONDS = {templates.RENDER_MAX_SECONDS}")
    for name, src in hostile.items():
        elapsed, outcome = one(src)
        print(f"{name:<30} {elapsed:6.2f} s per email  {outcome}")
    ordinary = "{% for t in tags %}<li>{{ t|upper }} {{ first_name }}</li>{% endfor %}"
    compiled = templates.compile_campaign("s", ordinary, "")
    ctx = templates.sample_context()
    ctx["tags"] = [f"tag{i}" for i in range(50)]
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        templates.render(compiled, ctx)
    print(f"{'ordinary 50-tag loop':<30} {(time.perf_counter() - start) / n * 1e6:6.1f} µs per email")


if __name__ == "__main__":
    main()
