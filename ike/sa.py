"""Sans-IO IKE SA (RFC 7296): one `IkeSa` object per IKE SA, in the style of aioquic.

The caller feeds it datagrams and the current time, and collects datagrams to send, a timer
deadline and events (`ike.events`). No sockets, no clock, no sleeping. This module holds the
public API and IKE_SA_INIT + IKE_AUTH with a pre-shared key; CREATE_CHILD_SA lives in
`ike.child_exchange`, INFORMATIONAL in `ike.informational`, the message-ID windows,
retransmission and timers in `ike.core`.

Daemon requests: `create_child`, `rekey_child(spi)`, `rekey_ike`, `delete_child(spi)`,
`delete`, `check_liveness` (call it every dpd_delay). Each queues an exchange; with a window
of one, exchanges run one after the other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
from collections.abc import Callable

from ike.addresses import ip_literal
from ike.child_exchange import NONCE_BYTES, ChildExchanges, ChildRequest
from ike.config import IkeConfig
from ike.constants import (
    AuthMethod,
    ExchangeType,
    HeaderFlag,
    NotifyType,
    enum_name,
    is_error_notify,
)
from ike.core import TERMINAL, Address, ChildSa, ChildState, Fail, State
from ike.crypto import (
    Prf,
    auth_matches,
    psk_auth,
    rekeyed_skeyseed,
    signed_octets,
    skeyseed,
)
from ike.dh import new_key_exchange
from ike.errors import IkeCryptoError, IkeError, IkeParseError
from ike.events import (
    ChildSaEstablished,
    ChildSaFailed,
    Event,
    IkeSaEstablished,
    IkeSaFailed,
    InitialContact,
)
from ike.message import IkeHeader, Message, decode_message, encode_message
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
    TsiPayload,
    TsPayload,
    TsrPayload,
)
from ike.proposals import ProposalSpec, check_response, sa_payload, select_proposal
from ike.selectors import narrow
from ike.transforms import TransformSet

__all__ = [
    "Address", "ChildSa", "ChildSaEstablished", "ChildState", "IkeConfig", "IkeSa", "PeerConfig",
    "IkeSaEstablished", "IkeSaFailed", "State",
]

_MAX_INIT_RETRIES = 3  # INVALID_KE_PAYLOAD / COOKIE restarts before giving up
# (IDi, IDr or None) -> the responder's configuration for that peer, or None: no such peer.
PeerConfig = Callable[[tuple[int, bytes], tuple[int, bytes] | None], IkeConfig | None]
_PROTECTED = (State.ESTABLISHED, State.REKEYED, State.DELETING)


def _nat_hash(spi_i: bytes, spi_r: bytes, addr: Address) -> bytes:
    ip = ip_literal(addr[0]).packed
    return hashlib.sha1(spi_i + spi_r + ip + struct.pack("!H", addr[1])).digest()


def _without_dh(specs: list[ProposalSpec]) -> list[ProposalSpec]:
    """IKE_AUTH carries no KE, so its Child SA proposals name no DH group (RFC 7296 1.2)."""
    return [dataclasses.replace(s, dh=()) for s in specs]


class IkeSa(ChildExchanges):
    def __init__(self, config: IkeConfig, *, initiator: bool, local_addr: Address,
                 remote_addr: Address, child_spi: bytes,
                 random: Callable[[int], bytes] = os.urandom,
                 spi_allocator: Callable[[], bytes | None] | None = None,
                 peer_config: PeerConfig | None = None) -> None:
        """`child_spi` is our inbound ESP SPI for the first Child SA, or b"": then it is taken
        from the allocator when the exchange that carries that SA is built (the initiator's
        IKE_AUTH, the responder's answer to it), as strongSwan gets its SPI from the kernel
        only once IKE_SA_INIT is done; `spi_allocator` gives
        the inbound SPIs of later ones (default: random; e.g. plug in a GETSPI pool, and return
        None when it is empty: requests then fail with TEMPORARY_FAILURE / ChildSaFailed).

        `peer_config` (responder): called in IKE_AUTH, before the peer's AUTH is checked, with
        the peer's identity (IDi) and the one it wants us to have (IDr, or None); it returns
        the configuration for that peer (its PSK, our identity, selectors, ESP proposals), as
        strongSwan picks its peer config by identity, or None to refuse the peer. Without it,
        `config` (chosen by address for IKE_SA_INIT) stays."""
        if child_spi and len(child_spi) != 4:
            raise ValueError("child_spi must be the 4-byte inbound ESP SPI or b\"\"")
        self._init_core(config, initiator, local_addr, remote_addr, random, spi_allocator)
        self._first_child_spi = child_spi
        self._peer_config = peer_config
        if initiator:
            self.spi_i = random(8)

    # -- public API --------------------------------------------------------------------------

    def initiate(self, now: float) -> None:
        if not self.initiator or self.state is not State.IDLE:
            raise RuntimeError("initiate() is for a fresh initiator")
        self._send_sa_init(now)

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        """Feed one IKE datagram (without the non-ESP marker). Never raises on bad input:
        it is answered as the RFC asks or dropped and counted in `drops`."""
        if self.state in TERMINAL:
            self.drops += 1
            return
        try:
            msg = decode_message(data)
        except IkeParseError as exc:
            self.drops += 1  # unauthenticated garbage is never answered (2.21.1) ...
            self._answer_bad_init(exc, addr)  # ... except a critical payload in a new INIT
            return
        try:
            self._dispatch(msg, addr, now)
        except Fail as fail:
            self._fail(str(fail), fail.notify)
        except IkeError as exc:
            self._fail(str(exc), int(exc.notify))

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        out, self._outbox = self._outbox, []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    # -- dispatch ----------------------------------------------------------------------------

    def _dispatch(self, msg: Message, addr: Address, now: float) -> None:
        if msg.is_initiator == self.initiator:
            self.drops += 1  # our own message reflected, or a confused peer
            return
        if self.state is State.IDLE:
            if self.initiator or msg.is_response or msg.exchange != ExchangeType.IKE_SA_INIT \
                    or msg.message_id != 0:
                self.drops += 1
                return
            self._on_sa_init_request(msg, addr)
            return
        if msg.spi_i != self.spi_i:
            self.drops += 1
            return
        if msg.exchange == ExchangeType.IKE_SA_INIT:
            if msg.is_response and self.state is State.INIT_SENT and msg.message_id == 0:
                self._on_sa_init_response(msg, now)
            elif msg.is_response or not self._is_retransmit(msg, addr):
                self.drops += 1
            return
        if msg.spi_r != self.spi_r:
            self.drops += 1
        elif msg.is_response:
            self._on_protected_response(msg, now)
        else:
            self._on_protected_request(msg, addr, now)

    def _on_protected_request(self, msg: Message, addr: Address, now: float) -> None:
        if self._is_retransmit(msg, addr):
            return
        allowed = (msg.exchange == ExchangeType.IKE_AUTH and self.state is State.INIT_DONE) \
            or (msg.exchange in (ExchangeType.CREATE_CHILD_SA, ExchangeType.INFORMATIONAL)
                and self.state in _PROTECTED)
        if msg.message_id != self._peer_next_id or not allowed:
            self.drops += 1
            return
        opened = self._open(msg)
        if opened is None:
            return
        self._peer_next_id += 1
        failure: IkeParseError | None = None
        if isinstance(opened, IkeParseError):
            # Authentic but malformed: answer with the error, inside SK (2.21.2, 2.21.3).
            reply = self._error_reply(opened)
            failure = opened if msg.exchange == ExchangeType.IKE_AUTH else None
        else:
            req = Message(msg.exchange, msg.message_id, msg.spi_i, msg.spi_r, msg.flags,
                          opened)
            if msg.exchange == ExchangeType.IKE_AUTH:
                reply = self._on_auth_request(req)
            elif msg.exchange == ExchangeType.CREATE_CHILD_SA:
                reply = self._on_create_child_request(req, now)
            else:
                reply = self._on_informational_request(req, now)
        self._send_response(msg, self._encrypted(msg.exchange, msg.message_id, True, reply),
                            addr)
        if failure is not None:
            self._fail(f"IKE_AUTH request malformed: {failure}", int(failure.notify))
        self._kick(now)

    def _on_protected_response(self, msg: Message, now: float) -> None:
        req = self._pending
        if req is None or msg.message_id != req.message_id or msg.exchange != req.exchange:
            self.drops += 1
            return
        opened = self._open(msg)
        if opened is None:
            return
        self._pending = None
        if isinstance(opened, IkeParseError):
            self._fail(f"malformed response to {req.kind}: {opened}", NotifyType.INVALID_SYNTAX)
            return
        assert req.on_response is not None
        req.on_response(msg, opened, now)
        self._kick(now)

    def _answer_bad_init(self, exc: IkeParseError, addr: Address) -> None:
        """A new IKE_SA_INIT with a critical payload we lack gets the notify (2.21.1)."""
        header = exc.header
        if self.initiator or self.state is not State.IDLE or \
                exc.notify != NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD or header is None:
            return
        if not isinstance(header, IkeHeader) or header.exchange != ExchangeType.IKE_SA_INIT \
                or header.is_response or header.message_id != 0:
            return
        reply = Message(ExchangeType.IKE_SA_INIT, 0, header.spi_i, bytes(8), HeaderFlag.RESPONSE,
                        [NotifyPayload(exc.notify, exc.notify_data)])
        self._outbox.append((encode_message(reply), addr))

    def _start(self, kind: str, arg: object, now: float) -> None:
        if kind == "create-child" and isinstance(arg, ChildRequest):
            self._start_child(arg, now)
        elif kind == "rekey-child" and isinstance(arg, bytes):
            self._start_child_rekey(arg, now)
        elif kind == "rekey-ike":
            self._start_ike_rekey(now)
        elif kind == "delete-child" and isinstance(arg, bytes):
            self._start_delete_child(arg, now)
        elif kind == "delete-spis" and isinstance(arg, list):
            self._start_delete_spis(arg, now)
        elif kind == "notify" and isinstance(arg, NotifyPayload):
            self._start_notify(arg, now)
        elif kind == "delete-ike":
            self._start_delete_ike(now, rekeyed=bool(arg))
        else:
            raise AssertionError(f"unknown task {kind}")

    # -- helpers shared by both roles --------------------------------------------------------

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

    def _verify_peer_auth(self, id_payload: IdPayload, auth: Payload | None) -> None:
        assert self._prf is not None and self._keys is not None
        if not isinstance(auth, AuthPayload) or auth.kind != AuthMethod.SHARED_KEY_MIC:
            raise Fail("peer AUTH missing or not PSK", NotifyType.AUTHENTICATION_FAILED)
        sk_p = self._keys.sk_pr if self.initiator else self._keys.sk_pi
        octets = signed_octets(self._prf, self._peer_init_msg, self._nonce, sk_p,
                               id_payload.body)
        if not auth_matches(psk_auth(self._prf, self.config.psk, octets), auth.data):
            raise Fail("peer AUTH does not verify", NotifyType.AUTHENTICATION_FAILED)
        expected = self.config.remote_id
        if expected is not None and (id_payload.kind, id_payload.data) != expected:
            raise Fail("peer identity does not match the configuration",
                       NotifyType.AUTHENTICATION_FAILED)

    def _derive(self, suite: TransformSet, shared: bytes) -> None:
        ni, nr = (self._nonce, self._peer_nonce) if self.initiator else \
            (self._peer_nonce, self._nonce)
        prf = Prf.for_id(suite.prf_alg.id)
        self._install_keys(suite, skeyseed(prf, ni, nr, shared), ni, nr)

    def _established(self, remote_id: tuple[int, bytes]) -> None:
        assert self._suite is not None
        self.state = State.ESTABLISHED
        self.remote_id = remote_id
        self._emit(IkeSaEstablished(self.spi_i, self.spi_r, self._suite, remote_id,
                                    self.local_behind_nat, self.remote_behind_nat))
        self._init_msg = self._peer_init_msg = b""  # no longer needed
        self._kex = None

    def _successor(self, initiator: bool, spi_i: bytes, spi_r: bytes, suite: TransformSet,
                   shared: bytes, ni: bytes, nr: bytes) -> IkeSa:
        assert self._prf is not None and self._keys is not None
        seed = rekeyed_skeyseed(self._prf, self._keys.sk_d, shared, ni, nr)
        new = IkeSa.__new__(IkeSa)
        new._init_core(self.config, initiator, self.local_addr, self.remote_addr,
                       self._random, self._allocate_spi)
        new.spi_i, new.spi_r = spi_i, spi_r
        new._install_keys(suite, seed, ni, nr)
        new.state = State.ESTABLISHED
        new.remote_id = self.remote_id
        new.local_behind_nat, new.remote_behind_nat = self.local_behind_nat, \
            self.remote_behind_nat
        return new

    # -- IKE_SA_INIT -------------------------------------------------------------------------

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
        self._pending = None
        self._next_id = 0
        self._send_request(ExchangeType.IKE_SA_INIT, self._init_msg, now, "IKE_SA_INIT", None)

    def _init_error(self, msg: Message, addr: Address, notify: int, data: bytes = b"") -> None:
        reply = Message(ExchangeType.IKE_SA_INIT, 0, msg.spi_i, bytes(8), HeaderFlag.RESPONSE,
                        [NotifyPayload(notify, data)])
        self._outbox.append((encode_message(reply), addr))

    def _on_sa_init_request(self, msg: Message, addr: Address) -> None:
        sa, ke, nonce = msg.find(SaPayload), msg.find(KePayload), msg.find(NoncePayload)
        if not (isinstance(sa, SaPayload) and isinstance(ke, KePayload)
                and isinstance(nonce, NoncePayload)) or msg.spi_r != bytes(8):
            self._init_error(msg, addr, NotifyType.INVALID_SYNTAX)
            raise Fail("IKE_SA_INIT request lacks SA, KE or Nonce", NotifyType.INVALID_SYNTAX)
        chosen = select_proposal(self.config.ike_proposals, sa.proposals)
        if chosen is None:
            self._init_error(msg, addr, NotifyType.NO_PROPOSAL_CHOSEN)
            raise Fail("no acceptable IKE proposal", NotifyType.NO_PROPOSAL_CHOSEN)
        suite = chosen.transforms
        if ke.group != suite.dh:
            # Stateless: the initiator retries with the group we name (RFC 7296 1.2).
            self._init_error(msg, addr, NotifyType.INVALID_KE_PAYLOAD,
                             struct.pack("!H", suite.dh))
            self.drops += 1
            return
        kex = new_key_exchange(suite.dh)
        try:
            shared = kex.shared_secret(ke.data)
        except IkeCryptoError as exc:
            self._init_error(msg, addr, NotifyType.INVALID_SYNTAX)
            raise Fail(str(exc), NotifyType.INVALID_SYNTAX) from None
        self._kex = kex
        self.spi_i = msg.spi_i
        self.spi_r = self._random(8)
        self._peer_nonce = nonce.nonce
        self._nonce = self._random(NONCE_BYTES)
        self._peer_init_msg = msg.raw
        self._check_nat(msg)
        reply = Message(ExchangeType.IKE_SA_INIT, 0, self.spi_i, self.spi_r, HeaderFlag.RESPONSE,
                        [SaPayload([chosen.proposal()]),
                         KePayload(suite.dh, kex.public_value()),
                         NoncePayload(self._nonce), *self._nat_notifies()])
        self._init_msg = encode_message(reply)
        self._derive(suite, shared)
        self.state = State.INIT_DONE
        self._peer_next_id = 1
        self._send_response(msg, self._init_msg, addr)

    @property
    def awaiting_child_spi(self) -> bool:
        """An initiator whose IKE_SA_INIT answer will make it take the first Child SA's SPI."""
        return self.initiator and self.state is State.INIT_SENT and not self._first_child_spi

    def _on_sa_init_response(self, msg: Message, now: float) -> None:
        sa = msg.find(SaPayload)
        if not isinstance(sa, SaPayload):
            # Only a notify-only answer is an error answer; anything else is noise.
            self._on_sa_init_refusal(msg, now)
            return
        ke, nonce = msg.find(KePayload), msg.find(NoncePayload)
        if not (isinstance(ke, KePayload) and isinstance(nonce, NoncePayload)) \
                or msg.spi_r == bytes(8):
            raise Fail("IKE_SA_INIT response lacks SA, KE or Nonce", NotifyType.INVALID_SYNTAX)
        chosen = check_response(self.config.ike_proposals, sa)
        if chosen is None or chosen.transforms.dh != ke.group or ke.group != self._dh_group:
            raise Fail("responder chose a proposal we did not offer",
                       NotifyType.NO_PROPOSAL_CHOSEN)
        assert self._kex is not None
        shared = self._kex.shared_secret(ke.data)
        self._pending = None
        self.spi_r = msg.spi_r
        self._peer_nonce = nonce.nonce
        self._peer_init_msg = msg.raw
        self._check_nat(msg)
        self._derive(chosen.transforms, shared)
        if not self._first_child_spi:
            spi = self._new_spi()
            if spi is None:
                raise Fail("no inbound SPI for the first Child SA")
            self._first_child_spi = spi
        my_id = self._id_payload()
        inner: list[Payload] = [my_id, self._my_auth(my_id)]
        if self.config.initial_contact:
            inner.append(NotifyPayload(NotifyType.INITIAL_CONTACT))
        if self.config.transport_mode:
            inner.append(NotifyPayload(NotifyType.USE_TRANSPORT_MODE))
        inner += [sa_payload(_without_dh(self.config.esp_proposals), self._first_child_spi),
                  TsiPayload(list(self.config.local_ts)), TsrPayload(list(self.config.remote_ts))]
        self.state = State.AUTH_SENT
        self._request(ExchangeType.IKE_AUTH, inner, now, "IKE_AUTH", self._on_auth_response)

    def _on_sa_init_refusal(self, msg: Message, now: float) -> None:
        notifies = msg.notifies()
        cookie = msg.notify(NotifyType.COOKIE)
        invalid_ke = msg.notify(NotifyType.INVALID_KE_PAYLOAD)
        if cookie is not None or invalid_ke is not None:
            self._init_retries += 1
            if self._init_retries > _MAX_INIT_RETRIES:
                raise Fail("too many IKE_SA_INIT restarts")
            if cookie is not None:
                self._cookie = cookie.data
            if invalid_ke is not None:
                group = struct.unpack("!H", invalid_ke.data)[0] if len(invalid_ke.data) == 2 \
                    else -1
                if not any(group in spec.dh for spec in self.config.ike_proposals):
                    raise Fail(f"responder wants DH group {group}, which we do not offer",
                               NotifyType.INVALID_KE_PAYLOAD)
                self._dh_group = group
            self._send_sa_init(now)
            return
        errors = [n.notify_type for n in notifies if is_error_notify(n.notify_type)]
        if errors:
            raise Fail(f"IKE_SA_INIT refused: {enum_name(NotifyType, errors[0])}", errors[0])
        self.drops += 1

    # -- IKE_AUTH ----------------------------------------------------------------------------

    def _on_auth_request(self, req: Message) -> list[Payload]:
        idi, auth = req.find(IdiPayload), req.find(AuthPayload)
        try:
            if not isinstance(idi, IdiPayload):
                raise Fail("IKE_AUTH request without IDi", NotifyType.INVALID_SYNTAX)
            if self._peer_config is not None:
                idr = req.find(IdrPayload)
                config = self._peer_config(
                    (idi.kind, idi.data), (idr.kind, idr.data) if isinstance(idr, IdPayload)
                    else None)
                if config is None:
                    raise Fail("no connection for the peer's identity",
                               NotifyType.AUTHENTICATION_FAILED)
                self.config = config
            self._verify_peer_auth(idi, auth)
        except Fail as fail:
            self._fail(str(fail), fail.notify)
            return [NotifyPayload(fail.notify or NotifyType.AUTHENTICATION_FAILED)]
        my_id = self._id_payload()
        reply: list[Payload] = [my_id, self._my_auth(my_id)]
        self._established((idi.kind, idi.data))
        if req.notify(NotifyType.INITIAL_CONTACT) is not None:
            self._emit(InitialContact((idi.kind, idi.data), self.spi_i, self.spi_r))
        try:
            chosen, ts_i, ts_r, transport = self._select_child(req, in_auth=True)
        except Fail as fail:
            code = fail.notify or NotifyType.INVALID_SYNTAX
            self._emit(ChildSaFailed(f"Child SA not created: {fail}", code))
            return [*reply, NotifyPayload(code)]
        if not self._first_child_spi:
            spi = self._new_spi()
            if spi is None:
                self._emit(ChildSaFailed("Child SA not created: no inbound SPI",
                                         NotifyType.TEMPORARY_FAILURE))
                return [*reply, NotifyPayload(NotifyType.TEMPORARY_FAILURE)]
            self._first_child_spi = spi
        if transport:
            reply.append(NotifyPayload(NotifyType.USE_TRANSPORT_MODE))
        reply += [SaPayload([chosen.proposal(self._first_child_spi)]), TsiPayload(list(ts_i)),
                  TsrPayload(list(ts_r))]
        self._install_child(chosen.transforms, self._peer_nonce, self._nonce, None, False,
                            self._first_child_spi, chosen.spi, ts_r, ts_i, transport, None)
        return reply

    def _on_auth_response(self, msg: Message, inner_payloads: list[Payload],
                          now: float) -> None:
        inner = Message(msg.exchange, msg.message_id, msg.spi_i, msg.spi_r, msg.flags,
                        inner_payloads)
        idr, auth = inner.find(IdrPayload), inner.find(AuthPayload)
        errors = [n.notify_type for n in inner.notifies() if is_error_notify(n.notify_type)]
        if not isinstance(idr, IdrPayload):
            raise Fail("IKE_AUTH refused", errors[0] if errors else NotifyType.INVALID_SYNTAX)
        try:
            self._verify_peer_auth(idr, auth)
        except Fail:
            # Tell the responder, which believes the SA is up (2.21.2), then give up.
            self._outbox.append((self._encrypted(
                ExchangeType.INFORMATIONAL, self._next_id, False,
                [NotifyPayload(NotifyType.AUTHENTICATION_FAILED)]), self.remote_addr))
            raise
        self._established((idr.kind, idr.data))
        sa, tsi, tsr = inner.find(SaPayload), inner.find(TsiPayload), inner.find(TsrPayload)
        if errors or not (isinstance(sa, SaPayload) and isinstance(tsi, TsPayload)
                          and isinstance(tsr, TsPayload)):
            code = errors[0] if errors else NotifyType.INVALID_SYNTAX
            self._emit(ChildSaFailed("Child SA not created", code))
            return
        chosen = check_response(_without_dh(self.config.esp_proposals), sa, skip_dh=True)
        ts_i = narrow(tsi.selectors, self.config.local_ts)
        ts_r = narrow(tsr.selectors, self.config.remote_ts)
        if chosen is None or len(chosen.spi) != 4 or not ts_i or not ts_r:
            self._emit(ChildSaFailed("Child SA reply unacceptable",
                                     NotifyType.NO_PROPOSAL_CHOSEN))
            self._queue_delete_spis([self._first_child_spi], now)
            return
        transport = self.config.transport_mode and \
            inner.notify(NotifyType.USE_TRANSPORT_MODE) is not None
        self._install_child(chosen.transforms, self._nonce, self._peer_nonce, None, True,
                            self._first_child_spi, chosen.spi, ts_i, ts_r, transport, None)

