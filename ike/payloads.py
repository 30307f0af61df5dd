"""Codec for the bodies of the IKEv2 payloads (RFC 7296 section 3.3 to 3.16).

Each payload class encodes and decodes its body only; the generic payload header and the
chaining of payloads live in `ike.message`. Every decoder checks every length and raises
`IkeParseError` (INVALID_SYNTAX) on anything malformed, never another exception.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Self, TypeAlias

from ike.constants import (
    ATTR_FORMAT_TV,
    PayloadType,
    TransformAttr,
    TsType,
)
from ike.errors import IkeParseError

_U16 = struct.Struct("!H")
_TRANSFORM_HDR = struct.Struct("!BBHBBH")  # last, reserved, length, type, reserved, id
_PROPOSAL_HDR = struct.Struct("!BBHBBBB")  # last, reserved, length, num, proto, spi size, count
_ATTR_HDR = struct.Struct("!HH")
_TS_HDR = struct.Struct("!BBHHH")  # type, ip proto, selector length, start port, end port
_NOTIFY_HDR = struct.Struct("!BBH")
_DELETE_HDR = struct.Struct("!BBH")
_KE_HDR = struct.Struct("!HH")

_LAST = 0
_MORE_PROPOSALS = 2
_MORE_TRANSFORMS = 3

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


def _need(data: bytes, size: int, what: str) -> None:
    if len(data) < size:
        raise IkeParseError(f"{what}: {len(data)} bytes, need at least {size}")


# --- SA payload: proposals, transforms and transform attributes -------------------------


@dataclass(slots=True, frozen=True)
class TransformAttribute:
    """A transform attribute other than Key Length, kept so a proposal using it is refused."""

    type: int
    value: bytes
    tv: bool = True

    def encode(self) -> bytes:
        if self.tv:
            if len(self.value) != 2:
                raise ValueError("TV attribute value must be 2 bytes")
            return _U16.pack(ATTR_FORMAT_TV | self.type) + self.value
        return _ATTR_HDR.pack(self.type, len(self.value)) + self.value


@dataclass(slots=True, frozen=True)
class Transform:
    type: int
    id: int
    key_length: int | None = None
    other_attributes: tuple[TransformAttribute, ...] = ()

    def encode(self, last: bool) -> bytes:
        attrs = b""
        if self.key_length is not None:
            attrs = _ATTR_HDR.pack(ATTR_FORMAT_TV | TransformAttr.KEY_LENGTH, self.key_length)
        attrs += b"".join(a.encode() for a in self.other_attributes)
        length = _TRANSFORM_HDR.size + len(attrs)
        return (
            _TRANSFORM_HDR.pack(_LAST if last else _MORE_TRANSFORMS, 0, length, self.type, 0,
                                self.id)
            + attrs
        )

    @classmethod
    def decode(cls, data: bytes) -> tuple[Transform, bool, int]:
        """Decode one transform at the start of data: (transform, is_last, consumed)."""
        _need(data, _TRANSFORM_HDR.size, "transform")
        last, _, length, ttype, _, tid = _TRANSFORM_HDR.unpack_from(data)
        if last not in (_LAST, _MORE_TRANSFORMS):
            raise IkeParseError(f"transform: bad last-substructure value {last}")
        if length < _TRANSFORM_HDR.size or length > len(data):
            raise IkeParseError(f"transform: bad length {length}")
        key_length: int | None = None
        others: list[TransformAttribute] = []
        pos = _TRANSFORM_HDR.size
        while pos < length:
            if length - pos < _ATTR_HDR.size:
                raise IkeParseError("transform attribute: truncated")
            atype, aval = _ATTR_HDR.unpack_from(data, pos)
            pos += _ATTR_HDR.size
            if atype & ATTR_FORMAT_TV:
                atype &= ~ATTR_FORMAT_TV
                if atype == TransformAttr.KEY_LENGTH:
                    if key_length is not None:
                        raise IkeParseError("transform: duplicate key length attribute")
                    key_length = aval
                else:
                    others.append(TransformAttribute(atype, _U16.pack(aval), tv=True))
            else:
                if aval > length - pos:
                    raise IkeParseError("transform attribute: length beyond transform")
                if atype == TransformAttr.KEY_LENGTH:
                    raise IkeParseError("transform: key length attribute must be TV format")
                others.append(TransformAttribute(atype, bytes(data[pos:pos + aval]), tv=False))
                pos += aval
        return cls(ttype, tid, key_length, tuple(others)), last == _LAST, length


@dataclass(slots=True, frozen=True)
class Proposal:
    number: int
    protocol: int
    spi: bytes
    transforms: tuple[Transform, ...]

    def encode(self, last: bool) -> bytes:
        if len(self.transforms) > 255 or len(self.spi) > 255:
            raise ValueError("too many transforms or SPI too long")
        body = b"".join(
            t.encode(i == len(self.transforms) - 1) for i, t in enumerate(self.transforms)
        )
        length = _PROPOSAL_HDR.size + len(self.spi) + len(body)
        hdr = _PROPOSAL_HDR.pack(_LAST if last else _MORE_PROPOSALS, 0, length, self.number,
                                 self.protocol, len(self.spi), len(self.transforms))
        return hdr + self.spi + body

    @classmethod
    def decode(cls, data: bytes) -> tuple[Proposal, bool, int]:
        _need(data, _PROPOSAL_HDR.size, "proposal")
        last, _, length, num, proto, spi_size, count = _PROPOSAL_HDR.unpack_from(data)
        if last not in (_LAST, _MORE_PROPOSALS):
            raise IkeParseError(f"proposal: bad last-substructure value {last}")
        if length < _PROPOSAL_HDR.size + spi_size or length > len(data):
            raise IkeParseError(f"proposal: bad length {length}")
        pos = _PROPOSAL_HDR.size
        spi = bytes(data[pos:pos + spi_size])
        pos += spi_size
        transforms: list[Transform] = []
        body = data[:length]
        transform_last = count == 0
        while pos < length:
            if transform_last:
                raise IkeParseError("proposal: data after last transform")
            transform, transform_last, used = Transform.decode(body[pos:])
            transforms.append(transform)
            pos += used
        if not transform_last or len(transforms) != count:
            raise IkeParseError(
                f"proposal: {len(transforms)} transforms present, header says {count}"
            )
        return cls(num, proto, spi, tuple(transforms)), last == _LAST, length


@dataclass(slots=True)
class SaPayload:
    TYPE: ClassVar[PayloadType] = PayloadType.SA
    proposals: list[Proposal]

    def encode_body(self) -> bytes:
        return b"".join(
            p.encode(i == len(self.proposals) - 1) for i, p in enumerate(self.proposals)
        )

    @classmethod
    def decode_body(cls, body: bytes) -> SaPayload:
        proposals: list[Proposal] = []
        pos = 0
        last = False
        while pos < len(body):
            if last:
                raise IkeParseError("SA: data after last proposal")
            proposal, last, used = Proposal.decode(body[pos:])
            proposals.append(proposal)
            pos += used
        if not last:
            raise IkeParseError("SA: no proposal, or last proposal not marked")
        return cls(proposals)


# --- Simple payloads ---------------------------------------------------------------------


@dataclass(slots=True)
class KePayload:
    TYPE: ClassVar[PayloadType] = PayloadType.KE
    group: int
    data: bytes

    def encode_body(self) -> bytes:
        return _KE_HDR.pack(self.group, 0) + self.data

    @classmethod
    def decode_body(cls, body: bytes) -> KePayload:
        _need(body, _KE_HDR.size, "KE")
        group, _ = _KE_HDR.unpack_from(body)
        return cls(group, bytes(body[_KE_HDR.size:]))


@dataclass(slots=True)
class NoncePayload:
    TYPE: ClassVar[PayloadType] = PayloadType.NONCE
    nonce: bytes

    def encode_body(self) -> bytes:
        return self.nonce

    @classmethod
    def decode_body(cls, body: bytes) -> NoncePayload:
        # RFC 7296 3.9: between 16 and 256 octets.
        if not 16 <= len(body) <= 256:
            raise IkeParseError(f"Nonce: length {len(body)} outside 16..256")
        return cls(bytes(body))


@dataclass(slots=True)
class _TypedDataPayload:
    """Body = one type octet, three reserved octets, then data (ID and AUTH payloads)."""

    TYPE: ClassVar[PayloadType]
    kind: int
    data: bytes

    def encode_body(self) -> bytes:
        return bytes((self.kind, 0, 0, 0)) + self.data

    @classmethod
    def decode_body(cls, body: bytes) -> Self:
        _need(body, 4, cls.TYPE.name)
        return cls(body[0], bytes(body[4:]))


@dataclass(slots=True)
class IdPayload(_TypedDataPayload):
    """IDi / IDr body; `kind` is the ID type, `data` the identification data."""

    TYPE: ClassVar[PayloadType] = PayloadType.IDi

    @property
    def body(self) -> bytes:
        """The octets that RFC 7296 2.15 feeds to prf(SK_p, RestOfIDPayload)."""
        return self.encode_body()


@dataclass(slots=True)
class IdiPayload(IdPayload):
    TYPE: ClassVar[PayloadType] = PayloadType.IDi


@dataclass(slots=True)
class IdrPayload(IdPayload):
    TYPE: ClassVar[PayloadType] = PayloadType.IDr


@dataclass(slots=True)
class AuthPayload(_TypedDataPayload):
    """`kind` is the auth method, `data` the authentication data."""

    TYPE: ClassVar[PayloadType] = PayloadType.AUTH


@dataclass(slots=True)
class _EncodedDataPayload:
    """Body = one encoding octet then data (CERT and CERTREQ payloads)."""

    TYPE: ClassVar[PayloadType]
    encoding: int
    data: bytes

    def encode_body(self) -> bytes:
        return bytes((self.encoding,)) + self.data

    @classmethod
    def decode_body(cls, body: bytes) -> Self:
        _need(body, 1, cls.TYPE.name)
        return cls(body[0], bytes(body[1:]))


@dataclass(slots=True)
class CertPayload(_EncodedDataPayload):
    TYPE: ClassVar[PayloadType] = PayloadType.CERT


@dataclass(slots=True)
class CertReqPayload(_EncodedDataPayload):
    TYPE: ClassVar[PayloadType] = PayloadType.CERTREQ


@dataclass(slots=True)
class NotifyPayload:
    TYPE: ClassVar[PayloadType] = PayloadType.NOTIFY
    notify_type: int
    data: bytes = b""
    protocol: int = 0
    spi: bytes = b""

    def encode_body(self) -> bytes:
        return _NOTIFY_HDR.pack(self.protocol, len(self.spi), self.notify_type) + self.spi + \
            self.data

    @classmethod
    def decode_body(cls, body: bytes) -> NotifyPayload:
        _need(body, _NOTIFY_HDR.size, "Notify")
        protocol, spi_size, ntype = _NOTIFY_HDR.unpack_from(body)
        _need(body, _NOTIFY_HDR.size + spi_size, "Notify SPI")
        end = _NOTIFY_HDR.size + spi_size
        return cls(ntype, bytes(body[end:]), protocol, bytes(body[_NOTIFY_HDR.size:end]))


@dataclass(slots=True)
class DeletePayload:
    TYPE: ClassVar[PayloadType] = PayloadType.DELETE
    protocol: int
    spis: list[bytes] = field(default_factory=list)
    spi_size: int = 4

    def encode_body(self) -> bytes:
        if any(len(s) != self.spi_size for s in self.spis):
            raise ValueError("Delete: every SPI must be spi_size bytes")
        return _DELETE_HDR.pack(self.protocol, self.spi_size, len(self.spis)) + b"".join(
            self.spis
        )

    @classmethod
    def decode_body(cls, body: bytes) -> DeletePayload:
        _need(body, _DELETE_HDR.size, "Delete")
        protocol, spi_size, count = _DELETE_HDR.unpack_from(body)
        if len(body) != _DELETE_HDR.size + spi_size * count:
            raise IkeParseError(f"Delete: {count} SPIs of {spi_size} bytes do not fit body")
        pos = _DELETE_HDR.size
        spis = [bytes(body[pos + i * spi_size:pos + (i + 1) * spi_size]) for i in range(count)]
        return cls(protocol, spis, spi_size)


@dataclass(slots=True)
class VendorIdPayload:
    TYPE: ClassVar[PayloadType] = PayloadType.VENDOR_ID
    data: bytes

    def encode_body(self) -> bytes:
        return self.data

    @classmethod
    def decode_body(cls, body: bytes) -> VendorIdPayload:
        return cls(bytes(body))


# --- Traffic selectors ---------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class TrafficSelector:
    start_addr: IPAddress
    end_addr: IPAddress
    ip_protocol: int = 0
    start_port: int = 0
    end_port: int = 65535

    @property
    def ts_type(self) -> TsType:
        return TsType.IPV4_ADDR_RANGE if self.start_addr.version == 4 else TsType.IPV6_ADDR_RANGE

    def encode(self) -> bytes:
        if self.start_addr.version != self.end_addr.version:
            raise ValueError("traffic selector mixes address families")
        addrs = self.start_addr.packed + self.end_addr.packed
        return _TS_HDR.pack(self.ts_type, self.ip_protocol, _TS_HDR.size + len(addrs),
                            self.start_port, self.end_port) + addrs


@dataclass(slots=True, frozen=True)
class RawTrafficSelector:
    """A selector of a type we do not understand (e.g. TS_FC_ADDR_RANGE), kept verbatim."""

    ts_type: int
    ip_protocol: int
    data: bytes  # everything after the 4-byte selector header

    def encode(self) -> bytes:
        return bytes((self.ts_type, self.ip_protocol)) + _U16.pack(len(self.data) + 4) + self.data


_ADDR_LEN: dict[int, int] = {TsType.IPV4_ADDR_RANGE: 4, TsType.IPV6_ADDR_RANGE: 16}


def _decode_selector(data: bytes) -> tuple[TrafficSelector | RawTrafficSelector, int]:
    _need(data, 4, "traffic selector")
    ts_type, proto, length = data[0], data[1], _U16.unpack_from(data, 2)[0]
    if length < 4 or length > len(data):
        raise IkeParseError(f"traffic selector: bad length {length}")
    alen = _ADDR_LEN.get(ts_type)
    if alen is None:
        return RawTrafficSelector(ts_type, proto, bytes(data[4:length])), length
    if length != _TS_HDR.size + 2 * alen:
        raise IkeParseError(f"traffic selector: length {length} wrong for type {ts_type}")
    _, _, _, sport, eport = _TS_HDR.unpack_from(data)
    start = data[_TS_HDR.size:_TS_HDR.size + alen]
    end = data[_TS_HDR.size + alen:length]
    addr_cls = ipaddress.IPv4Address if alen == 4 else ipaddress.IPv6Address
    return TrafficSelector(addr_cls(bytes(start)), addr_cls(bytes(end)), proto, sport,
                           eport), length


AnySelector: TypeAlias = TrafficSelector | RawTrafficSelector


@dataclass(slots=True)
class TsPayload:
    TYPE: ClassVar[PayloadType] = PayloadType.TSi
    selectors: list[AnySelector]

    def encode_body(self) -> bytes:
        if not 0 < len(self.selectors) < 256:
            raise ValueError("TS payload needs 1..255 selectors")
        return bytes((len(self.selectors), 0, 0, 0)) + b"".join(
            s.encode() for s in self.selectors
        )

    @classmethod
    def decode_body(cls, body: bytes) -> Self:
        _need(body, 4, "TS")
        count = body[0]
        if count == 0:
            raise IkeParseError("TS: zero selectors")
        pos = 4
        selectors: list[AnySelector] = []
        for _ in range(count):
            selector, used = _decode_selector(body[pos:])
            selectors.append(selector)
            pos += used
        if pos != len(body):
            raise IkeParseError("TS: trailing data after selectors")
        return cls(selectors)


@dataclass(slots=True)
class TsiPayload(TsPayload):
    TYPE: ClassVar[PayloadType] = PayloadType.TSi


@dataclass(slots=True)
class TsrPayload(TsPayload):
    TYPE: ClassVar[PayloadType] = PayloadType.TSr


# --- Encrypted, configuration, EAP, unknown -------------------------------------------------


@dataclass(slots=True)
class EncryptedPayload:
    """SK payload as on the wire: IV || ciphertext || ICV. `first_payload` is the type of the
    first inner payload (carried in the SK generic header's Next Payload field)."""

    TYPE: ClassVar[PayloadType] = PayloadType.SK
    first_payload: int
    data: bytes = field(repr=False)

    def encode_body(self) -> bytes:
        return self.data


@dataclass(slots=True)
class EncryptedFragmentPayload:
    """SKF payload (RFC 7383): fragment number, total, then IV || ciphertext || ICV."""

    TYPE: ClassVar[PayloadType] = PayloadType.SKF
    first_payload: int
    number: int
    total: int
    data: bytes = field(repr=False)

    def encode_body(self) -> bytes:
        return struct.pack("!HH", self.number, self.total) + self.data

    @classmethod
    def decode_fragment(cls, first_payload: int, body: bytes) -> EncryptedFragmentPayload:
        _need(body, 4, "SKF")
        number, total = struct.unpack_from("!HH", body)
        if number == 0 or total == 0 or number > total:
            raise IkeParseError(f"SKF: fragment {number} of {total}")
        return cls(first_payload, number, total, bytes(body[4:]))


@dataclass(slots=True, frozen=True)
class CpAttribute:
    type: int
    value: bytes = b""

    def encode(self) -> bytes:
        return _ATTR_HDR.pack(self.type & 0x7FFF, len(self.value)) + self.value


@dataclass(slots=True)
class CpPayload:
    TYPE: ClassVar[PayloadType] = PayloadType.CP
    cfg_type: int
    attributes: list[CpAttribute] = field(default_factory=list)

    def encode_body(self) -> bytes:
        return bytes((self.cfg_type, 0, 0, 0)) + b"".join(a.encode() for a in self.attributes)

    @classmethod
    def decode_body(cls, body: bytes) -> CpPayload:
        _need(body, 4, "CP")
        attrs: list[CpAttribute] = []
        pos = 4
        while pos < len(body):
            if len(body) - pos < _ATTR_HDR.size:
                raise IkeParseError("CP attribute: truncated header")
            atype, alen = _ATTR_HDR.unpack_from(body, pos)
            pos += _ATTR_HDR.size
            if alen > len(body) - pos:
                raise IkeParseError("CP attribute: length beyond payload")
            attrs.append(CpAttribute(atype & 0x7FFF, bytes(body[pos:pos + alen])))
            pos += alen
        return cls(body[0], attrs)


@dataclass(slots=True)
class EapPayload:
    TYPE: ClassVar[PayloadType] = PayloadType.EAP
    data: bytes  # the whole EAP message (RFC 3748): code, identifier, length, type, data

    def encode_body(self) -> bytes:
        return self.data

    @classmethod
    def decode_body(cls, body: bytes) -> EapPayload:
        _need(body, 4, "EAP")
        if _U16.unpack_from(body, 2)[0] != len(body):
            raise IkeParseError("EAP: message length does not match payload")
        return cls(bytes(body))


@dataclass(slots=True)
class UnknownPayload:
    """A payload type we do not implement, skipped because its critical bit was clear."""

    payload_type: int
    data: bytes
    critical: bool = False

    def encode_body(self) -> bytes:
        return self.data


Payload: TypeAlias = (
    SaPayload | KePayload | NoncePayload | IdPayload | AuthPayload | CertPayload
    | CertReqPayload | NotifyPayload | DeletePayload | VendorIdPayload | TsPayload
    | EncryptedPayload | EncryptedFragmentPayload | CpPayload | EapPayload | UnknownPayload
)

DECODERS: dict[int, Callable[[bytes], Payload]] = {
    cls.TYPE: cls.decode_body
    for cls in (
        SaPayload, KePayload, NoncePayload, IdiPayload, IdrPayload, AuthPayload, CertPayload,
        CertReqPayload, NotifyPayload, DeletePayload, VendorIdPayload, TsiPayload, TsrPayload,
        CpPayload, EapPayload,
    )
}


def payload_type(payload: Payload) -> int:
    if isinstance(payload, UnknownPayload):
        return payload.payload_type
    return int(payload.TYPE)
