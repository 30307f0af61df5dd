"""Sans-IO IKE SA: IKE_SA_INIT and IKE_AUTH with a pre-shared key (RFC 7296 1.2, 2.15).

One `IkeSa` object per IKE SA, in the style of aioquic: the caller feeds it datagrams and the
current time, and collects datagrams to send, a timer deadline and events. No sockets, no
clock, no sleeping. Covered: both roles, proposal selection, INVALID_KE_PAYLOAD and COOKIE
retries on the initiator, NAT detection notifies, PSK AUTH, the first Child SA with traffic
selector narrowing, retransmission with exponential back-off, and retransmitted requests
answered from the cached response. Not yet: CREATE_CHILD_SA, INFORMATIONAL, rekeying.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import os
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ike.constants import (
    AuthMethod,
    ExchangeType,
    HeaderFlag,
    NotifyType,
    is_error_notify,
)
from ike.crypto import (
    ChildSaKeys,
    IkeSaKeys,
    Prf,
    SkProtection,
    auth_matches,
    derive_child_keys,
    derive_ike_keys,
    ike_sa_ciphers,
    psk_auth,
    signed_octets,
    skeyseed,
)
from ike.dh import KeyExchange, new_key_exchange
from ike.errors import IkeCryptoError, IkeError, IkeIntegrityError, IkeParseError
from ike.message import Message, decode_message, decrypt_message, encode_message, encrypt_message
from ike.payloads import (
    AuthPayload,
    IdiPayload,
    IdPayload,
    IdrPayload,
    KePayload,
    NoncePayload,
    NotifyPayload,
    Payload,
    SaPayload,
    TrafficSelector,
    TsiPayload,
    TsPayload,
    TsrPayload,
)
from ike.proposals import ProposalSpec, check_response, sa_payload, select_proposal
from ike.transforms import TransformSet

Address = tuple[str, int]
NONCE_BYTES = 32
_MAX_INIT_RETRIES = 3  # INVALID_KE_PAYLOAD / COOKIE restarts before giving up


@dataclass(slots=True)
class IkeConfig:
    local_id: tuple[int, bytes]  # (IdType, identification data)
    psk: bytes = field(repr=False)
    ike_proposals: list[ProposalSpec]
    esp_proposals: list[ProposalSpec]
    local_ts: list[TrafficSelector]
    remote_ts: list[TrafficSelector]
    remote_id: tuple[int, bytes] | None = None  # None: accept any identity that knows the PSK
    transport_mode: bool = False
    retransmit_timeout: float = 2.0
    retransmit_tries: int = 5


# --- Events -------------------------------------------------------------------------------


@dataclass(slots=True)
class IkeSaEstablished:
    spi_i: bytes
    spi_r: bytes
    transforms: TransformSet
    remote_id: tuple[int, bytes]
    local_behind_nat: bool
    remote_behind_nat: bool


@dataclass(slots=True)
class ChildSaEstablished:
    inbound_spi: bytes
    outbound_spi: bytes
    transforms: TransformSet
    local_ts: list[TrafficSelector]
    remote_ts: list[TrafficSelector]
    transport_mode: bool
    encr_in: bytes = field(repr=False)
    integ_in: bytes = field(repr=False)
    encr_out: bytes = field(repr=False)
    integ_out: bytes = field(repr=False)


@dataclass(slots=True)
class IkeSaFailed:
    reason: str
    notify: int | None = None  # the error notify sent or received, if any


Event = IkeSaEstablished | ChildSaEstablished | IkeSaFailed


class State(enum.Enum):
    IDLE = "idle"
    INIT_SENT = "init-sent"  # initiator waits for the IKE_SA_INIT response
    INIT_DONE = "init-done"  # responder waits for IKE_AUTH
    AUTH_SENT = "auth-sent"  # initiator waits for the IKE_AUTH response
    ESTABLISHED = "established"
    FAILED = "failed"


# --- Helpers ------------------------------------------------------------------------------


def _nat_hash(spi_i: bytes, spi_r: bytes, addr: Address) -> bytes:
    ip = ipaddress.ip_address(addr[0]).packed
    return hashlib.sha1(spi_i + spi_r + ip + struct.pack("!H", addr[1])).digest()


def _narrow(offered: list, configured: list[TrafficSelector]) -> list[TrafficSelector]:
    """Intersections of the peer's selectors with ours (RFC 7296 2.9), ours in order."""
    out: list[TrafficSelector] = []
    for mine in configured:
        for theirs in offered:
            if not isinstance(theirs, TrafficSelector):
                continue
            if mine.start_addr.version != theirs.start_addr.version:
                continue
            if 0 not in (mine.ip_protocol, theirs.ip_protocol) and \
                    mine.ip_protocol != theirs.ip_protocol:
                continue
            start = max(int(mine.start_addr), int(theirs.start_addr))
            end = min(int(mine.end_addr), int(theirs.end_addr))
            sport = max(mine.start_port, theirs.start_port)
            eport = min(mine.end_port, theirs.end_port)
            if start <= end and sport <= eport:
                make = type(mine.start_addr)
                proto = mine.ip_protocol or theirs.ip_protocol
                out.append(TrafficSelector(make(start), make(end), proto, sport, eport))
    return out


class _Fail(Exception):
    """Internal: abort the exchange, optionally answering with an error notify."""

    def __init__(self, reason: str, notify: int | None = None, data: bytes = b"") -> None:
        super().__init__(reason)
        self.notify = notify
        self.data = data


# --- The IKE SA -------------------------------------------------------------------------------


class IkeSa:
    def __init__(self, config: IkeConfig, *, initiator: bool, local_addr: Address,
                 remote_addr: Address, child_spi: bytes,
                 random: Callable[[int], bytes] = os.urandom) -> None:
        if len(child_spi) != 4:
            raise ValueError("child_spi must be the 4-byte inbound ESP SPI")
        self.config = config
        self.initiator = initiator
        self.local_addr = local_addr
        self.remote_addr = remote_addr
        self.state = State.IDLE
        self._random = random
        self._child_spi = child_spi
        self.spi_i = random(8) if initiator else bytes(8)
        self.spi_r = bytes(8)
        self._events: deque[Event] = deque()
        self._outbox: list[tuple[bytes, Address]] = []
        # Request in flight (initiator) and last response (responder, for retransmits).
        self._request: bytes | None = None
        self._request_id = -1
        self._sent_at = 0.0
        self._tries = 0
        self._last_response: tuple[int, bytes] | None = None
        self._expected_id = 0
        # Negotiation state.
        self._kex: KeyExchange | None = None
        self._dh_group = config.ike_proposals[0].dh[0]
        self._cookie: bytes | None = None
        self._init_retries = 0
        self._nonce = b""
        self._peer_nonce = b""
        self._init_msg = b""  # our IKE_SA_INIT message, signed in AUTH
        self._peer_init_msg = b""
        self._suite: TransformSet | None = None
        self._prf: Prf | None = None
        self._keys: IkeSaKeys | None = None
        self._out: SkProtection | None = None
        self._in: SkProtection | None = None
        self.local_behind_nat = False
        self.remote_behind_nat = False
        self.drops = 0  # datagrams ignored: malformed, unexpected, failed ICV

    # -- public API ------------------------------------------------------------------------

    def initiate(self, now: float) -> None:
        if not self.initiator or self.state is not State.IDLE:
            raise RuntimeError("initiate() is for a fresh initiator")
        self._send_sa_init(now)

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        if self.state is State.FAILED:
            return
        try:
            msg = decode_message(data)
        except IkeParseError:
            self.drops += 1  # unauthenticated garbage: never answered (RFC 7296 2.21.1)
            return
        bound = self.initiator or self.state is not State.IDLE  # responder learns SPIi first
        if bound and msg.spi_i != self.spi_i:
            self.drops += 1
            return
        try:
            if msg.is_response:
                self._on_response(msg, now)
            else:
                self._on_request(msg, addr, now)
        except _Fail as fail:
            self._fail(str(fail), fail.notify)
        except IkeIntegrityError:
            self.drops += 1
        except IkeError as exc:
            self._fail(str(exc), int(exc.notify))

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        out, self._outbox = self._outbox, []
        return out

    def get_timer(self) -> float | None:
        if self._request is None or self.state in (State.FAILED, State.ESTABLISHED):
            return None
        return self._sent_at + self.config.retransmit_timeout * (2 ** (self._tries - 1))

    def handle_timer(self, now: float) -> None:
        deadline = self.get_timer()
        if deadline is None or now < deadline or self._request is None:
            return
        if self._tries >= self.config.retransmit_tries:
            self._fail(f"no response after {self._tries} transmissions")
            return
        self._tries += 1
        self._sent_at = now
        self._outbox.append((self._request, self.remote_addr))

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    # -- sending ---------------------------------------------------------------------------

    def _send_request(self, data: bytes, msg_id: int, now: float) -> None:
        self._request, self._request_id = data, msg_id
        self._sent_at, self._tries = now, 1
        self._outbox.append((data, self.remote_addr))

    def _send_response(self, msg_id: int, data: bytes, addr: Address) -> None:
        self._last_response = (msg_id, data)
        self._outbox.append((data, addr))

    def _nat_notifies(self) -> list[Payload]:
        return [
            NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP,
                          _nat_hash(self.spi_i, self.spi_r, self.local_addr)),
            NotifyPayload(NotifyType.NAT_DETECTION_DESTINATION_IP,
                          _nat_hash(self.spi_i, self.spi_r, self.remote_addr)),
        ]

    def _check_nat(self, msg: Message) -> None:
        # Hashes cover the SPIs as they appear in that message's header (RFC 7296 2.23).
        src = [n.data for n in msg.notifies()
               if n.notify_type == NotifyType.NAT_DETECTION_SOURCE_IP]
        dst = msg.notify(NotifyType.NAT_DETECTION_DESTINATION_IP)
        if src:
            self.remote_behind_nat = _nat_hash(msg.spi_i, msg.spi_r,
                                               self.remote_addr) not in src
        if dst is not None:
            self.local_behind_nat = dst.data != _nat_hash(msg.spi_i, msg.spi_r,
                                                          self.local_addr)

    def _send_sa_init(self, now: float) -> None:
        self._kex = new_key_exchange(self._dh_group)
        self._nonce = self._random(NONCE_BYTES)
        payloads: list[Payload] = []
        if self._cookie is not None:
            payloads.append(NotifyPayload(NotifyType.COOKIE, self._cookie))
        payloads += [sa_payload(self.config.ike_proposals),
                     KePayload(self._dh_group, self._kex.public_value()),
                     NoncePayload(self._nonce), *self._nat_notifies()]
        msg = Message(ExchangeType.IKE_SA_INIT, 0, self.spi_i, bytes(8), HeaderFlag.INITIATOR,
                      payloads)
        self._init_msg = encode_message(msg)
        self.state = State.INIT_SENT
        self._send_request(self._init_msg, 0, now)

    def _encrypted(self, exchange: int, msg_id: int, response: bool,
                   inner: list[Payload]) -> bytes:
        assert self._out is not None
        flags = (HeaderFlag.INITIATOR if self.initiator else 0) | \
            (HeaderFlag.RESPONSE if response else 0)
        msg = Message(exchange, msg_id, self.spi_i, self.spi_r, flags)
        return encrypt_message(msg, inner, self._out)

    def _id_payload(self) -> IdPayload:
        kind, data = self.config.local_id
        return IdiPayload(kind, data) if self.initiator else IdrPayload(kind, data)

    def _my_auth(self, id_payload: IdPayload) -> AuthPayload:
        assert self._prf is not None and self._keys is not None
        sk_p = self._keys.sk_pi if self.initiator else self._keys.sk_pr
        octets = signed_octets(self._prf, self._init_msg, self._peer_nonce, sk_p,
                               id_payload.body)
        return AuthPayload(AuthMethod.SHARED_KEY_MIC, psk_auth(self._prf, self.config.psk,
                                                               octets))

    def _verify_peer_auth(self, id_payload: IdPayload, auth: AuthPayload | None) -> None:
        assert self._prf is not None and self._keys is not None
        if auth is None or auth.kind != AuthMethod.SHARED_KEY_MIC:
            raise _Fail("peer AUTH missing or not PSK", NotifyType.AUTHENTICATION_FAILED)
        sk_p = self._keys.sk_pr if self.initiator else self._keys.sk_pi
        octets = signed_octets(self._prf, self._peer_init_msg, self._nonce, sk_p,
                               id_payload.body)
        if not auth_matches(psk_auth(self._prf, self.config.psk, octets), auth.data):
            raise _Fail("peer AUTH does not verify", NotifyType.AUTHENTICATION_FAILED)
        expected = self.config.remote_id
        if expected is not None and (id_payload.kind, id_payload.data) != expected:
            raise _Fail("peer identity does not match the configuration",
                        NotifyType.AUTHENTICATION_FAILED)

    def _derive(self, suite: TransformSet, shared: bytes) -> None:
        ni, nr = (self._nonce, self._peer_nonce) if self.initiator else \
            (self._peer_nonce, self._nonce)
        self._suite = suite
        self._prf = Prf.for_id(suite.prf_alg.id)
        seed = skeyseed(self._prf, ni, nr, shared)
        self._keys = derive_ike_keys(suite, seed, ni, nr, self.spi_i, self.spi_r)
        self._out, self._in = ike_sa_ciphers(suite, self._keys, self.initiator)

    def _child_established(self, suite: TransformSet, peer_spi: bytes,
                           ts_local: list[TrafficSelector], ts_remote: list[TrafficSelector],
                           transport: bool) -> ChildSaEstablished:
        assert self._prf is not None and self._keys is not None
        ni, nr = (self._nonce, self._peer_nonce) if self.initiator else \
            (self._peer_nonce, self._nonce)
        keys: ChildSaKeys = derive_child_keys(self._prf, self._keys.sk_d, suite, ni, nr)
        if self.initiator:
            enc_out, int_out, enc_in, int_in = keys.encr_i, keys.integ_i, keys.encr_r, \
                keys.integ_r
        else:
            enc_out, int_out, enc_in, int_in = keys.encr_r, keys.integ_r, keys.encr_i, \
                keys.integ_i
        return ChildSaEstablished(self._child_spi, peer_spi, suite, ts_local, ts_remote,
                                  transport, enc_in, int_in, enc_out, int_out)

    def _established(self, remote_id: tuple[int, bytes]) -> None:
        assert self._suite is not None
        self.state = State.ESTABLISHED
        self._request = None
        self._events.append(IkeSaEstablished(self.spi_i, self.spi_r, self._suite, remote_id,
                                             self.local_behind_nat, self.remote_behind_nat))

    def _fail(self, reason: str, notify: int | None = None) -> None:
        self.state = State.FAILED
        self._request = None
        self._events.append(IkeSaFailed(reason, notify))

    # -- responder -------------------------------------------------------------------------

    def _on_request(self, msg: Message, addr: Address, now: float) -> None:
        if self.initiator:
            self.drops += 1  # requests on an unestablished initiator SA: not handled yet
            return
        if self._last_response is not None and msg.message_id == self._last_response[0]:
            self._outbox.append((self._last_response[1], addr))  # retransmitted request
            return
        if msg.message_id != self._expected_id:
            self.drops += 1
            return
        if self.state is State.IDLE and msg.exchange == ExchangeType.IKE_SA_INIT:
            self._on_sa_init_request(msg, addr)
        elif self.state is State.INIT_DONE and msg.exchange == ExchangeType.IKE_AUTH \
                and msg.spi_r == self.spi_r:
            self._on_auth_request(msg, addr)
        else:
            self.drops += 1

    def _init_error(self, msg: Message, addr: Address, notify: int, data: bytes = b"") -> None:
        reply = Message(ExchangeType.IKE_SA_INIT, 0, msg.spi_i, bytes(8), HeaderFlag.RESPONSE,
                        [NotifyPayload(notify, data)])
        self._outbox.append((encode_message(reply), addr))

    def _on_sa_init_request(self, msg: Message, addr: Address) -> None:
        sa, ke, nonce = msg.find(SaPayload), msg.find(KePayload), msg.find(NoncePayload)
        if not (isinstance(sa, SaPayload) and isinstance(ke, KePayload)
                and isinstance(nonce, NoncePayload)) or msg.spi_r != bytes(8):
            self._init_error(msg, addr, NotifyType.INVALID_SYNTAX)
            raise _Fail("IKE_SA_INIT request lacks SA, KE or Nonce", NotifyType.INVALID_SYNTAX)
        chosen = select_proposal(self.config.ike_proposals, sa.proposals)
        if chosen is None:
            self._init_error(msg, addr, NotifyType.NO_PROPOSAL_CHOSEN)
            raise _Fail("no acceptable IKE proposal", NotifyType.NO_PROPOSAL_CHOSEN)
        suite = chosen.transforms
        if ke.group != suite.dh:
            # Stateless: the initiator retries with the group we name (RFC 7296 1.2).
            self._init_error(msg, addr, NotifyType.INVALID_KE_PAYLOAD,
                             struct.pack("!H", suite.dh))
            self.drops += 1
            return
        self.spi_i = msg.spi_i
        self.spi_r = self._random(8)
        self._kex = new_key_exchange(suite.dh)
        try:
            shared = self._kex.shared_secret(ke.data)
        except IkeCryptoError as exc:
            self._init_error(msg, addr, NotifyType.INVALID_SYNTAX)
            raise _Fail(str(exc), NotifyType.INVALID_SYNTAX) from None
        self._peer_nonce = nonce.nonce
        self._nonce = self._random(NONCE_BYTES)
        self._peer_init_msg = msg.raw
        self._check_nat(msg)
        reply = Message(ExchangeType.IKE_SA_INIT, 0, self.spi_i, self.spi_r, HeaderFlag.RESPONSE,
                        [SaPayload([chosen.proposal()]),
                         KePayload(suite.dh, self._kex.public_value()),
                         NoncePayload(self._nonce), *self._nat_notifies()])
        self._init_msg = encode_message(reply)
        self._derive(suite, shared)
        self.state = State.INIT_DONE
        self._expected_id = 1
        self._send_response(0, self._init_msg, addr)

    def _on_auth_request(self, msg: Message, addr: Address) -> None:
        inner = decrypt_message(msg, self._in)  # type: ignore[arg-type]
        ok = Message(ExchangeType.IKE_AUTH, 1, msg.spi_i, msg.spi_r, 0, inner)
        idi, auth = ok.find(IdiPayload), ok.find(AuthPayload)
        sa, tsi, tsr = ok.find(SaPayload), ok.find(TsiPayload), ok.find(TsrPayload)
        try:
            if not isinstance(idi, IdiPayload):
                raise _Fail("IKE_AUTH request without IDi", NotifyType.INVALID_SYNTAX)
            self._verify_peer_auth(idi, auth if isinstance(auth, AuthPayload) else None)
        except _Fail as fail:
            self._send_response(1, self._encrypted(ExchangeType.IKE_AUTH, 1, True, [
                NotifyPayload(fail.notify or NotifyType.AUTHENTICATION_FAILED)]), addr)
            raise
        my_id = self._id_payload()
        reply: list[Payload] = [my_id, self._my_auth(my_id)]
        child = self._responder_child(sa, tsi, tsr, ok, reply)
        self._send_response(1, self._encrypted(ExchangeType.IKE_AUTH, 1, True, reply), addr)
        self._expected_id = 2
        self._established((idi.kind, idi.data))
        if isinstance(child, ChildSaEstablished):
            self._events.append(child)
        else:
            self._events.append(IkeSaFailed(f"Child SA not created: {child.name}", child))

    def _responder_child(self, sa: Payload | None, tsi: Payload | None, tsr: Payload | None,
                         msg: Message, reply: list[Payload]) -> ChildSaEstablished | NotifyType:
        if not (isinstance(sa, SaPayload) and isinstance(tsi, TsPayload)
                and isinstance(tsr, TsPayload)):
            reply.append(NotifyPayload(NotifyType.INVALID_SYNTAX))
            return NotifyType.INVALID_SYNTAX
        chosen = select_proposal(self.config.esp_proposals, sa.proposals, skip_dh=True)
        if chosen is None:
            reply.append(NotifyPayload(NotifyType.NO_PROPOSAL_CHOSEN))
            return NotifyType.NO_PROPOSAL_CHOSEN
        ts_i = _narrow(tsi.selectors, self.config.remote_ts)
        ts_r = _narrow(tsr.selectors, self.config.local_ts)
        if not ts_i or not ts_r:
            reply.append(NotifyPayload(NotifyType.TS_UNACCEPTABLE))
            return NotifyType.TS_UNACCEPTABLE
        transport = self.config.transport_mode and \
            msg.notify(NotifyType.USE_TRANSPORT_MODE) is not None
        if transport:
            reply.append(NotifyPayload(NotifyType.USE_TRANSPORT_MODE))
        reply += [SaPayload([chosen.proposal(self._child_spi)]), TsiPayload(list(ts_i)),
                  TsrPayload(list(ts_r))]
        return self._child_established(chosen.transforms, chosen.spi, ts_r, ts_i, transport)

    # -- initiator -------------------------------------------------------------------------

    def _on_response(self, msg: Message, now: float) -> None:
        if not self.initiator or msg.message_id != self._request_id or self._request is None:
            self.drops += 1
            return
        if self.state is State.INIT_SENT and msg.exchange == ExchangeType.IKE_SA_INIT:
            self._on_sa_init_response(msg, now)
        elif self.state is State.AUTH_SENT and msg.exchange == ExchangeType.IKE_AUTH \
                and msg.spi_r == self.spi_r:
            self._on_auth_response(msg)
        else:
            self.drops += 1

    def _on_sa_init_response(self, msg: Message, now: float) -> None:
        cookie = msg.notify(NotifyType.COOKIE)
        invalid_ke = msg.notify(NotifyType.INVALID_KE_PAYLOAD)
        if cookie is not None or invalid_ke is not None:
            self._init_retries += 1
            if self._init_retries > _MAX_INIT_RETRIES:
                raise _Fail("too many IKE_SA_INIT restarts")
            if cookie is not None:
                self._cookie = cookie.data
            if invalid_ke is not None:
                group = struct.unpack("!H", invalid_ke.data)[0] if len(invalid_ke.data) == 2 \
                    else -1
                if not any(group in spec.dh for spec in self.config.ike_proposals):
                    raise _Fail(f"responder wants DH group {group}, which we do not offer",
                                NotifyType.INVALID_KE_PAYLOAD)
                self._dh_group = group
            self._send_sa_init(now)
            return
        for n in msg.notifies():
            if is_error_notify(n.notify_type):
                raise _Fail(f"IKE_SA_INIT refused: {NotifyType(n.notify_type).name}"
                            if n.notify_type in NotifyType._value2member_map_
                            else f"IKE_SA_INIT refused: {n.notify_type}", n.notify_type)
        sa, ke, nonce = msg.find(SaPayload), msg.find(KePayload), msg.find(NoncePayload)
        if not (isinstance(sa, SaPayload) and isinstance(ke, KePayload)
                and isinstance(nonce, NoncePayload)) or msg.spi_r == bytes(8):
            raise _Fail("IKE_SA_INIT response lacks SA, KE or Nonce", NotifyType.INVALID_SYNTAX)
        chosen = check_response(self.config.ike_proposals, sa)
        if chosen is None or chosen.transforms.dh != ke.group or ke.group != self._dh_group:
            raise _Fail("responder chose a proposal we did not offer",
                        NotifyType.NO_PROPOSAL_CHOSEN)
        assert self._kex is not None
        shared = self._kex.shared_secret(ke.data)
        self.spi_r = msg.spi_r
        self._peer_nonce = nonce.nonce
        self._peer_init_msg = msg.raw
        self._check_nat(msg)
        self._derive(chosen.transforms, shared)
        my_id = self._id_payload()
        inner: list[Payload] = [my_id, self._my_auth(my_id)]
        if self.config.transport_mode:
            inner.append(NotifyPayload(NotifyType.USE_TRANSPORT_MODE))
        inner += [sa_payload(self.config.esp_proposals, self._child_spi),
                  TsiPayload(list(self.config.local_ts)), TsrPayload(list(self.config.remote_ts))]
        self.state = State.AUTH_SENT
        self._send_request(self._encrypted(ExchangeType.IKE_AUTH, 1, False, inner), 1, now)

    def _on_auth_response(self, msg: Message) -> None:
        inner = Message(ExchangeType.IKE_AUTH, 1, msg.spi_i, msg.spi_r, 0,
                        decrypt_message(msg, self._in))  # type: ignore[arg-type]
        idr, auth = inner.find(IdrPayload), inner.find(AuthPayload)
        if not isinstance(idr, IdrPayload):
            errors = [n.notify_type for n in inner.notifies() if is_error_notify(n.notify_type)]
            raise _Fail("IKE_AUTH refused", errors[0] if errors else NotifyType.INVALID_SYNTAX)
        self._verify_peer_auth(idr, auth if isinstance(auth, AuthPayload) else None)
        self._established((idr.kind, idr.data))
        errors = [n.notify_type for n in inner.notifies() if is_error_notify(n.notify_type)]
        sa, tsi, tsr = inner.find(SaPayload), inner.find(TsiPayload), inner.find(TsrPayload)
        if errors or not (isinstance(sa, SaPayload) and isinstance(tsi, TsPayload)
                          and isinstance(tsr, TsPayload)):
            code = errors[0] if errors else NotifyType.INVALID_SYNTAX
            self._events.append(IkeSaFailed("Child SA not created", code))
            return
        chosen = check_response(self.config.esp_proposals, sa, skip_dh=True)
        ts_i = _narrow(tsi.selectors, self.config.local_ts)
        ts_r = _narrow(tsr.selectors, self.config.remote_ts)
        if chosen is None or len(chosen.spi) != 4 or not ts_i or not ts_r:
            self._events.append(IkeSaFailed("Child SA reply unacceptable",
                                            NotifyType.NO_PROPOSAL_CHOSEN))
            return
        transport = self.config.transport_mode and \
            inner.notify(NotifyType.USE_TRANSPORT_MODE) is not None
        self._events.append(self._child_established(chosen.transforms, chosen.spi, ts_i, ts_r,
                                                    transport))

