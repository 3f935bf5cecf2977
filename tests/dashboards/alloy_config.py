"""A reader for the subset of Grafana Alloy's configuration syntax that
``dashboards/logging/config.alloy`` uses: blocks (``name "label" { ... }``), attributes
(``key = value``), strings, numbers, booleans, lists, objects, references and ``//`` comments.
Enough for the tests to check the pipeline without the Alloy binary."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

_TOKEN = re.compile(r'''
    (?P<ws>\s+|//[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<number>-?\d+(?:\.\d+)?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<punct>[{}\[\]=,])
''', re.X)


@dataclass
class Block:
    name: str
    label: str | None = None
    attrs: dict = field(default_factory=dict)
    blocks: list[Block] = field(default_factory=list)

    def find(self, name: str, label: str | None = None) -> list[Block]:
        return [b for b in self.blocks if b.name == name and (label is None or b.label == label)]


@dataclass(frozen=True)
class Ref:
    """A reference to another component's export (``loki.write.loki.receiver``)."""

    path: str


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ValueError(f"unexpected character at {pos}: {text[pos:pos + 20]!r}")
        pos = m.end()
        if m.lastgroup != "ws":
            out.append((m.lastgroup, m.group()))
    return out


class _Parser:
    def __init__(self, text: str):
        self.toks = _tokens(text)
        self.i = 0

    def peek(self, k: int = 0):
        return self.toks[self.i + k] if self.i + k < len(self.toks) else (None, None)

    def take(self, value: str | None = None):
        kind, tok = self.peek()
        if value is not None and tok != value:
            raise ValueError(f"expected {value!r}, got {tok!r}")
        self.i += 1
        return kind, tok

    def body(self, block: Block, end: str | None) -> Block:
        while self.peek()[1] != end:
            kind, name = self.take()
            if kind != "ident":
                raise ValueError(f"expected a name, got {name!r}")
            if self.peek()[1] == "=":
                self.take("=")
                block.attrs[name] = self.value()
                continue
            label = None
            if self.peek()[0] == "string":
                label = json.loads(self.take()[1])
            self.take("{")
            child = self.body(Block(name, label), "}")
            self.take("}")
            block.blocks.append(child)
        return block

    def value(self):
        kind, tok = self.take()
        if kind == "string":
            return json.loads(tok)
        if kind == "number":
            return float(tok) if "." in tok else int(tok)
        if kind == "ident":
            return {"true": True, "false": False, "null": None}.get(tok, Ref(tok))
        if tok == "[":
            items = []
            while self.peek()[1] != "]":
                items.append(self.value())
                if self.peek()[1] == ",":
                    self.take(",")
            self.take("]")
            return items
        if tok == "{":
            obj = {}
            while self.peek()[1] != "}":
                k_kind, key = self.take()
                key = json.loads(key) if k_kind == "string" else key
                self.take("=")
                obj[key] = self.value()
                if self.peek()[1] == ",":
                    self.take(",")
            self.take("}")
            return obj
        raise ValueError(f"unexpected {tok!r}")


def parse(text: str) -> Block:
    return _Parser(text).body(Block("<root>"), None)
