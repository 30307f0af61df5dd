"""Route adds and removes over a raw rtnetlink socket, without pyroute2 on the hot path.

``RouteClient`` builds RTM_NEWROUTE (create or replace: the table is ours) and RTM_DELROUTE
requests with ``struct``, sends them without waiting and reads the kernel's answers (NLMSG_ERROR,
error 0 = done, else -errno) when they are ready. rtnetlink handles a request inside the
sender's ``send()``, so by the time ``send`` returns its answer is queued on our socket or, when
our receive buffer was full, dropped (the next read then fails with ENOBUFS): after such an
overrun every request sent before it that is still unanswered is reported lost (ENOBUFS) once
the queue is empty. The receive buffer is sized for thousands of answers and the number of
requests in flight is capped below what it holds.

``KernelRoutes`` is ``datapath.routes.RouteSync``'s installer on top of it: answers are read by
an event loop reader (``attach``) or, with no loop, right after each request; ``remove_all``
deletes every route it may have left in the table (shutdown leaves no route behind).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import NamedTuple

log = logging.getLogger(__name__)

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # error answers without a copy of our request
NETLINK_EXT_ACK = 11  # error answers with the kernel's reason as text
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_REPLACE, NLM_F_CREATE = 0x100, 0x400
NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x100, 0x200  # flags of an NLMSG_ERROR answer
NLMSGERR_ATTR_MSG = 1
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
RTA_DST, RTA_OIF, RTA_PREFSRC, RTA_TABLE = 1, 4, 7, 15
RTPROT_STATIC = 4
RT_SCOPE_UNIVERSE, RT_SCOPE_NOWHERE = 0, 255
RTN_UNICAST = 1
RT_TABLE_UNSPEC = 0

ADD_FLAGS = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
DEL_FLAGS = NLM_F_REQUEST | NLM_F_ACK

RCVBUF = 8 << 20  # bytes asked for; forced past net.core.rmem_max when we may
ANSWER_COST = 1024  # receive buffer bytes one queued answer takes (skb overhead included)
MAX_IN_FLIGHT = 4096
MAX_READS = 2 * MAX_IN_FLIGHT  # per read(): the loop calls again while more is queued
DEFAULT_TIMEOUT = 10.0

_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_ERRNO = struct.Struct("=i")
_RTA = struct.Struct("=HH")
# nlmsghdr, rtmsg, then RTA_TABLE, RTA_OIF and RTA_DST: the prefix of every request.
_HEAD = "=IHHII BBBBBBBBI HHI HHI HH"
_REQUEST = {(plen, with_src): struct.Struct(_HEAD + f"{plen}s" + (f"HH{plen}s" if with_src else ""))
            for plen in (4, 16) for with_src in (False, True)}
_BUF_SIZE = 1 << 16


class Answer(NamedTuple):
    """The kernel's answer to request ``seq``: error 0 (done) or an errno, with its reason."""

    seq: int
    error: int
    reason: str = ""


@dataclass(slots=True)
class RtnlStats:
    sent: int = 0
    done: int = 0  # answered with error 0
    refused: int = 0  # answered with an errno
    lost: int = 0  # answers dropped by a receive buffer overrun (reported as ENOBUFS)
    overruns: int = 0  # ENOBUFS from the socket
    malformed: int = 0  # answers that do not parse
    unexpected: int = 0  # well-formed messages that answer no pending request

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def parse_prefix(dst: str) -> tuple[int, bytes, int]:
    """'10.1.0.0/16' -> (AF_INET, packed network address, 16); host bits are cleared."""
    addr, slash, plen_text = dst.partition("/")
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    try:
        packed = socket.inet_pton(family, addr)
    except OSError:
        raise ValueError(f"not an IP prefix: {dst!r}") from None
    bits = len(packed) * 8
    if not slash:
        return family, packed, bits
    if not plen_text.isdigit() or int(plen_text) > bits:
        raise ValueError(f"bad prefix length in {dst!r}")
    plen = int(plen_text)
    mask = ((1 << plen) - 1) << (bits - plen)
    return family, (int.from_bytes(packed, "big") & mask).to_bytes(len(packed), "big"), plen


def encode_route(seq: int, dst: str, oif: int, table: int, src: str | None = None, *,
                 delete: bool = False, pid: int = 0) -> bytes:
    """An RTM_NEWROUTE (create or replace) or RTM_DELROUTE request for ``dst dev oif table``.

    Adds are unicast, proto static, scope global (what pyroute2 sent before); a delete matches
    any type, protocol and scope, and only the route through ``oif``."""
    family, packed, plen = parse_prefix(dst)
    size = len(packed)
    parts: list[int | bytes] = []
    if src is not None and not delete:
        try:
            parts = [4 + size, RTA_PREFSRC, socket.inet_pton(family, src)]
        except OSError:
            raise ValueError(f"source {src!r} is not of the family of {dst!r}") from None
    layout = _REQUEST[size, bool(parts)]
    if delete:
        kind, flags, proto, scope, rtype = RTM_DELROUTE, DEL_FLAGS, 0, RT_SCOPE_NOWHERE, 0
    else:
        kind, flags, proto, scope, rtype = (RTM_NEWROUTE, ADD_FLAGS, RTPROT_STATIC,
                                            RT_SCOPE_UNIVERSE, RTN_UNICAST)
    return layout.pack(layout.size, kind, flags, seq, pid,
                       family, plen, 0, 0, table if table < 256 else RT_TABLE_UNSPEC,
                       proto, scope, rtype, 0,
                       8, RTA_TABLE, table, 8, RTA_OIF, oif, 4 + size, RTA_DST, packed, *parts)


def _reason(buf: memoryview, off: int, end: int, flags: int, error: int) -> str:
    """The NLMSGERR_ATTR_MSG text of an extended ack, '' when there is none."""
    if not flags & NLM_F_ACK_TLVS:
        return ""
    pos = off + _HDR.size + 4
    if pos + _HDR.size > end:
        return ""
    echoed = _HDR.unpack_from(buf, pos)[0]
    pos += _HDR.size if flags & NLM_F_CAPPED or not error else (echoed + 3) & ~3
    while pos + _RTA.size <= end:
        length, kind = _RTA.unpack_from(buf, pos)
        if length < _RTA.size or pos + length > end:
            return ""
        if kind & 0x3FFF == NLMSGERR_ATTR_MSG:
            return bytes(buf[pos + 4:pos + length]).split(b"\0", 1)[0].decode("utf-8", "replace")
        pos += (length + 3) & ~3
    return ""


class RouteClient:
    """One non-blocking NETLINK_ROUTE socket; route requests out, answers in, by sequence."""

    __slots__ = ("table", "stats", "capacity", "_sock", "_pid", "_seq", "_pending",
                 "_lost_upto", "_buf", "_view")

    def __init__(self, table: int, *, rcvbuf: int = RCVBUF) -> None:
        if not 0 < table < 2**32:
            raise ValueError(f"routing table {table} out of range")
        self.table = table
        self.stats = RtnlStats()
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        try:
            self._sock.setblocking(False)
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except PermissionError:  # unprivileged: as much as net.core.rmem_max allows
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            for option in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):
                with contextlib.suppress(OSError):  # older kernels: longer answers, no reason
                    self._sock.setsockopt(SOL_NETLINK, option, 1)
            self._sock.bind((0, 0))
            self._pid = self._sock.getsockname()[0]
        except BaseException:
            self._sock.close()
            raise
        granted = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self.capacity = max(1, min(MAX_IN_FLIGHT, granted // ANSWER_COST))
        self._seq = 0
        self._pending: set[int] = set()
        self._lost_upto = 0  # after an overrun: unanswered requests up to this seq are lost
        self._buf = bytearray(_BUF_SIZE)
        self._view = memoryview(self._buf)

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def _send(self, dst: str, oif: int, src: str | None, delete: bool) -> int:
        seq = self._seq = self._seq % 0xFFFFFFFF + 1
        self._sock.send(encode_route(seq, dst, oif, self.table, src, delete=delete,
                                     pid=self._pid))
        self._pending.add(seq)
        self.stats.sent += 1
        return seq

    def add(self, dst: str, oif: int, src: str | None = None) -> int:
        """Send 'replace dst dev oif table T [src SRC]' (created if absent); its sequence."""
        return self._send(dst, oif, src, False)

    def delete(self, dst: str, oif: int) -> int:
        """Send 'delete dst dev oif table T'; its sequence."""
        return self._send(dst, oif, None, True)

    def forget(self, seq: int) -> None:
        """Stop waiting for ``seq`` (a late answer is then counted as unexpected)."""
        self._pending.discard(seq)

    def read(self) -> list[Answer]:
        """The answers ready now, without blocking (at most MAX_READS messages a call)."""
        out: list[Answer] = []
        sock, buf, view, stats = self._sock, self._buf, self._view, self.stats
        for _ in range(MAX_READS):
            try:
                n = sock.recv_into(buf)
            except BlockingIOError:  # all read: what an overrun dropped is known now
                if self._lost_upto:
                    self._report_lost(out)
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                stats.overruns += 1
                self._lost_upto = self._seq
                continue
            self._parse(view, n, out)
        return out

    def _report_lost(self, out: list[Answer]) -> None:
        upto, self._lost_upto = self._lost_upto, 0
        newest = self._seq
        # sequences wrap: "sent before the overrun" means no further back than the newest
        lost = [s for s in self._pending if (newest - s) % 0x100000000 >= (newest - upto)
                % 0x100000000]
        for seq in sorted(lost):
            self._pending.discard(seq)
            self.stats.lost += 1
            out.append(Answer(seq, errno.ENOBUFS, "answer lost: receive buffer overrun"))

    def _parse(self, view: memoryview, n: int, out: list[Answer]) -> None:
        stats, pending = self.stats, self._pending
        off = 0
        while off + _HDR.size <= n:
            length, kind, flags, seq, pid = _HDR.unpack_from(view, off)
            end = off + length
            if length < _HDR.size or end > n:
                stats.malformed += 1
                return
            if kind != NLMSG_ERROR or seq not in pending or pid != self._pid:
                stats.unexpected += 1
            elif length < _HDR.size + 4:
                stats.malformed += 1
            else:
                code = _ERRNO.unpack_from(view, off + _HDR.size)[0]
                pending.discard(seq)
                if code == 0:
                    stats.done += 1
                    out.append(Answer(seq, 0))
                else:
                    stats.refused += 1
                    if code > 0:  # the kernel sends -errno: a positive one is nonsense
                        stats.malformed += 1
                        out.append(Answer(seq, errno.EPROTO, f"bad netlink error {code}"))
                    else:
                        out.append(Answer(seq, -code, _reason(view, off, end, flags, -code)))
            off += (length + 3) & ~3
        if off < n:
            stats.malformed += 1

    def drain(self, timeout: float = DEFAULT_TIMEOUT, until: int | None = None) -> list[Answer]:
        """Answers until request ``until`` (or every pending one) is answered or ``timeout``
        seconds pass; requests still unanswered then stay pending."""
        out = self.read()
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        while (until in self._pending) if until is not None else self._pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            poller.poll(max(1, int(left * 1000)))
            out += self.read()
        return out

    def call(self, answer_of: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Wait for request ``answer_of``; OSError when refused or unanswered in time
        (other answers read meanwhile are dropped: use drain when several are pending)."""
        for answer in self.drain(timeout, answer_of):
            if answer.seq == answer_of:
                check(answer)
                return
        self.forget(answer_of)
        raise OSError(errno.ETIMEDOUT, "no netlink answer")

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> RouteClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def error_of(answer: Answer) -> OSError | None:
    """None for a done request, else the OSError the kernel's answer means."""
    if not answer.error:
        return None
    text = os.strerror(answer.error)
    return OSError(answer.error, f"{text}: {answer.reason}" if answer.reason else text)


def check(answer: Answer) -> None:
    error = error_of(answer)
    if error is not None:
        raise error


Done = Callable[[OSError | None], None]
_GONE = (errno.ESRCH, errno.ENOENT, errno.ENODEV)


class KernelRoutes:
    """``RouteSync``'s installer over a ``RouteClient``: requests leave at once, ``done``
    callbacks run when the answers are read (by the loop reader after ``attach``, else before
    ``add_route``/``remove_route`` return)."""

    __slots__ = ("client", "present", "_index_of", "_indexes", "_waiting", "_loop")

    def __init__(self, client: RouteClient,
                 index_of: Callable[[str], int] = socket.if_nametoindex) -> None:
        self.client = client
        self.present: dict[str, int] = {}  # dst -> oif of every route we may have installed
        self._index_of = index_of
        self._indexes: dict[str, int] = {}
        self._waiting: dict[int, tuple[str, int, bool, Done]] = {}  # seq -> dst, oif, add, done
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read answers from ``loop`` from now on."""
        loop.add_reader(self.client.fileno(), self.on_readable)
        self._loop = loop

    def detach(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.client.fileno())
            self._loop = None

    def _oif(self, ifname: str) -> int:
        index = self._indexes.get(ifname)
        if index is None:
            index = self._indexes[ifname] = self._index_of(ifname)
        return index

    def add_route(self, dst: str, ifname: str, src: str | None, done: Done) -> None:
        self._submit(dst, self._oif(ifname), src, True, done)

    def remove_route(self, dst: str, ifname: str, done: Done) -> None:
        self._submit(dst, self._oif(ifname), None, False, done)

    def _submit(self, dst: str, oif: int, src: str | None, add: bool, done: Done) -> None:
        client = self.client
        if client.in_flight >= client.capacity:  # keep the answers within the receive buffer
            self._dispatch(client.read())
        seq = client.add(dst, oif, src) if add else client.delete(dst, oif)
        if add:
            self.present[dst] = oif
        self._waiting[seq] = (dst, oif, add, done)
        if self._loop is None:
            answers = client.drain(until=seq)
            if seq in self._waiting and not any(a.seq == seq for a in answers):
                client.forget(seq)
                answers.append(Answer(seq, errno.ETIMEDOUT, "no netlink answer"))
            self._dispatch(answers)

    def on_readable(self) -> None:
        try:
            answers = self.client.read()
        except OSError as exc:  # not ENOBUFS (handled): say so, keep the loop running
            log.warning("datapath: route answers: %s", exc)
            return
        self._dispatch(answers)

    def _dispatch(self, answers: list[Answer]) -> None:
        for answer in answers:
            entry = self._waiting.pop(answer.seq, None)
            if entry is None:
                continue
            dst, oif, add, done = entry
            if answer.error == errno.ENODEV:  # the device went: look its index up again
                self._indexes = {k: v for k, v in self._indexes.items() if v != oif}
            if not add and (not answer.error or answer.error in _GONE):
                if self.present.get(dst) == oif:
                    del self.present[dst]
                done(None)
            else:
                done(error_of(answer))

    def remove_all(self, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
        """Delete every route we may have installed, within ``timeout`` seconds (answers lost
        to an overrun are asked again); the failures, as text (a route already gone is no
        failure). Requests still in flight are settled first; their callbacks are dropped."""
        self.detach()
        client = self.client
        self._dispatch(client.read())
        self._waiting.clear()
        failures: dict[str, str] = {}
        todo = dict(self.present)
        deadline = time.monotonic() + timeout
        while todo and (left := deadline - time.monotonic()) > 0:
            asked: dict[int, str] = {}
            for dst, oif in list(todo.items()):
                if client.in_flight >= client.capacity:
                    self._settle(client.drain(left), asked, todo, failures)
                try:
                    asked[client.delete(dst, oif)] = dst
                except (OSError, ValueError) as exc:
                    failures[dst] = str(exc)
                    del todo[dst]
            self._settle(client.drain(max(0.0, deadline - time.monotonic())), asked, todo,
                         failures)
        failures.update((dst, "no netlink answer") for dst in todo)
        return [f"{dst}: {why}" for dst, why in failures.items()]

    def _settle(self, answers: list[Answer], asked: dict[int, str], todo: dict[str, int],
                failures: dict[str, str]) -> None:
        for answer in answers:
            dst = asked.pop(answer.seq, None)
            if dst is None or answer.error == errno.ENOBUFS:
                continue  # not ours, or lost: asked again in the next round
            del todo[dst]
            if not answer.error or answer.error in _GONE:
                self.present.pop(dst, None)
            else:
                failures[dst] = str(error_of(answer))

    def close(self) -> None:
        self.detach()
        self.client.close()
