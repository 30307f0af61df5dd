"""CREATE_CHILD_SA in both roles (RFC 7296 1.3): new Child SAs with or without PFS, Child SA
rekeys (make-before-break), IKE SA rekeys (2.18), and rekey collisions (2.8.1, 2.8.2, 2.25).

A collision is settled by nonces: of the two new SAs, the one whose exchange carried the
lowest nonce is redundant and is deleted by the side that initiated that exchange; the side
that initiated the surviving one deletes the old SA. Anything one side leaves for the other to
delete gets a deadline, so a silent peer leaks nothing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ike.constants import DhId, ExchangeType, NotifyType, ProtocolId, enum_name, is_error_notify
from ike.core import ChildSa, ChildState, Fail, State
from ike.crypto import derive_child_keys
from ike.dh import KeyExchange, new_key_exchange
from ike.errors import IkeCryptoError
from ike.events import (
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaFailed,
    IkeRekeyFailed,
    IkeSaRekeyed,
)
from ike.informational import Informational
from ike.message import Message
from ike.payloads import (
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
from ike.proposals import Selection, check_response, sa_payload, select_proposal
from ike.selectors import narrow
from ike.transforms import TransformSet

if TYPE_CHECKING:
    from ike.sa import IkeSa

NONCE_BYTES = 32
MAX_KE_RETRIES = 2  # INVALID_KE_PAYLOAD answers followed per exchange
MAX_SELECTORS = 255  # a TS payload's count octet


def _notify(code: int, data: bytes = b"") -> list[Payload]:
    return [NotifyPayload(code, data)]


def _first_error(msg: Message) -> int | None:
    return next((n.notify_type for n in msg.notifies() if is_error_notify(n.notify_type)),
                None)


def _requested_group(msg: Message) -> int:
    n = msg.notify(NotifyType.INVALID_KE_PAYLOAD)
    return struct.unpack("!H", n.data)[0] if n is not None and len(n.data) == 2 else -1


@dataclass(slots=True)
class ChildRequest:
    """Our CREATE_CHILD_SA request for a Child SA, kept until its response."""

    new_spi: bytes
    local_ts: list[TrafficSelector]
    remote_ts: list[TrafficSelector]
    transport: bool
    rekey_of: bytes | None  # our inbound SPI of the pair being rekeyed
    group: int  # DhId.NONE: no PFS
    nonce: bytes = b""
    kex: KeyExchange | None = None
    ke_retries: int = 0


@dataclass(slots=True)
class IkeRekeyRequest:
    spi: bytes
    group: int
    nonce: bytes = b""
    kex: KeyExchange | None = None
    ke_retries: int = 0


class ChildExchanges(Informational):
    # -- shared by IKE_AUTH and CREATE_CHILD_SA ---------------------------------------------

    def _pfs_group(self) -> int:
        return next((s.dh[0] for s in self.config.esp_proposals if s.dh), DhId.NONE)

    def _child_by_outbound(self, spi: bytes) -> ChildSa | None:
        return next((c for c in self._children.values() if c.outbound_spi == spi), None)

    def _select_child(self, req: Message, in_auth: bool
                      ) -> tuple[Selection, list[TrafficSelector], list[TrafficSelector], bool]:
        """Responder: the chosen proposal, narrowed TSi and TSr, transport mode; or Fail."""
        sa, tsi, tsr = req.find(SaPayload), req.find(TsiPayload), req.find(TsrPayload)
        if not (isinstance(sa, SaPayload) and isinstance(tsi, TsPayload)
                and isinstance(tsr, TsPayload)):
            raise Fail("Child SA request lacks SA, TSi or TSr", NotifyType.INVALID_SYNTAX)
        chosen = select_proposal(self.config.esp_proposals, sa.proposals, skip_dh=in_auth)
        if chosen is None:
            raise Fail("no acceptable ESP proposal", NotifyType.NO_PROPOSAL_CHOSEN)
        ts_i = narrow(tsi.selectors, self.config.remote_ts)
        ts_r = narrow(tsr.selectors, self.config.local_ts)
        if not ts_i or not ts_r or max(len(ts_i), len(ts_r)) > MAX_SELECTORS:
            raise Fail("traffic selectors unacceptable", NotifyType.TS_UNACCEPTABLE)
        transport = self.config.transport_mode and \
            req.notify(NotifyType.USE_TRANSPORT_MODE) is not None
        return chosen, ts_i, ts_r, transport

    def _install_child(self, suite: TransformSet, ni: bytes, nr: bytes, shared: bytes | None,
                       exchange_initiator: bool, inbound: bytes, outbound: bytes,
                       local_ts: list[TrafficSelector], remote_ts: list[TrafficSelector],
                       transport: bool, rekey_of: bytes | None) -> ChildSa:
        """Derive the keys (2.17), remember the pair and announce it."""
        assert self._prf is not None and self._keys is not None
        keys = derive_child_keys(self._prf, self._keys.sk_d, suite, ni, nr, shared)
        if exchange_initiator:
            out_keys, in_keys = (keys.encr_i, keys.integ_i), (keys.encr_r, keys.integ_r)
        else:
            out_keys, in_keys = (keys.encr_r, keys.integ_r), (keys.encr_i, keys.integ_i)
        child = ChildSa(inbound, outbound, suite, list(local_ts), list(remote_ts), transport)
        self._children[inbound] = child
        self._emit(ChildSaEstablished(inbound, outbound, suite, list(local_ts),
                                      list(remote_ts), transport, in_keys[0], in_keys[1],
                                      out_keys[0], out_keys[1], rekey_of, exchange_initiator))
        return child

    # -- initiator: new Child SA and Child SA rekey ------------------------------------------

    def create_child(self, now: float, *, local_ts: list[TrafficSelector] | None = None,
                     remote_ts: list[TrafficSelector] | None = None,
                     transport_mode: bool | None = None) -> None:
        """Queue a CREATE_CHILD_SA for a new Child SA (selectors default to the config)."""
        self._require_established()
        ctx = ChildRequest(b"", list(local_ts or self.config.local_ts),
                           list(remote_ts or self.config.remote_ts),
                           self.config.transport_mode if transport_mode is None
                           else transport_mode, None, self._pfs_group())
        self._enqueue(("create-child", ctx), now)

    def rekey_child(self, inbound_spi: bytes, now: float) -> None:
        """Queue a rekey of the Child SA pair with this inbound (or outbound) SPI."""
        self._require_established()
        self._enqueue(("rekey-child", self._resolve_child(inbound_spi)), now)

    def _require_established(self) -> None:
        if self.state is not State.ESTABLISHED:
            raise RuntimeError(f"{self!r} is not established")

    def _start_child_rekey(self, spi: bytes, now: float) -> None:
        old = self._children.get(spi)
        if old is None or old.state is not ChildState.INSTALLED or \
                self.state is not State.ESTABLISHED:
            return  # deleted, replaced or being deleted meanwhile
        old.state = ChildState.REKEYING
        old.peer_rekey_nonce = old.peer_rekey_spi = None
        ctx = ChildRequest(b"", old.local_ts, old.remote_ts, old.transport_mode, spi,
                           self._pfs_group())
        self._start_child(ctx, now)

    def _start_child(self, ctx: ChildRequest, now: float) -> None:
        if self.state is not State.ESTABLISHED:
            return
        if not ctx.new_spi:
            spi = self._new_spi()
            if spi is None:
                old = self._children.get(ctx.rekey_of) if ctx.rekey_of is not None else None
                if old is not None and old.state is ChildState.REKEYING:
                    old.state = ChildState.INSTALLED
                self._emit(ChildSaFailed("no inbound SPI available", None, ctx.rekey_of))
                return
            ctx.new_spi = spi
        ctx.nonce = self._random(NONCE_BYTES)
        ctx.kex = new_key_exchange(ctx.group) if ctx.group != DhId.NONE else None
        inner: list[Payload] = []
        if ctx.rekey_of is not None:
            inner.append(NotifyPayload(NotifyType.REKEY_SA, b"", ProtocolId.ESP, ctx.rekey_of))
        if ctx.transport:
            inner.append(NotifyPayload(NotifyType.USE_TRANSPORT_MODE))
        inner += [sa_payload(self.config.esp_proposals, ctx.new_spi), NoncePayload(ctx.nonce)]
        if ctx.kex is not None:
            inner.append(KePayload(ctx.group, ctx.kex.public_value()))
        inner += [TsiPayload(list(ctx.local_ts)), TsrPayload(list(ctx.remote_ts))]
        kind = "rekey-child" if ctx.rekey_of is not None else "create-child"
        self._request(ExchangeType.CREATE_CHILD_SA, inner, now, kind,
                      lambda msg, payloads, t: self._on_child_response(ctx, msg, payloads, t))

    def _on_child_response(self, ctx: ChildRequest, msg: Message, inner: list[Payload],
                           now: float) -> None:
        resp = Message(msg.exchange, msg.message_id, msg.spi_i, msg.spi_r, msg.flags, inner)
        error = _first_error(resp)
        if error == NotifyType.INVALID_KE_PAYLOAD and ctx.ke_retries < MAX_KE_RETRIES:
            group = _requested_group(resp)
            if any(group in s.dh for s in self.config.esp_proposals):
                ctx.group, ctx.ke_retries = group, ctx.ke_retries + 1
                self._start_child(ctx, now)
                return
        if error is not None:
            self._child_refused(ctx, error, now)
            return
        try:
            child = self._accept_child_response(ctx, resp)
        except Fail as fail:
            # The responder installed its half: ask it to delete that (RFC 7296 1.3.1 is
            # silent; strongSwan does the same).
            self._queue_delete_spis([ctx.new_spi], now)
            self._child_refused(ctx, fail.notify or NotifyType.NO_PROPOSAL_CHOSEN, now,
                                str(fail))
            return
        if ctx.rekey_of is not None:
            nonce = resp.find(NoncePayload)
            assert isinstance(nonce, NoncePayload)
            self._settle_child_rekey(ctx.rekey_of, child, min(ctx.nonce, nonce.nonce), now)

    def _accept_child_response(self, ctx: ChildRequest, resp: Message) -> ChildSa:
        sa, nonce = resp.find(SaPayload), resp.find(NoncePayload)
        tsi, tsr = resp.find(TsiPayload), resp.find(TsrPayload)
        if not (isinstance(sa, SaPayload) and isinstance(nonce, NoncePayload)
                and isinstance(tsi, TsPayload) and isinstance(tsr, TsPayload)):
            raise Fail("CREATE_CHILD_SA response lacks SA, Nonce, TSi or TSr",
                       NotifyType.INVALID_SYNTAX)
        chosen = check_response(self.config.esp_proposals, sa)
        if chosen is None or len(chosen.spi) != 4:
            raise Fail("responder chose an ESP proposal we did not offer",
                       NotifyType.NO_PROPOSAL_CHOSEN)
        shared = None
        if chosen.transforms.dh != DhId.NONE:
            ke = resp.find(KePayload)
            if not isinstance(ke, KePayload) or ctx.kex is None or \
                    ke.group != chosen.transforms.dh or ke.group != ctx.group:
                raise Fail("PFS reply without a matching KE", NotifyType.INVALID_KE_PAYLOAD)
            try:
                shared = ctx.kex.shared_secret(ke.data)
            except IkeCryptoError as exc:
                raise Fail(str(exc), NotifyType.INVALID_SYNTAX) from None
        ts_i = narrow(tsi.selectors, ctx.local_ts)
        ts_r = narrow(tsr.selectors, ctx.remote_ts)
        if not ts_i or not ts_r:
            raise Fail("responder's selectors are not within ours", NotifyType.TS_UNACCEPTABLE)
        transport = ctx.transport and resp.notify(NotifyType.USE_TRANSPORT_MODE) is not None
        return self._install_child(chosen.transforms, ctx.nonce, nonce.nonce, shared, True,
                                   ctx.new_spi, chosen.spi, ts_i, ts_r, transport,
                                   ctx.rekey_of)

    def _child_refused(self, ctx: ChildRequest, code: int, now: float,
                       reason: str = "") -> None:
        reason = reason or f"peer answered {enum_name(NotifyType, code)}"
        old = self._children.get(ctx.rekey_of) if ctx.rekey_of is not None else None
        if old is not None and old.state is ChildState.REKEYING:
            if old.peer_rekey_spi is not None:
                # The peer's rekey of this pair went through: it deletes the old pair.
                old.state = ChildState.REKEYED
                old.delete_deadline = now + self.config.give_up_after()
                return
            old.state = ChildState.INSTALLED
            if code == NotifyType.TEMPORARY_FAILURE:
                self._retry_later(("rekey-child", old.inbound_spi), now)
                return
            if code == NotifyType.CHILD_SA_NOT_FOUND:
                del self._children[old.inbound_spi]
                self._emit(ChildSaDeleted(old.inbound_spi, old.outbound_spi,
                                          "peer has no such Child SA"))
                return
        self._emit(ChildSaFailed(reason, code, ctx.rekey_of))

    def _settle_child_rekey(self, old_spi: bytes, new: ChildSa, our_low: bytes,
                            now: float) -> None:
        old = self._children.get(old_spi)
        if old is None:
            return  # the peer deleted the old pair meanwhile; the new one stands
        wait = now + self.config.give_up_after()
        if old.peer_rekey_nonce is not None and old.peer_rekey_spi is not None:
            if our_low < old.peer_rekey_nonce:
                # Ours is redundant: we delete it; the peer, whose pair won, deletes the old.
                old.state = ChildState.REKEYED
                old.delete_deadline = wait
                self._queue_delete_child(new.inbound_spi, now)
                return
            theirs = self._children.get(old.peer_rekey_spi)
            if theirs is not None:
                theirs.delete_deadline = wait  # redundant; the peer deletes it
        old.state = ChildState.REKEYED
        self._queue_delete_child(old.inbound_spi, now)

    # -- responder: CREATE_CHILD_SA requests -------------------------------------------------

    def _on_create_child_request(self, req: Message, now: float) -> list[Payload]:
        sa, nonce = req.find(SaPayload), req.find(NoncePayload)
        if not isinstance(sa, SaPayload) or not isinstance(nonce, NoncePayload):
            return _notify(NotifyType.INVALID_SYNTAX)
        if self.state is not State.ESTABLISHED:
            return _notify(NotifyType.TEMPORARY_FAILURE)  # superseded or being deleted
        if sa.proposals and all(p.protocol == ProtocolId.IKE for p in sa.proposals):
            return self._answer_ike_rekey(req, sa, nonce.nonce, now)
        if self._pending is not None and self._pending.kind == "rekey-ike":
            return _notify(NotifyType.TEMPORARY_FAILURE)  # Child SAs move with our rekey
        old: ChildSa | None = None
        rekey = req.notify(NotifyType.REKEY_SA)
        if rekey is not None:
            old = self._child_by_outbound(rekey.spi)
            if old is None:
                return [NotifyPayload(NotifyType.CHILD_SA_NOT_FOUND, b"", ProtocolId.ESP,
                                      rekey.spi)]
            if old.state in (ChildState.DELETING, ChildState.REKEYED):
                return _notify(NotifyType.TEMPORARY_FAILURE)  # RFC 7296 2.25
        try:
            chosen, ts_i, ts_r, transport = self._select_child(req, in_auth=False)
            shared, ke_reply = self._respond_ke(req, chosen.transforms.dh)
        except Fail as fail:
            return _notify(fail.notify or NotifyType.INVALID_SYNTAX, fail.data)
        spi = self._new_spi()
        if spi is None:
            return _notify(NotifyType.TEMPORARY_FAILURE)
        nr = self._random(NONCE_BYTES)
        reply: list[Payload] = [NotifyPayload(NotifyType.USE_TRANSPORT_MODE)] if transport \
            else []
        reply += [SaPayload([chosen.proposal(spi)]), NoncePayload(nr), *ke_reply,
                  TsiPayload(list(ts_i)), TsrPayload(list(ts_r))]
        self._install_child(chosen.transforms, nonce.nonce, nr, shared, False, spi, chosen.spi,
                            ts_r, ts_i, transport, old.inbound_spi if old else None)
        if old is not None:
            if old.state is ChildState.REKEYING:  # collision: settled when ours completes
                old.peer_rekey_nonce = min(nonce.nonce, nr)
                old.peer_rekey_spi = spi
            else:
                old.state = ChildState.REKEYED  # the peer deletes it once ours is installed
                old.delete_deadline = now + self.config.give_up_after()
        return reply

    def _respond_ke(self, req: Message, group: int) -> tuple[bytes | None, list[Payload]]:
        """Our KE reply and g^ir for a chosen DH group (none without PFS), or Fail."""
        if group == DhId.NONE:
            return None, []
        ke = req.find(KePayload)
        if not isinstance(ke, KePayload) or ke.group != group:
            raise Fail("KE payload missing or of another group", NotifyType.INVALID_KE_PAYLOAD,
                       struct.pack("!H", group))
        kex = new_key_exchange(group)
        try:
            shared = kex.shared_secret(ke.data)
        except IkeCryptoError as exc:
            raise Fail(str(exc), NotifyType.INVALID_SYNTAX) from None
        return shared, [KePayload(group, kex.public_value())]

    # -- IKE SA rekey ------------------------------------------------------------------------

    def rekey_ike(self, now: float) -> None:
        """Queue a rekey of this IKE SA; IkeSaRekeyed announces the new one."""
        self._require_established()
        if not self._queued("rekey-ike"):
            self._enqueue(("rekey-ike", None), now)

    def _start_ike_rekey(self, now: float, ctx: IkeRekeyRequest | None = None) -> None:
        if self.state is not State.ESTABLISHED:
            return
        assert self._suite is not None
        if ctx is None:
            ctx = IkeRekeyRequest(self._random(8), self._suite.dh)
        ctx.nonce = self._random(NONCE_BYTES)
        ctx.kex = new_key_exchange(ctx.group)
        inner: list[Payload] = [sa_payload(self.config.ike_proposals, ctx.spi),
                                NoncePayload(ctx.nonce), KePayload(ctx.group,
                                                                   ctx.kex.public_value())]
        self._request(ExchangeType.CREATE_CHILD_SA, inner, now, "rekey-ike",
                      lambda msg, payloads, t: self._on_ike_rekey_response(ctx, msg, payloads,
                                                                           t))

    def _on_ike_rekey_response(self, ctx: IkeRekeyRequest, msg: Message,
                               inner: list[Payload], now: float) -> None:
        resp = Message(msg.exchange, msg.message_id, msg.spi_i, msg.spi_r, msg.flags, inner)
        error = _first_error(resp)
        if error == NotifyType.INVALID_KE_PAYLOAD and ctx.ke_retries < MAX_KE_RETRIES:
            group = _requested_group(resp)
            if any(group in s.dh for s in self.config.ike_proposals):
                ctx.group, ctx.ke_retries = group, ctx.ke_retries + 1
                self._start_ike_rekey(now, ctx)
                return
        try:
            if error is not None:
                raise Fail(f"peer answered {enum_name(NotifyType, error)}", error)
            ours = self._accept_ike_rekey(ctx, resp)
        except Fail as fail:
            if self._peer_ike_rekey is not None:  # the peer's rekey stands alone
                theirs, _ = self._peer_ike_rekey
                self._peer_ike_rekey = None
                self._switch_to(theirs, None, now, delete_old=False)
            elif fail.notify == NotifyType.TEMPORARY_FAILURE:
                self._retry_later(("rekey-ike", None), now)
            else:
                self._emit(IkeRekeyFailed(str(fail), fail.notify))
            return
        nonce = resp.find(NoncePayload)
        assert isinstance(nonce, NoncePayload)
        if self._peer_ike_rekey is None:
            self._switch_to(ours, None, now, delete_old=True)
            return
        theirs, their_low = self._peer_ike_rekey
        self._peer_ike_rekey = None
        if min(ctx.nonce, nonce.nonce) < their_low:
            ours._redundant = True
            ours.delete(now)  # we created the redundant one: we delete it
            self._switch_to(theirs, ours, now, delete_old=False)
        else:
            theirs._redundant = True
            theirs._delete_deadline = now + self.config.give_up_after()
            self._switch_to(ours, theirs, now, delete_old=True)

    def _accept_ike_rekey(self, ctx: IkeRekeyRequest, resp: Message) -> IkeSa:
        sa, nonce, ke = resp.find(SaPayload), resp.find(NoncePayload), resp.find(KePayload)
        if not (isinstance(sa, SaPayload) and isinstance(nonce, NoncePayload)
                and isinstance(ke, KePayload)):
            raise Fail("IKE rekey response lacks SA, Nonce or KE", NotifyType.INVALID_SYNTAX)
        chosen = check_response(self.config.ike_proposals, sa)
        if chosen is None or len(chosen.spi) != 8 or chosen.transforms.dh != ctx.group or \
                ke.group != ctx.group or ctx.kex is None:
            raise Fail("unacceptable IKE rekey response", NotifyType.NO_PROPOSAL_CHOSEN)
        try:
            shared = ctx.kex.shared_secret(ke.data)
        except IkeCryptoError as exc:
            raise Fail(str(exc), NotifyType.INVALID_SYNTAX) from None
        return self._successor(True, ctx.spi, chosen.spi, chosen.transforms, shared,
                               ctx.nonce, nonce.nonce)

    def _answer_ike_rekey(self, req: Message, sa: SaPayload, ni: bytes,
                          now: float) -> list[Payload]:
        pending = self._pending.kind if self._pending is not None else None
        if pending not in (None, "liveness", "rekey-ike"):
            # A Child SA exchange of ours is half done on this IKE SA: finish it first.
            return _notify(NotifyType.TEMPORARY_FAILURE)
        chosen = select_proposal(self.config.ike_proposals, sa.proposals)
        if chosen is None or len(chosen.spi) != 8:
            return _notify(NotifyType.NO_PROPOSAL_CHOSEN)
        try:
            shared, ke_reply = self._respond_ke(req, chosen.transforms.dh)
        except Fail as fail:
            return _notify(fail.notify or NotifyType.INVALID_SYNTAX, fail.data)
        assert shared is not None
        nr = self._random(NONCE_BYTES)
        spi_r = self._random(8)
        new = self._successor(False, chosen.spi, spi_r, chosen.transforms, shared, ni, nr)
        if pending == "rekey-ike":
            self._peer_ike_rekey = (new, min(ni, nr))  # settled when our response comes
        else:
            self._switch_to(new, None, now, delete_old=False)
        return [SaPayload([chosen.proposal(spi_r)]), NoncePayload(nr), *ke_reply]

    def _switch_to(self, winner: IkeSa, redundant: IkeSa | None, now: float,
                   delete_old: bool) -> None:
        """Hand the Child SAs to the new IKE SA, announce it, and retire this one: delete it
        ourselves when we initiated the winner, else wait (bounded) for the peer's delete."""
        winner._children, self._children = self._children, {}
        self._emit(IkeSaRekeyed(winner, redundant))
        self.state = State.REKEYED
        self._hand_over_tasks(winner, now)
        if delete_old:
            self._enqueue(("delete-ike", True), now, internal=True)
        else:
            self._delete_deadline = now + self.config.give_up_after()
