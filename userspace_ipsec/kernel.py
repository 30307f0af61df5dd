"""The emulated kernel: PF_KEYv2 (RFC 2367) semantics on ``Message`` values, sans IO.

``Kernel.handle(sock_id, msg, now)`` answers one request with a list of ``Delivery`` values: a
message and its audience, routed as Linux's af_key.c routes them:

- sender only: GETSPI, GET (with keys), X_SPDGET, and every error (header echoed, errno set);
- every socket, keys never included: ADD, UPDATE, DELETE, FLUSH, X_SPDADD, X_SPDUPDATE,
  X_SPDDELETE, X_SPDDELETE2, X_SPDFLUSH, X_PROMISC;
- registered sockets (any SA type, as Linux) plus the sender: REGISTER;
- registered sockets: EXPIRE (from ``tick``/``note_traffic``), ACQUIRE (from ``acquire``);
- sender, streamed: DUMP (with keys) and X_SPDDUMP, sadb_msg_seq counting down to 0;
- promiscuous sockets: a copy of each request (keys stripped) and of every non-stream delivery.

A refused request never changes the SAD or SPD. Time is the caller's: ``now`` is wall-clock
seconds (lifetime "current" extensions carry it). ``tick(now)`` runs lifetimes and larval
timeouts, ``next_deadline()`` says when it is next due. The datapath reports traffic with
``note_traffic(sa, now)`` when an SA's counters reach its marks, and asks for keys with
``acquire(policy, flow, now)``.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import NamedTuple, TypeVar

from . import algorithms
from .algorithms import AlgKind, Algorithm
from .kernel_sa import (
    Refused,
    check_satype,
    einval,
    mode_reqid,
    sa_endpoints,
    sa_from_message,
    sa_message,
    uipsec_ext,
)
from .kernel_spd import (
    PROTO_SATYPE,
    policy_from_message,
    policy_id_of,
    policy_message,
    selector_of,
)
from .pfkey.constants import (
    IPSEC_MANUAL_REQID_MAX,
    IPSEC_REPLAYWSIZE,
    ExtType,
    IpsecMode,
    MsgType,
    PolicyDir,
    PolicyType,
    SaState,
    SaType,
)
from .pfkey.messages import (
    AddressExt,
    Comb,
    Extension,
    IPAddress,
    LifetimeExt,
    Message,
    PolicyExt,
    ProposalExt,
    SpiRangeExt,
    SupportedAlg,
    SupportedExt,
    UipsecExt,
)
from .sa import NO_MARK, Policy, SecurityAssociation
from .sad import SAD, SpiExhausted
from .spd import DEFAULT_CACHE_SIZE, SPD

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class Audience(Enum):
    SENDER = "sender"  # Delivery.to only
    ALL = "all"  # every open socket
    REGISTERED = "registered"  # sockets registered for any SA type (as Linux), plus .to
    PROMISC = "promisc"  # copies of requests for sockets in promiscuous mode (setkey -x)


@dataclass(slots=True)
class Delivery:
    """One message (or a dump's stream of messages) and who receives it.

    Promiscuous sockets also receive every single-message delivery (not streams).
    ``uipsec`` is added to ``message`` for sockets that opted in to the private extension
    (``Kernel.message_for``); a stream is already built for its one recipient.
    """

    audience: Audience
    message: Message | None = None
    stream: Iterator[Message] | None = None
    to: int | None = None
    uipsec: UipsecExt | None = None


class Flow(NamedTuple):
    """A packet's profile as the datapath saw it (ports: 0 where the protocol has none)."""

    src: IPAddress
    dst: IPAddress
    proto: int = 0
    sport: int = 0
    dport: int = 0


@dataclass(slots=True)
class KernelOptions:
    allow_weak: bool = False  # offer and accept algorithms RFC 8221 deprecates
    satypes: frozenset[int] = frozenset({SaType.ESP})  # what the datapath implements
    larval_timeout: float = 30.0  # a GETSPI'd SA not UPDATEd by then vanishes (KAME, Linux)
    acquire_interval: float = 1.0  # at most one ACQUIRE per policy and SA endpoints per this
    spi_min: int = 0x100  # default GETSPI range, as Linux and KAME
    spi_max: int = 0x0FFFFFFF
    spd_cache_size: int = DEFAULT_CACHE_SIZE


@dataclass(slots=True)
class _Socket:
    registered: set[int] = field(default_factory=set)
    uipsec: bool = False
    promisc: bool = False
    larval: set[SecurityAssociation] = field(default_factory=set)


_ACQUIRE_TABLE_LIMIT = 4096
# Lifetimes offered in ACQUIRE proposals (Linux's: 7 h soft, 8 h hard).
_PROPOSAL_SOFT = 7 * 3600
_PROPOSAL_HARD = 8 * 3600


class Kernel:
    def __init__(self, options: KernelOptions | None = None,
                 rng: random.Random | None = None) -> None:
        self.options = options or KernelOptions()
        self.sad = SAD()
        self.spd = SPD(self.options.spd_cache_size)
        self._rng = rng or random.SystemRandom()
        self._sockets: dict[int, _Socket] = {}
        self._next_sock = itertools.count(1)
        self._timers: list[tuple[float, int, SecurityAssociation]] = []
        self._timer_seq = itertools.count()
        self._acquired: dict[tuple[int, IPAddress, IPAddress], float] = {}
        self._acquire_seq = 0
        self._next_reqid = IPSEC_MANUAL_REQID_MAX
        self._supported = _supported_exts(self.options.allow_weak)
        self._combs = _combs(self.options.allow_weak)
        self._handlers: dict[MsgType, Callable[[int, Message, float], list[Delivery]]] = {
            MsgType.GETSPI: self._getspi,
            MsgType.UPDATE: self._update,
            MsgType.ADD: self._add,
            MsgType.DELETE: self._delete,
            MsgType.GET: self._get,
            MsgType.ACQUIRE: self._acquire_reply,
            MsgType.REGISTER: self._register,
            MsgType.FLUSH: self._flush,
            MsgType.DUMP: self._dump,
            MsgType.X_SPDADD: self._spdadd,
            MsgType.X_SPDUPDATE: self._spdadd,
            MsgType.X_SPDDELETE: self._spddelete,
            MsgType.X_SPDDELETE2: self._spddelete2,
            MsgType.X_SPDGET: self._spdget,
            MsgType.X_SPDFLUSH: self._spdflush,
            MsgType.X_SPDDUMP: self._spddump,
            MsgType.X_PROMISC: self._promisc,
        }

    # -- sockets -----------------------------------------------------------------------------

    def open_socket(self) -> int:
        sock_id = next(self._next_sock)
        self._sockets[sock_id] = _Socket()
        return sock_id

    def close_socket(self, sock_id: int, now: float) -> list[Delivery]:
        """Forget the socket's registrations and drop the larval SAs it asked for."""
        sock = self._sockets.pop(sock_id, None)
        if sock is not None:
            for sa in sock.larval:
                if sa in self.sad:
                    self.sad.remove(sa)
        return []

    def recipients(self, delivery: Delivery, sender: int | None = None) -> list[int]:
        """The socket ids a delivery goes to (``sender``: default for Audience.SENDER)."""
        if delivery.audience is Audience.ALL:
            return list(self._sockets)
        ids = [s for s, sock in self._sockets.items()
               if (sock.promisc and delivery.stream is None)
               or (sock.registered and delivery.audience is Audience.REGISTERED)]
        to = delivery.to if delivery.to is not None else sender
        if (delivery.audience is not Audience.PROMISC and to is not None and to not in ids
                and to in self._sockets):
            ids.append(to)
        return ids

    def message_for(self, delivery: Delivery, sock_id: int) -> Message:
        """The delivery's message as socket ``sock_id`` gets it."""
        msg = delivery.message
        if msg is None:
            raise ValueError("a streamed delivery has no single message")
        sock = self._sockets.get(sock_id)
        if delivery.uipsec is None or sock is None or not sock.uipsec:
            return msg
        return replace(msg, ext={**msg.ext, ExtType.X_UIPSEC: delivery.uipsec})

    def registered(self, sock_id: int) -> frozenset[int]:
        sock = self._sockets.get(sock_id)
        return frozenset(sock.registered) if sock else frozenset()

    # -- requests ----------------------------------------------------------------------------

    def handle(self, sock_id: int, msg: Message, now: float) -> list[Delivery]:
        sock = self._sockets.get(sock_id)
        if sock is None:
            return []
        if msg.uipsec is not None:
            sock.uipsec = True
        out: list[Delivery] = []
        if any(s.promisc for s in self._sockets.values()):
            out.append(Delivery(Audience.PROMISC, _without_keys(msg)))
        handler = self._handlers.get(msg.type)
        try:
            if handler is None:
                raise Refused(errno.EOPNOTSUPP, f"{_name(msg.type)} is not a request")
            out.extend(handler(sock_id, msg, now))
        except Refused as exc:
            log.debug("pfkey: socket %d: %s refused (%s): %s", sock_id, _name(msg.type),
                      errno.errorcode.get(exc.errno, exc.errno), exc.reason)
            reply = Message(msg.type, msg.satype, msg.seq, msg.pid, exc.errno)
            out.append(Delivery(Audience.SENDER, reply, to=sock_id))
        return out

    # SA messages

    def _getspi(self, sock_id: int, msg: Message, now: float) -> list[Delivery]:
        satype = check_satype(msg, self.options.satypes)
        src, dst = sa_endpoints(msg)
        mode, reqid = mode_reqid(msg)
        low, high = self.options.spi_min, self.options.spi_max
        spirange = msg.ext.get(ExtType.SPIRANGE)
        if isinstance(spirange, SpiRangeExt):
            low, high = spirange.min, spirange.max
            if low > high:
                raise einval(f"SPI range {low:#x}-{high:#x} is empty")
        try:
            spi = self.sad.allocate_spi(dst, satype, low, high, self._rng)
        except ValueError:
            raise einval(f"SPI range {low:#x}-{high:#x} holds only reserved SPIs") from None
        except SpiExhausted as exc:
            raise Refused(errno.EEXIST if exc.single else errno.ENOENT, str(exc)) from None
        sa = SecurityAssociation(spi, satype, src, dst, mode, reqid, SaState.LARVAL,
                                 owner=sock_id, seq=msg.seq, add_time=now)
        self.sad.add(sa)
        self._sockets[sock_id].larval.add(sa)
        self._schedule(sa)
        reply = sa_message(sa, MsgType.GETSPI, seq=msg.seq, pid=msg.pid)
        return [Delivery(Audience.SENDER, reply, to=sock_id, uipsec=uipsec_ext(sa))]

    def _update(self, sock_id: int, msg: Message, now: float) -> list[Delivery]:
        satype = check_satype(msg, self.options.satypes)
        new = sa_from_message(msg, satype, allow_weak=self.options.allow_weak, now=now)
        old = self.sad.get(new.dst, satype, new.spi)
        if old is None:
            raise Refused(errno.ESRCH, f"no SA with SPI {new.spi:#x} for {new.dst}")
        if old.src != new.src:
            raise Refused(errno.ENOENT, f"SA {new.spi:#x} has another source than {new.src}")
        if old.state != SaState.LARVAL:
            raise Refused(errno.EEXIST, f"SA {new.spi:#x} is not larval: only GETSPI's are")
        if old.owner != sock_id:
            raise Refused(errno.EPERM, f"SA {new.spi:#x} belongs to another socket")
        if msg.sa2 is None:
            new.mode, new.reqid = old.mode, old.reqid
        new.seq = old.seq
        self.sad.replace(old, new)
        owner = self._sockets.get(sock_id)
        if owner is not None:
            owner.larval.discard(old)
        self._schedule(new)
        log.debug("pfkey: SA %s %#x %s->%s updated", satype.name, new.spi, new.src, new.dst)
        return [self._broadcast_sa(new, msg)]

    def _add(self, sock_id: int, msg: Message, now: float) -> list[Delivery]:
        satype = check_satype(msg, self.options.satypes)
        sa = sa_from_message(msg, satype, allow_weak=self.options.allow_weak, now=now)
        if self.sad.get(sa.dst, satype, sa.spi) is not None:
            raise Refused(errno.EEXIST, f"SA {sa.spi:#x} for {sa.dst} exists")
        self.sad.add(sa)
        self._schedule(sa)
        log.debug("pfkey: SA %s %#x %s->%s added", satype.name, sa.spi, sa.src, sa.dst)
        return [self._broadcast_sa(sa, msg)]

    def _lookup_sa(self, msg: Message) -> SecurityAssociation:
        satype = check_satype(msg, self.options.satypes)
        sa_ext = msg.sa
        if sa_ext is None:
            raise einval("the SA extension is required")
        _, dst = sa_endpoints(msg)
        sa = self.sad.get(dst, satype, sa_ext.spi)
        if sa is None:
            raise Refused(errno.ESRCH, f"no SA with SPI {sa_ext.spi:#x} for {dst}")
        return sa

    def _delete(self, sock_id: int, msg: Message, now: float) -> list[Delivery]:
        sa = self._lookup_sa(msg)
        self._remove_sa(sa)
        log.debug("pfkey: SA %s %#x %s->%s deleted", sa.satype.name, sa.spi, sa.src, sa.dst)
        return [self._broadcast_sa(sa, msg)]

    def _get(self, sock_id: int, msg: Message, now: float) -> list[Delivery]:
        sa = self._lookup_sa(msg)
        reply = sa_message(sa, MsgType.GET, seq=msg.seq, pid=msg.pid, keys=True)
        return [Delivery(Audience.SENDER, reply, to=sock_id, uipsec=uipsec_ext(sa))]

    def _flush(self, sock_id: int, msg: Message, now: float) -> list[Delivery]:
        satype = _satype_filter(msg)
        if satype:
            for sa in self.sad.snapshot(satype):
                self._remove_sa(sa)
        else:
            for sa in self.sad.clear():
                self._forget_larval(sa)
        reply = Message(MsgType.FLUSH, msg.satype, msg.seq, msg.pid)
        return [Delivery(Audience.ALL, reply)]

    def _dump(self, sock_id: int, msg: Message, now: float) -> list[Delivery]:
        sas = self.sad.snapshot(_satype_filter(msg))
        if not sas:
            raise Refused(errno.ENOENT, "no SA to dump")
        with_uipsec = self._sockets[sock_id].uipsec

        def render(sa: SecurityAssociation) -> Message:
            out = sa_message(sa, MsgType.DUMP, pid=msg.pid, keys=True)
            if with_uipsec:
                out.ext[ExtType.X_UIPSEC] = uipsec_ext(sa)
            return out

        return [Delivery(Audience.SENDER, stream=_countdown(sas, render), to=sock_id)]

    def _register(self, sock_id: int, msg: Message, now: float) -> list[Delivery]:
        sock = self._sockets[sock_id]
        satype = msg.satype
        # Linux accepts any SA type up to SADB_SATYPE_MAX: strongSwan registers AH too and
        # gives up if refused, though AH SAs themselves are refused when unsupported.
        if not 0 <= satype <= SaType.X_IPCOMP:
            raise einval(f"SA type {int(satype)} out of range")
        if satype != SaType.UNSPEC:
            if satype in sock.registered:
                raise Refused(errno.EEXIST, f"already registered for SA type {int(satype)}")
            sock.registered.add(int(satype))
        ext: dict[ExtType, Extension] = {}
        auth, enc = self._supported
        ext[ExtType.SUPPORTED_AUTH] = replace(auth, algs=list(auth.algs))
        if satype != SaType.AH:
            ext[ExtType.SUPPORTED_ENCRYPT] = replace(enc, algs=list(enc.algs))
        reply = Message(MsgType.REGISTER, satype, msg.seq, msg.pid, 0, ext)
        return [Delivery(Audience.REGISTERED, reply, to=sock_id)]

    def _acquire_reply(self, sock_id: int, msg: Message, now: float) -> list[Delivery]:
        """A key manager's ACQUIRE (with errno: it failed to negotiate); nothing to answer."""
        return []

    def _promisc(self, sock_id: int, msg: Message, now: float) -> list[Delivery]:
        """X_PROMISC: satype 1 turns promiscuous mode on, 0 off (Linux); echoed to all."""
        if msg.satype not in (0, 1):
            raise einval("X_PROMISC takes SA type 0 (off) or 1 (on)")
        self._sockets[sock_id].promisc = bool(msg.satype)
        return [Delivery(Audience.ALL, Message(MsgType.X_PROMISC, msg.satype, msg.seq, msg.pid))]

    # SPD messages

    def _spdadd(self, sock_id: int, msg: Message, now: float) -> list[Delivery]:
        policy = policy_from_message(msg, self.options.satypes, self._new_reqid, now)
        existing = self.spd.find(policy.selector, policy.direction)
        if msg.type == MsgType.X_SPDADD:
            if existing is not None:
                raise Refused(errno.EEXIST, f"a policy for this selector exists (id {existing.id})")
            self.spd.insert(policy)
        else:
            self.spd.update(policy)
        log.debug("pfkey: policy %d %s %s", policy.id, policy.direction.name,
                 "added" if existing is None else "updated")
        return [Delivery(Audience.ALL, policy_message(policy, msg.type, seq=msg.seq, pid=msg.pid))]

    def _spddelete(self, sock_id: int, msg: Message, now: float) -> list[Delivery]:
        selector, direction = selector_of(msg)
        policy = self.spd.find(selector, direction)
        if policy is None:
            raise Refused(errno.ENOENT, "no policy for this selector and direction")
        return self._removed_policy(policy, msg)

    def _spddelete2(self, sock_id: int, msg: Message, now: float) -> list[Delivery]:
        return self._removed_policy(self._policy_by_id(msg), msg)

    def _removed_policy(self, policy: Policy, msg: Message) -> list[Delivery]:
        self.spd.remove(policy)
        self._forget_acquires(policy.id)
        log.debug("pfkey: policy %d %s deleted", policy.id, policy.direction.name)
        return [Delivery(Audience.ALL, policy_message(policy, msg.type, seq=msg.seq, pid=msg.pid))]

    def _spdget(self, sock_id: int, msg: Message, now: float) -> list[Delivery]:
        policy = self._policy_by_id(msg)
        reply = policy_message(policy, MsgType.X_SPDGET, seq=msg.seq, pid=msg.pid)
        return [Delivery(Audience.SENDER, reply, to=sock_id)]

    def _policy_by_id(self, msg: Message) -> Policy:
        policy_id = policy_id_of(msg)
        policy = self.spd.get(policy_id)
        if policy is None:
            raise Refused(errno.ENOENT, f"no policy with id {policy_id}")
        return policy

    def _spdflush(self, sock_id: int, msg: Message, now: float) -> list[Delivery]:
        self.spd.flush()
        self._acquired.clear()
        reply = Message(MsgType.X_SPDFLUSH, SaType.UNSPEC, msg.seq, msg.pid)
        return [Delivery(Audience.ALL, reply)]

    def _spddump(self, sock_id: int, msg: Message, now: float) -> list[Delivery]:
        policies = self.spd.snapshot()
        if not policies:
            raise Refused(errno.ENOENT, "no policy to dump")

        def render(policy: Policy) -> Message:
            return policy_message(policy, MsgType.X_SPDDUMP, pid=msg.pid)

        return [Delivery(Audience.SENDER, stream=_countdown(policies, render), to=sock_id)]

    # -- datapath ----------------------------------------------------------------------------

    def acquire(self, policy: Policy, flow: Flow, now: float) -> list[Delivery]:
        """SADB_ACQUIRE for an outbound packet whose ipsec policy has no SA.

        Rate-limited per (policy, SA endpoints) to one per ``acquire_interval``: the endpoints
        are the tunnel's in tunnel mode, the packet's in transport mode. Returns [] when
        limited, when the policy needs no SA, or when no key manager is registered.
        """
        if policy.action != PolicyType.IPSEC or not policy.requests:
            return []
        if not any(sock.registered for sock in self._sockets.values()):
            return []
        req = policy.requests[0]
        src, dst = flow.src, flow.dst
        if req.mode == IpsecMode.TUNNEL and req.src is not None and req.dst is not None:
            src, dst = req.src, req.dst
        key = (policy.id, src, dst)
        last = self._acquired.get(key)
        if last is not None and now - last < self.options.acquire_interval:
            return []
        if len(self._acquired) >= _ACQUIRE_TABLE_LIMIT:
            horizon = now - self.options.acquire_interval
            self._acquired = {k: t for k, t in self._acquired.items() if t > horizon}
        self._acquired[key] = now
        self._acquire_seq = (self._acquire_seq + 1) & 0xFFFFFFFF
        satype = PROTO_SATYPE.get(req.proto, SaType.ESP)
        ext: dict[ExtType, Extension] = {
            ExtType.ADDRESS_SRC: AddressExt(src),
            ExtType.ADDRESS_DST: AddressExt(dst),
            ExtType.X_POLICY: PolicyExt(PolicyType.IPSEC, PolicyDir.OUTBOUND, policy.id,
                                        policy.priority, [replace(r) for r in policy.requests]),
            ExtType.PROPOSAL: ProposalExt(IPSEC_REPLAYWSIZE, [replace(c) for c in self._combs]),
        }
        msg = Message(MsgType.ACQUIRE, satype, self._acquire_seq, 0, 0, ext)
        log.info("pfkey: ACQUIRE %d for policy %d %s->%s", self._acquire_seq, policy.id, src, dst)
        return [Delivery(Audience.REGISTERED, msg)]

    def note_traffic(self, sa: SecurityAssociation, now: float) -> list[Delivery]:
        """The datapath saw the SA's counters reach ``packet_mark`` or ``byte_mark``.

        Records the first use, fires byte/packet (and any due time) expiries, and moves the
        marks to the next limit.
        """
        if sa not in self.sad or sa.state not in (SaState.MATURE, SaState.DYING):
            sa.packet_mark = sa.byte_mark = NO_MARK
            return []
        if not sa.use_time:
            sa.use_time = now or 1e-9  # 0 means "never used"
        return self._check_lifetimes(sa, now)

    def expire_now(self, sa: SecurityAssociation, now: float) -> list[Delivery]:
        """Hard-expire ``sa`` at once (its outbound sequence numbers are used up, RFC 4303
        3.3.3): removed from the SAD, SADB_EXPIRE (hard) to the registered sockets."""
        if sa not in self.sad:
            return []
        log.info("pfkey: SA %s %#x %s->%s hard expired (sequence numbers used up)",
                 sa.satype.name, sa.spi, sa.src, sa.dst)
        self._remove_sa(sa)
        return [self._expire(sa, ExtType.LIFETIME_HARD)]

    # -- timers ------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Delivery]:
        """Run the lifetimes and larval timeouts that are due at ``now``."""
        out: list[Delivery] = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, _, sa = heapq.heappop(timers)
            if sa.timer_at != when or sa not in self.sad:
                continue  # superseded or gone
            sa.timer_at = None
            out.extend(self._check_lifetimes(sa, now))
        return out

    def next_deadline(self) -> float | None:
        timers = self._timers
        while timers and (timers[0][2].timer_at != timers[0][0] or timers[0][2] not in self.sad):
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def _check_lifetimes(self, sa: SecurityAssociation, now: float) -> list[Delivery]:
        if sa.state == SaState.LARVAL:
            if now >= sa.add_time + self.options.larval_timeout:
                log.info("pfkey: larval SA %#x for %s timed out", sa.spi, sa.dst)
                self._remove_sa(sa)
                return []
        elif _reached(sa, sa.hard, now):
            log.info("pfkey: SA %s %#x %s->%s hard expired", sa.satype.name, sa.spi, sa.src,
                     sa.dst)
            self._remove_sa(sa)
            return [self._expire(sa, ExtType.LIFETIME_HARD)]
        out: list[Delivery] = []
        if not sa.soft_expired and sa.state != SaState.LARVAL and _reached(sa, sa.soft, now):
            log.info("pfkey: SA %s %#x %s->%s soft expired", sa.satype.name, sa.spi, sa.src,
                     sa.dst)
            sa.soft_expired = True
            self.sad.set_state(sa, SaState.DYING)
            out.append(self._expire(sa, ExtType.LIFETIME_SOFT))
        self._schedule(sa)
        return out

    def _expire(self, sa: SecurityAssociation, which: ExtType) -> Delivery:
        msg = sa_message(sa, MsgType.EXPIRE, lifetimes=(which,))
        return Delivery(Audience.REGISTERED, msg, uipsec=uipsec_ext(sa))

    def _schedule(self, sa: SecurityAssociation) -> None:
        """Arm the SA's next time-based deadline and its traffic marks."""
        deadlines: list[float] = []
        if sa.state == SaState.LARVAL:
            deadlines.append(sa.add_time + self.options.larval_timeout)
            sa.packet_mark = sa.byte_mark = NO_MARK
        else:
            limits = [sa.hard] if sa.soft_expired else [sa.hard, sa.soft]
            for lt in limits:
                if lt.addtime:
                    deadlines.append(sa.add_time + lt.addtime)
                if lt.usetime and sa.use_time:
                    deadlines.append(sa.use_time + lt.usetime)
            if sa.use_time:
                sa.packet_mark = min((lt.allocations for lt in limits if lt.allocations),
                                     default=NO_MARK)
                sa.byte_mark = min((lt.bytes for lt in limits if lt.bytes), default=NO_MARK)
            else:
                sa.packet_mark = sa.byte_mark = 0  # the first packet reports first use
        when = min(deadlines, default=None)
        if when != sa.timer_at:
            sa.timer_at = when
            if when is not None:
                heapq.heappush(self._timers, (when, next(self._timer_seq), sa))
                if len(self._timers) > 2 * len(self.sad) + 1024:
                    self._timers = [t for t in self._timers
                                    if t[2].timer_at == t[0] and t[2] in self.sad]
                    heapq.heapify(self._timers)

    # -- helpers -----------------------------------------------------------------------------

    def _remove_sa(self, sa: SecurityAssociation) -> None:
        self.sad.remove(sa)
        sa.timer_at = None
        sa.packet_mark = sa.byte_mark = NO_MARK
        self._forget_larval(sa)

    def _forget_larval(self, sa: SecurityAssociation) -> None:
        if sa.owner is not None:
            owner = self._sockets.get(sa.owner)
            if owner is not None:
                owner.larval.discard(sa)
        sa.timer_at = None
        sa.packet_mark = sa.byte_mark = NO_MARK

    def _forget_acquires(self, policy_id: int) -> None:
        for key in [k for k in self._acquired if k[0] == policy_id]:
            del self._acquired[key]

    def _broadcast_sa(self, sa: SecurityAssociation, request: Message) -> Delivery:
        """ADD/UPDATE/DELETE news for every socket, keys stripped (RFC 2367 3.1)."""
        msg = sa_message(sa, request.type, seq=request.seq, pid=request.pid)
        return Delivery(Audience.ALL, msg, uipsec=uipsec_ext(sa))

    def _new_reqid(self) -> int:
        self._next_reqid = self._next_reqid + 1 if self._next_reqid < 0xFFFFFFFF else (
            IPSEC_MANUAL_REQID_MAX + 1)
        return self._next_reqid


def _without_keys(msg: Message) -> Message:
    """A request as promiscuous sockets see it: keys never leave the kernel unasked."""
    if ExtType.KEY_AUTH not in msg.ext and ExtType.KEY_ENCRYPT not in msg.ext:
        return msg
    ext: dict[ExtType, Extension] = {
        t: e for t, e in msg.ext.items() if t not in (ExtType.KEY_AUTH, ExtType.KEY_ENCRYPT)}
    return replace(msg, ext=ext)


def _name(msg_type: MsgType | int) -> str:
    return msg_type.name if isinstance(msg_type, MsgType) else str(msg_type)


def _satype_filter(msg: Message) -> int:
    """FLUSH/DUMP: UNSPEC (0) means every SA type; ESP and AH select theirs."""
    if msg.satype not in (SaType.UNSPEC, SaType.ESP, SaType.AH):
        raise einval(f"SA type {int(msg.satype)} is not ESP or AH")
    return int(msg.satype)


def _reached(sa: SecurityAssociation, lt: LifetimeExt, now: float) -> bool:
    return bool(
        (lt.addtime and now >= sa.add_time + lt.addtime)
        or (lt.usetime and sa.use_time and now >= sa.use_time + lt.usetime)
        or (lt.allocations and sa.allocations >= lt.allocations)
        or (lt.bytes and sa.total_bytes >= lt.bytes)
    )


def _countdown(items: Sequence[_T], render: Callable[[_T], Message]) -> Iterator[Message]:
    """Render lazily, sadb_msg_seq counting down to 0 on the last message (KAME, Linux)."""
    last = len(items) - 1
    for index, item in enumerate(items):
        msg = render(item)
        msg.seq = last - index
        yield msg


def _supported_exts(allow_weak: bool) -> tuple[SupportedExt, SupportedExt]:
    def algs(table: tuple[Algorithm, ...]) -> list[SupportedAlg]:
        return [SupportedAlg(a.pfkey_id, a.iv_bytes, min(a.key_bits), max(a.key_bits))
                for a in table if allow_weak or not a.weak]

    return SupportedExt(algs(algorithms.INTEGRITY)), SupportedExt(algs(algorithms.ENCRYPTION))


def _combs(allow_weak: bool) -> list[Comb]:
    """Every usable ESP combination, newest algorithms first; AEADs need no integrity."""
    def ok(a: Algorithm) -> bool:
        return (allow_weak or not a.weak) and a.key_bits != (0,)

    def comb(enc: Algorithm, integ: Algorithm | None) -> Comb:
        return Comb(
            auth=integ.pfkey_id if integ else algorithms.AUTH_NONE,
            encrypt=enc.pfkey_id,
            auth_minbits=min(integ.key_bits) if integ else 0,
            auth_maxbits=max(integ.key_bits) if integ else 0,
            encrypt_minbits=min(enc.key_bits),
            encrypt_maxbits=max(enc.key_bits),
            soft_addtime=_PROPOSAL_SOFT, hard_addtime=_PROPOSAL_HARD,
            soft_usetime=_PROPOSAL_SOFT, hard_usetime=_PROPOSAL_HARD,
        )

    integs = [a for a in reversed(algorithms.INTEGRITY) if ok(a)]
    out: list[Comb] = []
    for enc in reversed(algorithms.ENCRYPTION):
        if not ok(enc):
            continue
        if enc.kind is AlgKind.AEAD:
            out.append(comb(enc, None))
        else:
            out.extend(comb(enc, integ) for integ in integs)
    return out


__all__ = ["Audience", "Delivery", "Flow", "Kernel", "KernelOptions"]
