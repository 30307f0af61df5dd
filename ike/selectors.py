"""Traffic selector narrowing (RFC 7296 2.9)."""

from __future__ import annotations

from collections.abc import Sequence

from ike.payloads import AnySelector, TrafficSelector


def narrow(offered: Sequence[AnySelector],
           configured: Sequence[TrafficSelector]) -> list[TrafficSelector]:
    """Intersections of the peer's selectors with ours, ours in order; unknown types skipped."""
    out: list[TrafficSelector] = []
    for mine in configured:
        for theirs in offered:
            if not isinstance(theirs, TrafficSelector):
                continue
            if mine.start_addr.version != theirs.start_addr.version:
                continue
            if 0 not in (mine.ip_protocol, theirs.ip_protocol) and \
                    mine.ip_protocol != theirs.ip_protocol:
                continue
            start = max(int(mine.start_addr), int(theirs.start_addr))
            end = min(int(mine.end_addr), int(theirs.end_addr))
            sport = max(mine.start_port, theirs.start_port)
            eport = min(mine.end_port, theirs.end_port)
            if start <= end and sport <= eport:
                make = type(mine.start_addr)
                proto = mine.ip_protocol or theirs.ip_protocol
                out.append(TrafficSelector(make(start), make(end), proto, sport, eport))
    return out
