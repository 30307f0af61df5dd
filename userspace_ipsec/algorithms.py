"""The ESP/AH algorithms the stack knows: PF_KEY numbers, setkey names and key geometry.

One table serves the PF_KEY codec (numbers), the setkey parser (names), SADB_REGISTER (the
supported lists) and the datapath (which cipher to build). Numbers follow Linux's
``include/uapi/linux/pfkeyv2.h``; ChaCha20-Poly1305 has no PF_KEY number on Linux or KAME, so
we use its IANA ESP transform ID (28) as a private assignment, documented in docs/pfkey.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class AlgKind(Enum):
    AEAD = "aead"  # encryption with built-in integrity; no separate auth algorithm
    CIPHER = "cipher"  # encryption that needs an integrity algorithm beside it
    INTEG = "integ"  # integrity (HMAC)


@dataclass(frozen=True, slots=True)
class Algorithm:
    name: str  # canonical setkey name
    kind: AlgKind
    pfkey_id: int  # sadb_sa_encrypt / sadb_sa_auth value
    key_bits: tuple[int, ...]  # accepted key lengths in bits, salt/nonce included
    salt_bytes: int = 0  # trailing bytes of the key that are the nonce salt (RFC 4106/7634/3686)
    iv_bytes: int = 0  # explicit IV carried in each ESP packet
    icv_bytes: int = 0  # integrity check value length (AEAD tag or truncated HMAC)
    block_bytes: int = 4  # payload alignment for padding (RFC 4303: at least 4)
    weak: bool = False  # refused unless explicitly allowed (RFC 8221)
    aliases: tuple[str, ...] = ()


# Encryption algorithms (sadb_sa_encrypt).
ENCRYPTION: tuple[Algorithm, ...] = (
    Algorithm("null", AlgKind.CIPHER, 11, (0,), block_bytes=4),
    Algorithm("des-cbc", AlgKind.CIPHER, 2, (64,), iv_bytes=8, block_bytes=8, weak=True),
    Algorithm("3des-cbc", AlgKind.CIPHER, 3, (192,), iv_bytes=8, block_bytes=8, weak=True),
    Algorithm(
        "aes-cbc", AlgKind.CIPHER, 12, (128, 192, 256), iv_bytes=16, block_bytes=16,
        aliases=("rijndael-cbc",),
    ),
    Algorithm("aes-ctr", AlgKind.CIPHER, 13, (160, 224, 288), salt_bytes=4, iv_bytes=8),
    Algorithm(
        "aes-gcm-16", AlgKind.AEAD, 20, (160, 224, 288), salt_bytes=4, iv_bytes=8, icv_bytes=16,
        aliases=("aes-gcm",),
    ),
    Algorithm(
        "chacha20-poly1305", AlgKind.AEAD, 28, (288,), salt_bytes=4, iv_bytes=8, icv_bytes=16,
    ),
)

# Integrity algorithms (sadb_sa_auth).
INTEGRITY: tuple[Algorithm, ...] = (
    Algorithm("null", AlgKind.INTEG, 251, (0,)),
    Algorithm("hmac-md5", AlgKind.INTEG, 2, (128,), icv_bytes=12, weak=True),
    Algorithm("hmac-sha1", AlgKind.INTEG, 3, (160,), icv_bytes=12),
    Algorithm("hmac-sha256", AlgKind.INTEG, 5, (256,), icv_bytes=16, aliases=("hmac-sha2-256",)),
    Algorithm("hmac-sha384", AlgKind.INTEG, 6, (384,), icv_bytes=24, aliases=("hmac-sha2-384",)),
    Algorithm("hmac-sha512", AlgKind.INTEG, 7, (512,), icv_bytes=32, aliases=("hmac-sha2-512",)),
)

# sadb_sa_auth value meaning "no integrity algorithm" (AEAD SAs carry this).
AUTH_NONE = 0
ENCRYPT_NONE = 0


def _index(algs: tuple[Algorithm, ...]) -> dict[str, Algorithm]:
    by_name: dict[str, Algorithm] = {}
    for alg in algs:
        for name in (alg.name, *alg.aliases):
            by_name[name] = alg
    return by_name


_ENCRYPTION_BY_NAME = _index(ENCRYPTION)
_INTEGRITY_BY_NAME = _index(INTEGRITY)
_ENCRYPTION_BY_ID = {alg.pfkey_id: alg for alg in ENCRYPTION}
_INTEGRITY_BY_ID = {alg.pfkey_id: alg for alg in INTEGRITY}


def encryption_by_name(name: str) -> Algorithm | None:
    return _ENCRYPTION_BY_NAME.get(name.lower())


def integrity_by_name(name: str) -> Algorithm | None:
    return _INTEGRITY_BY_NAME.get(name.lower())


def encryption_by_id(pfkey_id: int) -> Algorithm | None:
    return _ENCRYPTION_BY_ID.get(pfkey_id)


def integrity_by_id(pfkey_id: int) -> Algorithm | None:
    return _INTEGRITY_BY_ID.get(pfkey_id)


def check_key(alg: Algorithm, key: bytes) -> str | None:
    """Return why ``key`` does not suit ``alg``, or None when it does."""
    bits = len(key) * 8
    if bits not in alg.key_bits:
        allowed = ", ".join(str(b) for b in alg.key_bits)
        return f"{alg.name} takes a key of {allowed} bits, got {bits}"
    return None
