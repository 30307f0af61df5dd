"""RFC 3948 classification of datagrams on UDP 4500, checked against scapy's layers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.ipsec import ESP, NAT_KEEPALIVE, NON_ESP

from datapath.encap import NAT_KEEPALIVE as KEEPALIVE_BYTES
from datapath.encap import NON_ESP_MARKER, UdpKind, classify, ike_datagram
from datapath.esp import EspTransform


def test_esp_datagram() -> None:
    esp = EspTransform.build(0x3000, "aes-gcm-16", bytes(20)).seal(b"inner", 4)
    kind, view = classify(esp)
    assert kind is UdpKind.ESP and bytes(view) == esp


def test_ike_marker_stripped() -> None:
    ike = bytes(range(1, 29)) * 2
    datagram = ike_datagram(ike)
    assert datagram[:4] == NON_ESP_MARKER
    kind, view = classify(datagram)
    assert kind is UdpKind.IKE and bytes(view) == ike


def test_ike_datagram_matches_scapy_non_esp() -> None:
    ike = b"\x11" * 28
    scapy_bytes = bytes(UDP(sport=4500, dport=4500) / NON_ESP() / ike)[8:]
    assert ike_datagram(ike) == scapy_bytes


def test_keepalive() -> None:
    wire = bytes(IP() / UDP(sport=4500, dport=4500) / NAT_KEEPALIVE())[28:]
    assert wire == KEEPALIVE_BYTES
    assert classify(wire)[0] is UdpKind.KEEPALIVE


@pytest.mark.parametrize(
    "datagram",
    [b"", b"\x00", b"\xfe", b"\xff\xff", b"\x00\x00\x00", NON_ESP_MARKER, b"\x00\x00\x00\x01",
     b"\x01\x02\x03\x04\x05\x06\x07"],
)
def test_malformed(datagram: bytes) -> None:
    assert classify(datagram)[0] is UdpKind.MALFORMED


@given(st.binary(max_size=64))
def test_classification_total(datagram: bytes) -> None:
    kind, view = classify(datagram)
    parsed = UDP(bytes(UDP(sport=4500, dport=4500) / datagram))
    if kind is UdpKind.ESP:
        assert parsed.haslayer(ESP) and parsed[ESP].spi != 0 and bytes(view) == datagram
    elif kind is UdpKind.IKE:
        assert datagram[:4] == NON_ESP_MARKER and bytes(view) == datagram[4:] and view
    elif kind is UdpKind.KEEPALIVE:
        assert datagram == b"\xff"
    else:
        assert len(datagram) < 8 and datagram != b"\xff" or datagram == NON_ESP_MARKER
