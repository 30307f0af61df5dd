"""The ESP transform of one SA, sans-IO (RFC 4303; AES-GCM RFC 4106, ChaCha20-Poly1305 RFC 7634,
AES-CTR RFC 3686, AES-CBC RFC 3602, HMAC-SHA2 RFC 4868, NULL RFC 2410, ESN RFC 4304).

``EspTransform.build(...)`` turns plain SA parameters (SPI, algorithm names from
``userspace_ipsec.algorithms`` and keys, ESN flag, replay window, next outbound sequence number)
into an object whose cipher and HMAC contexts and ``struct.Struct``s are made once. The object
knows nothing about IP: tunnel or transport mode is the caller's choice of ``next_header``
(4/41 for a whole inner packet, the upper-layer protocol for transport mode).

Outbound: ``seal(payload, next_header) -> bytes`` gives SPI|seq|IV|ciphertext|ICV, with the
RFC 4303 padding (1, 2, 3, ...) inside the ciphertext; ``seal_into(payload, next_header, out,
offset) -> end`` writes the same bytes into a caller's buffer (room for outer headers in front);
``seal_slot(slot, n, next_header)`` turns the payload at the start of a ``SealSlot``'s body into
the ESP packet where it lies (an AEAD encrypts in place: the datapath's per-packet path).
IVs: random and unpredictable for CBC, the 64-bit sequence number for GCM/ChaCha20/CTR (unique
per packet because the counter never repeats). When the counter is used up (2^32 - 1 without
ESN, 2^64 - 1 with it) ``seal`` raises ``SequenceExhausted`` and the caller must expire the SA.

Inbound: ``open(packet) -> (next_header, payload)``; ``open_into(packet, out, offset) ->
(next_header, end)`` writes the payload at ``out[offset:end]`` (``out`` needs ``len(packet)``
bytes from ``offset``); an AEAD also has ``open_in_place``, which decrypts a received packet
over its own ciphertext, and ``open_run``, which does that in one pass for a run of packets of
one size that continue the replay window in order (a GRO receive of one stream). Any reason
not to deliver raises ``EspDrop`` whose ``reason`` is a ``DropReason``; it is the only
exception bad input can cause. Exceptions keep the common path free of result checks; drops
are the rare path. A dummy packet (next header 59, RFC 4303 2.6)
is authenticated and recorded in the replay window, then raised as ``EspDrop(DUMMY)``, which
the datapath discards without counting an error.

Order of inbound checks (RFC 4303 3.4): length and alignment, SPI, replay ``check``, ICV
(constant time ``hmac.compare_digest``, or the AEAD tag), decrypt, replay ``accept``, padding.
A forged packet therefore never moves the replay window.

Speed: cryptography builds a new CBC/CTR context in ~20 us, ten times the cost of the cipher
work for a 1400-byte packet, so CBC keeps one encryptor and one decryptor per SA for its whole
life. Outbound, a fresh random block R is fed first and its ciphertext E(R xor chain) becomes
the packet's IV (unpredictable, NIST SP 800-38A appendix C style); inbound, the packet's IV is
fed first so the chain restarts from it and the first output block is dropped. AES-CTR is a
persistent ECB context applied to the counter blocks, XORed with the data as big integers.

An ``EspTransform`` is not thread-safe: one worker owns it. Keys never appear in its repr.
"""

from __future__ import annotations

import abc
import hmac
import os
import struct
from collections import deque
from collections.abc import Iterable, Sequence
from enum import IntEnum
from itertools import count, repeat, takewhile
from operator import and_, attrgetter, eq, length_hint, rshift, setitem, truth

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from datapath.replay import ReplayWindow
from userspace_ipsec.algorithms import (
    AlgKind,
    Algorithm,
    check_key,
    encryption_by_name,
    integrity_by_name,
)

NEXT_HEADER_DUMMY = 59  # RFC 4303 2.6: "no next header", a dummy (TFC) packet
MAX_PAYLOAD = 65535
AEAD_HEAD = 16  # an AEAD packet's bytes before the ciphertext: SPI, sequence number, 8-byte IV
AEAD_ICV = 16  # ... and after it: the tag (AES-GCM-16, ChaCha20-Poly1305)
# Room a packet sealed where it lies needs in front of it (the ESP header) and behind it
# (padding, the 2 trailer bytes and the ICV): see SealSlot.
SEAL_HEAD = AEAD_HEAD
SEAL_TAIL = 258 + AEAD_ICV

_LOW = 0xFFFFFFFF
_HDR = struct.Struct("!II")  # SPI, low 32 bits of the sequence number
# ... and the 8-byte IV of AES-GCM and ChaCha20-Poly1305, as bytes: the nonce's tail (RFC 4106
# 4, RFC 7634 2), so it is converted once per packet, not once for the header and once for it.
HEAD_IV = struct.Struct("!II8s")
_AAD_ESN = struct.Struct("!III")  # RFC 4106 5 / RFC 7634 3: SPI, seq high, seq low
_HDR_SEQ = struct.Struct("!IIQ")  # SPI, low 32 bits and all 64 bits (the IV) of the number
_NONCE = struct.Struct("!4sQ")  # salt, IV
_U32 = struct.Struct("!I")
_VIEWS = attrgetter("views")  # a SealSlot's, for C-level loops over slots (seal_run)

# Padding bytes for each pad length (RFC 4303 2.4: 1, 2, 3, ...), and the whole trailer
# (padding, pad length, next header) by pad length and next header.
_PADS = tuple(bytes(range(1, n + 1)) for n in range(256))
# seal pads to the cipher's block (at most 16 bytes): padding below 16 bytes is all it makes.
_TRAILERS = tuple(tuple(pad + bytes((len(pad), nh)) for nh in range(256)) for pad in _PADS[:16])
# The trailer read in one go: the 4 bytes before pad length and next header hold up to 4
# padding bytes, checked against the expected ones under a mask (no slice per packet).
_TRAILER = struct.Struct("!IBB")
_PAD_MASK = tuple((1 << 8 * n) - 1 for n in range(5))
_PAD_WORD = tuple(int.from_bytes(_PADS[n], "big") for n in range(5))
# The padding and trailer of each pad length, read as one field and two: a run's packets
# (EspTransform.open_run) must all read the same.
_RUN_TRAILERS = tuple(struct.Struct(f"!{n}sBB") for n in range(256))
_PAD_NH = struct.Struct("!BB")

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "hmac-md5": hashes.MD5,
    "hmac-sha1": hashes.SHA1,
    "hmac-sha256": hashes.SHA256,
    "hmac-sha384": hashes.SHA384,
    "hmac-sha512": hashes.SHA512,
}


class DropReason(IntEnum):
    MALFORMED = 1  # too short, or the ciphertext is not aligned to the block size
    SPI_MISMATCH = 2  # the packet names another SA
    REPLAY = 3  # duplicate or older than the window
    AUTH = 4  # ICV or AEAD tag does not verify
    BAD_PADDING = 5  # pad length beyond the data, or padding bytes not 1, 2, 3, ...
    DUMMY = 6  # next header 59: authentic dummy packet, discard silently


class EspDrop(Exception):  # noqa: N818  (a drop verdict, not an error of ours)
    """An inbound packet that must not be delivered; ``reason`` says why."""

    __slots__ = ("reason",)

    def __init__(self, reason: DropReason) -> None:
        super().__init__(reason.name)
        self.reason = reason


class SequenceExhausted(Exception):  # noqa: N818
    """The outbound sequence number space is used up; the SA must be expired."""


class EspConfigError(ValueError):
    """Parameters that cannot make an ESP SA (unknown algorithm, bad key length, ...)."""


class SealSlot:
    """A buffer in which a packet becomes an ESP packet where it lies: SEAL_HEAD bytes of
    room for the ESP header, the payload at ``body`` and SEAL_TAIL bytes of room behind it.

    An AEAD writes the header in front, the trailer behind and encrypts in place
    (``EspTransform.seal_slot``). The views of one payload size (what is encrypted, where
    the ciphertext and tag go, the whole packet) are made when that size first comes and
    kept while it repeats, as it does in a stream: sealing then makes no slice at all."""

    __slots__ = ("buf", "body", "ptlen", "plain", "sealed", "packet", "aad", "views", "_spare")

    def __init__(self, buf: memoryview) -> None:
        if len(buf) <= SEAL_HEAD + SEAL_TAIL:
            raise ValueError("a SealSlot needs room for a payload")
        self.buf = buf
        self.body = buf[SEAL_HEAD:]  # the payload, then the room behind it
        self.ptlen = -1  # the plaintext size (payload, padding, trailer) the views are for
        self.plain = self.sealed = self.packet = buf[:0]
        self.aad = buf[:8]  # SPI and sequence number: the AAD without ESN
        self.views = self._views()
        self._spare: memoryview | None = None

    @classmethod
    def holding(cls, payload: bytes | bytearray | memoryview) -> SealSlot:
        """A new slot just big enough for ``payload``, copied in."""
        n = len(payload)
        slot = cls(memoryview(bytearray(SEAL_HEAD + n + SEAL_TAIL)))
        slot.body[:n] = payload
        return slot

    def fit(self, ptlen: int) -> None:
        """Make the views for a plaintext of ``ptlen`` bytes (ValueError if it cannot fit)."""
        if ptlen + AEAD_ICV > len(self.body):
            raise ValueError(f"no room to seal {ptlen} bytes in place")
        self.plain = self.body[:ptlen]
        self.sealed = self.body[:ptlen + AEAD_ICV]
        self.packet = self.buf[:SEAL_HEAD + ptlen + AEAD_ICV]
        self.ptlen = ptlen
        self.views = self._views()

    def _views(self) -> tuple[int, memoryview, memoryview, memoryview, memoryview,
                              memoryview, memoryview]:
        """All of them in one tuple: a run of slots (seal_run) reads them with one attribute
        lookup per slot and transposes them with zip, in C."""
        return self.ptlen, self.body, self.buf, self.aad, self.plain, self.sealed, self.packet

    def spare(self) -> memoryview:
        """A second buffer as big as this one, for a transform that cannot seal in place."""
        if self._spare is None:
            self._spare = memoryview(bytearray(len(self.buf) + 64))
        return self._spare


class EspTransform(abc.ABC):
    """ESP processing for one SA. Build with ``EspTransform.build``; see the module doc."""

    __slots__ = (
        "spi", "esn", "replay", "encryption", "integrity",
        "_spi_hi", "_next_seq", "_seq_limit", "_align_mask", "_head_len", "_icv_len", "_pt_at",
        "_mac", "_work", "_out",
    )

    def __init__(
        self, spi: int, enc: Algorithm, enc_key: bytes, integ: Algorithm, integ_key: bytes, *,
        esn: bool, replay_window: int, next_seq: int,
    ) -> None:
        self.spi = spi
        self._spi_hi = spi << 32  # header = (_spi_hi | seq_low).to_bytes(8)
        self.esn = esn
        self.replay = ReplayWindow(replay_window, esn=esn)
        self.encryption = enc.name
        self.integrity = integ.name
        self._next_seq = next_seq
        self._seq_limit = (1 << 64) - 1 if esn else _LOW
        self._align_mask = max(enc.block_bytes, 4) - 1
        self._head_len = 8 + enc.iv_bytes
        self._pt_at = 0
        self._work = memoryview(bytearray(0))
        self._out = memoryview(bytearray(0))
        if integ.name == "null":
            self._mac: crypto_hmac.HMAC | None = None
            self._icv_len = enc.icv_bytes
        else:
            self._mac = crypto_hmac.HMAC(integ_key, _HASHES[integ.name]())
            self._icv_len = integ.icv_bytes
        self._setup(enc, enc_key)

    @abc.abstractmethod
    def _setup(self, enc: Algorithm, key: bytes) -> None:
        """Build the cipher contexts for ``key`` (salt included where the algorithm has one)."""

    @staticmethod
    def build(
        spi: int,
        encryption: str,
        enc_key: bytes,
        integrity: str = "null",
        integ_key: bytes = b"",
        *,
        esn: bool = False,
        replay_window: int = 64,
        next_seq: int = 1,
        allow_weak: bool = False,
    ) -> EspTransform:
        """Make the transform for one SA. Raises ``EspConfigError`` on unusable parameters."""
        enc = encryption_by_name(encryption)
        integ = integrity_by_name(integrity)
        if enc is None:
            raise EspConfigError(f"unknown encryption algorithm {encryption!r}")
        if integ is None:
            raise EspConfigError(f"unknown integrity algorithm {integrity!r}")
        for alg, key in ((enc, enc_key), (integ, integ_key)):
            why = check_key(alg, key)
            if why is not None:
                raise EspConfigError(why)
            if alg.weak and not allow_weak:
                raise EspConfigError(f"{alg.name} is weak (RFC 8221); refused unless allowed")
        if enc.kind is AlgKind.AEAD and integ.name != "null":
            raise EspConfigError(f"{enc.name} is an AEAD and takes no integrity algorithm")
        if enc.kind is not AlgKind.AEAD and integ.name == "null":
            if enc.name == "null":
                raise EspConfigError("ESP with NULL encryption needs an integrity algorithm")
            if not allow_weak:
                raise EspConfigError(f"{enc.name} without integrity is refused unless allowed")
        if not 0 <= spi <= _LOW:
            raise EspConfigError("SPI must fit in 32 bits")
        if spi < 256:
            raise EspConfigError("SPI values 0-255 are reserved (RFC 4303 2.1)")
        if not 1 <= next_seq <= ((1 << 64) if esn else (1 << 32)):
            raise EspConfigError("next_seq out of range")
        if replay_window < 0:
            raise EspConfigError("replay window must be >= 0")
        cls = _CLASSES[enc.name]
        return cls(spi, enc, enc_key, integ, integ_key,
                   esn=esn, replay_window=replay_window, next_seq=next_seq)

    # -- sizes ------------------------------------------------------------------------------

    @property
    def next_seq(self) -> int:
        """Sequence number the next sealed packet will carry."""
        return self._next_seq

    @property
    def seq_remaining(self) -> int:
        """How many more packets ``seal`` will accept."""
        return max(0, self._seq_limit - self._next_seq + 1)

    def sealed_len(self, payload_len: int) -> int:
        """Length of the ESP packet ``seal`` makes from a payload of ``payload_len`` bytes."""
        ptlen = payload_len + 2 + (-(payload_len + 2) & self._align_mask)
        return self._head_len + ptlen + self._icv_len

    @property
    def max_overhead(self) -> int:
        """Most bytes ESP adds to a payload (header, IV, padding, trailer, ICV)."""
        return self._head_len + self._align_mask + 2 + self._icv_len

    # -- outbound ---------------------------------------------------------------------------

    def seal(self, payload: bytes | bytearray | memoryview, next_header: int) -> bytes:
        """The ESP packet (from the SPI on) carrying ``payload``."""
        need = self.sealed_len(len(payload))
        out = self._out
        if len(out) < need:
            out = self._out = memoryview(bytearray(max(need, 2048)))
        end = self.seal_into(payload, next_header, out, 0)
        return bytes(out[:end])

    def seal_into(
        self, payload: bytes | bytearray | memoryview, next_header: int,
        out: bytearray | memoryview, offset: int = 0,
    ) -> int:
        """Write the ESP packet at ``out[offset:]``; return the offset just past it."""
        n = len(payload)
        if n > MAX_PAYLOAD:
            raise ValueError(f"payload too large ({n} bytes)")
        at = self._pt_at
        work = self._work
        if len(work) < at + n + SEAL_TAIL:  # room for the payload, padding, trailer (ICV)
            work = self._work = memoryview(bytearray(max(at + n + SEAL_TAIL, 2048)))
        work[at:at + n] = payload
        return self.seal_staged(n, next_header, out, offset)

    def seal_slot(self, slot: SealSlot, n: int, next_header: int) -> memoryview:
        """Seal the ``n``-byte payload at ``slot.body``; return the ESP packet, a view that
        stays valid until the slot is reused. An AEAD seals in place (see SealSlot); the
        others seal into the slot's spare buffer."""
        out = slot.spare()
        return out[:self.seal_into(slot.body[:n], next_header, out)]

    def staging(self) -> memoryview:
        """The buffer ``seal_staged`` seals from: write the payload (up to MAX_PAYLOAD bytes)
        at its start. Valid until the next ``staging`` or ``seal_into`` on this transform,
        and sealing may overwrite all of it (an AEAD encrypts there); lets a caller build a
        packet in place instead of copying it in."""
        at = self._pt_at
        need = at + MAX_PAYLOAD + SEAL_TAIL
        if len(self._work) < need:
            self._work = memoryview(bytearray(need))
        return self._work[at:]

    @abc.abstractmethod
    def seal_staged(
        self, n: int, next_header: int, out: bytearray | memoryview, offset: int = 0,
    ) -> int:
        """Seal the ``n``-byte payload at the start of ``staging()`` (see ``seal_into``)."""

    # -- inbound ----------------------------------------------------------------------------

    def open(self, packet: bytes | bytearray | memoryview) -> tuple[int, bytes]:
        """``(next_header, payload)`` of an ESP packet, or raise ``EspDrop``."""
        out = self._out
        if len(out) < len(packet):
            out = self._out = memoryview(bytearray(max(len(packet), 2048)))
        next_header, end = self.open_into(packet, out, 0)
        return next_header, bytes(out[:end])

    def open_known(
        self, packet: bytes | bytearray | memoryview, low: int, iv: bytes, out: memoryview,
        offset: int = 0,
    ) -> tuple[int, int]:
        """``open_into`` for a caller that has read the first 16 bytes of ``packet`` with
        ``HEAD_IV``: the SPI (and found this transform by it), the low 32 bits of the sequence
        number and an 8-byte IV; its ``out`` is a memoryview. A transform with another IV ignores
        ``low`` and ``iv``; an AEAD saves reading them again."""
        return self.open_into(packet, out, offset)

    @abc.abstractmethod
    def open_into(
        self, packet: bytes | bytearray | memoryview, out: bytearray | memoryview,
        offset: int = 0,
    ) -> tuple[int, int]:
        """Decrypt into ``out[offset:]``; return ``(next_header, end of payload)``."""

    opens_in_place = False  # True: open_in_place works (an AEAD: AEAD_HEAD and AEAD_ICV)

    def open_in_place(
        self, low: int, iv: bytes, sealed: memoryview, plain: memoryview, ctlen: int,
    ) -> tuple[int, int]:
        """Open a packet where it lies; only where ``opens_in_place``. The caller has read
        the first AEAD_HEAD bytes with ``HEAD_IV`` (the SPI, which found this transform,
        ``low`` and ``iv``); ``sealed`` is the rest (ciphertext and tag) and ``plain`` the
        ``ctlen`` bytes at its start, where the plaintext goes. Returns ``(next_header,
        payload length)``: the payload is at the start of ``plain``."""
        raise NotImplementedError(f"{type(self).__name__} cannot open in place")

    def open_run(
        self, headers: Iterable[tuple[int, ...]], ivs: Sequence[memoryview],
        sealed: Sequence[memoryview], aads: Iterable[memoryview | bytes],
        plain: Sequence[memoryview], ctlen: int,
    ) -> tuple[int, bool]:
        """``open_in_place`` for a run of packets at once, where the transform can (an
        AEAD); (0, False): nothing was opened, ``open_in_place`` each."""
        return 0, False

    def trailer(self, plain: memoryview, ctlen: int) -> tuple[int, int]:
        """``(next_header, payload length)`` from the end of the ``ctlen`` bytes of plaintext
        at the start of ``plain``, after checking the padding (RFC 4303 2.4: 1, 2, 3, ...);
        a dummy packet raises ``EspDrop(DUMMY)``."""
        if ctlen < 6:  # (the trailer read below would start before the buffer)
            return self._trailer(plain, 0, ctlen)
        pad4, padlen, next_header = _TRAILER.unpack_from(plain, ctlen - 6)
        size = ctlen - (padlen + 2)  # (a small int is cached: one new int, not two)
        if padlen and (size < 0 or (
                pad4 & _PAD_MASK[padlen] != _PAD_WORD[padlen] if padlen <= 4
                else plain[size:ctlen - 2] != _PADS[padlen])):
            raise EspDrop(DropReason.BAD_PADDING)
        if next_header == NEXT_HEADER_DUMMY:
            raise EspDrop(DropReason.DUMMY)
        return next_header, size

    @staticmethod
    def run_trailer(plain: Sequence[memoryview], ctlen: int, n: int) -> tuple[int, int] | None:
        """The ``(next_header, payload length)`` of the first ``n`` packets ``open_run``
        opened, if they all end in the same valid padding and trailer (read in one pass);
        None: read each with ``trailer``."""
        padlen, next_header = _PAD_NH.unpack_from(plain[0], ctlen - 2)
        size = ctlen - (padlen + 2)
        if size < 0 or next_header == NEXT_HEADER_DUMMY:
            return None
        end = _RUN_TRAILERS[padlen]
        expected = (_PADS[padlen], padlen, next_header)
        if list(map(end.unpack_from, plain[:n], repeat(size, n))).count(expected) != n:
            return None
        return next_header, size

    def seal_run(self, slots: Sequence[SealSlot], n: int, next_header: int,
                 ) -> list[memoryview] | None:
        """``seal_slot`` for every slot at once, where the transform can (an AEAD); None:
        nothing was sealed, ``seal_slot`` each."""
        return None

    @staticmethod
    def _trailer(out: memoryview, offset: int, end: int) -> tuple[int, int]:
        """``(next_header, end of payload)`` from the decrypted trailer before ``end``, after
        checking the padding (RFC 4303 2.4: 1, 2, 3, ...) and refusing a dummy packet."""
        padlen = out[end - 2]
        next_header = out[end - 1]
        pay_end = end - 2 - padlen
        if pay_end < offset or out[pay_end:end - 2] != _PADS[padlen]:
            raise EspDrop(DropReason.BAD_PADDING)
        if next_header == NEXT_HEADER_DUMMY:
            raise EspDrop(DropReason.DUMMY)
        return next_header, pay_end

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(spi={self.spi:#010x}, {self.encryption}/"
                f"{self.integrity}, esn={self.esn}, next_seq={self._next_seq})")


class _CipherEsp(EspTransform):
    """A cipher with a separate ICV (HMAC, or none for debugging): NULL, CBC and CTR. The
    subclass encrypts and decrypts; sealing and opening around that (sequence number,
    trailer, ICV, replay window) are common."""

    __slots__ = ()

    def seal_staged(
        self, n: int, next_header: int, out: bytearray | memoryview, offset: int = 0,
    ) -> int:
        seq = self._next_seq
        if seq > self._seq_limit:
            raise SequenceExhausted(f"SPI {self.spi:#010x}: sequence numbers used up")
        padlen = -(n + 2) & self._align_mask
        ptlen = n + padlen + 2
        icv_at = offset + self._head_len + ptlen
        end = icv_at + self._icv_len
        outmv = memoryview(out)
        if end > len(outmv) or n > MAX_PAYLOAD:
            raise ValueError(f"output buffer too small or payload too large ({n} bytes)")
        self._next_seq = seq + 1
        work = self._work
        t = self._pt_at + n
        work[t:t + padlen + 2] = _TRAILERS[padlen][next_header]
        self._encrypt(seq, work, ptlen, outmv, offset)
        mac = self._mac
        if mac is not None:
            h = mac.copy()
            h.update(outmv[offset:icv_at])
            if self.esn:
                h.update(_U32.pack(seq >> 32))  # RFC 4303 2.2.1: high bits sent implicitly
            outmv[icv_at:end] = h.finalize()[:self._icv_len]
        return end

    @abc.abstractmethod
    def _encrypt(
        self, seq: int, work: memoryview, ptlen: int, out: memoryview, offset: int
    ) -> None:
        """Write header, IV and ciphertext of the plaintext in ``work``."""

    def open_into(
        self, packet: bytes | bytearray | memoryview, out: bytearray | memoryview,
        offset: int = 0,
    ) -> tuple[int, int]:
        data = memoryview(packet)
        n = len(data)
        ctlen = n - self._head_len - self._icv_len
        if ctlen < 2 or ctlen & self._align_mask:
            raise EspDrop(DropReason.MALFORMED)
        spi, low = _HDR.unpack_from(data)
        if spi != self.spi:
            raise EspDrop(DropReason.SPI_MISMATCH)
        replay = self.replay
        seq = replay.check(low)
        if seq is None:
            raise EspDrop(DropReason.REPLAY)
        mac = self._mac
        if mac is not None:
            icv_at = n - self._icv_len
            h = mac.copy()
            h.update(data[:icv_at])
            if self.esn:
                h.update(_U32.pack(seq >> 32))
            if not hmac.compare_digest(h.finalize()[:self._icv_len], data[icv_at:]):
                raise EspDrop(DropReason.AUTH)
        outmv = memoryview(out)
        end = offset + ctlen
        if end > len(outmv):
            raise ValueError("output buffer too small")
        self._decrypt(seq, data, ctlen, outmv, offset)
        replay.accept(seq)
        return self._trailer(outmv, offset, end)

    @abc.abstractmethod
    def _decrypt(
        self, seq: int, data: memoryview, ctlen: int, out: memoryview, offset: int
    ) -> None:
        """Write the ``ctlen`` plaintext bytes at ``out[offset:]``."""


class _NullEsp(_CipherEsp):
    """RFC 2410 NULL encryption (integrity only)."""

    __slots__ = ()

    def _setup(self, enc: Algorithm, key: bytes) -> None:
        pass

    def _encrypt(
        self, seq: int, work: memoryview, ptlen: int, out: memoryview, offset: int
    ) -> None:
        out[offset:offset + 8] = (self._spi_hi | (seq & _LOW)).to_bytes(8, "big")
        out[offset + 8:offset + 8 + ptlen] = work[:ptlen]

    def _decrypt(
        self, seq: int, data: memoryview, ctlen: int, out: memoryview, offset: int
    ) -> None:
        out[offset:offset + ctlen] = data[8:8 + ctlen]


class _AeadEsp(EspTransform):
    """AES-GCM (RFC 4106) and ChaCha20-Poly1305 (RFC 7634): IV = 64-bit sequence number."""

    __slots__ = ("_aead", "_salt", "_stage")

    def _setup(self, enc: Algorithm, key: bytes) -> None:
        key, self._salt = key[:-enc.salt_bytes], key[-enc.salt_bytes:]  # nonce = salt | IV
        self._aead = AESGCM(key) if enc.name == "aes-gcm-16" else ChaCha20Poly1305(key)
        self._pt_at = SEAL_HEAD  # the staging buffer is a SealSlot (seal_staged)
        self._stage: SealSlot | None = None

    def seal_slot(self, slot: SealSlot, n: int, next_header: int) -> memoryview:
        # The ciphertext goes over the plaintext (OpenSSL's AEADs take input and output at
        # the same address), through the views the slot keeps for this size: the outbound
        # datapath's per-packet path, and the AEAD's only sealing routine.
        seq = self._next_seq
        if seq > self._seq_limit:
            raise SequenceExhausted(f"SPI {self.spi:#010x}: sequence numbers used up")
        if n > MAX_PAYLOAD:
            raise ValueError(f"payload too large ({n} bytes)")
        padlen = (-2 - n) & self._align_mask
        ptlen = n + (padlen + 2)
        if slot.ptlen != ptlen:
            slot.fit(ptlen)
        self._next_seq = seq + 1
        slot.body[n:ptlen] = _TRAILERS[padlen][next_header]
        low = seq & _LOW
        spi = self.spi
        _HDR_SEQ.pack_into(slot.buf, 0, spi, low, seq)
        self._aead.encrypt_into(
            _NONCE.pack(self._salt, seq), slot.plain,
            _AAD_ESN.pack(spi, seq >> 32, low) if self.esn else _HDR.pack(spi, low),
            slot.sealed,
        )
        return slot.packet

    def seal_run(self, slots: Sequence[SealSlot], n: int, next_header: int,
                 ) -> list[memoryview] | None:
        """``seal_slot`` for every slot, all with ``n`` bytes of payload, in one pass: the
        per-packet steps (views, trailer, header, nonce, encryption) run in C-level loops
        (map over the slots), not in the interpreter. The sending gateway's path for the
        packets of one stream in a TUN read batch. None, with nothing taken, when the
        sequence numbers left are fewer than the slots: ``seal_slot`` each, which raises
        ``SequenceExhausted`` where they run out."""
        m = len(slots)
        seq = self._next_seq
        if seq + m - 1 > self._seq_limit or n > MAX_PAYLOAD:
            return None
        padlen = (-2 - n) & self._align_mask
        ptlen = n + (padlen + 2)
        ptlens, bodies, bufs, aads, plains, sealeds, packets = zip(*map(_VIEWS, slots), strict=True)
        if ptlens.count(ptlen) != m:
            for slot in slots:
                if slot.ptlen != ptlen:
                    slot.fit(ptlen)
            ptlens, bodies, bufs, aads, plains, sealeds, packets = zip(
                *map(_VIEWS, slots), strict=True)
        self._next_seq = seq + m
        numbers = range(seq, seq + m)
        deque(map(setitem, bodies, repeat(slice(n, ptlen)),
                  repeat(_TRAILERS[padlen][next_header])), 0)
        spi = self.spi
        lows = map(and_, numbers, repeat(_LOW))
        deque(map(_HDR_SEQ.pack_into, bufs, repeat(0), repeat(spi), lows, numbers), 0)
        if self.esn:
            aads = tuple(map(_AAD_ESN.pack, repeat(spi), map(rshift, numbers, repeat(32)),
                             map(and_, numbers, repeat(_LOW))))
        deque(map(self._aead.encrypt_into, map(_NONCE.pack, repeat(self._salt), numbers),
                  plains, aads, sealeds), 0)
        return list(packets)

    def seal_staged(
        self, n: int, next_header: int, out: bytearray | memoryview, offset: int = 0,
    ) -> int:
        # The staging buffer is a SealSlot: seal there, then copy the packet out.
        end = offset + self.sealed_len(n)
        if end > len(out):  # (refused before a sequence number is taken)
            raise ValueError(f"output buffer too small ({len(out)} bytes, {end} needed)")
        stage = self._stage
        if stage is None or stage.buf.obj is not self._work.obj:  # new or grown
            stage = self._stage = SealSlot(self._work)
        out[offset:end] = self.seal_slot(stage, n, next_header)
        return end

    def open_into(
        self, packet: bytes | bytearray | memoryview, out: bytearray | memoryview,
        offset: int = 0,
    ) -> tuple[int, int]:
        n = len(packet)
        if n - 32 < 2 or (n - 32) & self._align_mask:
            raise EspDrop(DropReason.MALFORMED)
        spi, low, iv = HEAD_IV.unpack_from(packet)
        if spi != self.spi:
            raise EspDrop(DropReason.SPI_MISMATCH)
        if type(out) is not memoryview:
            out = memoryview(out)  # a bytearray's slice would be a copy
        return self.open_known(packet, low, iv, out, offset)

    def open_known(
        self, packet: bytes | bytearray | memoryview, low: int, iv: bytes, out: memoryview,
        offset: int = 0,
    ) -> tuple[int, int]:
        ctlen = len(packet) - 32
        next_header, size = self.open_in_place(
            low, iv, memoryview(packet)[16:], out[offset:offset + ctlen], ctlen)
        return next_header, offset + size

    opens_in_place = True

    def open_in_place(
        self, low: int, iv: bytes, sealed: memoryview, plain: memoryview, ctlen: int,
    ) -> tuple[int, int]:
        # The base class's open_known with _decrypt inlined, no HMAC and the replay check's
        # common case (the next packet in order, without ESN) decided here: each step on the
        # receiving gateway's per-packet path is a few hundred instructions of the interpreter.
        if ctlen < 2 or ctlen & self._align_mask:
            raise EspDrop(DropReason.MALFORMED)
        replay = self.replay
        esn = self.esn
        following = replay.highest + 1
        if low == following and not esn:
            seq = low
        else:
            checked = replay.check(low)
            if checked is None:
                raise EspDrop(DropReason.REPLAY)
            seq = checked
        try:  # (decrypt_into refuses an output buffer of the wrong size with ValueError)
            self._aead.decrypt_into(
                self._salt + iv, sealed,
                _AAD_ESN.pack(self.spi, seq >> 32, low) if esn else _HDR.pack(self.spi, low),
                plain)
        except InvalidTag:
            raise EspDrop(DropReason.AUTH) from None
        if seq == following:
            replay.highest = seq  # in order: ReplayWindow.accept's whole work
        else:
            replay.accept(seq)
        return self.trailer(plain, ctlen)

    def open_run(
        self, headers: Iterable[tuple[int, ...]], ivs: Sequence[memoryview],
        sealed: Sequence[memoryview], aads: Iterable[memoryview | bytes],
        plain: Sequence[memoryview], ctlen: int,
    ) -> tuple[int, bool]:
        """Open in place, in one pass, a run of packets that all have ``ctlen`` bytes of
        ciphertext: packet i's (SPI, sequence number) is ``headers[i]``, its IV ``ivs[i]``, its
        first 8 bytes ``aads[i]`` (the AAD without ESN); ``sealed``/``plain`` as for
        ``open_in_place``. Only the leading packets that carry this SA's SPI and, in order,
        the numbers right after the replay window's highest (so all new) are taken.

        Returns ``(opened, failed)``: packets 0..opened were authentic and are recorded in
        the replay window (their trailers are unread: ``run_trailer``, ``trailer``); with
        ``failed``, packet ``opened`` failed authentication (its bytes are garbage now). The
        packets after those are untouched, for ``open_in_place``. (0, False) for a
        ``ctlen`` that no packet can have.

        This is the receiving gateway's path for a GRO batch of one stream: the per-packet
        steps run in C (map over the AEAD, takewhile over the headers), not in the
        interpreter, which costs more per packet than the decryption itself."""
        if ctlen < 6 or ctlen & self._align_mask:
            return 0, False
        replay = self.replay
        highest = replay.highest
        spi = self.spi
        esn = self.esn
        # (With ESN the wire has the low 32 bits, which wrap; without, a number past 2^32 - 1
        # matches nothing.)
        expected = zip(repeat(spi), map(and_, count(highest + 1), repeat(_LOW)) if esn
                       else count(highest + 1))
        run = len(list(takewhile(truth, map(eq, headers, expected))))
        if not run:
            return 0, False
        if esn:  # the AAD has the high 32 bits, which are not on the wire
            numbers = range(highest + 1, highest + 1 + run)
            aads = map(_AAD_ESN.pack, repeat(spi), map(rshift, numbers, repeat(32)),
                       map(and_, numbers, repeat(_LOW)))
        nonce_ivs = iter(ivs[:run])
        try:
            deque(map(self._aead.decrypt_into, map(self._salt.__add__, nonce_ivs), sealed,
                      aads, plain), 0)
        except InvalidTag:
            opened = run - length_hint(nonce_ivs) - 1  # (map took the failed packet's IV)
            replay.highest = highest + opened
            return opened, True
        replay.highest = highest + run  # in order after highest: the window's run grows
        return run, False

class _CbcEsp(_CipherEsp):
    """AES-CBC (RFC 3602) and (3)DES-CBC with persistent contexts; see the module doc."""

    __slots__ = ("_enc", "_dec", "_block", "_pool", "_pool_at")

    def _setup(self, enc: Algorithm, key: bytes) -> None:
        block = enc.block_bytes
        if enc.name == "aes-cbc":
            cipher: algorithms.AES | TripleDES = algorithms.AES(key)
        else:  # single DES is 3DES with K1 = K2 = K3
            cipher = TripleDES(key * 3 if len(key) == 8 else key)
        zero_iv = bytes(block)
        self._enc: CipherContext = Cipher(cipher, modes.CBC(zero_iv)).encryptor()
        self._dec: CipherContext = Cipher(cipher, modes.CBC(zero_iv)).decryptor()
        self._block = block
        self._pt_at = block  # room in front of the plaintext for the block that becomes the IV
        self._pool = memoryview(b"")
        self._pool_at = 0

    def _encrypt(
        self, seq: int, work: memoryview, ptlen: int, out: memoryview, offset: int
    ) -> None:
        out[offset:offset + 8] = (self._spi_hi | (seq & _LOW)).to_bytes(8, "big")
        block = self._block
        at = self._pool_at
        if at + block > len(self._pool):
            self._pool = memoryview(os.urandom(256 * block))
            at = 0
        self._pool_at = at + block
        work[:block] = self._pool[at:at + block]
        out[offset + 8:offset + 8 + block + ptlen] = self._enc.update(work[:block + ptlen])

    def _decrypt(
        self, seq: int, data: memoryview, ctlen: int, out: memoryview, offset: int
    ) -> None:
        block = self._block
        clear = self._dec.update(data[8:8 + block + ctlen])
        out[offset:offset + ctlen] = memoryview(clear)[block:]


# "prefix.join(_CTR_SUFFIXES[:n + 1])" lays out n RFC 3686 counter blocks prefix|1, prefix|2, ...
_CTR_SUFFIXES = (b"",) + tuple(_U32.pack(i) for i in range(1, (MAX_PAYLOAD >> 4) + 3))


class _CtrEsp(_CipherEsp):
    """AES-CTR (RFC 3686): IV = 64-bit sequence number, block = salt | IV | counter from 1."""

    __slots__ = ("_ecb", "_salt")

    def _setup(self, enc: Algorithm, key: bytes) -> None:
        key, self._salt = key[:-enc.salt_bytes], key[-enc.salt_bytes:]
        self._ecb: CipherContext = Cipher(algorithms.AES(key), modes.ECB()).encryptor()

    def _xor_keystream(self, prefix: bytes, text: memoryview) -> bytes:
        # Python ints are the cheapest XOR the standard library has for a whole packet.
        n = len(text)
        stream = self._ecb.update(prefix.join(_CTR_SUFFIXES[:((n + 15) >> 4) + 1]))
        return (int.from_bytes(stream[:n], "big") ^ int.from_bytes(text, "big")).to_bytes(n, "big")

    def _encrypt(
        self, seq: int, work: memoryview, ptlen: int, out: memoryview, offset: int
    ) -> None:
        iv = seq.to_bytes(8, "big")
        out[offset:offset + 16] = (self._spi_hi | (seq & _LOW)).to_bytes(8, "big") + iv
        out[offset + 16:offset + 16 + ptlen] = self._xor_keystream(self._salt + iv, work[:ptlen])

    def _decrypt(
        self, seq: int, data: memoryview, ctlen: int, out: memoryview, offset: int
    ) -> None:
        out[offset:offset + ctlen] = self._xor_keystream(
            self._salt + data[8:16], data[16:16 + ctlen]
        )


_CLASSES: dict[str, type[EspTransform]] = {
    "null": _NullEsp,
    "aes-gcm-16": _AeadEsp,
    "chacha20-poly1305": _AeadEsp,
    "aes-cbc": _CbcEsp,
    "des-cbc": _CbcEsp,
    "3des-cbc": _CbcEsp,
    "aes-ctr": _CtrEsp,
}
