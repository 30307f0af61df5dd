"""The ``-P`` policy of spdadd/spdupdate/spddelete: ipsec_set_policy(3)'s language.

``direction [priority] action [requests...]``, where priority is ``prio N``, ``prio -N`` or
``prio low|def|high [+|- N]`` (Linux: a smaller value is a higher priority, so "+" subtracts), and
each request is one word ``proto/mode/src-dst/level`` with the short forms libipsec allows.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import ip_address

from ..pfkey.constants import (
    IPPROTO_AH,
    IPPROTO_ESP,
    IpsecLevel,
    IpsecMode,
    PolicyDir,
    PolicyType,
)
from ..pfkey.messages import IPAddress, IpsecRequest, PolicyExt
from .lexer import Cursor, Token

PRIORITY_HIGH = 0x40000000
PRIORITY_DEFAULT = 0x80000000
PRIORITY_LOW = 0xC0000000
_PRIORITY_BASES = {"high": PRIORITY_HIGH, "def": PRIORITY_DEFAULT, "low": PRIORITY_LOW}
_BASE_PLUS_MAX = 0x40000000  # "base + N": N up to this (man page)
_BASE_MINUS_MAX = 0x3FFFFFFF  # "base - N"

DIRECTIONS = {"in": PolicyDir.INBOUND, "out": PolicyDir.OUTBOUND, "fwd": PolicyDir.FWD}
ACTIONS = {
    "discard": PolicyType.DISCARD,
    "none": PolicyType.NONE,
    "ipsec": PolicyType.IPSEC,
    "entrust": PolicyType.ENTRUST,
    "bypass": PolicyType.BYPASS,
}
_PROTOS = {"esp": IPPROTO_ESP, "ah": IPPROTO_AH}
_MODES = {"transport": IpsecMode.TRANSPORT, "tunnel": IpsecMode.TUNNEL, "any": IpsecMode.ANY}
_LEVELS = {
    "default": IpsecLevel.DEFAULT,
    "use": IpsecLevel.USE,
    "require": IpsecLevel.REQUIRE,
    "unique": IpsecLevel.UNIQUE,
}
_PRIORITY_RE = re.compile(r"(?:(low|def|high)\s*)?(?:([+-])?\s*([0-9]{1,12}))?")
_ENDPOINT_RE = re.compile(r"([^\[\]]+)(?:\[([0-9]{1,5})\])?")


@dataclass(slots=True)
class ParsedPolicy:
    policy: PolicyExt
    action_given: bool  # False for the bare "-P dir" that spddelete allows


def parse_policy(cur: Cursor, flag: Token, words: Sequence[Token]) -> ParsedPolicy:
    """Parse the words after ``-P`` (``flag``) up to the ``;``."""
    if not words:
        raise cur.error(flag, "-P needs a direction: in, out or fwd")
    dir_token = words[0]
    direction = DIRECTIONS.get(dir_token.text)
    if direction is None:
        raise cur.error(dir_token, "policy direction must be in, out or fwd")
    if len(words) == 1:
        return ParsedPolicy(PolicyExt(PolicyType.DISCARD, direction), action_given=False)

    index = 1
    priority = PRIORITY_DEFAULT
    if words[1].text in ("priority", "prio"):
        index = 2
        while index < len(words) and words[index].text not in ACTIONS:
            index += 1
        priority = _priority(cur, words[1], words[2:index])
    if index >= len(words):
        raise cur.error(words[-1], "policy action missing: discard, none, ipsec, entrust, bypass")
    action_token = words[index]
    action = ACTIONS.get(action_token.text)
    if action is None:
        hint = " ('default' is a request level, not an action)" if action_token.text == "default"\
            else ""
        raise cur.error(
            action_token, f"policy action must be discard, none, ipsec, entrust or bypass{hint}"
        )
    request_words = words[index + 1 :]
    if action is not PolicyType.IPSEC and request_words:
        raise cur.error(request_words[0], "requests are only allowed with the ipsec action")
    if action is PolicyType.IPSEC and not request_words:
        raise cur.error(action_token, "ipsec needs a request, e.g. esp/transport//require")
    requests = [_request(cur, token, direction) for token in request_words]
    return ParsedPolicy(
        PolicyExt(action, direction, priority=priority, requests=requests), action_given=True
    )


def _priority(cur: Cursor, prio_token: Token, words: Sequence[Token]) -> int:
    text = " ".join(w.text for w in words)
    match = _PRIORITY_RE.fullmatch(text)
    if not text or match is None:
        raise cur.error(
            words[0] if words else prio_token,
            "priority must be N, -N, or low|def|high optionally followed by + N or - N",
        )
    base_name, sign, digits = match.groups()
    offset = int(digits) if digits else 0
    where = words[0]
    if base_name is None:
        if digits is None:
            raise cur.error(where, "priority offset missing")
        # "priority N": N above the default is a higher priority, hence a smaller value.
        value = PRIORITY_DEFAULT + offset if sign == "-" else PRIORITY_DEFAULT - offset
        if not 0 <= value <= 0xFFFFFFFF:
            raise cur.error(where, "priority offset out of range -2147483647..2147483648")
        return value
    base = _PRIORITY_BASES[base_name]
    if digits is None:
        return base
    if sign is None:
        raise cur.error(where, "write 'prio BASE + N' or 'prio BASE - N'")
    if sign == "+":
        if offset > _BASE_PLUS_MAX:
            raise cur.error(where, f"priority offset above {_BASE_PLUS_MAX}")
        return base - offset
    if offset > _BASE_MINUS_MAX:
        raise cur.error(where, f"priority offset above {_BASE_MINUS_MAX}")
    return base + offset


def _request(cur: Cursor, token: Token, direction: PolicyDir) -> IpsecRequest:
    parts = token.text.split("/")
    if len(parts) < 2 or not parts[1]:
        raise cur.error(token, "request needs at least protocol/mode, e.g. esp/transport//require")
    if len(parts) > 4:
        raise cur.error(token, "request has too many '/' parts (protocol/mode/src-dst/level)")
    proto_name, mode_name = parts[0], parts[1]
    if proto_name == "ipcomp":
        raise cur.error(token, "IPComp is not supported by userspace-ipsec")
    proto = _PROTOS.get(proto_name)
    if proto is None:
        raise cur.error(token, f"request protocol must be esp or ah, not {proto_name!r}")
    mode = _MODES.get(mode_name)
    if mode is None or mode is IpsecMode.ANY:
        raise cur.error(token, f"request mode must be transport or tunnel, not {mode_name!r}")

    request = IpsecRequest(proto=proto, mode=mode, level=IpsecLevel.DEFAULT)
    if len(parts) >= 3 and parts[2]:
        _endpoints(cur, token, parts[2], direction, request)
    if mode is IpsecMode.TUNNEL and request.src is None:
        raise cur.error(token, "tunnel mode needs the endpoints: esp/tunnel/SRC-DST/level")
    if len(parts) == 4 and parts[3]:
        _level(cur, token, parts[3], request)
    return request


def _endpoints(
    cur: Cursor, token: Token, text: str, direction: PolicyDir, request: IpsecRequest
) -> None:
    if text in ("me-any", "any-me"):
        wanted = PolicyDir.OUTBOUND if text == "me-any" else PolicyDir.INBOUND
        if direction is not wanted:
            raise cur.error(token, f"{text} fits only an {wanted.name.lower()} policy")
        return
    halves = text.split("-")
    if len(halves) != 2:
        raise cur.error(token, "endpoints must be SRC-DST (one '-')")
    src, src_port = _endpoint(cur, token, halves[0])
    dst, dst_port = _endpoint(cur, token, halves[1])
    if src.version != dst.version:
        raise cur.error(token, "tunnel endpoints are of different address families")
    request.src, request.dst = src, dst
    request.src_port, request.dst_port = src_port, dst_port


def _endpoint(cur: Cursor, token: Token, text: str) -> tuple[IPAddress, int]:
    match = _ENDPOINT_RE.fullmatch(text)
    if match is None:
        raise cur.error(token, f"bad endpoint {text!r}: ADDRESS or ADDRESS[PORT]")
    try:
        address = ip_address(match.group(1))
    except ValueError:
        raise cur.error(token, f"endpoint {match.group(1)!r} is not a numeric IP address") from None
    port = int(match.group(2) or 0)
    if port > 0xFFFF:
        raise cur.error(token, f"port {port} out of range")
    return address, port


def _level(cur: Cursor, token: Token, text: str, request: IpsecRequest) -> None:
    name, colon, reqid_text = text.partition(":")
    level = _LEVELS.get(name)
    if level is None:
        raise cur.error(token, f"level must be default, use, require or unique[:N], not {text!r}")
    request.level = level
    if colon:
        if level is not IpsecLevel.UNIQUE:
            raise cur.error(token, "only unique takes a :reqid")
        if re.fullmatch("[0-9]{1,10}", reqid_text) is None:
            raise cur.error(token, "unique:N needs a decimal reqid")
        reqid = int(reqid_text)
        if not 1 <= reqid <= 0xFFFFFFFF:
            raise cur.error(token, "reqid must be between 1 and 4294967295")
        request.reqid = reqid
