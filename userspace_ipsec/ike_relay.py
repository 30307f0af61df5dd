"""The stream between the daemon and its IKE process: IKE datagrams of UDP 4500 both ways.

The datapath owns UDP 4500 (ESP-in-UDP and IKE share it, RFC 3948), so when IKE runs in a
process of its own (``ike.process``), the daemon hands it the IKE datagrams that socket receives
and sends the ones IKE gives back. One Unix stream socket carries length-prefixed records:

    length:u32 | kind:u8 | body
    kind READY     (IKE process -> daemon): empty body, sent once it serves
    kind DATAGRAM  (both ways): family:u8 (4 or 6) | peer port:u16 | local port:u16 |
                   peer address | local address (4 or 16 bytes each; all zero: none) | message

A stream, not datagrams: Unix datagram queues hold ten messages here (net.unix.max_dgram_qlen),
far fewer than a burst of a thousand IKE SAs. Past ``MAX_BUFFERED`` unsent bytes a datagram is
dropped and counted, as a full UDP socket would drop it; IKE retransmits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

READY, DATAGRAM = 0, 1
MAX_RECORD = 70_000  # an IKE message fits a UDP datagram (65,535) plus our header
MAX_BUFFERED = 8 << 20
CLOSE_TIMEOUT = 2.0  # seconds to flush on close

_LENGTH = struct.Struct("!I")
_HEADER = struct.Struct("!BBHH")  # kind, family, peer port, local port
_SIZES = {4: (socket.AF_INET, 4), 6: (socket.AF_INET6, 16)}


class RelayError(ValueError):
    """A record that does not parse: the other end is not our daemon or IKE process."""


@dataclass(frozen=True, slots=True)
class Datagram:
    message: bytes
    peer: tuple[str, int]
    local: tuple[str | None, int]


def encode_ready() -> bytes:
    return _LENGTH.pack(1) + bytes([READY])


def encode_datagram(message: bytes, peer: tuple[Any, ...], local: tuple[Any, ...]) -> bytes:
    """``peer`` and ``local`` are (address, port); ``local``'s address may be None."""
    family = 6 if ":" in str(peer[0]) else 4
    af, size = _SIZES[family]
    peer_raw = socket.inet_pton(af, str(peer[0]))
    local_raw = bytes(size) if local[0] is None else socket.inet_pton(af, str(local[0]))
    body = _HEADER.pack(DATAGRAM, family, int(peer[1]), int(local[1])) + peer_raw + local_raw
    return _LENGTH.pack(len(body) + len(message)) + body + message


def decode(record: bytes) -> Datagram | None:
    """One record without its length prefix: a Datagram, or None for READY."""
    if not record:
        raise RelayError("empty record")
    if record[0] == READY:
        return None
    if record[0] != DATAGRAM or len(record) < _HEADER.size:
        raise RelayError(f"unknown or short record (kind {record[0]})")
    _kind, family, peer_port, local_port = _HEADER.unpack_from(record)
    if family not in _SIZES:
        raise RelayError(f"unknown address family {family}")
    af, size = _SIZES[family]
    start = _HEADER.size
    if len(record) < start + 2 * size:
        raise RelayError("record shorter than its addresses")
    peer = socket.inet_ntop(af, record[start:start + size])
    local_raw = record[start + size:start + 2 * size]
    local = None if not any(local_raw) else socket.inet_ntop(af, local_raw)
    return Datagram(record[start + 2 * size:], (peer, peer_port), (local, local_port))


class Relay:
    """One end of the stream: ``send`` buffers a datagram, ``on_datagram`` gets the other
    end's, ``on_ready`` its READY; ``closed`` is set when the stream ends."""

    def __init__(self, sock: socket.socket,
                 on_datagram: Callable[[Datagram], None],
                 on_ready: Callable[[], None] | None = None) -> None:
        self._sock = sock
        self.on_datagram = on_datagram
        self.on_ready = on_ready
        self.closed = asyncio.Event()
        self.dropped = 0
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(sock=self._sock,
                                                                  limit=MAX_RECORD + 4)
        self._task = asyncio.create_task(self._read(reader))

    def send(self, message: bytes, peer: tuple[Any, ...], local: tuple[Any, ...]) -> bool:
        return self._write(encode_datagram(message, peer, local))

    def send_ready(self) -> bool:
        return self._write(encode_ready())

    def _write(self, record: bytes) -> bool:
        writer = self._writer
        if writer is None or writer.is_closing() or \
                writer.transport.get_write_buffer_size() > MAX_BUFFERED:
            self.dropped += 1
            return False
        writer.write(record)
        return True

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
                if not 0 < length <= MAX_RECORD:
                    raise RelayError(f"record length {length}")
                datagram = decode(await reader.readexactly(length))
                try:
                    if datagram is None:
                        if self.on_ready is not None:
                            self.on_ready()
                    else:
                        self.on_datagram(datagram)
                except Exception:  # the receiver's bug must not end the relay
                    log.exception("relay: handler failed")
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass  # the other end went away
        except RelayError as exc:
            log.error("relay: %s; closing it", exc)
        finally:
            self.closed.set()
            if self._writer is not None:
                self._writer.transport.abort()  # nobody is left to read what we would send

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writer is not None:
            self._writer.close()  # after what is buffered (the IKE process's last deletes)
            try:
                await asyncio.wait_for(self._writer.wait_closed(), CLOSE_TIMEOUT)
            except Exception:  # a peer that stopped reading: drop what it did not take
                self._writer.transport.abort()
        else:
            self._sock.close()
        self.closed.set()
