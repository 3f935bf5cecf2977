"""Transitional: the ``mailgenius`` command lives in the console (:mod:`console.commands`).

Only ``importer/__main__.py`` still calls ``mailgenius.cli.main`` (that file belongs to the importer
work of this round and was not edited); once it runs its app through
:func:`mailgenius.serve.service_main`, as ``sender/__main__.py`` and ``exporter/__main__.py`` do, this
module goes away. tests/test_architecture.py lists this one upward import as a known exception
and fails when it is no longer needed.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from console.commands import main as console_main

    return console_main(argv)
