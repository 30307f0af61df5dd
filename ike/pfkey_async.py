"""An asyncio PF_KEY socket for the IKE daemon: requests awaited by sequence number, dumps
collected whole, and every other message (ACQUIRE, EXPIRE, news of SAs and policies) handed
to a callback, as racoon reads its PF_KEY socket from its event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errno_mod
import logging
import os
import random
import socket
from collections.abc import Callable
from pathlib import Path

from userspace_ipsec.pfkey.client import (
    MAX_MESSAGE,
    SOCKET_BUFFER,
    DaemonNotRunning,
    PfkeyReplyError,
)
from userspace_ipsec.pfkey.codec import PfkeyError, decode, encode
from userspace_ipsec.pfkey.constants import ExtType, MsgType, SaType
from userspace_ipsec.pfkey.messages import Message, UipsecExt

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0
MAX_DUMP = 1_000_000  # entries: a bound on what one dump may hold in memory


class AsyncPfkey:
    def __init__(self, path: str | os.PathLike[str],
                 on_message: Callable[[Message], None]) -> None:
        self.path = Path(path)
        self.pid = os.getpid()
        self.on_message = on_message
        self._seq = random.randrange(1, 1 << 30)
        self._sock: socket.socket | None = None
        self._waiting: dict[tuple[int, int], asyncio.Future[Message]] = {}
        self._dump: tuple[int, list[Message], asyncio.Future[list[Message]]] | None = None
        self._dump_lock = asyncio.Lock()
        self._buf = bytearray(MAX_MESSAGE + 1)
        self.malformed = 0

    async def open(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, str(self.path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise DaemonNotRunning(f"no PF_KEY socket at {self.path}") from exc
        except OSError:
            sock.close()
            raise
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(sock.fileno())
        sock.close()
        gone = DaemonNotRunning("PF_KEY socket closed")
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(gone)
        self._waiting.clear()
        if self._dump is not None and not self._dump[2].done():
            self._dump[2].set_exception(gone)

    @property
    def is_open(self) -> bool:
        return self._sock is not None

    # -- requests ----------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq = (self._seq % 0xFFFFFFFF) + 1
        return self._seq

    async def _send(self, msg: Message) -> None:
        if self._sock is None:
            raise DaemonNotRunning("PF_KEY socket closed")
        msg.pid = self.pid
        if not msg.seq:
            msg.seq = self._next_seq()
        msg.ext.setdefault(ExtType.X_UIPSEC, UipsecExt())
        data = encode(msg)
        try:
            try:  # a SEQPACKET send is whole or nothing: the loop is needed only when full
                self._sock.send(data)
            except BlockingIOError:
                await asyncio.get_running_loop().sock_sendall(self._sock, data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise DaemonNotRunning("the PF_KEY daemon went away") from exc

    async def request(self, msg: Message, timeout: float = REQUEST_TIMEOUT) -> Message:
        """Send and await the reply; PfkeyReplyError when the kernel sets errno."""
        reply = (await self.requests([msg], timeout))[0]
        if isinstance(reply, BaseException):
            raise reply
        return reply

    async def requests(self, msgs: list[Message], timeout: float = REQUEST_TIMEOUT
                       ) -> list[Message | PfkeyReplyError]:
        """Send several requests back to back, then await all their replies (one loop wake-up
        can bring them all): each is the reply, or the PfkeyReplyError of a refusal. A
        timeout or a lost socket raises, with the other requests left to the kernel."""
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[Message]] = []
        keys = []
        for msg in msgs:
            msg.seq = msg.seq or self._next_seq()
            key = (msg.seq, int(msg.type))
            fut: asyncio.Future[Message] = loop.create_future()
            self._waiting[key] = fut
            keys.append(key)
            futs.append(fut)
        # One timer rather than asyncio.wait_for (a task and callbacks per request).
        timer = loop.call_later(timeout, _time_out, futs)
        try:
            for msg in msgs:
                await self._send(msg)
            replies = [await fut for fut in futs]
        finally:
            timer.cancel()
            for key in keys:
                self._waiting.pop(key, None)
        return [PfkeyReplyError(r) if r.errno else r for r in replies]

    async def dump(self, msg_type: MsgType = MsgType.DUMP,
                   satype: int = SaType.UNSPEC) -> list[Message]:
        """Every entry of SADB_DUMP or SADB_X_SPDDUMP (empty list for an empty database)."""
        async with self._dump_lock:
            fut: asyncio.Future[list[Message]] = asyncio.get_running_loop().create_future()
            self._dump = (int(msg_type), [], fut)
            try:
                await self._send(Message(type=msg_type, satype=satype))
                return await asyncio.wait_for(fut, REQUEST_TIMEOUT)
            finally:
                self._dump = None

    # -- receiving ---------------------------------------------------------------------------

    def _readable(self) -> None:
        for _ in range(1024):  # bounded per wake-up; the loop calls again if more is ready
            sock = self._sock
            if sock is None:
                return
            try:
                n = sock.recv_into(self._buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                n = 0
            if n == 0:
                log.error("pfkey: the kernel closed our PF_KEY socket")
                self.close()
                return
            try:
                msg = decode(bytes(self._buf[:n]))
            except PfkeyError:
                self.malformed += 1
                continue
            self._deliver(msg)

    def _deliver(self, msg: Message) -> None:
        if msg.pid == self.pid:
            dump = self._dump
            if dump is not None and msg.type == dump[0]:
                self._dump_entry(msg, dump[1], dump[2])
                return
            fut = self._waiting.get((msg.seq, int(msg.type)))
            if fut is not None and not fut.done():
                fut.set_result(msg)
                return
        try:
            self.on_message(msg)
        except Exception:  # a handler bug must not stop the socket
            log.exception("pfkey: handler failed on %s", MsgType(msg.type).name)

    @staticmethod
    def _dump_entry(msg: Message, entries: list[Message],
                    fut: asyncio.Future[list[Message]]) -> None:
        if fut.done():
            return
        if msg.errno:
            if msg.errno == errno_mod.ENOENT:
                fut.set_result(entries)
            else:
                fut.set_exception(PfkeyReplyError(msg))
            return
        if len(entries) < MAX_DUMP:
            entries.append(msg)
        if msg.seq == 0:
            fut.set_result(entries)


def _time_out(futs: list[asyncio.Future[Message]]) -> None:
    for fut in futs:
        if not fut.done():
            fut.set_exception(TimeoutError("no PF_KEY reply"))
