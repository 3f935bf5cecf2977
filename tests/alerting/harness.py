"""The lead's stack harness (tests/stack.py).

A ``tests/stack/`` test package (the stack engineer's suite) shadows the ``tests/stack.py``
module on import; load the module by path when that happens.
"""

from __future__ import annotations

import importlib.util
import sys

from tests.conftest import ROOT

try:
    from tests.stack import Stack, require_binaries, wait_until  # noqa: F401
except ImportError:
    _name = "tests._stack_harness"
    module = sys.modules.get(_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(_name, ROOT / "tests" / "stack.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[_name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    Stack = module.Stack
    require_binaries = module.require_binaries
    wait_until = module.wait_until
