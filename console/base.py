"""What every operator command shares: the one-line error, its exit code, and plain tables."""

from __future__ import annotations

import sys


class OpsError(Exception):
    """A problem the operator must fix; printed as one line, exit code ``code``."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code



def guard(fn):
    """Turn an OpsError into one clear line and its exit code. (A SettingsError, a connection
    error and Ctrl-C reach ``mailgenius``'s main(), which maps them through the kernel's
    :func:`mailgenius.serve.run_command`, as for every command.)"""

    def run(args) -> int:
        try:
            return fn(args)
        except OpsError as exc:
            print(f"mailgenius {args.command}: {exc}", file=sys.stderr)
            return exc.code

    return run


def format_table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    out = ["  ".join(f"{h:<{w}}" for h, w in zip(headers, widths, strict=False)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(f"{str(c):<{w}}" for c, w in zip(r, widths, strict=False)).rstrip() for r in rows]
    return "\n".join(out)
