"""Fuzz the IKE state machine with mutated datagrams of real exchanges (seeded, repeatable).

Every datagram of a full life cycle (IKE_SA_INIT, IKE_AUTH, CREATE_CHILD_SA for a new Child SA
with PFS, a Child SA rekey, INFORMATIONAL deletes and a liveness check, an IKE SA rekey, the
final delete) is mutated many times and each mutant is fed, before the genuine datagram, to
the object about to receive it, in whatever state it is in then. Protected messages must be
dropped and counted with no other change; unprotected IKE_SA_INIT mutants go to scratch
objects in the same state, which may legitimately act on them. The life cycle must then
complete as if nothing had happened.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Callable

from ike.constants import DhId, ExchangeType, NotifyType, ProtocolId
from ike.core import State
from ike.dh import new_key_exchange
from ike.events import ChildSaDeleted, ChildSaEstablished, IkeSaDeleted, IkeSaRekeyed
from ike.message import encode_payloads
from ike.payloads import (
    DeletePayload,
    KePayload,
    NoncePayload,
    NotifyPayload,
    Payload,
    TsiPayload,
    TsrPayload,
)
from ike.proposals import parse_proposals, sa_payload
from ike.sa import IkeSa
from tests.ike.harness import I_ADDR, R_ADDR, Net, config, pair, seal_raw

PFS = {"esp_proposals": parse_proposals("aes128gcm16-x25519", "esp")}
MUTANTS_PER_DATAGRAM = 520
RUNS = 10  # 10 runs x 20 datagrams x 520 mutants = 104,000 mutated messages


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    op = rng.randrange(9)
    if op == 0:  # bit flips
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(len(buf))
            buf[pos] ^= 1 << rng.randrange(8)
    elif op == 1:  # truncation
        del buf[rng.randrange(len(buf)):]
    elif op == 2:  # IKE header length
        struct.pack_into("!I", buf, 24, rng.choice([0, 28, len(buf) - 1, len(buf) + 1,
                                                    rng.randrange(1 << 32)]))
    elif op == 3:  # first generic payload header length
        struct.pack_into("!H", buf, 30, rng.choice([0, 3, 4, 5, rng.randrange(1 << 16)]))
    elif op == 4:  # payload types: the header's next payload or the first payload's
        buf[rng.choice([16, 28])] = rng.choice([0, 33, 34, 40, 41, 46, 53,
                                                rng.randrange(256)])
    elif op == 5:  # exchange type, flags, message ID, version
        field = rng.choice([17, 18, 19, 20, 23])
        buf[field] = rng.randrange(256)
    elif op == 6:  # a span of random bytes
        start = rng.randrange(len(buf))
        end = min(len(buf), start + rng.randint(1, 32))
        buf[start:end] = rng.randbytes(end - start)
    elif op == 7:  # random bytes after a real header (passes the SPI checks)
        buf = buf[:28] + bytearray(rng.randbytes(rng.randrange(200)))
        struct.pack_into("!I", buf, 24, len(buf))
    else:  # trailing bytes
        buf += rng.randbytes(rng.randint(1, 16))
    out = bytes(buf)
    return out if out != data else out + b"\x00"


def _snapshot(sa: IkeSa) -> tuple[object, ...]:
    pending = sa._pending
    return (sa.state, sa._next_id, sa._peer_next_id, id(pending),
            pending.retransmits if pending else -1, len(sa._events), len(sa._outbox),
            len(sa._children), id(sa._cached), len(sa._queue), sa.spi_i, sa.spi_r)


class Fuzzer:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.fed = 0

    def protected(self, sa: IkeSa, data: bytes, addr: tuple[str, int], now: float) -> None:
        """Mutants of a protected message: each one dropped and counted, nothing else."""
        for _ in range(MUTANTS_PER_DATAGRAM):
            before, drops = _snapshot(sa), sa.drops
            sa.receive_datagram(mutate(self.rng, data), addr, now)
            assert sa.drops == drops + 1
            assert _snapshot(sa) == before
            self.fed += 1

    def unprotected(self, make: Callable[[], IkeSa], data: bytes, addr: tuple[str, int],
                    allowed: set[State]) -> None:
        """Mutants of an IKE_SA_INIT message to scratch objects: acting on a well-formed
        mutant is legitimate; otherwise the drop is counted. No exception either way."""
        scratch = make()
        for _ in range(MUTANTS_PER_DATAGRAM):
            state, drops = scratch.state, scratch.drops
            scratch.receive_datagram(mutate(self.rng, data), addr, 0.0)
            out = scratch.datagrams_to_send(0.0)
            assert scratch.state in allowed
            assert scratch.state is not state or out or scratch.drops == drops + 1
            if scratch.state is not state or out:
                scratch = make()
            self.fed += 1


def _fixed_spi(spi: bytes) -> Callable[[int], bytes]:
    return lambda n: spi if n == 8 else os.urandom(n)


def life_cycle(seed: int) -> int:
    """One fuzzed life cycle; returns the number of mutants fed."""
    fz = Fuzzer(seed)
    i, r = pair(PFS, PFS)
    net = Net(i, r)

    def fresh_responder() -> IkeSa:
        return IkeSa(config("r", **PFS), initiator=False, local_addr=R_ADDR,
                     remote_addr=I_ADDR, child_spi=b"\x00\x00\x01\x00")

    def fresh_initiator() -> IkeSa:
        sa = IkeSa(config("i", **PFS), initiator=True, local_addr=I_ADDR, remote_addr=R_ADDR,
                   child_spi=b"\x00\x00\x01\x01", random=_fixed_spi(i.spi_i))
        sa.initiate(0.0)
        sa.datagrams_to_send(0.0)
        return sa

    i.initiate(0.0)
    (init,) = net.outgoing("i")
    fz.unprotected(fresh_responder, init, I_ADDR, {State.IDLE, State.INIT_DONE, State.FAILED})
    net.deliver("i", init)
    (init_resp,) = net.outgoing("r")
    fz.unprotected(fresh_initiator, init_resp, R_ADDR,
                   {State.INIT_SENT, State.AUTH_SENT, State.FAILED})
    net.deliver("r", init_resp)

    def pump() -> None:
        """Deliver everything, each genuine datagram preceded by its mutants."""
        for _ in range(20):
            moved = False
            for name, _src, dst in net.sides():
                for data in net.outgoing(name):
                    target = dst.route(data)
                    assert target is not None
                    addr = I_ADDR if name == "i" else R_ADDR
                    fz.protected(target, data, addr, net.now)
                    net.deliver(name, data)
                    moved = True
            if not moved:
                return

    pump()  # IKE_AUTH
    assert net.i.sa.state is State.ESTABLISHED and net.r.sa.state is State.ESTABLISHED
    net.i.sa.create_child(net.now)
    pump()
    first = net.i.sa.child_sas[0].inbound_spi
    net.i.sa.rekey_child(first, net.now)  # rekey + delete of the old pair
    pump()
    net.r.sa.check_liveness(net.now)
    pump()
    net.r.sa.rekey_ike(net.now)  # IKE SA rekey + delete of the old IKE SA
    pump()
    net.i.sa.delete_child(net.i.sa.child_sas[0].inbound_spi, net.now)
    pump()
    net.i.sa.delete(net.now)
    pump()
    # The life cycle completed exactly as without the mutants.
    assert len(net.i.take(IkeSaRekeyed)) == 1 and len(net.r.take(IkeSaRekeyed)) == 1
    for side in (net.i, net.r):
        assert len(side.take(ChildSaEstablished)) == 3
        assert len(side.take(ChildSaDeleted)) == 3
        assert [e.rekeyed for e in side.take(IkeSaDeleted)] == [True, False]
        assert all(sa.state is State.DELETED for sa in side.sas)
        assert sum(sa.drops for sa in side.sas) >= fz.fed // 4
    return fz.fed


def test_fuzzed_life_cycles() -> None:
    fed = sum(life_cycle(seed) for seed in range(RUNS))
    assert fed >= 100_000


def test_authentic_garbage_inside_sk() -> None:
    """Mutated plaintexts under valid keys reach the handlers: they must answer or drop,
    never raise, and leave an SA that still runs a liveness check."""
    rng = random.Random(7)
    n = [bytes([b]) * 4 for b in range(8)]
    samples = [
        (ExchangeType.CREATE_CHILD_SA, "create"), (ExchangeType.INFORMATIONAL, "delete"),
        (ExchangeType.CREATE_CHILD_SA, "rekey"), (ExchangeType.CREATE_CHILD_SA, "ike"),
    ]
    net = Net.established(PFS, PFS)
    rebuilt = 0
    for round_ in range(2500):
        exchange, kind = samples[round_ % len(samples)]
        sa, peer = net.i.sa, net.r.sa
        inner = _plaintext(sa, kind, n)
        first, body = inner
        mutant = mutate(rng, bytes(28) + body)[28:] or body[:1]
        data = seal_raw(sa, exchange, first if rng.random() < 0.8 else rng.randrange(256),
                        mutant)
        peer.receive_datagram(data, I_ADDR, net.now)
        net.outgoing("r")  # answers to requests the sender no longer waits for
        if peer.state is not State.ESTABLISHED or round_ % 100 == 99:
            if peer.state is State.ESTABLISHED:
                sa._next_id = peer._peer_next_id
                sa.check_liveness(net.now)
                assert net.pump() == 2 and peer.state is State.ESTABLISHED
            net = Net.established(PFS, PFS)
            rebuilt += 1
    assert rebuilt >= 25


def _plaintext(sa: IkeSa, kind: str, n: list[bytes]) -> tuple[int, bytes]:
    """The inner payload chain of a genuine request of that kind (built, not sent)."""
    child = sa.child_sas[0].inbound_spi if sa.child_sas else n[1]
    payloads: list[Payload]
    if kind == "delete":
        payloads = [DeletePayload(ProtocolId.ESP, [child, n[2]])]
    elif kind == "ike":
        payloads = [sa_payload(sa.config.ike_proposals, b"\x01" * 8), NoncePayload(b"n" * 32),
                    KePayload(DhId.CURVE25519, new_key_exchange(DhId.CURVE25519)
                              .public_value())]
    else:
        payloads = [sa_payload(sa.config.esp_proposals, n[3]), NoncePayload(b"m" * 32),
                    KePayload(DhId.CURVE25519, b"\x09" + bytes(31)),
                    TsiPayload(list(sa.config.local_ts)), TsrPayload(list(sa.config.remote_ts))]
        if kind == "rekey":
            payloads.insert(0, NotifyPayload(NotifyType.REKEY_SA, b"", ProtocolId.ESP, child))
    return encode_payloads(payloads)
