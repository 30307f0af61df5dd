"""Global datapath counters (per-SA counters live on the SecurityAssociation itself)."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(slots=True)
class DatapathStats:
    # outbound
    tun_packets: int = 0  # packets read from the TUN
    tso_packets: int = 0  # of which TCP super-packets (TUN offloads on) ...
    tso_segments: int = 0  # ... cut into this many segments
    sealed: int = 0  # ESP packets made
    no_policy: int = 0  # TUN packet matching no outbound policy
    discard: int = 0  # matched a discard policy
    bypass: int = 0  # matched a "none" policy: never routed into the TUN, dropped
    acquires: int = 0  # SADB_ACQUIRE sent (after the kernel's rate limit)
    queued: int = 0  # packets held while an SA is negotiated
    queue_drops: int = 0  # held packets pushed out by newer ones (or the SA never came)
    queue_flushed: int = 0  # held packets sent once their SA appeared
    ptb_sent: int = 0  # ICMP frag-needed / ICMPv6 packet-too-big written into the TUN
    seq_exhausted: int = 0  # packets refused because their SA ran out of sequence numbers
    tx_errors: int = 0  # outer send refused by the kernel
    # inbound
    esp_received: int = 0  # ESP packets (UDP-encapsulated or raw) received
    opened: int = 0  # ESP packets authenticated and delivered to the TUN
    no_sa: int = 0  # unknown SPI
    malformed: int = 0  # bad outer or inner packet, bad padding, wrong inner protocol
    auth_failures: int = 0
    replay: int = 0
    policy_mismatch: int = 0  # inner packet not allowed by an in/fwd policy for this SA
    dummy: int = 0  # RFC 4303 2.6 dummy packets (dropped silently)
    tun_write_errors: int = 0
    # UDP 4500 control traffic
    keepalives_sent: int = 0
    keepalives_received: int = 0
    ike_received: int = 0  # IKE datagrams handed to the IKE handler
    ike_dropped: int = 0  # IKE datagrams with no handler registered
    ike_sent: int = 0

    def as_dict(self) -> dict[str, int]:
        # Not dataclasses.asdict, which deep-copies field by field: this is polled.
        return {name: getattr(self, name) for name in _NAMES}


_NAMES = tuple(f.name for f in fields(DatapathStats))
