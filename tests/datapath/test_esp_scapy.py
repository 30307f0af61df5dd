"""Interoperability of EspTransform with scapy's independent ESP implementation.

For every algorithm, tunnel (all inner/outer IP version pairs) and transport mode, with and
without UDP encapsulation and ESN: scapy decrypts what we seal, we open what scapy seals, and
for the deterministic algorithms (IV = sequence number) both produce the same bytes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.packet import Packet, Raw

from datapath.esp import EspTransform


@dataclass(frozen=True)
class Suite:
    name: str
    enc: str
    enc_len: int
    integ: str
    integ_len: int
    scapy_enc: str
    scapy_auth: str | None
    deterministic: bool  # IV is the sequence number, so scapy can produce identical bytes


SUITES = [
    Suite("gcm128", "aes-gcm-16", 20, "null", 0, "AES-GCM", None, True),
    Suite("gcm256", "aes-gcm-16", 36, "null", 0, "AES-GCM", None, True),
    Suite("chacha20poly1305", "chacha20-poly1305", 36, "null", 0, "CHACHA20-POLY1305", None, True),
    Suite("cbc128-sha256", "aes-cbc", 16, "hmac-sha256", 32, "AES-CBC", "SHA2-256-128", False),
    Suite("cbc256-sha384", "aes-cbc", 32, "hmac-sha384", 48, "AES-CBC", "SHA2-384-192", False),
    Suite("cbc256-sha512", "aes-cbc", 32, "hmac-sha512", 64, "AES-CBC", "SHA2-512-256", False),
    Suite("cbc192-sha1", "aes-cbc", 24, "hmac-sha1", 20, "AES-CBC", "HMAC-SHA1-96", False),
    Suite("null-sha256", "null", 0, "hmac-sha256", 32, "NULL", "SHA2-256-128", True),
    Suite("ctr128-sha256", "aes-ctr", 20, "hmac-sha256", 32, "AES-CTR", "SHA2-256-128", True),
    Suite("ctr256-sha512", "aes-ctr", 36, "hmac-sha512", 64, "AES-CTR", "SHA2-512-256", True),
    Suite("3des-md5", "3des-cbc", 24, "hmac-md5", 16, "3DES", "HMAC-MD5-96", False),
]

# mode name -> (inner IP version or None for transport, outer IP version)
MODES = {
    "tunnel-4in4": (4, 4),
    "tunnel-4in6": (4, 6),
    "tunnel-6in4": (6, 4),
    "tunnel-6in6": (6, 6),
    "transport-4": (None, 4),
    "transport-6": (None, 6),
}

SPI = 0xC0FFEE01
PAYLOAD_SIZES = (0, 1, 2, 15, 16, 17, 61, 1000)
ESN_START = (7 << 32) | 0xFFFFFFFB  # crosses a 2^32 boundary within the test packets


def outer_header(version: int) -> Packet:
    if version == 4:
        return IP(src="192.0.2.1", dst="198.51.100.2")
    return IPv6(src="2001:db8::1", dst="2001:db8:ffff::2")


def inner_packet(version: int, size: int, index: int) -> Packet:
    data = Raw(bytes((index + i) & 0xFF for i in range(size)))
    ip = IP(src="10.1.0.1", dst="10.2.0.1") if version == 4 else IPv6(src="fd00::1", dst="fd00::2")
    l4 = UDP(sport=1234, dport=5678) if index % 2 else TCP(sport=40000, dport=443, flags="PA")
    pkt = ip / l4 / data
    return pkt.__class__(bytes(pkt))  # fix lengths and checksums


def keys(suite: Suite) -> tuple[bytes, bytes]:
    rng = random.Random(suite.name)
    return rng.randbytes(suite.enc_len), rng.randbytes(suite.integ_len)


def scapy_sa(suite: Suite, inner: int | None, outer: int, natt: bool, esn: bool,
             seq: int = 1) -> SecurityAssociation:
    enc_key, integ_key = keys(suite)
    return SecurityAssociation(
        ESP, spi=SPI, seq_num=seq & 0xFFFFFFFF,
        crypt_algo=suite.scapy_enc, crypt_key=enc_key,
        auth_algo=suite.scapy_auth, auth_key=integ_key or None,
        tunnel_header=outer_header(outer) if inner else None,
        nat_t_header=UDP(sport=4500, dport=4500) if natt else None,
        esn_en=esn, esn=seq >> 32,
    )


def our_sa(suite: Suite, esn: bool, next_seq: int = 1) -> EspTransform:
    enc_key, integ_key = keys(suite)
    return EspTransform.build(
        SPI, suite.enc, enc_key, suite.integ, integ_key,
        esn=esn, next_seq=next_seq, allow_weak=True,
    )


def wire_packet(esp: bytes, outer: int, natt: bool) -> Packet:
    """The ESP bytes as they would arrive: outer IP, optional UDP 4500, ESP."""
    head = outer_header(outer)
    if natt:
        pkt = head / UDP(sport=4500, dport=4500) / Raw(esp)
    elif outer == 4:
        pkt = IP(src=head.src, dst=head.dst, proto=50) / Raw(esp)
    else:
        pkt = IPv6(src=head.src, dst=head.dst, nh=50) / Raw(esp)
    return pkt.__class__(bytes(pkt))


def plaintext_of(pkt: Packet, transport: bool) -> tuple[int, bytes]:
    """(next header, ESP payload) the packet should travel as."""
    if not transport:
        return (4 if pkt.version == 4 else 41), bytes(pkt)
    proto = pkt.proto if pkt.version == 4 else pkt.nh
    return proto, bytes(pkt.payload)


CASES = [
    pytest.param(suite, mode, natt, esn, id=f"{suite.name}-{mode}-{'natt' if natt else 'raw'}"
                 f"-{'esn' if esn else 'seq32'}")
    for suite in SUITES for mode in MODES for natt in (False, True) for esn in (False, True)
]


@pytest.mark.parametrize(("suite", "mode", "natt", "esn"), CASES)
def test_scapy_opens_what_we_seal(suite: Suite, mode: str, natt: bool, esn: bool) -> None:
    inner, outer = MODES[mode]
    start = ESN_START if esn else 1
    ours = our_sa(suite, esn, start)
    for index, size in enumerate(PAYLOAD_SIZES):
        original = inner_packet(inner or outer, size, index)
        nh, payload = plaintext_of(original, inner is None)
        seq = start + index
        esp = ours.seal(payload, nh)
        theirs = scapy_sa(suite, inner, outer, natt, esn, seq)
        decrypted = theirs.decrypt(wire_packet(esp, outer, natt), esn=seq >> 32)
        if inner is None:
            assert bytes(decrypted.payload) == payload
            assert (decrypted.proto if outer == 4 else decrypted.nh) == nh
        else:
            assert bytes(decrypted) == payload
        if suite.deterministic:
            iv = None if suite.enc == "null" else seq.to_bytes(8, "big")
            sealed = theirs.encrypt(original, iv=iv)
            assert bytes(sealed[ESP]) == esp


@pytest.mark.parametrize(("suite", "mode", "natt", "esn"), CASES)
def test_we_open_what_scapy_seals(suite: Suite, mode: str, natt: bool, esn: bool) -> None:
    inner, outer = MODES[mode]
    start = ESN_START if esn else 1
    ours = our_sa(suite, esn)
    if esn:
        ours.replay.accept(start - 1)  # the receiver has seen the packets before this run
    for index, size in enumerate(PAYLOAD_SIZES):
        original = inner_packet(inner or outer, size, index)
        seq = start + index
        theirs = scapy_sa(suite, inner, outer, natt, esn, seq)
        sealed = theirs.encrypt(original)
        assert sealed.haslayer(UDP) == natt
        nh, payload = ours.open(bytes(sealed[ESP]))
        assert (nh, payload) == plaintext_of(original, inner is None)
    assert ours.replay.highest == start + len(PAYLOAD_SIZES) - 1
