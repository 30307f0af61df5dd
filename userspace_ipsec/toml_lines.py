"""A fast path for the TOML our configurations are written in, with tomllib for the rest.

A configuration with thousands of connections is thousands of ``[table]`` headers and
``key = value`` lines; tomllib, in pure Python, spends about 0.1 ms on each connection, and a
reload of 1,000 tunnels waits 120 ms for it before anything else happens. ``parse`` reads that
plain form line by line with a few regular expressions, about four times faster, and gives up
(returns None) at the first thing outside it: escapes, multi-line strings or arrays, inline
tables, dotted keys, arrays of tables, dates, numbers other than plain decimals, a key or table
defined twice, a control character, CR. ``loads`` then lets tomllib parse the whole text, so
every error message, and every result beyond the plain form, is tomllib's own. Where ``parse``
answers, its result equals tomllib's (tests/core/test_toml_lines.py checks this against
tomllib on generated documents).
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

_WS = "[ \t]*"
_KEY = "[A-Za-z0-9_-]+"
_BASIC = r'"[^"\\\x00-\x08\x0a-\x1f\x7f]*"'  # no escapes: those go to tomllib
_LITERAL = r"'[^'\x00-\x08\x0a-\x1f\x7f]*'"
_INT = r"-?(?:0|[1-9][0-9]*)"
_FLOAT = _INT + r"\.[0-9]+"
_SCALAR = f"(?:{_BASIC}|{_LITERAL}|{_FLOAT}|{_INT}|true|false)"
_ARRAY = rf"\[{_WS}(?:{_SCALAR}{_WS},{_WS})*(?:{_SCALAR}{_WS})?\]"
_COMMENT = f"{_WS}(?:#.*)?"

_HEADER = re.compile(rf"\[{_WS}({_KEY}(?:{_WS}\.{_WS}{_KEY})*){_WS}\]{_COMMENT}")
_PAIR = re.compile(rf"({_KEY}){_WS}={_WS}({_SCALAR}|{_ARRAY}){_COMMENT}")
_ITEM = re.compile(_SCALAR)
_DOT = re.compile(rf"{_WS}\.{_WS}")
_REFUSED = re.compile("[\x00-\x08\x0b-\x1f\x7f\ufeff]")  # CR, controls, BOM: tomllib's call


def loads(text: str) -> dict[str, Any]:
    """``tomllib.loads(text)``, faster for plain configuration files."""
    doc = parse(text)
    return tomllib.loads(text) if doc is None else doc


def parse(text: str) -> dict[str, Any] | None:
    """The document, or None when it is not in the plain form this reads."""
    if _REFUSED.search(text):
        return None
    root: dict[str, Any] = {}
    defined: set[int] = set()  # ids of the tables a header has defined
    table = root
    for raw in text.split("\n"):
        line = raw.lstrip(" \t")
        if not line or line[0] == "#":
            continue
        if line[0] == "[":
            header = _HEADER.fullmatch(line)
            if header is None:
                return None  # [[array of tables]], quoted keys, junk
            found = _table(root, _DOT.split(header.group(1)), defined)
            if found is None:
                return None
            table = found
            continue
        pair = _PAIR.fullmatch(line)
        if pair is None or pair.group(1) in table:
            return None
        value = _value(pair.group(2))
        if value is None:
            return None
        table[pair.group(1)] = value
    return root


def _table(root: dict[str, Any], path: list[str], defined: set[int]) -> dict[str, Any] | None:
    """The table a header names, created on the way; None if TOML forbids the header."""
    table = root
    for key in path:
        child = table.setdefault(key, {})
        if not isinstance(child, dict):
            return None  # a value of that name, not a table
        table = child
    if id(table) in defined:
        return None  # defined twice
    defined.add(id(table))
    return table


def _value(text: str) -> Any:
    if text[0] != "[":
        return _scalar(text)
    items = []
    for item in _ITEM.finditer(text, 1):
        value = _scalar(item.group())
        if value is None:
            return None
        items.append(value)
    return items


def _scalar(text: str) -> Any:
    first = text[0]
    if first in "\"'":
        return text[1:-1]
    if text == "true":
        return True
    if text == "false":
        return False
    return float(text) if "." in text else int(text)
