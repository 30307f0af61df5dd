"""Configuration of one IKE SA: identities, PSK, proposals, selectors and timing."""

from __future__ import annotations

from dataclasses import dataclass, field

from ike.payloads import TrafficSelector
from ike.proposals import ProposalSpec


@dataclass(slots=True)
class IkeConfig:
    local_id: tuple[int, bytes]  # (IdType, identification data)
    psk: bytes = field(repr=False)
    ike_proposals: list[ProposalSpec]
    esp_proposals: list[ProposalSpec]  # a DH transform here means PFS in CREATE_CHILD_SA
    local_ts: list[TrafficSelector]
    remote_ts: list[TrafficSelector]
    remote_id: tuple[int, bytes] | None = None  # None: accept any identity that knows the PSK
    transport_mode: bool = False
    # strongSwan's defaults: wait timeout * base**n before retransmission n+1, `tries`
    # retransmissions, then give up after one more wait (165 s in all).
    retransmit_timeout: float = 4.0
    retransmit_base: float = 1.8
    retransmit_tries: int = 5
    initial_contact: bool = True  # initiator sends INITIAL_CONTACT in IKE_AUTH
    temporary_failure_retry: float = 10.0  # delay before retrying a rekey the peer refused
    max_queued_exchanges: int = 32  # requests waiting for the window of one

    def retransmit_wait(self, retransmits: int) -> float:
        """Seconds to wait for a response after the (retransmits+1)-th transmission."""
        return self.retransmit_timeout * self.retransmit_base ** retransmits

    def give_up_after(self) -> float:
        """Seconds from the first transmission until a request is abandoned."""
        return sum(self.retransmit_wait(n) for n in range(self.retransmit_tries + 1))
