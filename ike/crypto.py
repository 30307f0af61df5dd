"""IKEv2 key derivation, PSK authentication and SK payload protection.

RFC 7296 2.13 (prf+), 2.14 (SKEYSEED and the IKE SA keys), 2.15 (AUTH), 2.17 (Child SA
KEYMAT), 2.18 (rekeyed SKEYSEED); RFC 5282 (AES-GCM in IKEv2); RFC 7634 (ChaCha20-Poly1305).
Every key field is excluded from repr(); ICVs are compared in constant time.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from ike.constants import EncrId
from ike.errors import IkeIntegrityError, IkeParseError
from ike.transforms import INTEG_ALGS, PRF_ALGS, IntegAlg, TransformSet

KEY_PAD = b"Key Pad for IKEv2"
_PRF_PLUS_MAX_BLOCKS = 255  # the counter octet runs 0x01..0xff (RFC 7296 2.13)


@dataclass(frozen=True, slots=True)
class Prf:
    """An HMAC-based PRF: prf(key, data)."""

    id: int
    hash_name: str
    size: int

    @classmethod
    def for_id(cls, prf_id: int) -> Prf:
        alg = PRF_ALGS.get(prf_id)
        if alg is None:
            raise ValueError(f"unsupported PRF {prf_id}")
        return cls(prf_id, alg.hash_name, alg.size)

    def __call__(self, key: bytes, data: bytes) -> bytes:
        return hmac.digest(key, data, self.hash_name)


def prf_plus(prf: Prf, key: bytes, seed: bytes, length: int) -> bytes:
    """prf+ (K, S) = T1 | T2 | ..., T1 = prf(K, S | 0x01), Tn = prf(K, Tn-1 | S | n)."""
    if length > prf.size * _PRF_PLUS_MAX_BLOCKS:
        raise ValueError(f"prf+ cannot produce {length} bytes with a {prf.size}-byte PRF")
    out = bytearray()
    block = b""
    counter = 1
    while len(out) < length:
        block = prf(key, block + seed + bytes((counter,)))
        out += block
        counter += 1
    return bytes(out[:length])


# --- IKE SA keys --------------------------------------------------------------------------


@dataclass(slots=True)
class IkeSaKeys:
    sk_d: bytes = field(repr=False)
    sk_ai: bytes = field(repr=False)
    sk_ar: bytes = field(repr=False)
    sk_ei: bytes = field(repr=False)
    sk_er: bytes = field(repr=False)
    sk_pi: bytes = field(repr=False)
    sk_pr: bytes = field(repr=False)


def skeyseed(prf: Prf, ni: bytes, nr: bytes, shared_secret: bytes) -> bytes:
    """SKEYSEED = prf(Ni | Nr, g^ir) for a new IKE SA (RFC 7296 2.14)."""
    return prf(ni + nr, shared_secret)


def rekeyed_skeyseed(old_prf: Prf, old_sk_d: bytes, shared_secret: bytes, ni: bytes,
                     nr: bytes) -> bytes:
    """SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr), with the old IKE SA's PRF (2.18)."""
    return old_prf(old_sk_d, shared_secret + ni + nr)


def derive_ike_keys(suite: TransformSet, seed: bytes, ni: bytes, nr: bytes, spi_i: bytes,
                    spi_r: bytes) -> IkeSaKeys:
    """{SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr} = prf+(SKEYSEED, Ni|Nr|SPIi|SPIr)."""
    prf = Prf.for_id(suite.prf_alg.id)
    sizes = (prf.size, suite.integ_key_bytes, suite.integ_key_bytes, suite.encr_key_bytes,
             suite.encr_key_bytes, prf.size, prf.size)
    keymat = prf_plus(prf, seed, ni + nr + spi_i + spi_r, sum(sizes))
    parts = []
    pos = 0
    for size in sizes:
        parts.append(keymat[pos:pos + size])
        pos += size
    return IkeSaKeys(*parts)


# --- Child SA keys ------------------------------------------------------------------------


@dataclass(slots=True)
class ChildSaKeys:
    """Keys of one Child SA pair. `_i` keys protect traffic from the exchange initiator to the
    responder, `_r` keys the reverse. AEAD encryption keys end with their 4-byte salt."""

    encr_i: bytes = field(repr=False)
    integ_i: bytes = field(repr=False)
    encr_r: bytes = field(repr=False)
    integ_r: bytes = field(repr=False)


def derive_child_keys(prf: Prf, sk_d: bytes, suite: TransformSet, ni: bytes, nr: bytes,
                      shared_secret: bytes | None = None) -> ChildSaKeys:
    """KEYMAT = prf+(SK_d, [g^ir (new) |] Ni | Nr), split i->r encr, i->r integ, r->i encr,
    r->i integ (RFC 7296 2.17), the order Linux and strongSwan install them in."""
    ek, ik = suite.encr_key_bytes, suite.integ_key_bytes
    seed = (shared_secret or b"") + ni + nr
    keymat = prf_plus(prf, sk_d, seed, 2 * (ek + ik))
    return ChildSaKeys(keymat[:ek], keymat[ek:ek + ik], keymat[ek + ik:2 * ek + ik],
                       keymat[2 * ek + ik:])


# --- AUTH (RFC 7296 2.15) -----------------------------------------------------------------


def signed_octets(prf: Prf, message: bytes, peer_nonce: bytes, sk_p: bytes,
                  id_body: bytes) -> bytes:
    """<SignedOctets> = RealMessage | NonceData of the peer | prf(SK_p, RestOfIDPayload).

    `message` is our own IKE_SA_INIT message as sent, `sk_p` is SK_pi for the initiator's
    octets and SK_pr for the responder's, `id_body` is the ID payload without its generic
    header (IdPayload.body).
    """
    return message + peer_nonce + prf(sk_p, id_body)


def psk_auth(prf: Prf, psk: bytes, octets: bytes) -> bytes:
    """AUTH = prf(prf(Shared Secret, "Key Pad for IKEv2"), <SignedOctets>)."""
    return prf(prf(psk, KEY_PAD), octets)


def auth_matches(expected: bytes, received: bytes) -> bool:
    return hmac.compare_digest(expected, received)


# --- SK payload protection ----------------------------------------------------------------


def _strip_padding(padded: bytes) -> bytes:
    if not padded:
        raise IkeParseError("SK: empty plaintext")
    pad_len = padded[-1]
    if pad_len + 1 > len(padded):
        raise IkeParseError(f"SK: pad length {pad_len} exceeds plaintext")
    return padded[:-1 - pad_len]


@dataclass(slots=True)
class CbcHmacCipher:
    """AES-CBC with a separate HMAC-SHA2 ICV over header..ciphertext (RFC 7296 3.14)."""

    _encr_key: bytes = field(repr=False)
    _integ: IntegAlg
    _integ_key: bytes = field(repr=False)
    _aes: algorithms.AES = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._aes = algorithms.AES(self._encr_key)

    def sealed_length(self, plaintext_len: int) -> int:
        blocks = plaintext_len // 16 + 1  # room for at least the pad length octet
        return 16 + 16 * blocks + self._integ.icv_bytes

    def seal(self, plaintext: bytes, aad: bytes, iv: bytes | None = None) -> bytes:
        iv = os.urandom(16) if iv is None else iv
        pad_len = 15 - len(plaintext) % 16
        padded = plaintext + bytes(pad_len) + bytes((pad_len,))
        enc = Cipher(self._aes, modes.CBC(iv)).encryptor()
        ct = enc.update(padded) + enc.finalize()
        icv = hmac.digest(self._integ_key, aad + iv + ct, self._integ.hash_name)
        return iv + ct + icv[:self._integ.icv_bytes]

    def open(self, body: bytes, aad: bytes) -> bytes:
        icv_len = self._integ.icv_bytes
        ct_len = len(body) - 16 - icv_len
        if ct_len < 16 or ct_len % 16:
            raise IkeParseError(f"SK: {len(body)}-byte body does not fit AES-CBC")
        expected = hmac.digest(self._integ_key, aad + body[:-icv_len], self._integ.hash_name)
        if not hmac.compare_digest(expected[:icv_len], body[-icv_len:]):
            raise IkeIntegrityError("SK: ICV mismatch")
        dec = Cipher(self._aes, modes.CBC(body[:16])).decryptor()
        return _strip_padding(dec.update(body[16:-icv_len]) + dec.finalize())


@dataclass(slots=True)
class AeadCipher:
    """AES-GCM-16 (RFC 5282) or ChaCha20-Poly1305 (RFC 7634): nonce = salt(4) | IV(8),
    AAD = IKE header through the SK generic header, no padding."""

    encr: int
    _key: bytes = field(repr=False)  # key || 4-byte salt
    _counter: int = field(default=0, repr=False)
    _aead: AESGCM | ChaCha20Poly1305 = field(init=False, repr=False)
    _salt: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        key, self._salt = self._key[:-4], self._key[-4:]
        self._aead = (ChaCha20Poly1305(key) if self.encr == EncrId.CHACHA20_POLY1305
                      else AESGCM(key))

    def sealed_length(self, plaintext_len: int) -> int:
        return 8 + plaintext_len + 1 + 16

    def seal(self, plaintext: bytes, aad: bytes, iv: bytes | None = None) -> bytes:
        if iv is None:
            # A counter never repeats under one key; retransmissions resend stored bytes.
            self._counter += 1
            iv = self._counter.to_bytes(8, "big")
        return iv + self._aead.encrypt(self._salt + iv, plaintext + b"\x00", aad)

    def open(self, body: bytes, aad: bytes) -> bytes:
        if len(body) < 8 + 1 + 16:
            raise IkeParseError(f"SK: {len(body)}-byte body too short for AEAD")
        try:
            padded = self._aead.decrypt(self._salt + body[:8], body[8:], aad)
        except InvalidTag:
            raise IkeIntegrityError("SK: AEAD tag mismatch") from None
        return _strip_padding(padded)


SkProtection = CbcHmacCipher | AeadCipher


def new_sk_cipher(suite: TransformSet, encr_key: bytes, integ_key: bytes) -> SkProtection:
    """The SK payload protection for one direction of an IKE SA."""
    if len(encr_key) != suite.encr_key_bytes:
        raise ValueError("encryption key length does not match the transform set")
    if suite.encr_alg.aead:
        return AeadCipher(suite.encr, encr_key)
    if suite.encr != EncrId.AES_CBC:
        raise ValueError(f"unsupported IKE encryption algorithm {suite.encr}")
    integ = INTEG_ALGS.get(suite.integ)
    if integ is None:
        raise ValueError(f"unsupported IKE integrity algorithm {suite.integ}")
    return CbcHmacCipher(encr_key, integ, integ_key)


def ike_sa_ciphers(suite: TransformSet, keys: IkeSaKeys,
                   initiator: bool) -> tuple[SkProtection, SkProtection]:
    """(outbound, inbound) SK protection for the original initiator or responder."""
    from_i = new_sk_cipher(suite, keys.sk_ei, keys.sk_ai)
    from_r = new_sk_cipher(suite, keys.sk_er, keys.sk_ar)
    return (from_i, from_r) if initiator else (from_r, from_i)
