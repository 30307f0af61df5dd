"""What the IKE side knows about each transform: key sizes, ICV sizes, weakness, names.

`TransformSet` is one negotiated choice per transform type, the output of proposal selection
and the input of key derivation.
"""

from __future__ import annotations

from dataclasses import dataclass

from ike.constants import DhId, EncrId, IntegId, PrfId, ProtocolId, TransformType
from ike.payloads import Proposal, Transform


@dataclass(frozen=True, slots=True)
class EncrAlg:
    id: EncrId
    key_bits: tuple[int, ...]  # accepted Key Length attribute values (without salt)
    block_bytes: int  # padding alignment of the SK payload plaintext
    iv_bytes: int
    icv_bytes: int = 0  # AEAD tag length; 0 for ciphers that need an INTEG transform
    salt_bytes: int = 0  # extra keying material for AEAD nonces (RFC 5282, RFC 7634)
    key_length_attr: bool = True  # False: fixed key, Key Length attribute must be absent
    weak: bool = False

    @property
    def aead(self) -> bool:
        return self.icv_bytes > 0


@dataclass(frozen=True, slots=True)
class IntegAlg:
    id: IntegId
    hash_name: str
    key_bytes: int
    icv_bytes: int
    weak: bool = False


@dataclass(frozen=True, slots=True)
class PrfAlg:
    id: PrfId
    hash_name: str
    size: int  # output length = preferred key length for HMAC PRFs
    weak: bool = False


ENCR_ALGS: dict[int, EncrAlg] = {
    EncrId.AES_CBC: EncrAlg(EncrId.AES_CBC, (128, 192, 256), 16, 16),
    EncrId.AES_GCM_16: EncrAlg(EncrId.AES_GCM_16, (128, 192, 256), 1, 8, 16, 4),
    EncrId.CHACHA20_POLY1305: EncrAlg(EncrId.CHACHA20_POLY1305, (256,), 1, 8, 16, 4,
                                      key_length_attr=False),
    EncrId.TRIPLE_DES: EncrAlg(EncrId.TRIPLE_DES, (192,), 8, 8, key_length_attr=False,
                               weak=True),
}

INTEG_ALGS: dict[int, IntegAlg] = {
    IntegId.HMAC_SHA2_256_128: IntegAlg(IntegId.HMAC_SHA2_256_128, "sha256", 32, 16),
    IntegId.HMAC_SHA2_384_192: IntegAlg(IntegId.HMAC_SHA2_384_192, "sha384", 48, 24),
    IntegId.HMAC_SHA2_512_256: IntegAlg(IntegId.HMAC_SHA2_512_256, "sha512", 64, 32),
    IntegId.HMAC_SHA1_96: IntegAlg(IntegId.HMAC_SHA1_96, "sha1", 20, 12, weak=True),
    IntegId.HMAC_MD5_96: IntegAlg(IntegId.HMAC_MD5_96, "md5", 16, 12, weak=True),
}

PRF_ALGS: dict[int, PrfAlg] = {
    PrfId.HMAC_SHA2_256: PrfAlg(PrfId.HMAC_SHA2_256, "sha256", 32),
    PrfId.HMAC_SHA2_384: PrfAlg(PrfId.HMAC_SHA2_384, "sha384", 48),
    PrfId.HMAC_SHA2_512: PrfAlg(PrfId.HMAC_SHA2_512, "sha512", 64),
    PrfId.HMAC_SHA1: PrfAlg(PrfId.HMAC_SHA1, "sha1", 20, weak=True),
    PrfId.HMAC_MD5: PrfAlg(PrfId.HMAC_MD5, "md5", 16, weak=True),
}

WEAK_DH_GROUPS = frozenset({DhId.MODP768, DhId.MODP1024, DhId.MODP1536})


@dataclass(frozen=True, slots=True)
class TransformSet:
    """One algorithm per transform type, as agreed for an IKE SA or a Child SA.

    `prf` is None for Child SAs; `dh` is DhId.NONE for a Child SA without PFS; `esn` is None
    for IKE SAs. `encr_key_bits` excludes the AEAD salt.
    """

    encr: int
    encr_key_bits: int
    integ: int = IntegId.NONE
    prf: int | None = None
    dh: int = DhId.NONE
    esn: int | None = None

    @property
    def encr_alg(self) -> EncrAlg:
        return ENCR_ALGS[self.encr]

    @property
    def integ_alg(self) -> IntegAlg | None:
        return INTEG_ALGS.get(self.integ)

    @property
    def prf_alg(self) -> PrfAlg:
        if self.prf is None:
            raise ValueError("transform set has no PRF (a Child SA set)")
        return PRF_ALGS[self.prf]

    @property
    def encr_key_bytes(self) -> int:
        """Keying material taken for each encryption key, AEAD salt included."""
        return self.encr_key_bits // 8 + self.encr_alg.salt_bytes

    @property
    def integ_key_bytes(self) -> int:
        alg = self.integ_alg
        return alg.key_bytes if alg else 0

    def transforms(self) -> tuple[Transform, ...]:
        """The transforms to put in a proposal (e.g. the responder's single chosen one)."""
        key_len = self.encr_key_bits if self.encr_alg.key_length_attr else None
        out = [Transform(TransformType.ENCR, self.encr, key_len)]
        if self.prf is not None:
            out.append(Transform(TransformType.PRF, self.prf))
        if self.integ != IntegId.NONE:
            out.append(Transform(TransformType.INTEG, self.integ))
        if self.dh != DhId.NONE:
            out.append(Transform(TransformType.DH, self.dh))
        if self.esn is not None:
            out.append(Transform(TransformType.ESN, self.esn))
        return tuple(out)

    def proposal(self, number: int, protocol: ProtocolId, spi: bytes = b"") -> Proposal:
        return Proposal(number, protocol, spi, self.transforms())

