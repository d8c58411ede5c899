"""The decoder spec: a small grammar, its TOML form, and canonical formatting (so ``to_spec()`` round-trips).

EBNF (also in docs/composition.md)::

    spec   := stage ( ">" stage )*
    stage  := name [ "(" [ arg ( "," arg )* ] ")" ]
    arg    := ident "=" value
    value  := int | float | string | "true" | "false" | list
    list   := "[" [ value ( "," value )* ] "]"
    name   := ident ;  ident := [A-Za-z_][A-Za-z0-9_]*
    int    := [+-]? digit+ ;  float := [+-]? digit* "." digit* ( [eE] [+-]? digit+ )? | [+-]? digit+ [eE] [+-]? digit+
    string := '"' ( [^"\\] | "\\" any )* '"'  |  "'" ( [^'\\] | "\\" any )* "'"

Keyword arguments only. Whitespace is free between tokens. The TOML form is an array of ``[[strategy]]`` tables
with ``name`` and parameters, plus an optional ``[cfg]`` table.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class SpecError(ValueError):
    """A malformed spec; ``column`` is 1-based (0 when not about a position)."""

    def __init__(self, message: str, text: str = "", column: int = 0) -> None:
        self.column = column
        self.text = text
        where = f" at column {column}" if column else ""
        super().__init__(f"decoder spec{where}: {message}")


@dataclass(frozen=True)
class Stage:
    name: str
    args: dict[str, Any]
    column: int = 1


_TOKEN = re.compile(
    r"""\s*(?:
    (?P<float>[+-]?(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?\d+[eE][+-]?\d+)
  | (?P<int>[+-]?\d+)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<punct>[()\[\],=>])
    )""",
    re.VERBOSE | re.DOTALL,
)


def _tokens(text: str) -> list[tuple[str, str, int]]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            column = len(text[:pos]) + (len(text[pos:]) - len(text[pos:].lstrip())) + 1
            raise SpecError(f"unexpected character {text[column - 1]!r}", text, column)
        kind = m.lastgroup
        start = m.start(kind) + 1
        out.append((kind, m.group(kind), start))
        pos = m.end()
    return out


def _unquote(raw: str, text: str, column: int) -> str:
    body, out, i = raw[1:-1], [], 0
    escapes = {"n": "\n", "t": "\t", "\\": "\\", '"': '"', "'": "'"}
    while i < len(body):
        ch = body[i]
        if ch == "\\":
            nxt = body[i + 1]
            if nxt not in escapes:
                raise SpecError(f"unknown escape \\{nxt} in string", text, column + i + 1)
            out.append(escapes[nxt])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.i = 0

    def peek(self) -> tuple[str, str, int] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, kind: str | None = None, value: str | None = None, what: str = "") -> tuple[str, str, int]:
        tok = self.peek()
        if tok is None:
            raise SpecError(f"expected {what or value or kind} but the spec ended", self.text, len(self.text) + 1)
        if (kind and tok[0] != kind) or (value and tok[1] != value):
            raise SpecError(f"expected {what or value or kind}, found {tok[1]!r}", self.text, tok[2])
        self.i += 1
        return tok

    def spec(self) -> list[Stage]:
        if not self.toks:
            raise SpecError("empty spec", self.text, 1)
        stages = [self.stage()]
        while self.peek() is not None:
            self.take("punct", ">", "'>' between stages")
            stages.append(self.stage())
        return stages

    def stage(self) -> Stage:
        _, name, column = self.take("ident", what="a strategy name")
        args: dict[str, Any] = {}
        tok = self.peek()
        if tok is not None and tok[1] == "(":
            self.take("punct", "(")
            if self.peek() is not None and self.peek()[1] == ")":
                self.take("punct", ")")
                return Stage(name, args, column)
            while True:
                _, key, kcol = self.take("ident", what="a parameter name (keyword arguments only)")
                if key in args:
                    raise SpecError(f"parameter `{key}` given twice in `{name}`", self.text, kcol)
                self.take("punct", "=", "'=' after the parameter name")
                args[key] = self.value()
                tok = self.take("punct", what="',' or ')'")
                if tok[1] == ")":
                    break
                if tok[1] != ",":
                    raise SpecError(f"expected ',' or ')', found {tok[1]!r}", self.text, tok[2])
        return Stage(name, args, column)

    def value(self) -> Any:
        tok = self.peek()
        if tok is None:
            raise SpecError("expected a value but the spec ended", self.text, len(self.text) + 1)
        kind, raw, column = tok
        self.i += 1
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "string":
            return _unquote(raw, self.text, column)
        if kind == "ident" and raw in ("true", "false"):
            return raw == "true"
        if raw == "[":
            items: list[Any] = []
            if self.peek() is not None and self.peek()[1] == "]":
                self.i += 1
                return items
            while True:
                items.append(self.value())
                tok = self.take("punct", what="',' or ']'")
                if tok[1] == "]":
                    return items
                if tok[1] != ",":
                    raise SpecError(f"expected ',' or ']', found {tok[1]!r}", self.text, tok[2])
        raise SpecError(f"expected a value, found {raw!r}", self.text, column)


def parse_spec(text: str) -> list[Stage]:
    """Parse a spec string into stages; raises :class:`SpecError` (never another exception) on bad text."""
    if not isinstance(text, str):
        raise SpecError(f"a spec must be a string, got {type(text).__name__}")
    try:
        return _Parser(text).spec()
    except SpecError:
        raise
    except (ValueError, IndexError, OverflowError) as exc:  # e.g. an absurdly long number
        raise SpecError(str(exc), text, 0) from exc


def parse_toml(path: str | Path) -> tuple[list[Stage], dict[str, Any] | None]:
    """The TOML form: ``[[strategy]]`` tables (``name`` + parameters) and an optional ``[cfg]`` table."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"decoder file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"decoder file {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"strategy", "cfg"})
    if unknown:
        raise SpecError(f"decoder file {path}: unknown table `{unknown[0]}` (expected [[strategy]] and [cfg])")
    stages = []
    for i, table in enumerate(data.get("strategy", [])):
        if not isinstance(table, dict) or not isinstance(table.get("name"), str):
            raise SpecError(f"decoder file {path}: [[strategy]] number {i + 1} needs a `name` string")
        args = {k: v for k, v in table.items() if k != "name"}
        stages.append(Stage(table["name"], args, 0))
    cfg = data.get("cfg")
    if cfg is not None and not isinstance(cfg, dict):
        raise SpecError(f"decoder file {path}: `cfg` must be a table")
    return stages, cfg


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        return text if ("." in text or "e" in text or "inf" in text or "nan" in text) else text + ".0"
    if isinstance(value, str):
        body = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        return f'"{body}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} in a spec")


def format_stage(name: str, args: dict[str, Any]) -> str:
    if not args:
        return name
    return f"{name}(" + ", ".join(f"{k}={format_value(v)}" for k, v in args.items()) + ")"
