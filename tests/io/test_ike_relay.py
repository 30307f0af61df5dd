"""The daemon <-> IKE process relay: its records, and two Relay ends over a real socketpair."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from userspace_ipsec import ike_relay
from userspace_ipsec.ike_relay import Datagram, Relay, RelayError, decode, encode_datagram


@pytest.mark.parametrize("peer, local", [
    (("192.0.2.7", 4500), ("10.0.0.1", 4500)),
    (("2001:db8::7", 61000), ("2001:db8::1", 4500)),
    (("198.51.100.1", 1), (None, 0)),  # IKE sending: the source may be left to routing
])
def test_datagram_round_trip(peer: tuple[str, int], local: tuple[str | None, int]) -> None:
    message = bytes(range(256)) * 3
    record = encode_datagram(message, peer, local)
    (length,) = struct.unpack_from("!I", record)
    assert length == len(record) - 4
    assert decode(record[4:]) == Datagram(message, peer, local)


def test_ready_record() -> None:
    assert decode(ike_relay.encode_ready()[4:]) is None


@pytest.mark.parametrize("record, why", [
    (b"", "empty"),
    (b"\x07", "unknown"),
    (b"\x01\x04\x11\x94", "short"),
    (b"\x01\x05\x11\x94\x11\x94" + bytes(8), "family"),
    (b"\x01\x06\x11\x94\x11\x94" + bytes(20), "addresses"),
])
def test_bad_records_are_refused(record: bytes, why: str) -> None:
    with pytest.raises(RelayError, match=why):
        decode(record)


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def test_two_ends_carry_a_burst_both_ways_and_see_the_end() -> None:
    async def scenario() -> None:
        a_sock, b_sock = _pair()
        got_a: list[Datagram] = []
        got_b: list[Datagram] = []
        ready = asyncio.Event()
        a = Relay(a_sock, got_a.append, on_ready=ready.set)
        b = Relay(b_sock, got_b.append)
        await a.start()
        await b.start()
        assert b.send_ready()
        await asyncio.wait_for(ready.wait(), 5)
        # More records than a Unix datagram queue holds (10): the stream keeps them all.
        for i in range(2000):
            assert a.send(i.to_bytes(4, "big") * 50, ("10.0.0.2", 500 + i), ("10.0.0.1", 4500))
            assert b.send(b"r" * (i % 1400 + 1), ("2001:db8::2", 4500), (None, 0))
        deadline = asyncio.get_running_loop().time() + 10
        while (len(got_a) < 2000 or len(got_b) < 2000) and \
                asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert [d.peer[1] for d in got_b] == [500 + i for i in range(2000)]
        assert got_b[1234].message == (1234).to_bytes(4, "big") * 50
        assert [len(d.message) for d in got_a] == [i % 1400 + 1 for i in range(2000)]
        assert got_a[0].local == (None, 0) and got_a[0].peer == ("2001:db8::2", 4500)
        await b.close()
        await asyncio.wait_for(a.closed.wait(), 5)  # the other end going is seen
        assert not a.send(b"x", ("10.0.0.2", 500), (None, 0)) and a.dropped == 1
        await a.close()

    asyncio.run(scenario())


def test_garbage_from_the_other_end_closes_the_relay_without_raising() -> None:
    async def scenario() -> None:
        a_sock, raw = _pair()
        got: list[Datagram] = []
        a = Relay(a_sock, got.append)
        await a.start()
        good = encode_datagram(b"ike", ("10.0.0.2", 500), ("10.0.0.1", 500))
        raw.sendall(good + struct.pack("!I", 1 << 30) + b"junk")
        await asyncio.wait_for(a.closed.wait(), 5)
        assert [d.message for d in got] == [b"ike"]
        await a.close()
        raw.close()

    asyncio.run(scenario())


def test_a_handler_error_does_not_end_the_relay() -> None:
    async def scenario() -> None:
        a_sock, b_sock = _pair()
        seen: list[bytes] = []

        def handler(d: Datagram) -> None:
            seen.append(d.message)
            if d.message == b"boom":
                raise RuntimeError("handler bug")

        a = Relay(a_sock, handler)
        b = Relay(b_sock, lambda d: None)
        await a.start()
        await b.start()
        for message in (b"one", b"boom", b"two"):
            b.send(message, ("10.0.0.2", 500), (None, 0))
        deadline = asyncio.get_running_loop().time() + 5
        while len(seen) < 3 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert seen == [b"one", b"boom", b"two"] and not a.closed.is_set()
        await a.close()
        await b.close()

    asyncio.run(scenario())


def test_a_peer_that_stops_reading_costs_counted_drops_not_memory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ike_relay, "MAX_BUFFERED", 64 * 1024)

    async def scenario() -> None:
        a_sock, stalled = _pair()  # nobody reads `stalled`
        a = Relay(a_sock, lambda d: None)
        await a.start()
        sent = sum(a.send(b"x" * 1000, ("10.0.0.2", 500), (None, 0)) for _ in range(5000))
        await asyncio.sleep(0.05)
        assert a.dropped > 0 and sent + a.dropped == 5000
        assert sent * 1000 < 5000 * 1000  # bounded by the socket buffers plus MAX_BUFFERED
        await a.close()
        stalled.close()

    asyncio.run(scenario())
