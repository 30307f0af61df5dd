"""SA and policy dump messages turned into plain records for ``uipsec sa list`` / ``spd list``.

The records are what ``--json`` prints and what the tables are made from; keys appear only when
the caller asks for them.
"""

from __future__ import annotations

from typing import Any

from . import algorithms
from .pfkey.constants import (
    ExtType,
    IpsecLevel,
    IpsecMode,
    NatTType,
    PolicyDir,
    PolicyType,
    SaState,
    SaType,
)
from .pfkey.messages import (
    AddressExt,
    KeyExt,
    LifetimeExt,
    Message,
    NatTPortExt,
    NatTTypeExt,
)

_PROTO_NAMES = {0: "any", 255: "any", 1: "icmp", 6: "tcp", 17: "udp", 58: "icmp6", 132: "sctp"}


def _name(enum_type: type, value: int) -> str:
    try:
        return str(enum_type(value).name).lower()
    except ValueError:
        return str(value)


def _lifetime(msg: Message, ext_type: ExtType) -> dict[str, int] | None:
    life = msg.ext.get(ext_type)
    if not isinstance(life, LifetimeExt):
        return None
    return {
        "allocations": life.allocations,
        "bytes": life.bytes,
        "addtime": life.addtime,
        "usetime": life.usetime,
    }


def _endpoint(addr: AddressExt | None, port_ext: object) -> str:
    if addr is None:
        return "?"
    port = port_ext.port if isinstance(port_ext, NatTPortExt) else addr.port
    return f"{addr.address}[{port}]" if port else str(addr.address)


def sa_record(msg: Message, *, show_keys: bool = False) -> dict[str, Any]:
    sa = msg.sa
    sa2 = msg.sa2
    extra = msg.uipsec
    encr = algorithms.encryption_by_id(sa.encrypt) if sa else None
    integ = algorithms.integrity_by_id(sa.auth) if sa and sa.auth else None
    encap = msg.ext.get(ExtType.X_NAT_T_TYPE)
    record: dict[str, Any] = {
        "spi": sa.spi if sa else None,
        "spi_hex": f"0x{sa.spi:08x}" if sa else None,
        "protocol": _name(SaType, msg.satype),
        "mode": _name(IpsecMode, sa2.mode) if sa2 else "any",
        "src": _endpoint(msg.src, msg.ext.get(ExtType.X_NAT_T_SPORT)),
        "dst": _endpoint(msg.dst, msg.ext.get(ExtType.X_NAT_T_DPORT)),
        "encap": _name(NatTType, encap.type) if isinstance(encap, NatTTypeExt) else None,
        "reqid": sa2.reqid if sa2 else 0,
        "state": _name(SaState, sa.state) if sa else None,
        "encryption": encr.name if encr else (str(sa.encrypt) if sa else None),
        "integrity": integ.name if integ else (str(sa.auth) if sa and sa.auth else None),
        "replay_window": (extra.replay_window if extra and extra.replay_window
                          else (sa.replay if sa else 0)),
        "esn": bool(extra and extra.flags & 1),
        "current": _lifetime(msg, ExtType.LIFETIME_CURRENT),
        "hard": _lifetime(msg, ExtType.LIFETIME_HARD),
        "soft": _lifetime(msg, ExtType.LIFETIME_SOFT),
    }
    if extra is not None:
        record["counters"] = {
            "packets_in": extra.packets_in,
            "packets_out": extra.packets_out,
            "bytes_in": extra.bytes_in,
            "bytes_out": extra.bytes_out,
            "replay_drops": extra.replay_drops,
            "auth_failures": extra.auth_failures,
        }
    if show_keys:
        for name, ext_type in (("encryption_key", ExtType.KEY_ENCRYPT),
                               ("integrity_key", ExtType.KEY_AUTH)):
            key = msg.ext.get(ext_type)
            record[name] = key.key.hex() if isinstance(key, KeyExt) else None
    return record


def _selector(addr: AddressExt | None) -> dict[str, Any]:
    if addr is None:
        return {"prefix": None, "port": 0}
    return {"prefix": f"{addr.address}/{addr.full_prefixlen}", "port": addr.port}


def policy_record(msg: Message) -> dict[str, Any]:
    pol = msg.policy
    src, dst = msg.src, msg.dst
    proto = src.proto if src else 0
    requests = []
    if pol is not None:
        for req in pol.requests:
            endpoints = f"{req.src}-{req.dst}" if req.src is not None else ""
            requests.append(
                {
                    "protocol": {50: "esp", 51: "ah", 108: "ipcomp"}.get(req.proto, str(req.proto)),
                    "mode": _name(IpsecMode, req.mode),
                    "endpoints": endpoints,
                    "level": _name(IpsecLevel, req.level),
                    "reqid": req.reqid,
                }
            )
    return {
        "id": pol.id if pol else None,
        "direction": {1: "in", 2: "out", 3: "fwd"}.get(pol.dir, _name(PolicyDir, pol.dir))
        if pol else None,
        "action": _name(PolicyType, pol.type) if pol else None,
        "priority": pol.priority if pol else 0,
        "src": _selector(src),
        "dst": _selector(dst),
        "upper_protocol": _PROTO_NAMES.get(proto, str(proto)),
        "requests": requests,
        "current": _lifetime(msg, ExtType.LIFETIME_CURRENT),
    }


def table(rows: list[list[str]], headers: list[str]) -> str:
    """Left-aligned columns, two spaces apart, like ``ip`` and ``swanctl`` listings."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)
