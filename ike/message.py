"""IKEv2 message codec: the fixed header, the generic payload header and payload chains.

`decode_message` parses a datagram (without the non-ESP marker) into a `Message`. The SK
payload, when present, is left encrypted; `decrypt_message` opens it with an `SkCipher`
(see `ike.crypto`) and parses the inner chain. `encode_message` / `encrypt_message` are
the inverses. Malformed input raises `IkeParseError` only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Protocol

from ike.constants import (
    CRITICAL_BIT,
    GENERIC_HEADER_LEN,
    IKE_HEADER_LEN,
    IKE_MAJOR_VERSION,
    ExchangeType,
    HeaderFlag,
    NotifyType,
    PayloadType,
)
from ike.errors import IkeParseError
from ike.payloads import (
    DECODERS,
    EncryptedFragmentPayload,
    EncryptedPayload,
    NotifyPayload,
    Payload,
    UnknownPayload,
    payload_type,
)

_HEADER = struct.Struct("!8s8sBBBBII")
_GENERIC = struct.Struct("!BBH")
_MAX_PAYLOADS = 512  # far more than any legitimate message; bounds the work per datagram


class SkCipher(Protocol):
    """Protection of the SK payload body (implemented in `ike.crypto`)."""

    def sealed_length(self, plaintext_len: int) -> int:
        """Length of IV || ciphertext (with padding and pad length) || ICV."""
        ...

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """Pad, encrypt and authenticate; aad is the IKE header through the SK header."""
        ...

    def open(self, body: bytes, aad: bytes) -> bytes:
        """Verify and decrypt IV || ciphertext || ICV; return the plaintext without padding."""
        ...


@dataclass(slots=True)
class IkeHeader:
    spi_i: bytes
    spi_r: bytes
    next_payload: int
    exchange: int
    flags: int
    message_id: int
    length: int
    major: int = IKE_MAJOR_VERSION
    minor: int = 0

    @property
    def is_response(self) -> bool:
        return bool(self.flags & HeaderFlag.RESPONSE)

    @property
    def is_initiator(self) -> bool:
        """True when the sender is the original initiator of the IKE SA."""
        return bool(self.flags & HeaderFlag.INITIATOR)

    def encode(self) -> bytes:
        return _HEADER.pack(self.spi_i, self.spi_r, self.next_payload,
                            (self.major << 4) | self.minor, self.exchange, self.flags,
                            self.message_id, self.length)

    @classmethod
    def decode(cls, data: bytes) -> IkeHeader:
        if len(data) < IKE_HEADER_LEN:
            raise IkeParseError(f"IKE header: {len(data)} bytes, need {IKE_HEADER_LEN}")
        spi_i, spi_r, nxt, version, exchange, flags, msgid, length = _HEADER.unpack_from(data)
        return cls(spi_i, spi_r, nxt, exchange, flags, msgid, length, version >> 4,
                   version & 0x0F)


@dataclass(slots=True)
class Message:
    exchange: int
    message_id: int
    spi_i: bytes
    spi_r: bytes = bytes(8)
    flags: int = 0
    payloads: list[Payload] = field(default_factory=list)
    # Set by decode_message: the datagram and the offset of the SK payload, for decryption.
    raw: bytes = field(default=b"", repr=False, compare=False)
    sk_offset: int | None = field(default=None, repr=False, compare=False)

    @property
    def is_response(self) -> bool:
        return bool(self.flags & HeaderFlag.RESPONSE)

    @property
    def is_initiator(self) -> bool:
        return bool(self.flags & HeaderFlag.INITIATOR)

    def header(self, next_payload: int, length: int) -> IkeHeader:
        return IkeHeader(self.spi_i, self.spi_r, next_payload, self.exchange, self.flags,
                         self.message_id, length)

    def find(self, cls: type[Payload]) -> Payload | None:
        """The first payload of exactly the given class (IdiPayload vs IdrPayload differ)."""
        for p in self.payloads:
            if type(p) is cls:
                return p
        return None

    def notifies(self) -> list[NotifyPayload]:
        return [p for p in self.payloads if isinstance(p, NotifyPayload)]

    def notify(self, ntype: NotifyType) -> NotifyPayload | None:
        return next((n for n in self.notifies() if n.notify_type == ntype), None)

    def describe(self) -> str:
        """Short text for logs, e.g. 'IKE_AUTH request 1 [ IDi AUTH SA TSi TSr ]'."""
        try:
            name = ExchangeType(self.exchange).name
        except ValueError:
            name = f"exchange {self.exchange}"
        kinds = []
        for p in self.payloads:
            ptype = payload_type(p)
            if isinstance(p, NotifyPayload):
                try:
                    kinds.append(f"N({NotifyType(p.notify_type).name})")
                except ValueError:
                    kinds.append(f"N({p.notify_type})")
            else:
                kinds.append(PayloadType(ptype).name if ptype in PayloadType._value2member_map_
                             else str(ptype))
        kind = "response" if self.is_response else "request"
        return f"{name} {kind} {self.message_id} [ {' '.join(kinds)} ]"


# --- Payload chains ---------------------------------------------------------------------------


def encode_payloads(payloads: list[Payload]) -> tuple[int, bytes]:
    """Encode a chain: (type of the first payload, bytes). SK/SKF must come last."""
    parts: list[bytes] = []
    for i, payload in enumerate(payloads):
        body = payload.encode_body()
        length = GENERIC_HEADER_LEN + len(body)
        if length > 0xFFFF:
            raise ValueError(f"payload {payload_type(payload)} too long ({length} bytes)")
        if isinstance(payload, EncryptedPayload | EncryptedFragmentPayload):
            if i != len(payloads) - 1:
                raise ValueError("the SK payload must be the last payload")
            nxt = payload.first_payload
        else:
            nxt = payload_type(payloads[i + 1]) if i + 1 < len(payloads) else 0
        critical = CRITICAL_BIT if isinstance(payload, UnknownPayload) and payload.critical else 0
        parts.append(_GENERIC.pack(nxt, critical, length) + body)
    first = payload_type(payloads[0]) if payloads else PayloadType.NONE
    return int(first), b"".join(parts)


def decode_payloads(first: int, data: bytes, *, outer: bool = False) -> list[Payload]:
    """Decode a payload chain starting with type `first` that must span all of `data`.

    `outer` allows an SK or SKF payload (only as the last one): its body is kept encrypted.
    """
    payloads: list[Payload] = []
    ptype = first
    pos = 0
    view = memoryview(data)
    while ptype != PayloadType.NONE:
        if len(payloads) >= _MAX_PAYLOADS:
            raise IkeParseError(f"more than {_MAX_PAYLOADS} payloads")
        if len(data) - pos < GENERIC_HEADER_LEN:
            raise IkeParseError(f"payload {ptype}: truncated generic header")
        nxt, flags, length = _GENERIC.unpack_from(data, pos)
        if length < GENERIC_HEADER_LEN or length > len(data) - pos:
            raise IkeParseError(f"payload {ptype}: bad length {length}")
        body = bytes(view[pos + GENERIC_HEADER_LEN:pos + length])
        pos += length
        if ptype in (PayloadType.SK, PayloadType.SKF):
            if not outer:
                raise IkeParseError("SK payload inside an encrypted payload")
            if pos != len(data):
                raise IkeParseError("SK payload is not the last payload")
            if ptype == PayloadType.SK:
                payloads.append(EncryptedPayload(nxt, body))
            else:
                payloads.append(EncryptedFragmentPayload.decode_fragment(nxt, body))
            return payloads
        decoder = DECODERS.get(ptype)
        if decoder is not None:
            payloads.append(decoder(body))
        elif flags & CRITICAL_BIT:
            raise IkeParseError(f"unsupported critical payload {ptype}",
                                NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD, bytes((ptype,)))
        else:
            payloads.append(UnknownPayload(ptype, body, False))
        ptype = nxt
    if pos != len(data):
        raise IkeParseError(f"{len(data) - pos} bytes after the last payload")
    return payloads


# --- Messages ---------------------------------------------------------------------------------


def encode_message(msg: Message) -> bytes:
    """Encode a message whose payloads are all clear (or an SK payload already sealed)."""
    first, body = encode_payloads(msg.payloads)
    return msg.header(first, IKE_HEADER_LEN + len(body)).encode() + body


def decode_message(data: bytes) -> Message:
    """Parse a datagram into a Message; the SK payload, if any, stays encrypted."""
    header = IkeHeader.decode(data)
    if header.major != IKE_MAJOR_VERSION:
        raise IkeParseError(f"IKE major version {header.major}", NotifyType.INVALID_MAJOR_VERSION,
                            header=header)
    if header.length != len(data):
        raise IkeParseError(f"header length {header.length} != datagram {len(data)}",
                            header=header)
    try:
        payloads = decode_payloads(header.next_payload, data[IKE_HEADER_LEN:], outer=True)
    except IkeParseError as exc:
        exc.header = header
        raise
    sk_offset = None
    if payloads and isinstance(payloads[-1], EncryptedPayload | EncryptedFragmentPayload):
        sk_offset = len(data) - GENERIC_HEADER_LEN - len(payloads[-1].encode_body())
    return Message(header.exchange, header.message_id, header.spi_i, header.spi_r, header.flags,
                   payloads, bytes(data), sk_offset)


def encrypt_message(msg: Message, inner: list[Payload], cipher: SkCipher) -> bytes:
    """Encode msg (its clear payloads, normally none) followed by an SK payload holding inner."""
    first_inner, plaintext = encode_payloads(inner)
    sk_len = GENERIC_HEADER_LEN + cipher.sealed_length(len(plaintext))
    if sk_len > 0xFFFF:
        raise ValueError(f"SK payload too long ({sk_len} bytes)")
    # Chain the clear payloads to an empty SK, then drop its header to rebuild it with length.
    first, clear = encode_payloads([*msg.payloads, EncryptedPayload(first_inner, b"")])
    clear = clear[:-GENERIC_HEADER_LEN]
    total = IKE_HEADER_LEN + len(clear) + sk_len
    aad = msg.header(first, total).encode() + clear + _GENERIC.pack(first_inner, 0, sk_len)
    sealed = cipher.seal(plaintext, aad)
    if len(sealed) != sk_len - GENERIC_HEADER_LEN:
        raise ValueError("cipher produced a body of unexpected length")
    return aad + sealed


def decrypt_message(msg: Message, cipher: SkCipher) -> list[Payload]:
    """Verify and decrypt msg's SK payload and decode the inner payload chain.

    Raises IkeIntegrityError (a subclass of IkeParseError) when the ICV does not match.
    """
    sk = msg.payloads[-1] if msg.payloads else None
    if not isinstance(sk, EncryptedPayload) or msg.sk_offset is None:
        raise IkeParseError("message has no SK payload")
    aad_end = msg.sk_offset + GENERIC_HEADER_LEN
    plaintext = cipher.open(msg.raw[aad_end:], msg.raw[:aad_end])
    return decode_payloads(sk.first_payload, plaintext)
