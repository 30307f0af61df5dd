"""IKE core costs: SK payload seal/open per suite, DH per group, a full PSK handshake.

Run: python benchmarks/ike_crypto.py   (prints figures; asserts nothing)
"""

from __future__ import annotations

import ipaddress
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ike.constants import DhId, EncrId, ExchangeType, IdType, IntegId, PrfId
from ike.crypto import derive_ike_keys, ike_sa_ciphers
from ike.dh import new_key_exchange
from ike.message import Message, decode_message, decrypt_message, encrypt_message
from ike.payloads import (
    AuthPayload,
    IdiPayload,
    NotifyPayload,
    Payload,
    TrafficSelector,
    TsiPayload,
)
from ike.proposals import parse_proposals
from ike.sa import IkeConfig, IkeSa
from ike.transforms import TransformSet


def rate(fn: Callable[[], object], seconds: float = 0.5, max_iter: int = 200_000) -> float:
    """Calls per second, bounded in both time and count."""
    n = 0
    start = time.perf_counter()
    while n < max_iter:
        fn()
        n += 1
        if time.perf_counter() - start >= seconds:
            break
    return n / (time.perf_counter() - start)


def sk_figures() -> None:
    net = ipaddress.ip_network("10.0.0.0/8")
    inner: list[Payload] = [IdiPayload(IdType.FQDN, b"alice.example"), AuthPayload(2, b"A" * 32),
             NotifyPayload(16384), TsiPayload([TrafficSelector(net[0], net[-1])])]
    msg = Message(ExchangeType.IKE_AUTH, 1, b"i" * 8, b"r" * 8, 0x08)
    for name, suite in (
        ("aes128gcm16", TransformSet(EncrId.AES_GCM_16, 128, prf=PrfId.HMAC_SHA2_256)),
        ("chacha20poly1305", TransformSet(EncrId.CHACHA20_POLY1305, 256,
                                          prf=PrfId.HMAC_SHA2_256)),
        ("aes256-sha256", TransformSet(EncrId.AES_CBC, 256, IntegId.HMAC_SHA2_256_128,
                                       PrfId.HMAC_SHA2_256)),
    ):
        keys = derive_ike_keys(suite, b"s" * 32, b"n" * 32, b"m" * 32, b"i" * 8, b"r" * 8)
        out, _ = ike_sa_ciphers(suite, keys, True)
        _, inbound = ike_sa_ciphers(suite, keys, False)
        data = encrypt_message(msg, inner, out)
        seal = rate(lambda: encrypt_message(msg, inner, out))  # noqa: B023
        opened = rate(lambda: decrypt_message(decode_message(data), inbound))  # noqa: B023
        print(f"SK {name:18s} encode+seal {seal:9.0f}/s   parse+open {opened:9.0f}/s")


def dh_figures() -> None:
    for group in (DhId.MODP2048, DhId.MODP3072, DhId.MODP4096, DhId.ECP256, DhId.ECP384,
                  DhId.ECP521, DhId.CURVE25519, DhId.CURVE448):
        peer = new_key_exchange(group).public_value()
        per_s = rate(lambda: new_key_exchange(group).shared_secret(peer),  # noqa: B023
                     0.5, 2000)
        print(f"DH {DhId(group).name:10s} keygen+derive {1000 / per_s:7.2f} ms")


def handshake_figure() -> None:
    net_a, net_b = ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("10.2.0.0/16")
    ta, tb = TrafficSelector(net_a[0], net_a[-1]), TrafficSelector(net_b[0], net_b[-1])

    def one() -> None:
        def cfg(me: bytes, local: TrafficSelector, remote: TrafficSelector) -> IkeConfig:
            return IkeConfig((IdType.FQDN, me), b"psk", parse_proposals("default", "ike"),
                             parse_proposals("default", "esp"), [local], [remote])
        i = IkeSa(cfg(b"a", ta, tb), initiator=True, local_addr=("192.0.2.1", 500),
                  remote_addr=("192.0.2.2", 500), child_spi=b"\x00\x00\x00\x01")
        r = IkeSa(cfg(b"b", tb, ta), initiator=False, local_addr=("192.0.2.2", 500),
                  remote_addr=("192.0.2.1", 500), child_spi=b"\x00\x00\x00\x02")
        i.initiate(0.0)
        for _ in range(4):
            for d, _a in i.datagrams_to_send(0.0):
                r.receive_datagram(d, ("192.0.2.1", 500), 0.0)
            for d, _a in r.datagrams_to_send(0.0):
                i.receive_datagram(d, ("192.0.2.2", 500), 0.0)
        assert i.state.value == "established"

    per_s = rate(one, 1.0, 500)
    print(f"PSK handshake (default proposals, both sides, in memory) {1000 / per_s:.2f} ms")


if __name__ == "__main__":
    sk_figures()
    dh_figures()
    handshake_figure()
