"""The plain-TOML fast path against tomllib: where it answers it must answer the same; where
tomllib refuses a document it must not answer at all; and it must answer for our configs."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from benchmarks.ike_setup import OURS_RESPONDER, ours_initiator_config
from userspace_ipsec import toml_lines
from userspace_ipsec.config import ConfigError, loads

REPO = Path(__file__).resolve().parents[2]

# Fragments chosen to collide: few key names (duplicates), strings with the characters that
# end or escape them, numbers TOML allows and refuses, and constructs only tomllib reads.
KEYS = ["a", "b", "x-1", "_", "true", "7"]
STRINGS = ['"plain"', '"with # hash"', "'lit\\eral \"q\"'", '""', '"esc\\"aped"', '"tab\there"',
           '"back\\\\slash"', '"é ünï"', "'it''s'", '"unterminated']
NUMBERS = ["0", "-0", "42", "-7", "01", "+1", "1_000", "1.5", "-0.25", "1.", ".5", "1e3",
           "0x1f", "inf", "99999999999999999999999"]
OTHERS = ["true", "false", "True", "{ a = 1 }", '"""multi"""', "1979-05-27", "[1, [2]]"]
SCALARS = st.sampled_from(STRINGS + NUMBERS + ["true", "false"])
WS = st.sampled_from(["", " ", "  ", "\t"])


@st.composite
def arrays(draw: st.DrawFn) -> str:
    items = draw(st.lists(SCALARS, max_size=4))
    sep = draw(st.sampled_from([",", ", ", " ,", ",\t"]))
    trailing = draw(st.sampled_from(["", ",", " , "])) if items else ""
    return f"[{draw(WS)}{sep.join(items)}{trailing}{draw(WS)}]"


@st.composite
def lines(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["header", "pair", "pair", "pair", "comment", "blank", "odd"]))
    if kind == "header":
        path = draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=3))
        dot = draw(st.sampled_from([".", " . "]))
        opening, closing = draw(st.sampled_from([("[", "]"), ("[", "]"), ("[[", "]]"),
                                                 ('["', '"]')]))
        return f"{draw(WS)}{opening}{draw(WS)}{dot.join(path)}{draw(WS)}{closing}" \
               f"{draw(st.sampled_from(['', ' # note', '#x']))}"
    if kind == "pair":
        key = draw(st.sampled_from(KEYS + ["a.b", '"quoted"']))
        value = draw(st.one_of(SCALARS, arrays(), st.sampled_from(OTHERS)))
        return f"{draw(WS)}{key}{draw(WS)}={draw(WS)}{value}" \
               f"{draw(st.sampled_from(['', ' # c', '#c', ' ']))}"
    if kind == "comment":
        return draw(st.sampled_from(["# a comment", "  #indented", "#", "# \x7f del"]))
    if kind == "blank":
        return draw(st.sampled_from(["", "   ", "\t"]))
    return draw(st.sampled_from(["junk", "a =", "= 1", "[a] b = 1", "a = 1 2", "[]", "\r",
                                 "a = 1\r", "[a", "a = [1,", "2]"]))


def tomllib_or_error(text: str) -> dict[str, Any] | None:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return None


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(lines(), max_size=14))
@example(["[a]", "b = 1", "[a.c]", "[a]"])  # a table defined twice
@example(["[a.b]", "x = 1", "[a]", "y = 2"])  # a table made implicitly, then defined
@example(["a = 1", "[a]"])  # a value, then a table of the same name
@example(["[a]", "b = 1", "[a.b]"])
@example(['a = ["x", 1, 2.5, true, ]', "b = []", "c = 'x'  # c"])
def test_same_answer_as_tomllib_or_none(doc: list[str]) -> None:
    text = "\n".join(doc)
    expected = tomllib_or_error(text)
    fast = toml_lines.parse(text)
    if expected is None:
        assert fast is None, f"tomllib refuses this, the fast path read {fast!r}"
    elif fast is not None:
        assert fast == expected
        assert list(fast) == list(expected)  # table order: connections are listed in it
    assert toml_lines.loads(text) == expected if expected is not None else True


@pytest.mark.parametrize("text", [
    ours_initiator_config(300, True), OURS_RESPONDER,
    *(p.read_text() for p in sorted((REPO / "examples").rglob("*.toml"))),
], ids=lambda t: t[:30])
def test_our_configurations_take_the_fast_path(text: str) -> None:
    fast = toml_lines.parse(text)
    assert fast is not None and fast == tomllib.loads(text)


def test_errors_still_come_from_tomllib_with_their_line() -> None:
    with pytest.raises(ConfigError) as err:
        loads('[daemon]\nlog_level = "info"\nlog_level = "debug"\n', "x.toml")
    assert err.value.line == 3 and "TOML syntax" in str(err.value)
