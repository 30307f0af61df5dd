"""Bad bytes, oversized messages, stuck readers and huge dumps, through the real socket."""

from __future__ import annotations

import errno
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from tests.core.helpers import key_msg, sa_msg
from tests.daemon.daemon_proc import RunningDaemon, pipeline
from userspace_ipsec.pfkey.client import MAX_MESSAGE, SOCKET_BUFFER
from userspace_ipsec.pfkey.constants import MsgType, SaType
from userspace_ipsec.pfkey.messages import Message

HEADER = struct.Struct("=BBBBHHII")


@pytest.fixture
def raw(daemon: RunningDaemon) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    sock.settimeout(10)
    sock.connect(str(daemon.socket_path))
    yield sock
    sock.close()


def _ask(sock: socket.socket, data: bytes) -> tuple[int, ...]:
    sock.send(data)
    reply = sock.recv(MAX_MESSAGE + 1)
    assert len(reply) == HEADER.size, reply  # a bare sadb_msg, no extension
    return HEADER.unpack(reply)


def _header(msg_type: int = MsgType.ADD, satype: int = SaType.ESP, words: int = 2,
            version: int = 2, reserved: int = 0, seq: int = 77, pid: int = 88) -> bytes:
    return HEADER.pack(version, msg_type, 0, satype, words, reserved, seq, pid)


@pytest.mark.parametrize(
    ("data", "expect"),
    [
        (b"\x02\x03\x00", (0, errno.EMSGSIZE, 0, 0, 0)),  # shorter than sadb_msg
        (_header(version=3), (MsgType.ADD, errno.EINVAL, SaType.ESP, 77, 88)),
        (_header(reserved=1), (MsgType.ADD, errno.EINVAL, SaType.ESP, 77, 88)),
        (_header(msg_type=99), (0, errno.EINVAL, SaType.ESP, 77, 88)),  # no type 99 to echo
        (_header(words=3), (MsgType.ADD, errno.EMSGSIZE, SaType.ESP, 77, 88)),
        (_header(words=3) + struct.pack("=HH4x", 1, 99), (MsgType.ADD, errno.EINVAL, 3, 77, 88)),
        (_header(words=3) + struct.pack("=HH4x", 0, 1), (MsgType.ADD, errno.EINVAL, 3, 77, 88)),
        (_header(words=2, msg_type=MsgType.ADD), (MsgType.ADD, errno.EINVAL, 3, 77, 88)),
        (_header(words=2, msg_type=MsgType.X_MIGRATE, satype=0),
         (MsgType.X_MIGRATE, errno.EOPNOTSUPP, 0, 77, 88)),
    ],
    ids=["short", "version", "reserved", "type", "length", "unknown-ext", "zero-ext-len",
         "add-without-extensions", "migrate"],
)
def test_malformed_bytes_get_an_errno_reply(raw: socket.socket, data: bytes,
                                            expect: tuple[int, ...]) -> None:
    version, msg_type, err, satype, words, reserved, seq, pid = _ask(raw, data)
    assert (version, words, reserved) == (2, 2, 0)
    assert (msg_type, err, satype, seq, pid) == expect


def test_message_over_the_maximum_size(daemon: RunningDaemon, raw: socket.socket) -> None:
    big = _header(words=0xFFFF, seq=5) + bytes(MAX_MESSAGE + 8 - HEADER.size)
    assert _ask(raw, big)[1:3] == (MsgType.ADD, errno.EMSGSIZE)
    # The largest a header can state is read whole (and refused for what it says, not size).
    exact = _header(words=0xFFFF, seq=6) + struct.pack("=HH", 0xFFFE, 17) + bytes(
        MAX_MESSAGE - HEADER.size - 4)
    assert _ask(raw, exact)[1:3] == (MsgType.ADD, errno.EINVAL)
    # The socket still works.
    assert daemon.client().request(Message(MsgType.FLUSH)).errno == 0


def test_stuck_reader_does_not_grow_the_daemon(daemon: RunningDaemon) -> None:
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stuck.connect(str(daemon.socket_path))
    actor = daemon.client()
    actor.request(Message(MsgType.FLUSH))  # the stuck socket is open by now
    rss_before = daemon.rss_kib()
    count = 100_000
    replies = pipeline(actor, (Message(MsgType.FLUSH) for _ in range(count)))
    assert len(replies) == count
    assert all(r.type == MsgType.FLUSH and r.errno == 0 for r in replies)
    grown_mib = (daemon.rss_kib() - rss_before) / 1024
    # 100,000 queued broadcasts would be tens of MiB; the queue is capped at 4,096.
    assert grown_mib < 24, f"daemon grew {grown_mib:.1f} MiB"

    other = daemon.client()  # a newcomer is served as usual
    assert other.request(sa_msg(MsgType.ADD, 0x7001, seq=0)).errno == 0
    assert other.request(key_msg(MsgType.GET, 0x7001)).sa is not None

    # The stuck socket gets what was queued for it, not the 100,000 broadcasts.
    stuck.settimeout(2)
    received = 0
    try:
        while received < count:
            stuck.recv(MAX_MESSAGE + 1)
            received += 1
    except TimeoutError:
        pass
    finally:
        stuck.close()
    assert 0 < received < count // 4, received


def test_dump_of_20000_sas_arrives_whole_to_a_slow_reader(daemon: RunningDaemon) -> None:
    count = 20_000
    loader = daemon.client()
    spis = range(0x10000, 0x10000 + count)
    replies = pipeline(loader, (sa_msg(MsgType.ADD, spi, seq=0) for spi in spis))
    assert [r.errno for r in replies] == [0] * count

    reader = daemon.client(uipsec_ext=False)
    dump = reader.dump(SaType.ESP)
    first = next(dump)  # the dump is under way; now stop reading for a while
    time.sleep(1.0)
    assert loader.request(key_msg(MsgType.GET, 0x10000)).sa is not None  # others are served
    entries = [first]
    for n, msg in enumerate(dump):
        entries.append(msg)
        if n % 2000 == 0:
            time.sleep(0.05)
    assert [m.seq for m in entries] == list(range(count - 1, -1, -1))
    assert sorted(m.sa.spi for m in entries) == list(spis)  # type: ignore[union-attr]
