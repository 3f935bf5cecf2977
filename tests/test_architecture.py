"""The floors of docs/architecture.md, enforced by reading every product module's imports with
``ast`` (imports inside functions count too: a lazy import is still a dependency).

* kernel ``mailgenius/`` imports no service, tool or console package;
* services ``sender/`` ``importer/`` ``exporter/`` import the kernel and themselves, never each other;
* tools ``alerting/`` ``dashboards/`` ``deploy/`` import the kernel and themselves;
* console ``console/`` may import anything below it;
* kernel modules do not import each other in a cycle;
* no product module loads a module by a name string (``importlib.import_module``, ``__import__``);
* no product module uses another module's private names (a leading underscore: ``from .x import
  _y``, or ``x._y`` on a module of ours): what two modules share is public, in the module below
  both (``sender/sending.py`` and ``sender/delivery.py`` record through ``sender/ledger.py``);
* no product module (outside tests/ and benchmarks/) is longer than 800 lines;
* only ``mailgenius/settings.py`` reads the environment (``os.environ``, ``os.getenv``): every
  other kernel and service module gets its settings injected; the console's and the tools'
  remaining reads are listed in :data:`ENVIRON_READERS` with why.

``ROOT`` can be pointed elsewhere (``MAILGENIUS_ARCHITECTURE_ROOT``) to check another checkout.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(os.environ.get("MAILGENIUS_ARCHITECTURE_ROOT") or Path(__file__).resolve().parents[1])

KERNEL = "kernel"
SERVICE = "service"
TOOL = "tool"
CONSOLE = "console"
FLOOR = {"mailgenius": KERNEL, "sender": SERVICE, "importer": SERVICE, "exporter": SERVICE,
         "alerting": TOOL, "dashboards": TOOL, "deploy": TOOL, "console": CONSOLE}
MAX_LINES = 800

#: (importing file, imported package) -> why it is still there. Each entry must still be needed:
#: the test fails when one is fixed, so the list only shrinks.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}

#: (importing file, module, private name) -> why it is still there; the same rule: it only shrinks
KNOWN_PRIVATE_USES: dict[tuple[str, str, str], str] = {}


def from_target(package: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names (relative ones resolved against ``package``)."""
    if not node.level:
        return node.module or ""
    base = package.split(".")
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def product_files() -> list[Path]:
    files = []
    for package in FLOOR:
        files += sorted(p for p in (ROOT / package).rglob("*.py") if ".venv" not in p.parts)
    return files


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports (absolute dotted names), with the line."""
    tree = ast.parse(path.read_text(), str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = from_target(package, node)
            # `from pkg import mod` imports the module pkg.mod when there is such a file
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if _is_module(sub):
                    out.append((sub, node.lineno))
                else:
                    out.append((target, node.lineno))
    return out


def _is_module(dotted: str) -> bool:
    rel = Path(*dotted.split("."))
    return (ROOT / rel.with_suffix(".py")).is_file() or (ROOT / rel / "__init__.py").is_file()


def allowed(src_top: str, dst_top: str) -> bool:
    if dst_top not in FLOOR or dst_top == src_top:
        return True  # the standard library, third parties, itself
    src, dst = FLOOR[src_top], FLOOR[dst_top]
    if src == CONSOLE:
        return True
    return dst == KERNEL  # services and tools: the kernel only; the kernel: nothing above


def violations() -> list[tuple[str, str, int]]:
    out = []
    for path in product_files():
        rel = str(path.relative_to(ROOT))
        src_top = rel.split("/")[0]
        for name, line in imports_of(path):
            dst_top = name.split(".")[0]
            if not allowed(src_top, dst_top):
                out.append((rel, dst_top, line))
    return out


def test_every_import_goes_down_the_floors():
    found = violations()
    unexpected = [f"{rel}:{line} imports {dst} ({FLOOR[rel.split('/')[0]]} -> {FLOOR[dst]})"
                  for rel, dst, line in found if (rel, dst) not in KNOWN_EXCEPTIONS]
    assert not unexpected, "imports against docs/architecture.md:\n" + "\n".join(unexpected)
    stale = sorted(set(KNOWN_EXCEPTIONS) - {(rel, dst) for rel, dst, _ in found})
    assert not stale, f"fixed, remove from KNOWN_EXCEPTIONS: {stale}"


def test_kernel_modules_import_each_other_without_cycles():
    graph: dict[str, set[str]] = {}
    for path in (ROOT / "mailgenius").rglob("*.py"):
        me = module_name(path)
        graph[me] = {name for name, _ in imports_of(path)
                     if name.startswith("mailgenius.") and name != me and _is_module(name)}
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles in the kernel:\n" + "\n".join(cycles)


def test_no_module_is_loaded_by_a_name_string():
    found = []
    for path in product_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                fn = node.func
                name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
                if name in ("import_module", "__import__"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} calls {name}")
    assert not found, "modules loaded by name (import them plainly):\n" + "\n".join(found)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(path: Path) -> list[tuple[str, str, int]]:
    """(module of ours, private name, line) for every private name ``path`` takes from another
    module of ours: ``from m import _x`` (imports inside functions count) and ``m._x`` where
    ``m`` is bound by an import of a module of ours."""
    tree = ast.parse(path.read_text(), str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out, bound = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in FLOOR:
                    if alias.asname:
                        bound[alias.asname] = alias.name
                    else:  # `import a.b` binds `a`
                        bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            target = from_target(package, node)
            if target.split(".")[0] not in FLOOR:
                continue
            for alias in node.names:
                if _is_module(f"{target}.{alias.name}"):
                    bound[alias.asname or alias.name] = f"{target}.{alias.name}"
                elif _private(alias.name) and target != me:
                    out.append((target, alias.name, node.lineno))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                and _private(node.attr) and bound[node.value.id] != me):
            out.append((bound[node.value.id], node.attr, node.lineno))
    return out


def test_no_module_uses_another_modules_private_names():
    found = {(str(p.relative_to(ROOT)), mod, name): line for p in product_files() for mod, name, line in private_uses(p)}
    unexpected = [f"{rel}:{line} uses {mod}.{name}" for (rel, mod, name), line in sorted(found.items())
                  if (rel, mod, name) not in KNOWN_PRIVATE_USES]
    assert not unexpected, "private names used across modules (make them public, or move them below both):\n" + \
        "\n".join(unexpected)
    stale = sorted(set(KNOWN_PRIVATE_USES) - set(found))
    assert not stale, f"fixed, remove from KNOWN_PRIVATE_USES: {stale}"


def test_the_send_path_layers():
    """sender/ledger.py is below sending and delivery: it imports neither; delivery never imports
    sending at run time (only its ``SendContext`` for type annotations)."""
    sender = ROOT / "sender"
    ledger = {name for name, _ in imports_of(sender / "ledger.py")}
    assert not ledger & {"sender.sending", "sender.delivery"}, ledger
    tree = ast.parse((sender / "delivery.py").read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", "") == "TYPE_CHECKING" for n in ast.walk(node)}
    runtime = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               and node.module == "sending" and id(node) not in typing_only]
    assert not runtime, f"sender/delivery.py imports sending at run time (lines {runtime})"


def test_the_private_name_rule_itself(tmp_path, monkeypatch):
    pkg = tmp_path / "sender"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("_x = 1\n")
    (pkg / "b.py").write_text("from . import a\nfrom .a import _x\n\n\ndef f():\n    return a._x\n")
    (pkg / "c.py").write_text("_y = 1\n\n\ndef g():\n    from .a import __doc__\n    return _y\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert sorted(private_uses(pkg / "b.py")) == [("sender.a", "_x", 2), ("sender.a", "_x", 6)]
    assert private_uses(pkg / "c.py") == []


def test_no_product_module_is_longer_than_800_lines():
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in product_files()
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"split these (over {MAX_LINES} lines):\n" + "\n".join(long)


#: the one module that reads configuration from the environment (docs/architecture.md)
SETTINGS_MODULE = "mailgenius/settings.py"
#: other product modules allowed to read os.environ -> why. Each entry must still be needed (the
#: test fails when one stops reading it), so the list only shrinks. Kernel and service modules
#: never belong here: their configuration comes from load_settings.
ENVIRON_READERS: dict[str, str] = {
    "console/basics.py": "builds the environment of the dramatiq worker processes it starts, and points "
                         "MAILGENIUS_RULES_FILE at `build --root`'s rules.yml for the generators",
    "console/backup.py": "builds pg_dump / psql children's environment (PGPASSWORD)",
    "console/supervisor.py": "builds the environment of the processes it supervises",
    "console/stack.py": "stack-prepare: derives every process's environment (ports, URLs, secrets) from "
                        "the operator's, before any settings exist",
    "alerting/cli.py": "write-secrets copies the alert channels' secrets from the operator's environment "
                       "into files (a tool, run beside the services)",
    "alerting/generate.py": "render-time inputs of the generated Alertmanager config (MAILGENIUS_WATCHDOG_URL, "
                            "MAILGENIUS_GRAFANA_URL): a tool, not a service",
    "dashboards/helpers.py": "MAILGENIUS_DASHBOARDS_CONFIG, a build-time input of the dashboards tool",
}


def environ_reads(path: Path) -> list[int]:
    """Lines of ``path`` that read the environment: ``os.environ`` used other than as the target
    of an assignment (``os.environ[K] = v`` hands a value to a library, it reads nothing),
    ``os.getenv``, ``os.environb``, or ``environ`` / ``getenv`` imported from ``os``."""
    tree = ast.parse(path.read_text(), str(path))
    stores = {id(node.value) for node in ast.walk(tree)
              if isinstance(node, ast.Subscript) and isinstance(node.ctx, (ast.Store, ast.Del))}
    lines = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os"
                and node.attr in ("environ", "environb", "getenv", "getenvb") and id(node) not in stores):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and any(
                a.name in ("environ", "environb", "getenv", "getenvb") for a in node.names):
            lines.append(node.lineno)
    return sorted(lines)


def test_only_the_settings_module_reads_the_environment():
    readers = {}
    for path in product_files():
        rel = str(path.relative_to(ROOT))
        if rel != SETTINGS_MODULE and (lines := environ_reads(path)):
            readers[rel] = lines
    unexpected = [f"{rel}:{','.join(map(str, lines))}" for rel, lines in sorted(readers.items())
                  if rel not in ENVIRON_READERS]
    assert not unexpected, ("reads os.environ: take the value from load_settings (mailgenius/settings.py) "
                            "and inject it instead:\n" + "\n".join(unexpected))
    assert not [rel for rel in ENVIRON_READERS if rel.split("/")[0] in ("mailgenius", "sender", "importer",
                                                                         "exporter")]
    stale = sorted(set(ENVIRON_READERS) - set(readers))
    assert not stale, f"no longer read the environment, remove from ENVIRON_READERS: {stale}"
    assert environ_reads(ROOT / SETTINGS_MODULE), "settings.py is where the environment is read"


@pytest.mark.parametrize(("source", "reads"), [
    ("import os\nx = os.environ.get('A')\n", True),
    ("import os\nx = os.getenv('A')\n", True),
    ("import os\nenv = dict(os.environ)\n", True),
    ("from os import environ\n", True),
    ("from os import getenv as g\n", True),
    ("import os\nos.environ['A'] = 'b'\n", False),
    ("import os\ndel os.environ['A']\n", False),
    ("import os\npid = os.getpid()\n", False),
])
def test_the_environ_rule_itself(tmp_path, source, reads):
    path = tmp_path / "m.py"
    path.write_text(source)
    assert bool(environ_reads(path)) is reads


@pytest.mark.parametrize(("src", "dst", "ok"), [
    ("mailgenius", "sender", False), ("mailgenius", "console", False), ("mailgenius", "alerting", False),
    ("sender", "importer", False), ("exporter", "sender", False), ("sender", "mailgenius", True),
    ("alerting", "exporter", False), ("deploy", "mailgenius", True), ("dashboards", "console", False),
    ("console", "sender", True), ("console", "deploy", True), ("sender", "aiohttp", True),
])
def test_the_rule_itself(src, dst, ok):
    assert allowed(src, dst) is ok
