"""INFORMATIONAL in both roles (RFC 7296 1.4): deleting Child SAs and the IKE SA, liveness
checks, and notifies; with the delete collisions of 2.25.
"""

from __future__ import annotations

from ike.constants import ExchangeType, NotifyType, ProtocolId, is_error_notify
from ike.core import TERMINAL, ChildSa, ChildState, IkeSaCore, State
from ike.events import ChildSaDeleted, PeerNotify
from ike.message import Message
from ike.payloads import DeletePayload, NotifyPayload, Payload

# Error notifies in an INFORMATIONAL request that end the IKE SA (2.21.2: the initiator
# reports a failed authentication of the responder this way).
_FATAL = frozenset({NotifyType.AUTHENTICATION_FAILED, NotifyType.AUTHORIZATION_FAILED})


class Informational(IkeSaCore):
    # -- daemon requests ---------------------------------------------------------------------

    def delete_child(self, inbound_spi: bytes, now: float) -> None:
        """Queue the delete of the Child SA pair with this inbound (or outbound) SPI;
        ChildSaDeleted follows when the peer has answered."""
        self._queue_delete_child(self._resolve_child(inbound_spi), now)

    def delete(self, now: float) -> None:
        """Delete the IKE SA and with it every Child SA; IkeSaDeleted follows."""
        if self.state in TERMINAL or self._queued("delete-ike"):
            return
        if self.state not in (State.ESTABLISHED, State.REKEYED):
            self._deleted("deleted before it was established")
            return
        self._queue.clear()
        self._retries.clear()
        self._enqueue(("delete-ike", False), now, front=True)

    def check_liveness(self, now: float) -> None:
        """Send an empty INFORMATIONAL unless a request is already in flight (which tests the
        peer just as well). LivenessFailed, then IkeSaFailed, if it goes unanswered."""
        if self.state is State.ESTABLISHED and not self.busy:
            self._request(ExchangeType.INFORMATIONAL, [], now, "liveness",
                          lambda msg, inner, t: None)

    def report_invalid_spi(self, spi: bytes, now: float) -> None:
        """Tell the peer that ESP arrived for an SPI we do not know (RFC 7296 1.5, 3.10.1)."""
        if len(spi) != 4:
            raise ValueError("an ESP SPI is 4 bytes")
        if self.state is State.ESTABLISHED:
            self._enqueue(("notify", NotifyPayload(NotifyType.INVALID_SPI, spi,
                                                   ProtocolId.ESP)), now)

    def _start_notify(self, notify: NotifyPayload, now: float) -> None:
        if self.state is State.ESTABLISHED:
            self._request(ExchangeType.INFORMATIONAL, [notify], now, "notify",
                          lambda msg, inner, t: None)

    # -- initiator ---------------------------------------------------------------------------

    def _queue_delete_child(self, inbound_spi: bytes, now: float) -> None:
        child = self._children.get(inbound_spi)
        if child is None or child.state is ChildState.DELETING or \
                self._queued("delete-child", inbound_spi):
            return
        self._enqueue(("delete-child", inbound_spi), now, internal=True)

    def _start_delete_child(self, spi: bytes, now: float) -> None:
        child = self._children.get(spi)
        if child is None or child.state is ChildState.DELETING or self.state in TERMINAL:
            return
        reason = "rekeyed" if child.state is ChildState.REKEYED else "deleted by us"
        child.state = ChildState.DELETING
        child.delete_deadline = None
        self._request(ExchangeType.INFORMATIONAL, [DeletePayload(ProtocolId.ESP, [spi])], now,
                      "delete-child", lambda msg, inner, t: self._child_gone(spi, reason))

    def _queue_delete_spis(self, inbound_spis: list[bytes], now: float) -> None:
        """Delete SAs the peer installed but we refused (no local state to clean)."""
        self._enqueue(("delete-spis", list(inbound_spis)), now, internal=True)

    def _start_delete_spis(self, spis: list[bytes], now: float) -> None:
        if self.state is State.ESTABLISHED:
            self._request(ExchangeType.INFORMATIONAL, [DeletePayload(ProtocolId.ESP, spis)],
                          now, "delete-child", lambda msg, inner, t: None)

    def _child_gone(self, spi: bytes, reason: str) -> None:
        child = self._children.pop(spi, None)
        if child is not None:
            self._emit(ChildSaDeleted(child.inbound_spi, child.outbound_spi, reason))

    def _start_delete_ike(self, now: float, rekeyed: bool = False) -> None:
        if self.state in TERMINAL:
            return
        self.state = State.DELETING
        reason = "rekeyed" if rekeyed else "deleted by us"
        self._request(ExchangeType.INFORMATIONAL, [DeletePayload(ProtocolId.IKE, [], 0)], now,
                      "delete-ike", lambda msg, inner, t: self._deleted(reason, rekeyed),
                      lambda t: self._deleted(f"{reason} (peer did not answer)", rekeyed))

    def _expire_child(self, child: ChildSa, now: float) -> None:
        self._queue_delete_child(child.inbound_spi, now)

    # -- responder ---------------------------------------------------------------------------

    def _on_informational_request(self, req: Message, now: float) -> list[Payload]:
        reply_spis: list[bytes] = []
        for payload in req.payloads:
            if isinstance(payload, DeletePayload):
                if payload.protocol == ProtocolId.IKE:
                    # Answered as usual even while we rekey or delete it ourselves (2.25.2).
                    self._deleted("deleted by peer", rekeyed=self.state is State.REKEYED)
                    return []
                if payload.protocol == ProtocolId.ESP:
                    reply_spis += self._peer_deletes(payload.spis)
            elif isinstance(payload, NotifyPayload) and is_error_notify(payload.notify_type):
                if payload.notify_type in _FATAL:
                    self._fail("peer reports failed authentication", payload.notify_type)
                    return []
                self._emit(PeerNotify(payload.notify_type, payload.data, payload.protocol,
                                      payload.spi))
            # Status notifies we do not know, vendor IDs, CP: ignored (RFC 7296 3.10.1).
        return [DeletePayload(ProtocolId.ESP, reply_spis)] if reply_spis else []

    def _peer_deletes(self, outbound_spis: list[bytes]) -> list[bytes]:
        """Remove the pairs the peer names; our inbound SPIs of them for the reply, except
        those we are deleting ourselves at the same time (answered without, 1.4.1)."""
        ours: list[bytes] = []
        for spi in outbound_spis:
            child = next((c for c in self._children.values() if c.outbound_spi == spi), None)
            if child is None:
                continue
            if child.state is not ChildState.DELETING:
                ours.append(child.inbound_spi)
            self._child_gone(child.inbound_spi, "deleted by peer")
        return ours
