"""UDP encapsulation of ESP (RFC 3948) on port 4500: tell ESP, IKE and NAT keepalives apart.

A datagram on UDP 4500 is one of (RFC 3948 2.2, 2.3):
- ESP: the first four bytes are the SPI, never zero; at least SPI and sequence number.
- IKE: a four-byte all-zero "non-ESP marker" precedes the IKE message; strip it.
- NAT keepalive: exactly one byte, 0xFF; ignore it.
Anything else is malformed and dropped.

``classify`` never raises; it returns the kind and a zero-copy view of the part that matters
(the whole ESP packet, or the IKE message without its marker).
"""

from __future__ import annotations

from enum import IntEnum

NAT_T_PORT = 4500
NON_ESP_MARKER = b"\x00\x00\x00\x00"
NAT_KEEPALIVE = b"\xff"
_ESP_MIN = 8  # SPI + sequence number; the ESP transform checks the rest


class UdpKind(IntEnum):
    ESP = 1
    IKE = 2
    KEEPALIVE = 3
    MALFORMED = 4


def classify(datagram: bytes | bytearray | memoryview) -> tuple[UdpKind, memoryview]:
    """What a datagram received on UDP 4500 carries, and that part of it."""
    view = memoryview(datagram)
    n = len(view)
    if n >= 4:
        if view[:4] != NON_ESP_MARKER:
            return (UdpKind.ESP, view) if n >= _ESP_MIN else (UdpKind.MALFORMED, view)
        return (UdpKind.IKE, view[4:]) if n > 4 else (UdpKind.MALFORMED, view)
    if n == 1 and view[0] == 0xFF:
        return UdpKind.KEEPALIVE, view
    return UdpKind.MALFORMED, view


def ike_datagram(message: bytes | bytearray | memoryview) -> bytes:
    """An IKE message as sent on UDP 4500: the non-ESP marker, then the message."""
    return NON_ESP_MARKER + bytes(message)
