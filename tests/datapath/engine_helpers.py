"""Two datapaths back to back over loopback UDP, each with its own Kernel and an in-memory TUN.

No privileges needed: the outer sockets are plain UDP sockets on 127.0.0.1 and 127.0.0.2 (no
SO_MARK), and the TUN is replaced by ``MemoryTun`` (packets to read in, packets written out),
so the engine's real Outbound/Inbound code, ESP transforms, SPD and SAD are exercised.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field

from datapath.engine import Datapath
from datapath.ippacket import ip_header
from datapath.sockets import UdpSocket
from datapath.tun import PacketSlots, TunStats
from userspace_ipsec.config import DatapathConfig
from userspace_ipsec.kernel import Delivery, Kernel, KernelOptions
from userspace_ipsec.pfkey.constants import MsgType, SaType
from userspace_ipsec.pfkey.messages import Message
from userspace_ipsec.setkey.parser import parse_script

NOW = 1_700_000_000.0
LEFT, RIGHT = "127.0.0.1", "127.0.0.2"
KEY_A = "0x" + "a1" * 16 + "c0ffee01"
KEY_B = "0x" + "b2" * 16 + "c0ffee02"


class MemoryTun:
    """The TUN's interface, in memory: ``inbox`` is read by read_batch, writes go to ``sent``."""

    name = "memtun"
    fd = -1

    def __init__(self) -> None:
        self.inbox: list[bytes] = []
        self.sent: list[bytes] = []
        self.stats = TunStats()

    def read_batch(self, slots: PacketSlots, limit: int | None = None) -> int:
        n = 0
        while self.inbox and n < len(slots.buffers):
            pkt = self.inbox.pop(0)
            slots.views[n][:len(pkt)] = pkt
            slots.lengths[n] = len(pkt)
            n += 1
        return n

    def write(self, packet: bytes | bytearray | memoryview) -> bool:
        self.sent.append(bytes(packet))
        return True


@dataclass
class Side:
    kernel: Kernel
    dp: Datapath
    tun: MemoryTun
    udp: UdpSocket
    addr: str
    deliveries: list[Delivery] = field(default_factory=list)
    sock_id: int = 0
    clock: list[float] = field(default_factory=lambda: [NOW])

    @property
    def port(self) -> int:
        return int(self.udp.address[1])

    def setkey(self, script: str) -> None:
        for command in parse_script(script, rfc_mode=False):
            for msg in command.messages:
                for d in self.kernel.handle(self.sock_id, msg, self.clock[0]):
                    msg_out = d.message
                    assert msg_out is None or not msg_out.errno or msg_out.type != msg.type, (
                        f"{msg.type.name} refused: errno {msg_out.errno}")
        self.dp.sync()

    def register(self) -> None:
        self.kernel.handle(self.sock_id, Message(MsgType.REGISTER, SaType.ESP), self.clock[0])

    def send(self, *packets: bytes) -> None:
        self.tun.inbox.extend(packets)
        self.dp.handle_tun()

    def receive(self, timeout: float = 2.0) -> None:
        """Let the datapath read what arrived on its UDP socket (bounded wait)."""
        deadline = time.monotonic() + timeout
        before = self.dp.counters.esp_received + self.dp.counters.keepalives_received \
            + self.dp.counters.ike_received + self.dp.counters.ike_dropped
        while time.monotonic() < deadline:
            self.dp.handle_udp(self.udp)
            now = self.dp.counters.esp_received + self.dp.counters.keepalives_received \
                + self.dp.counters.ike_received + self.dp.counters.ike_dropped
            if now > before:
                time.sleep(0.02)
                self.dp.handle_udp(self.udp)
                return
            time.sleep(0.005)


def make_side(addr: str, **config: object) -> Side:
    kernel = Kernel(KernelOptions())
    tun = MemoryTun()
    udp = UdpSocket(socket.AF_INET, addr, 0, gro=False)
    clock = [NOW]
    deliveries: list[Delivery] = []
    cfg = DatapathConfig(**config)  # type: ignore[arg-type]
    dp = Datapath(kernel, cfg, deliveries.extend, clock=lambda: clock[0],
                  local=lambda: frozenset({socket.inet_aton(addr)}))
    dp.attach(tun, [udp], [])  # type: ignore[arg-type]
    side = Side(kernel, dp, tun, udp, addr, deliveries, kernel.open_socket(), clock)
    return side


def tunnel_scripts(left: Side, right: Side, *, soft_bytes: int = 0,
                   with_sas: bool = True) -> tuple[str, str]:
    """esp-udp tunnel 10.1.0.0/24 (left) <-> 10.4.0.0/24 (right); SPIs 0x1001 / 0x1002."""
    lp, rp = f"[{left.port}]", f"[{right.port}]"
    soft = f" -bs {soft_bytes}" if soft_bytes else ""
    sas = (
        f"add {LEFT}{lp} {RIGHT}{rp} esp-udp 0x1001 -m tunnel -r 64{soft} "
        f"-E aes-gcm-16 {KEY_A};\n"
        f"add {RIGHT}{rp} {LEFT}{lp} esp-udp 0x1002 -m tunnel -r 64{soft} "
        f"-E aes-gcm-16 {KEY_B};\n"
    ) if with_sas else ""

    def policies(mine: str, theirs: str, me: str, mp: str, peer: str, pp: str) -> str:
        return (
            f"spdadd {mine} {theirs} any -P out ipsec esp/tunnel/{me}{mp}-{peer}{pp}/require;\n"
            f"spdadd {theirs} {mine} any -P in ipsec esp/tunnel/{peer}{pp}-{me}{mp}/require;\n"
        )

    return (sas + policies("10.1.0.0/24", "10.4.0.0/24", LEFT, lp, RIGHT, rp),
            sas + policies("10.4.0.0/24", "10.1.0.0/24", RIGHT, rp, LEFT, lp))


def udp_packet(src: str, dst: str, payload: bytes = b"x" * 100, *, df: bool = False,
               sport: int = 1111, dport: int = 2222) -> bytes:
    """An IPv4 UDP packet (checksum 0: none, legal for IPv4)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    header = bytearray(ip_header(socket.inet_aton(src), socket.inet_aton(dst), 17, len(udp)))
    if df:
        header[6] |= 0x40
        header[10:12] = b"\0\0"
        header[10:12] = ip_header_checksum(bytes(header))
    return bytes(header) + udp


def ip_header_checksum(header: bytes) -> bytes:
    from datapath.ippacket import internet_checksum

    return struct.pack("!H", internet_checksum(header))


def connected_pair(**config: object) -> tuple[Side, Side]:
    left, right = make_side(LEFT, **config), make_side(RIGHT, **config)
    l_script, r_script = tunnel_scripts(left, right)
    left.setkey(l_script)
    right.setkey(r_script)
    return left, right
