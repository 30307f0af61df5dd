"""The emulated PF_KEY socket: a Unix SOCK_SEQPACKET server in front of the sans-IO Kernel.

Each connection is one PF_KEY socket. Requests are decoded, handed to the Kernel, and the
Kernel's deliveries routed: to the sender, to every socket, or to the registered ones. A dump is
streamed from the Kernel's iterator one message at a time, only as fast as the client reads, so a
dump of any size arrives whole (racoon's dumps truncated when the kernel's socket buffer filled).
Broadcasts to a client that stopped reading are dropped and counted once its queue is full, as a
kernel drops them with ENOBUFS: a stuck client must not grow the daemon without bound.
"""

from __future__ import annotations

import asyncio
import errno
import grp
import logging
import os
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..kernel import Delivery, Kernel
from ..rundir import listen_unix
from .client import MAX_MESSAGE, SOCKET_BUFFER
from .codec import PfkeyError, decode, encode
from .constants import PF_KEY_V2, MsgType

log = logging.getLogger(__name__)

_HEADER = struct.Struct("=BBBBHHII")  # sadb_msg
_UCRED = struct.Struct("=iII")  # struct ucred: pid, uid, gid
_KNOWN_TYPES = frozenset(int(t) for t in MsgType)

# A connection whose queue of undelivered broadcasts reaches this loses further broadcasts.
BROADCAST_QUEUE_LIMIT = 4096
# Stop reading a client's requests while this many replies wait to be sent to it.
REQUEST_BACKLOG_LIMIT = 256
# Datagrams read, or dump messages sent, per turn of a connection before yielding to the others.
READ_BATCH = 64
# Connections taken in before serving one request (a bound on the work of one turn).
MAX_ADMIT_PER_REQUEST = 64
STREAM_BATCH = 256


@dataclass(slots=True)
class ServerStats:
    connections: int = 0
    refused: int = 0
    messages_in: int = 0
    malformed: int = 0
    broadcasts_dropped: int = 0


@dataclass(slots=True)
class _Connection:
    sock: socket.socket
    sock_id: int
    peer: str
    queue: deque[bytes | Iterator[bytes]] = field(default_factory=deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    can_read: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    closed: bool = False
    writing: bool = False  # the write loop is sending queue[0]


def peer_allowed(uid: int, gid: int, pid: int, group_gid: int | None) -> bool:
    """Root, the daemon's own user, and (if configured) members of the socket's group."""
    if uid in (0, os.geteuid()):
        return True
    if group_gid is None:
        return False
    if gid == group_gid:
        return True
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return str(group_gid) in line.split()[1:]
    except OSError:
        pass
    return False


def error_reply(data: bytes, err: int) -> bytes:
    """An errno reply echoing whatever of the offending header could be read."""
    if len(data) >= _HEADER.size:
        _, msg_type, _, satype, _, _, seq, pid = _HEADER.unpack_from(data)
    else:
        msg_type, satype, seq, pid = MsgType.RESERVED, 0, 0, 0
    if msg_type not in _KNOWN_TYPES:
        msg_type = MsgType.RESERVED  # an unknown type cannot be echoed in a decodable reply
    return _HEADER.pack(PF_KEY_V2, msg_type, err, satype, _HEADER.size // 8, 0, seq, pid)


class PfkeyServer:
    def __init__(
        self,
        kernel: Kernel,
        path: Path,
        *,
        group: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kernel = kernel
        self.path = path
        self.clock = clock
        self.stats = ServerStats()
        self._group_gid = grp.getgrnam(group).gr_gid if group else None
        self._listener: socket.socket | None = None
        self._pending = select.poll()  # the listener's readiness: a failed accept costs 9x more
        self._accept_task: asyncio.Task[None] | None = None
        self._connections: dict[int, _Connection] = {}
        self._dirty: dict[int, _Connection] = {}  # connections with news queued this turn
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop start() ran in

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        listener = listen_unix(self.path, socket.SOCK_SEQPACKET, group_gid=self._group_gid)
        self._loop = asyncio.get_running_loop()
        self._listener = listener
        self._pending.register(listener, select.POLLIN)
        self._accept_task = asyncio.create_task(self._accept_loop())

    async def close(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
        for conn in list(self._connections.values()):
            self._drop(conn)
        if self._listener is not None:
            self._pending.unregister(self._listener)
            self._listener.close()
            self._listener = None
        self.path.unlink(missing_ok=True)

    async def _accept_loop(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self._listener)
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        pid, uid, gid = _UCRED.unpack(cred)
        if not peer_allowed(uid, gid, pid, self._group_gid):
            self.stats.refused += 1
            log.warning("pfkey: refused connection from pid %d uid %d gid %d", pid, uid, gid)
            sock.close()
            return
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        sock_id = self.kernel.open_socket()
        conn = _Connection(sock, sock_id, f"pid {pid} uid {uid}")
        conn.can_read.set()
        self._connections[sock_id] = conn
        self.stats.connections += 1
        conn.tasks = [
            asyncio.create_task(self._read_loop(conn)),
            asyncio.create_task(self._write_loop(conn)),
        ]
        log.debug("pfkey: socket %d opened by %s", sock_id, conn.peer)

    def _drop(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._connections.pop(conn.sock_id, None)
        current = asyncio.current_task()
        for task in conn.tasks:
            if task is not current:
                task.cancel()
        conn.sock.close()
        self.dispatch(None, self.kernel.close_socket(conn.sock_id, self.clock()))
        log.debug("pfkey: socket %d closed", conn.sock_id)

    # -- requests ----------------------------------------------------------------------------

    async def _read_loop(self, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        sock = conn.sock
        buf = bytearray(MAX_MESSAGE + 1)
        view = memoryview(buf)
        try:
            while True:
                await conn.can_read.wait()
                n = await loop.sock_recv_into(sock, buf)  # waits for the first datagram
                if n == 0:
                    break
                self.handle_datagram(conn, bytes(view[:n]))
                # Then every datagram already queued, without a trip through the event loop
                # per message; a batch at most, so that one busy client cannot starve others.
                for _ in range(READ_BATCH):
                    if not conn.can_read.is_set():
                        break
                    try:
                        n = sock.recv_into(buf)
                    except (BlockingIOError, InterruptedError):
                        break
                    if n == 0:
                        return  # the finally clause drops the connection
                    self.handle_datagram(conn, bytes(view[:n]))
                else:
                    await asyncio.sleep(0)
        except (ConnectionError, OSError):
            pass
        finally:
            self._drop(conn)

    def handle_datagram(self, conn: _Connection, data: bytes) -> None:
        self.stats.messages_in += 1
        if len(data) > MAX_MESSAGE:
            self.stats.malformed += 1
            self._enqueue(conn, error_reply(data, errno.EMSGSIZE))
            return
        try:
            msg = decode(data)
        except PfkeyError as exc:
            self.stats.malformed += 1
            log.debug("pfkey: socket %d sent a bad message: %s", conn.sock_id, exc)
            self._enqueue(conn, error_reply(data, exc.errno))
            return
        self._admit_waiting()
        self.dispatch(conn.sock_id, self.kernel.handle(conn.sock_id, msg, self.clock()))

    def _admit_waiting(self) -> None:
        """Take in the connections already made before serving a request: as on Linux, a
        socket opened before a request was sent gets the news it causes (the accept loop may
        not have had its turn yet)."""
        listener = self._listener
        if listener is None or not self._pending.poll(0):
            return
        for _ in range(MAX_ADMIT_PER_REQUEST):
            try:
                sock, _ = listener.accept()
            except OSError:  # nothing waiting (EAGAIN), or the listener is closing
                return
            self._admit(sock)

    # -- deliveries --------------------------------------------------------------------------

    def dispatch(self, sender: int | None, deliveries: Iterable[Delivery]) -> None:
        """Route the Kernel's deliveries (also used for its timer and ACQUIRE events)."""
        connections = self._connections
        for delivery in deliveries:
            if delivery.stream is not None:
                for sock_id in self.kernel.recipients(delivery, sender):
                    conn = connections.get(sock_id)
                    if conn is not None:
                        self._enqueue(conn, (encode(m) for m in delivery.stream))
                continue
            message = delivery.message
            if message is None:
                continue
            # A broadcast is encoded once per variant (with or without the private
            # extension), not once per recipient.
            plain: bytes | None = None
            extended: bytes | None = None
            for sock_id in self.kernel.recipients(delivery, sender):
                conn = connections.get(sock_id)
                if conn is None:
                    continue
                if sock_id != sender and len(conn.queue) >= BROADCAST_QUEUE_LIMIT:
                    self.stats.broadcasts_dropped += 1
                    continue
                msg = self.kernel.message_for(delivery, sock_id)
                if msg is message:
                    if plain is None:
                        plain = encode(msg)
                    data = plain
                else:
                    if extended is None:
                        extended = encode(msg)
                    data = extended
                self._enqueue(conn, data)

    def _enqueue(self, conn: _Connection, item: bytes | Iterator[bytes]) -> None:
        conn.queue.append(item)
        if len(conn.queue) >= REQUEST_BACKLOG_LIMIT:
            conn.can_read.clear()
        # Sent at the end of this turn of the event loop, with everything else produced in it:
        # replies to a batch of requests leave in a burst, waking the reader once, not once
        # per message (on a busy machine each wake-up can cost a context switch).
        self._dirty[conn.sock_id] = conn
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop = self._loop or asyncio.get_running_loop()
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Send what the connections touched this turn have queued, directly while their
        socket buffers take it; the write loop takes over from a full buffer or a dump."""
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, {}
        for conn in dirty.values():
            if conn.closed:
                continue
            queue = conn.queue
            if not conn.writing:
                send = conn.sock.send
                try:
                    while queue and isinstance(queue[0], bytes):
                        send(queue[0])
                        queue.popleft()
                except OSError:
                    pass  # full (the write loop waits) or broken (the write loop drops it)
            if queue:
                conn.wakeup.set()
            elif not conn.can_read.is_set():
                conn.can_read.set()

    async def _write_loop(self, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        sock = conn.sock
        queue = conn.queue
        try:
            while True:
                while not queue:
                    conn.can_read.set()
                    conn.wakeup.clear()
                    await conn.wakeup.wait()
                item = queue[0]
                # Popped only once sent; meanwhile _flush leaves this queue alone.
                conn.writing = True
                if isinstance(item, bytes):
                    await loop.sock_sendall(sock, item)
                    queue.popleft()
                else:
                    await self._send_stream(conn, item)
                conn.writing = False
                if len(queue) < REQUEST_BACKLOG_LIMIT // 2:
                    conn.can_read.set()
        except (ConnectionError, OSError):
            self._drop(conn)

    async def _send_stream(self, conn: _Connection, stream: Iterator[bytes]) -> None:
        """Send up to a batch of a dump, then let others run; pops the stream when done.

        A dump is pulled from the Kernel's iterator one message at a time and only as fast as
        the client reads: when its socket buffer is full, sock_sendall waits for it to drain
        (the back-pressure), and nothing more is rendered meanwhile.
        """
        loop = asyncio.get_running_loop()
        sock = conn.sock
        for _ in range(STREAM_BATCH):
            data = next(stream, None)
            if data is None:
                conn.queue.popleft()
                return
            try:
                sock.send(data)
            except (BlockingIOError, InterruptedError):
                await loop.sock_sendall(sock, data)
        await asyncio.sleep(0)
