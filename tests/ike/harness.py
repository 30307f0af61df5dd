"""Two IkeSa objects talking in memory, routed by SPI the way the daemon will route them."""

from __future__ import annotations

import ipaddress
import os
import struct
from collections.abc import Callable, Iterator

from ike.config import IkeConfig
from ike.constants import IdType, PayloadType
from ike.core import TERMINAL, State
from ike.events import Event, IkeSaRekeyed
from ike.message import IkeHeader
from ike.payloads import TrafficSelector
from ike.proposals import parse_proposals
from ike.sa import IkeSa

I_ADDR, R_ADDR = ("192.0.2.1", 500), ("198.51.100.1", 500)


def ts(net: str) -> TrafficSelector:
    n = ipaddress.ip_network(net)
    return TrafficSelector(n[0], n[-1])


def config(side: str, **over: object) -> IkeConfig:
    local, remote = ("10.1.0.0/16", "10.2.0.0/16") if side == "i" else \
        ("10.2.0.0/16", "10.1.0.0/16")
    base: dict[str, object] = dict(
        local_id=(IdType.FQDN, b"alice" if side == "i" else b"gw"),
        psk=b"correct horse battery staple",
        ike_proposals=parse_proposals("aes128gcm16-prfsha256-x25519", "ike"),
        esp_proposals=parse_proposals("aes128gcm16", "esp"),
        local_ts=[ts(local)], remote_ts=[ts(remote)],
    )
    base.update(over)
    return IkeConfig(**base)  # type: ignore[arg-type]


def scripted(nonces: list[bytes]) -> Callable[[int], bytes]:
    """A random source that hands out the given 32-byte nonces first, in order."""
    queue = list(nonces)

    def rand(n: int) -> bytes:
        if n == 32 and queue:
            return queue.pop(0)
        return os.urandom(n)
    return rand


def pair(i_over: dict | None = None, r_over: dict | None = None, *,
         i_random: Callable[[int], bytes] = os.urandom,
         r_random: Callable[[int], bytes] = os.urandom) -> tuple[IkeSa, IkeSa]:
    i = IkeSa(config("i", **(i_over or {})), initiator=True, local_addr=I_ADDR,
              remote_addr=R_ADDR, child_spi=b"\xc0\x00\x00\x01", random=i_random)
    r = IkeSa(config("r", **(r_over or {})), initiator=False, local_addr=R_ADDR,
              remote_addr=I_ADDR, child_spi=b"\xc0\x00\x00\x02", random=r_random)
    return i, r


def pump(i: IkeSa, r: IkeSa, now: float = 0.0, rounds: int = 10) -> int:
    """Deliver datagrams both ways between two objects until quiet; returns how many."""
    delivered = 0
    for _ in range(rounds):
        moved = False
        for src, dst, addr in ((i, r, I_ADDR), (r, i, R_ADDR)):
            for data, _ in src.datagrams_to_send(now):
                dst.receive_datagram(data, addr, now)
                delivered += 1
                moved = True
        if not moved:
            break
    return delivered


def events(sa: IkeSa) -> list:
    out = []
    while (e := sa.next_event()) is not None:
        out.append(e)
    return out


def seal_raw(sa: IkeSa, exchange: int, first: int, plaintext: bytes) -> bytes:
    """A request protected with sa's real keys whose plaintext is arbitrary bytes."""
    assert sa._out is not None
    sk_len = 4 + sa._out.sealed_length(len(plaintext))
    header = IkeHeader(sa.spi_i, sa.spi_r, PayloadType.SK, exchange, sa._flags(False),
                       sa._next_id, 28 + sk_len).encode()
    aad = header + struct.pack("!BBH", first, 0, sk_len)
    sa._next_id += 1
    return aad + sa._out.seal(plaintext, aad)


class Side:
    """One peer: its IKE SAs (rekeys add more) and every event they reported."""

    def __init__(self, sa: IkeSa, addr: tuple[str, int]) -> None:
        self.sas = [sa]
        self.addr = addr
        self.events: list[Event] = []

    def collect(self) -> None:
        for sa in list(self.sas):
            while (e := sa.next_event()) is not None:
                self.events.append(e)
                if isinstance(e, IkeSaRekeyed):
                    self.sas.append(e.new_sa)
                    if e.redundant_sa is not None:
                        self.sas.append(e.redundant_sa)

    def route(self, data: bytes) -> IkeSa | None:
        spi_i, spi_r = data[:8], data[8:16]
        matches = [sa for sa in self.sas if sa.spi_i == spi_i]
        exact = [sa for sa in matches if sa.spi_r == spi_r]
        if exact or matches:
            return (exact or matches)[0]
        idle = [sa for sa in self.sas if sa.state is State.IDLE and not sa.initiator]
        return idle[0] if idle else None

    @property
    def sa(self) -> IkeSa:
        """The IKE SA in use: the newest one that is established."""
        live = [sa for sa in self.sas if sa.state is State.ESTABLISHED and not sa._redundant]
        return live[-1] if live else self.sas[-1]

    def take(self, kind: type) -> list:
        self.collect()
        found = [e for e in self.events if isinstance(e, kind)]
        self.events = [e for e in self.events if not isinstance(e, kind)]
        return found


class Net:
    """Both peers with a clock; `hold` keeps datagrams back for reordering tests."""

    def __init__(self, i: IkeSa, r: IkeSa) -> None:
        self.i = Side(i, I_ADDR)
        self.r = Side(r, R_ADDR)
        self.now = 0.0
        self.wire: list[tuple[str, bytes]] = []  # every datagram sent: ("i" or "r", bytes)

    @classmethod
    def established(cls, i_over: dict | None = None, r_over: dict | None = None,
                    **kw: Callable[[int], bytes]) -> Net:
        i, r = pair(i_over, r_over, **kw)
        net = cls(i, r)
        i.initiate(0.0)
        net.pump()
        assert i.state is State.ESTABLISHED and r.state is State.ESTABLISHED
        return net

    def sides(self) -> Iterator[tuple[str, Side, Side]]:
        yield "i", self.i, self.r
        yield "r", self.r, self.i

    def outgoing(self, name: str) -> list[bytes]:
        side = self.i if name == "i" else self.r
        out = [data for sa in side.sas for data, _ in sa.datagrams_to_send(self.now)]
        self.wire += [(name, d) for d in out]
        return out

    def deliver(self, name: str, data: bytes) -> None:
        """Deliver a datagram sent by side `name` to the other side."""
        src, dst = (self.i, self.r) if name == "i" else (self.r, self.i)
        sa = dst.route(data)
        if sa is not None:
            sa.receive_datagram(data, src.addr, self.now)
        dst.collect()
        src.collect()

    def pump(self, rounds: int = 50) -> int:
        delivered = 0
        for _ in range(rounds):
            moved = False
            for name, _src, _dst in self.sides():
                for data in self.outgoing(name):
                    self.deliver(name, data)
                    delivered += 1
                    moved = True
            if not moved:
                break
        self.i.collect()
        self.r.collect()
        return delivered

    def timers(self, until: float, lose: bool = False) -> None:
        """Run timers up to `until`; with `lose`, every datagram is lost."""
        for _ in range(1000):
            deadlines = [t for side in (self.i, self.r) for sa in side.sas
                         if sa.state not in TERMINAL and (t := sa.get_timer()) is not None]
            if not deadlines or min(deadlines) > until:
                break
            self.now = max(self.now, min(deadlines))
            for side in (self.i, self.r):
                for sa in list(side.sas):
                    sa.handle_timer(self.now)
            if lose:
                self.outgoing("i")
                self.outgoing("r")
                self.i.collect()
                self.r.collect()
            else:
                self.pump()
        self.now = max(self.now, until)
