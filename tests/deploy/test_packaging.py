"""Packaging: the lock files cover pyproject.toml with exact, hashed pins; build and test tools
stay out of the runtime set; `mailgenius --version`; the licence."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
#: tools that must not be installed with the service (issue: packaging)
NOT_RUNTIME = {"grafanalib", "honcho", "aiosmtpd", "pytest", "ruff", "playwright", "pip-tools"}


def _pins(lock: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of a pip-compile --generate-hashes file."""
    pins: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in lock.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)", line)
        if m:
            current = canonicalize_name(m.group(1))
            pins[current] = (m.group(2), [])
            continue
        h = re.search(r"--hash=(sha256:[0-9a-f]{64})", line)
        if h and current:
            pins[current][1].append(h.group(1))
    return pins


def _requirements(*extras: str) -> list[Requirement]:
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in PROJECT["optional-dependencies"][extra]]
    return reqs


@pytest.mark.parametrize(("lock", "extras"), [("runtime.txt", ("sink",)),
                                              ("dev.txt", ("sink", "build", "dev"))])
def test_lock_pins_every_requirement_exactly_with_hashes(lock, extras):
    pins = _pins(ROOT / "requirements" / lock)
    assert pins, lock
    for name, (_version, hashes) in pins.items():
        assert hashes, f"{lock}: {name} has no hash"
    for req in _requirements(*extras):
        name = canonicalize_name(req.name)
        # Then each requirement of pyproject.toml is pinned, to a version its range allows
        assert name in pins, f"{lock} lacks {req.name}: run scripts/lock.sh"
        assert req.specifier.contains(pins[name][0], prereleases=True), \
            f"{lock}: {req.name}=={pins[name][0]} is outside {req.specifier}: run scripts/lock.sh"


def test_runtime_and_dev_locks_agree_on_shared_versions():
    runtime, dev = _pins(ROOT / "requirements/runtime.txt"), _pins(ROOT / "requirements/dev.txt")
    differ = {n: (runtime[n][0], dev[n][0]) for n in runtime.keys() & dev.keys() if runtime[n][0] != dev[n][0]}
    assert not differ, differ
    assert runtime.keys() <= dev.keys()


def test_build_and_test_tools_are_not_runtime_dependencies():
    runtime = {canonicalize_name(Requirement(r).name) for r in PROJECT["dependencies"]}
    assert not runtime & NOT_RUNTIME
    assert not _pins(ROOT / "requirements/runtime.txt").keys() & NOT_RUNTIME - {"aiosmtpd"}
    # the report draws charts at run time: matplotlib stays
    assert "matplotlib" in runtime


def test_setup_ci_and_image_install_from_the_lock():
    setup = (ROOT / "scripts/setup.sh").read_text()
    assert "--require-hashes -r requirements/dev.txt" in setup
    # the install is skipped only when neither the lock nor pyproject.toml changed
    assert "requirements/dev.txt" in setup.split("want=", 1)[1].splitlines()[0]
    assert "--require-hashes -r requirements/runtime.txt" in (ROOT / "Dockerfile").read_text()
    assert "scripts/setup.sh" in (ROOT / "Makefile").read_text()


def test_version_flag_prints_the_project_version():
    res = subprocess.run([sys.executable, "-m", "console", "--version"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"mailgenius {PROJECT['version']}"


def test_licence_is_apache_2_and_the_readme_says_so():
    assert "Apache License" in (ROOT / "LICENSE").read_text().splitlines()[1]
    assert "Version 2.0" in (ROOT / "LICENSE").read_text()
    assert PROJECT["license"] == "Apache-2.0"
    assert "Apache License 2.0" in (ROOT / "README.md").read_text()
