"""The import status words are spelled in two places only: the kernel's vocabulary
(mailgenius/import_states.py) and the state machine that uses them (importer/jobs.py).

Read with ``ast`` (docstrings are prose and skipped):

* importer/: any other string literal that *is* a status word (``"failed"``) or quotes one the
  SQL way (``status = 'failed'``) fails the test;
* exporter/ and console/: the campaigns, the broker and the supervisor share some of these
  words (a campaign is ``queued``, a dead message ``failed``, a process ``running``), so there
  the test looks at the import code only: SQL naming the
  ``imports`` table that quotes a status word, and status-word literals in a module whose name
  says import (exporter/monitoring_page/imports.py), inside any function or class whose name
  does, or assigned to a module-level name that does (``IMPORT_*``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from mailgenius.import_states import STATUSES

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {"mailgenius/import_states.py", "importer/jobs.py"}
_QUOTED = re.compile(r"'(" + "|".join(STATUSES) + r")'")
_IMPORTS_TABLE = re.compile(r"\bimports\b", re.IGNORECASE)


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the bare string statements (docstrings and the like)."""
    return {id(n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)}


def _import_scopes(tree: ast.Module) -> list[ast.AST]:
    """The nodes of a module that are about imports: functions and classes named so, and
    module-level assignments to a name that says import."""
    out: list[ast.AST] = []
    for n in ast.walk(tree):
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and "import" in n.name.lower():
            out.append(n)
    for n in tree.body:
        targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and "IMPORT" in t.id.upper() for t in targets):
            out.append(n)
    return out


def spelled_words(source: str, *, whole_module: bool) -> list[tuple[int, str]]:
    """(line, literal) of every status word spelled in ``source`` (see the module docstring)."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    found: dict[tuple[int, str], None] = {}

    def check(node: ast.AST, exact: bool, quoted_anywhere: bool) -> None:
        for c in ast.walk(node):
            if not (isinstance(c, ast.Constant) and isinstance(c.value, str)) or id(c) in skip:
                continue
            v = c.value
            if exact and v in STATUSES:
                found[(c.lineno, v)] = None
            elif _QUOTED.search(v) and (quoted_anywhere or _IMPORTS_TABLE.search(v)):
                found[(c.lineno, v)] = None

    if whole_module:
        check(tree, exact=True, quoted_anywhere=True)
    else:
        check(tree, exact=False, quoted_anywhere=False)  # SQL on the imports table, anywhere
        for scope in _import_scopes(tree):
            check(scope, exact=True, quoted_anywhere=True)
    return sorted(found)


def test_the_checker_finds_what_it_looks_for():
    sql = "SELECT 1 FROM imports WHERE status = 'failed'"
    assert spelled_words(f'x = "{sql}"\n', whole_module=True) == [(1, sql)]
    assert spelled_words('def f():\n    return "running"\n', whole_module=True) == [(2, "running")]
    assert spelled_words('"""queued, running or \'failed\'"""\n', whole_module=True) == []
    # the exporter: campaign words stay free, import code and SQL on imports do not
    assert spelled_words('CAMPAIGN = ("queued", "failed")\n', whole_module=False) == []
    assert spelled_words('IMPORT_STATES = ("queued",)\n', whole_module=False) == [(1, "queued")]
    assert spelled_words('async def import_stats(p):\n    return "cancelled"\n', whole_module=False) == [
        (2, "cancelled")]
    assert spelled_words(f'def g():\n    return "{sql}"\n', whole_module=False) == [(2, sql)]
    assert spelled_words('def g():\n    return "SELECT 1 FROM campaigns WHERE status = \'failed\'"\n',
                         whole_module=False) == []


def test_import_status_words_live_in_the_vocabulary_and_the_state_machine_only():
    problems = []
    for package, whole in (("importer", True), ("exporter", False), ("console", False)):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in ALLOWED:
                continue
            whole_module = whole or "import" in path.stem
            for line, literal in spelled_words(path.read_text(), whole_module=whole_module):
                problems.append(f"{rel}:{line}: {literal[:80]!r}")
    assert not problems, ("import status words spelled outside mailgenius/import_states.py and "
                          "importer/jobs.py (use their constants / sql_list):\n" + "\n".join(problems))
