"""What every IKE exchange shares: message IDs with a window of one in each direction, the
responder's response cache, retransmission with back-off, the queue of requests waiting for
the window, deadlines, events and the end of an IKE SA (RFC 7296 2.1, 2.2, 2.3).
"""

from __future__ import annotations

import abc
import enum
import hashlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ike.config import IkeConfig
from ike.constants import HeaderFlag
from ike.crypto import IkeSaKeys, Prf, SkProtection, derive_ike_keys, ike_sa_ciphers
from ike.dh import KeyExchange
from ike.errors import IkeParseError
from ike.events import (
    ChildSaDeleted,
    Event,
    IkeSaDeleted,
    IkeSaFailed,
    LivenessFailed,
)
from ike.message import Message, decode_payloads, encrypt_message
from ike.payloads import EncryptedPayload, NotifyPayload, Payload, TrafficSelector
from ike.transforms import TransformSet

if TYPE_CHECKING:
    from ike.sa import IkeSa

Address = tuple[str, int]
GENERIC_HEADER = 4


class State(enum.Enum):
    IDLE = "idle"
    INIT_SENT = "init-sent"  # initiator waits for the IKE_SA_INIT response
    INIT_DONE = "init-done"  # responder waits for IKE_AUTH
    AUTH_SENT = "auth-sent"  # initiator waits for the IKE_AUTH response
    ESTABLISHED = "established"
    REKEYED = "rekeyed"  # superseded by a new IKE SA; waits for the old one's delete
    DELETING = "deleting"  # our delete of the IKE SA is queued or in flight
    DELETED = "deleted"
    FAILED = "failed"


TERMINAL = (State.DELETED, State.FAILED)


class ChildState(enum.Enum):
    INSTALLED = "installed"
    REKEYING = "rekeying"  # our rekey request is queued or in flight
    REKEYED = "rekeyed"  # replaced; waits for a delete (ours or the peer's)
    DELETING = "deleting"  # our delete request is queued or in flight


@dataclass(slots=True)
class ChildSa:
    """What the IKE SA remembers of an installed Child SA pair (no keys: they went to the
    daemon in ChildSaEstablished)."""

    inbound_spi: bytes
    outbound_spi: bytes
    transforms: TransformSet
    local_ts: list[TrafficSelector]
    remote_ts: list[TrafficSelector]
    transport_mode: bool
    state: ChildState = ChildState.INSTALLED
    # Collision bookkeeping (RFC 7296 2.8.1): the lowest nonce of the peer's rekey of this
    # pair, answered while our own rekey was in flight, and the pair it created.
    peer_rekey_nonce: bytes | None = None
    peer_rekey_spi: bytes | None = None
    # A pair someone else should delete (replaced or redundant): delete it ourselves then.
    delete_deadline: float | None = None


ResponseHandler = Callable[[Message, list[Payload], float], None]
Task = tuple[str, object]  # a request waiting for the window: (kind, argument)
# Tasks that concern Child SAs follow them to the new IKE SA after an IKE SA rekey.
MOVABLE_TASKS = frozenset({"create-child", "rekey-child", "delete-child", "delete-spis"})


@dataclass(slots=True)
class OutstandingRequest:
    message_id: int
    exchange: int
    data: bytes = field(repr=False)
    kind: str
    on_response: ResponseHandler | None  # None: IKE_SA_INIT / IKE_AUTH, handled by state
    sent_at: float
    retransmits: int = 0
    on_timeout: Callable[[float], None] | None = None


@dataclass(slots=True)
class CachedResponse:
    message_id: int
    request_digest: bytes
    data: bytes = field(repr=False)


class Fail(Exception):
    """Internal: abort the exchange, optionally answering with an error notify."""

    def __init__(self, reason: str, notify: int | None = None, data: bytes = b"") -> None:
        super().__init__(reason)
        self.notify = notify
        self.data = data


def _random_spi(random: Callable[[int], bytes]) -> Callable[[], bytes | None]:
    def allocate() -> bytes:
        for _ in range(64):
            spi = random(4)
            if int.from_bytes(spi, "big") >= 0x100:  # 1..255 are reserved by IANA
                return spi
        raise RuntimeError("random source gives no usable SPI")
    return allocate


class IkeSaCore(abc.ABC):
    """State and plumbing of one IKE SA; the exchanges live in the subclasses."""

    def _init_core(self, config: IkeConfig, initiator: bool, local_addr: Address,
                   remote_addr: Address, random: Callable[[int], bytes],
                   spi_allocator: Callable[[], bytes | None] | None) -> None:
        self.config = config
        self.initiator = initiator  # original initiator of this IKE SA (the I flag)
        self.local_addr = local_addr
        self.remote_addr = remote_addr
        self.state = State.IDLE
        self._random = random
        self._allocate_spi = spi_allocator or _random_spi(random)
        self.spi_i = bytes(8)
        self.spi_r = bytes(8)
        self._events: deque[Event] = deque()
        self._outbox: list[tuple[bytes, Address]] = []
        self._pending: OutstandingRequest | None = None
        self._next_id = 0  # our next request's message ID
        self._peer_next_id = 0  # the message ID we expect on the peer's next request
        self._cached: CachedResponse | None = None
        self._queue: deque[Task] = deque()
        self._retries: list[tuple[float, Task]] = []
        self._delete_deadline: float | None = None  # REKEYED / redundant: end ourselves then
        self._suite: TransformSet | None = None
        self._prf: Prf | None = None
        self._keys: IkeSaKeys | None = None
        self._out: SkProtection | None = None
        self._in: SkProtection | None = None
        self._children: dict[bytes, ChildSa] = {}
        self.remote_id: tuple[int, bytes] | None = None
        self.local_behind_nat = False
        self.remote_behind_nat = False
        self.drops = 0  # datagrams ignored: malformed, unexpected, failed ICV, stale
        self.auth_drops = 0  # of those, protected messages that did not verify or decrypt
        # IKE_SA_INIT / IKE_AUTH state (unused once established).
        self._kex: KeyExchange | None = None
        self._dh_group = config.ike_proposals[0].dh[0]
        self._cookie: bytes | None = None
        self._init_retries = 0
        self._nonce = b""
        self._peer_nonce = b""
        self._init_msg = b""  # our IKE_SA_INIT message, signed in AUTH
        self._peer_init_msg = b""
        self._first_child_spi = b""
        # IKE SA rekey: the peer's new IKE SA (and its lowest nonce), answered while our own
        # rekey was in flight; settled when ours completes (RFC 7296 2.8.2).
        self._peer_ike_rekey: tuple[IkeSa, bytes] | None = None
        self._redundant = False  # a new IKE SA that lost a rekey collision

    def __repr__(self) -> str:
        role = "initiator" if self.initiator else "responder"
        return (f"IkeSa({self.spi_i.hex()}_i {self.spi_r.hex()}_r {role} "
                f"{self.state.value}, {len(self._children)} child SAs)")

    # -- public read-only views ------------------------------------------------------------

    @property
    def child_sas(self) -> list[ChildSa]:
        return list(self._children.values())

    @property
    def busy(self) -> bool:
        """A request of ours is in flight or waiting for the window."""
        return self._pending is not None or bool(self._queue)

    def _install_keys(self, suite: TransformSet, seed: bytes, ni: bytes, nr: bytes) -> None:
        self._suite = suite
        self._prf = Prf.for_id(suite.prf_alg.id)
        self._keys = derive_ike_keys(suite, seed, ni, nr, self.spi_i, self.spi_r)
        self._out, self._in = ike_sa_ciphers(suite, self._keys, self.initiator)

    def _new_spi(self) -> bytes | None:
        """A fresh inbound ESP SPI, or None when the allocator has none (or gives junk)."""
        spi = self._allocate_spi()
        if spi is None or len(spi) != 4 or spi in self._children:
            return None
        return spi

    def _resolve_child(self, spi: bytes) -> bytes:
        """The inbound SPI of the pair that `spi` names in either direction (a PF_KEY
        EXPIRE may name the outbound SA); ValueError if none."""
        if spi in self._children:
            return spi
        for child in self._children.values():
            if child.outbound_spi == spi:
                return child.inbound_spi
        raise ValueError(f"no Child SA with SPI {spi.hex()}")

    # -- events and ends -------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        self._events.append(event)

    def _drop_children(self, reason: str) -> None:
        for child in list(self._children.values()):
            self._emit(ChildSaDeleted(child.inbound_spi, child.outbound_spi, reason))
        self._children.clear()

    def _end(self) -> None:
        self._pending = None
        self._queue.clear()
        self._retries.clear()
        self._delete_deadline = None

    def _fail(self, reason: str, notify: int | None = None) -> None:
        if self.state in TERMINAL:
            return
        self._drop_children(reason)
        self.state = State.FAILED
        self._end()
        self._emit(IkeSaFailed(reason, notify))

    def _deleted(self, reason: str, rekeyed: bool = False) -> None:
        if self.state in TERMINAL:
            return
        self._drop_children(reason)
        self.state = State.DELETED
        self._end()
        self._emit(IkeSaDeleted(self.spi_i, self.spi_r, reason, rekeyed or self._redundant))

    # -- sending ---------------------------------------------------------------------------

    def _flags(self, response: bool) -> int:
        return (HeaderFlag.INITIATOR if self.initiator else 0) | \
            (HeaderFlag.RESPONSE if response else 0)

    def _encrypted(self, exchange: int, msg_id: int, response: bool,
                   inner: list[Payload]) -> bytes:
        assert self._out is not None
        msg = Message(exchange, msg_id, self.spi_i, self.spi_r, self._flags(response))
        return encrypt_message(msg, inner, self._out)

    def _send_request(self, exchange: int, data: bytes, now: float, kind: str,
                      on_response: ResponseHandler | None,
                      on_timeout: Callable[[float], None] | None = None) -> None:
        assert self._pending is None, "window of one: a request is already in flight"
        self._pending = OutstandingRequest(self._next_id, exchange, data, kind, on_response,
                                           now, 0, on_timeout)
        self._next_id += 1
        self._outbox.append((data, self.remote_addr))

    def _request(self, exchange: int, inner: list[Payload], now: float, kind: str,
                 on_response: ResponseHandler,
                 on_timeout: Callable[[float], None] | None = None) -> None:
        """Encrypt and send a request with the next message ID."""
        data = self._encrypted(exchange, self._next_id, False, inner)
        self._send_request(exchange, data, now, kind, on_response, on_timeout)

    def _send_response(self, msg: Message, data: bytes, addr: Address) -> None:
        self._cached = CachedResponse(msg.message_id, hashlib.sha256(msg.raw).digest(), data)
        self._outbox.append((data, addr))

    def _enqueue(self, task: Task, now: float, front: bool = False,
                 internal: bool = False) -> None:
        """Queue a request; the daemon's requests are bounded, our own follow-ups (retries,
        deletes after rekeys: at most a few per Child SA) are not refused."""
        if not internal and len(self._queue) >= self.config.max_queued_exchanges:
            raise RuntimeError(f"{self!r}: {len(self._queue)} requests already queued")
        if front:
            self._queue.appendleft(task)
        else:
            self._queue.append(task)
        self._kick(now)

    def _kick(self, now: float) -> None:
        """Start queued requests while the window is free (a start may decide to skip)."""
        for _ in range(len(self._queue)):
            if self._pending is not None or not self._queue or self.state in TERMINAL:
                return
            kind, arg = self._queue.popleft()
            self._start(kind, arg, now)

    def _queued(self, kind: str, arg: object = None) -> bool:
        if any(k == kind and (arg is None or a == arg) for k, a in self._queue):
            return True
        return arg is None and self._pending is not None and self._pending.kind == kind

    def _retry_later(self, task: Task, now: float) -> None:
        self._retries.append((now + self.config.temporary_failure_retry, task))

    def _hand_over_tasks(self, to: IkeSaCore, now: float) -> None:
        """After an IKE SA rekey, Child SA requests continue on the new IKE SA."""
        to._queue.extend(t for t in self._queue if t[0] in MOVABLE_TASKS)
        to._retries += [r for r in self._retries if r[1][0] in MOVABLE_TASKS]
        self._queue.clear()
        self._retries.clear()
        to._kick(now)

    @abc.abstractmethod
    def _start(self, kind: str, arg: object, now: float) -> None:
        """Hook: send the request of a queued task, or skip it if it no longer applies."""

    # -- receiving -------------------------------------------------------------------------

    def _is_retransmit(self, msg: Message, addr: Address) -> bool:
        """Answer a retransmitted request from the cache (RFC 7296 2.1); True if handled."""
        cached = self._cached
        if cached is None or msg.message_id != cached.message_id:
            return False
        if hashlib.sha256(msg.raw).digest() == cached.request_digest:
            self._outbox.append((cached.data, addr))
        else:
            self.drops += 1  # same message ID, other bytes: not a retransmission
        return True

    def _open(self, msg: Message) -> list[Payload] | IkeParseError | None:
        """The inner payloads of a protected message; an IkeParseError when it verified but
        its content is malformed (answerable); None (counted) when it does not verify."""
        sk = msg.payloads[0] if len(msg.payloads) == 1 else None
        if not isinstance(sk, EncryptedPayload) or msg.sk_offset is None or self._in is None:
            self.drops += 1
            return None
        aad_end = msg.sk_offset + GENERIC_HEADER
        try:
            plaintext = self._in.open(msg.raw[aad_end:], msg.raw[:aad_end])
        except IkeParseError:
            self.drops += 1
            self.auth_drops += 1
            return None
        try:
            return decode_payloads(sk.first_payload, plaintext)
        except IkeParseError as exc:
            return exc

    def _error_reply(self, exc: IkeParseError) -> list[Payload]:
        return [NotifyPayload(int(exc.notify), exc.notify_data)]

    # -- timers ----------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        if self.state in TERMINAL:
            return None
        times: list[float] = []
        if self._pending is not None:
            times.append(self._pending.sent_at
                         + self.config.retransmit_wait(self._pending.retransmits))
        times += [at for at, _ in self._retries]
        times += [c.delete_deadline for c in self._children.values()
                  if c.delete_deadline is not None]
        if self._delete_deadline is not None:
            times.append(self._delete_deadline)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        if self.state in TERMINAL:
            return
        req = self._pending
        if req is not None and now >= req.sent_at + self.config.retransmit_wait(req.retransmits):
            if req.retransmits >= self.config.retransmit_tries:
                self._pending = None
                if req.on_timeout is not None:
                    req.on_timeout(now)
                else:
                    self._timed_out(req)
                if self.state in TERMINAL:
                    return
            else:
                req.retransmits += 1
                req.sent_at = now
                self._outbox.append((req.data, self.remote_addr))
        due = [r for r in self._retries if r[0] <= now]
        self._retries = [r for r in self._retries if r[0] > now]
        for _, task in due:
            self._enqueue(task, now, internal=True)
        for child in list(self._children.values()):
            if child.delete_deadline is not None and now >= child.delete_deadline:
                child.delete_deadline = None
                self._expire_child(child, now)
        if self._delete_deadline is not None and now >= self._delete_deadline:
            self._delete_deadline = None
            self._deleted("peer did not delete the superseded IKE SA", rekeyed=True)
        self._kick(now)

    def _timed_out(self, req: OutstandingRequest) -> None:
        tries = req.retransmits + 1
        if req.kind == "liveness":
            self._drop_children("peer not responding")
            self._emit(LivenessFailed(self.spi_i, self.spi_r))
        self._fail(f"no response to {req.kind} after {tries} transmissions")

    @abc.abstractmethod
    def _expire_child(self, child: ChildSa, now: float) -> None:
        """Hook: a replaced or redundant Child SA was not deleted by the peer in time."""

    @abc.abstractmethod
    def _successor(self, initiator: bool, spi_i: bytes, spi_r: bytes, suite: TransformSet,
                   shared: bytes, ni: bytes, nr: bytes) -> IkeSa:
        """Hook: the IKE SA that a rekey exchange creates (RFC 7296 2.18)."""
