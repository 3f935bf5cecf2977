"""Generated files: write one only when its content changed, and ``--check``.

Every generator of ``mailgenius build`` (alerting, dashboards, the metrics catalogue, the
Kubernetes manifests) renders its files to text, then hands them here. A file whose content is
already on disk is left alone (its mtime too); with ``check`` nothing is written or removed and the
paths that *would* change are returned, which ``mailgenius build --check`` (and a test) turns into
a failure when the committed files drifted from their sources.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path


def write_if_changed(files: Mapping[str | Path, str], root: Path, *, check: bool = False) -> list[Path]:
    """Write each ``path -> text`` under ``root`` (an absolute path stays as it is) whose content
    differs from the file on disk, creating folders; return those paths (in the order of
    ``files``' sorted keys, all ``str`` or all ``Path``). With ``check``,
    write nothing and return the paths that would change."""
    changed = []
    for rel, text in sorted(files.items()):
        path = Path(root) / rel
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        changed.append(path)
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    return changed


def remove_stale(paths: Iterable[Path], *, check: bool = False) -> list[Path]:
    """Remove generated files no generator produces any more; return them. With ``check``,
    remove nothing and return the files that would go."""
    stale = list(paths)
    if not check:
        for path in stale:
            path.unlink()
    return stale
