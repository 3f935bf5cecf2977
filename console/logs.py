"""``mailgenius logs``: read the JSON-lines logs that ``make run`` writes to
``<data dir>/log/<process>.log`` (rotated by size: ``<process>.log.1`` ... are older).

Filters: ``--service`` (a process name, repeatable), ``--level`` (this level and above),
``--lines`` (the last N matching lines, default 100), ``--follow`` (keep printing new lines, also
across a rotation), ``--json`` (the raw objects instead of one readable line each).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "critical": 50, "fatal": 50}


def log_dir(env: dict[str, str]) -> Path:
    return Path(env.get("MAILGENIUS_LOG_DIR") or Path(env.get("MAILGENIUS_DATA_DIR") or "var") / "log")


def parse(line: str, service: str) -> dict:
    try:
        obj = json.loads(line)
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        obj = {"level": "info", "message": line.rstrip("\n")}
    obj.setdefault("service", service)
    return obj


def matches(obj: dict, min_level: int) -> bool:
    return LEVELS.get(str(obj.get("level", "info")).lower(), 20) >= min_level


def render(obj: dict) -> str:
    extra = {k: v for k, v in obj.items() if k not in ("ts", "level", "service", "message", "logger", "exc")}
    text = f"{obj.get('ts', '-')} {str(obj.get('level', 'info')).upper():<8} {obj.get('service', '-')}: {obj.get('message', '')}"
    if extra:
        text += "  " + " ".join(f"{k}={v}" for k, v in extra.items())
    if obj.get("exc"):
        text += "\n" + str(obj["exc"])
    return text


def _files(directory: Path, service: str) -> list[Path]:
    """The service's files, oldest first (``x.log.5`` ... ``x.log.1``, ``x.log``)."""
    rotated = sorted(directory.glob(f"{service}.log.[0-9]*"), key=lambda p: int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0,
                     reverse=True)
    current = directory / f"{service}.log"
    return rotated + ([current] if current.exists() else [])


def read(directory: Path, services: list[str] | None, min_level: int, lines: int) -> list[dict]:
    names = services or sorted({p.name.split(".log")[0] for p in directory.glob("*.log*")})
    out: list[dict] = []
    for name in names:
        for path in _files(directory, name):
            with path.open(encoding="utf-8", errors="replace") as fh:
                out += [o for o in (parse(line, name) for line in fh if line.strip()) if matches(o, min_level)]
    out.sort(key=lambda o: str(o.get("ts", "")))
    return out[-lines:] if lines else out


def follow(directory: Path, services: list[str] | None, min_level: int, emit, *, poll: float = 0.5,
           stop=lambda: False) -> None:
    """Print lines appended from now on; a file that shrank or was replaced (rotation) is reopened."""
    open_files: dict[str, tuple[object, int]] = {}

    def names():
        return services or sorted(p.name[:-4] for p in directory.glob("*.log"))

    for name in names():
        path = directory / f"{name}.log"
        if path.exists():
            fh = path.open(encoding="utf-8", errors="replace")
            fh.seek(0, 2)
            open_files[name] = (fh, path.stat().st_ino)
    while not stop():
        for name in names():
            path = directory / f"{name}.log"
            try:
                inode = path.stat().st_ino
            except FileNotFoundError:
                continue
            fh, known = open_files.get(name, (None, None))
            if fh is not None:
                for line in fh.readlines():  # the rest of the old file first
                    if line.strip():
                        obj = parse(line, name)
                        if matches(obj, min_level):
                            emit(obj)
            if fh is None or known != inode:
                if fh is not None:
                    fh.close()
                fh = path.open(encoding="utf-8", errors="replace")
                open_files[name] = (fh, inode)
                for line in fh.readlines():
                    if line.strip():
                        obj = parse(line, name)
                        if matches(obj, min_level):
                            emit(obj)
        time.sleep(poll)


def cmd_logs(args) -> int:
    from .stack import effective_environ

    directory = Path(args.dir) if args.dir else log_dir(effective_environ())
    if not directory.is_dir():
        print(f"mailgenius logs: {directory} does not exist (it is created by `make run`; set MAILGENIUS_DATA_DIR)",
              file=sys.stderr)
        return 1
    level = args.level.lower()
    if level not in LEVELS:
        print(f"mailgenius logs: unknown level {args.level!r} (one of debug, info, warning, error, critical)", file=sys.stderr)
        return 2
    services = args.service or None
    if services:
        known = {p.name.split(".log")[0] for p in directory.glob("*.log*")}
        unknown = [s for s in services if s not in known]
        if unknown:
            print(f"mailgenius logs: no log for {', '.join(unknown)} in {directory} (have: {', '.join(sorted(known))})",
                  file=sys.stderr)
            return 2

    def emit(obj):
        print(json.dumps(obj, ensure_ascii=False) if args.json else render(obj), flush=True)

    for obj in read(directory, services, LEVELS[level], args.lines):
        emit(obj)
    if args.follow:
        try:
            follow(directory, services, LEVELS[level], emit)
        except KeyboardInterrupt:
            return 0
    return 0
