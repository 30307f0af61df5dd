"""PF_KEY client library: the counterpart of ipsec-tools' libipsec, over the daemon's socket.

The emulated PF_KEY socket is a Unix SOCK_SEQPACKET socket in the run directory: one PF_KEY
message per datagram, in both directions. Replies are matched to requests by sequence number and
pid, as on a real PF_KEY socket; broadcasts that arrive in between are handed to an optional
callback (``setkey -x`` prints them) instead of being lost.
"""

from __future__ import annotations

import errno as errno_mod
import itertools
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from .codec import PfkeyError, decode, encode
from .constants import ExtType, MsgType, SaType
from .messages import Message, UipsecExt

# sadb_msg_len is 16 bits of 64-bit words: no PF_KEY message is larger.
MAX_MESSAGE = 0xFFFF * 8
SOCKET_BUFFER = 4 * 1024 * 1024


class DaemonNotRunning(Exception):
    """No daemon answers on the run directory's PF_KEY socket."""


class PfkeyReplyError(Exception):
    """The kernel answered a request with sadb_msg_errno set."""

    def __init__(self, reply: Message) -> None:
        self.reply = reply
        self.errno = reply.errno
        super().__init__(f"{MsgType(reply.type).name}: {os.strerror(reply.errno)}")


class PfkeyClient:
    """A blocking PF_KEY socket. Not thread-safe; one per thread."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float | None = 30.0,
        on_message: Callable[[Message, bytes], None] | None = None,
        uipsec_ext: bool = True,
    ) -> None:
        """Connect to the socket at ``path``.

        ``on_message`` sees every message this socket receives (replies and broadcasts) with its
        raw bytes, and every message it sends; ``uipsec_ext`` announces that this client speaks
        the private extension, so replies carry replay windows above 255, ESN and counters.
        """
        self.path = Path(path)
        self.pid = os.getpid()
        self.on_message = on_message
        self.uipsec_ext = uipsec_ext
        self._seq = itertools.count(1)
        self._buf = bytearray(MAX_MESSAGE)
        self._view = memoryview(self._buf)
        self._pending: list[Message] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            self._sock.settimeout(timeout)
            self._sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self._sock.close()
            raise DaemonNotRunning(f"no uipsec daemon is listening on {self.path}") from exc
        except OSError:
            self._sock.close()
            raise

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> PfkeyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    def next_seq(self) -> int:
        return next(self._seq) & 0xFFFFFFFF

    # -- raw send and receive ----------------------------------------------------------------

    def send(self, msg: Message) -> Message:
        """Send ``msg`` with this socket's pid and, if unset, a fresh sequence number."""
        msg.pid = self.pid
        if not msg.seq:
            msg.seq = self.next_seq()
        if self.uipsec_ext:
            msg.ext.setdefault(ExtType.X_UIPSEC, UipsecExt())
        data = encode(msg)
        if self.on_message is not None:
            self.on_message(msg, data)
        try:
            self._sock.send(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise DaemonNotRunning(f"the uipsec daemon on {self.path} went away") from exc
        return msg

    def receive(self) -> Message:
        """The next message for this socket (a reply or a broadcast)."""
        if self._pending:
            return self._pending.pop(0)
        return self._receive_raw()

    def _receive_raw(self) -> Message:
        try:
            n = self._sock.recv_into(self._buf)
        except ConnectionResetError as exc:
            raise DaemonNotRunning(f"the uipsec daemon on {self.path} went away") from exc
        if n == 0:
            raise DaemonNotRunning(f"the uipsec daemon on {self.path} closed the socket")
        data = bytes(self._view[:n])  # one copy (a bytearray slice would make two)
        try:
            msg = decode(data)
        except PfkeyError as exc:
            raise PfkeyError(errno_mod.EBADMSG, f"undecodable message from daemon: {exc}") from exc
        if self.on_message is not None:
            self.on_message(msg, data)
        return msg

    def _is_reply(self, msg: Message, request: Message) -> bool:
        return msg.pid == self.pid and msg.seq == request.seq and msg.type == request.type

    def _await_reply(self, request: Message) -> Message:
        while True:
            msg = self._receive_raw()
            if self._is_reply(msg, request):
                return msg
            self._pending.append(msg)

    # -- requests ----------------------------------------------------------------------------

    def request(self, msg: Message) -> Message:
        """Send ``msg`` and return its reply; raise PfkeyReplyError when errno is set."""
        self.send(msg)
        reply = self._await_reply(msg)
        if reply.errno:
            raise PfkeyReplyError(reply)
        return reply

    def dump(self, satype: int = SaType.UNSPEC) -> Iterator[Message]:
        """Every SA (SADB_DUMP): yields entries until the one with sequence number 0."""
        return self._dump(MsgType.DUMP, satype)

    def spddump(self) -> Iterator[Message]:
        """Every policy (SADB_X_SPDDUMP)."""
        return self._dump(MsgType.X_SPDDUMP, SaType.UNSPEC)

    def _dump(self, msg_type: MsgType, satype: int) -> Iterator[Message]:
        self.send(Message(type=msg_type, satype=satype))
        # Dump entries carry the requester's pid and a sequence counting down to 0, not the
        # request's sequence number (KAME and Linux agree on this).
        while True:
            msg = self._receive_raw()
            if msg.pid != self.pid or msg.type != msg_type:
                self._pending.append(msg)
                continue
            if msg.errno:
                if msg.errno == errno_mod.ENOENT:
                    return  # empty database
                raise PfkeyReplyError(msg)
            yield msg
            if msg.seq == 0:
                return

    def register(self, satype: int = SaType.ESP) -> Message:
        return self.request(Message(type=MsgType.REGISTER, satype=satype))
