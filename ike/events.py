"""Events an IkeSa hands to the daemon (collected with `IkeSa.next_event()`).

Every IKE SA ends with exactly one IkeSaDeleted or IkeSaFailed; before it, a ChildSaDeleted
for each Child SA still installed (none when the IKE SA was rekeyed: its Child SAs moved on).
Key material is never part of a repr.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

from ike.payloads import TrafficSelector
from ike.transforms import TransformSet

if TYPE_CHECKING:
    from ike.sa import IkeSa


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
    """Install both SAs. With `rekey_of` set, this pair replaces the Child SA whose inbound SPI
    that is; the old pair stays until its ChildSaDeleted (make-before-break). `initiated` is
    False when the peer's request made this pair: the peer installs its side only once it has
    our response."""

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
    rekey_of: bytes | None = None
    initiated: bool = True


@dataclass(slots=True)
class ChildSaDeleted:
    """Remove the inbound SA `inbound_spi` and the outbound SA `outbound_spi`."""

    inbound_spi: bytes
    outbound_spi: bytes
    reason: str


@dataclass(slots=True)
class ChildSaFailed:
    """A Child SA could not be created or rekeyed; the IKE SA lives on."""

    reason: str
    notify: int | None = None
    rekey_of: bytes | None = None


@dataclass(slots=True)
class IkeSaRekeyed:
    """This IKE SA is replaced by `new_sa` (new SPIs, keys; the Child SAs moved to it).

    Route datagrams for new_sa's SPIs to it from now on, and keep this object until it
    reports IkeSaDeleted. `redundant_sa`, after a rekey collision (RFC 7296 2.8.2), is the
    losing new IKE SA: route to it too until it reports IkeSaDeleted.
    """

    new_sa: IkeSa
    redundant_sa: IkeSa | None = None


@dataclass(slots=True)
class IkeRekeyFailed:
    """An IKE SA rekey was refused; the current IKE SA lives on."""

    reason: str
    notify: int | None = None


@dataclass(slots=True)
class IkeSaDeleted:
    spi_i: bytes
    spi_r: bytes
    reason: str
    rekeyed: bool = False  # True: superseded by a rekey, its Child SAs live on elsewhere


@dataclass(slots=True)
class IkeSaFailed:
    reason: str
    notify: int | None = None  # the error notify sent or received, if any


@dataclass(slots=True)
class LivenessFailed:
    """The liveness check got no answer; IkeSaFailed follows."""

    spi_i: bytes
    spi_r: bytes


@dataclass(slots=True)
class InitialContact:
    """The peer says it has no other IKE SA with us: drop older SAs of this identity."""

    remote_id: tuple[int, bytes]
    spi_i: bytes
    spi_r: bytes


@dataclass(slots=True)
class PeerNotify:
    """An error notify the peer sent in an INFORMATIONAL request (e.g. INVALID_SPI)."""

    notify_type: int
    data: bytes
    protocol: int
    spi: bytes


Event: TypeAlias = (
    IkeSaEstablished | ChildSaEstablished | ChildSaDeleted | ChildSaFailed | IkeSaRekeyed
    | IkeRekeyFailed | IkeSaDeleted | IkeSaFailed | LivenessFailed | InitialContact
    | PeerNotify
)
