"""Diffie-Hellman key exchange for IKEv2: MODP (RFC 3526), ECP (RFC 5903), X25519/X448.

Wire formats: MODP public values and shared secrets are big-endian, left-padded to the prime's
length; ECP public values are x || y without the 0x04 prefix and the shared secret is x
(RFC 5903 sections 7 and 9); X25519/X448 values are the raw RFC 7748 strings (RFC 8031).
Peer values are checked as the RFCs require and refused with `IkeCryptoError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric import dh, ec, x448, x25519

from ike.constants import DhId, NotifyType
from ike.errors import IkeCryptoError

# RFC 2409 groups 1-2 and RFC 3526 groups 5, 14-16 (generator 2); the test re-derives them
# from the RFCs' formula in pi.
MODP_PRIMES: dict[int, int] = {
    DhId.MODP768: int(
        "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
        "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
        "4FE1356D6D51C245E485B576625E7EC6F44C42E9A63A3620FFFFFFFFFFFFFFFF",
        16,
    ),
    DhId.MODP1024: int(
        "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
        "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
        "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
        "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE65381FFFFFFFFFFFFFFFF",
        16,
    ),
    DhId.MODP1536: int(
        "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
        "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
        "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
        "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05"
        "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
        "9ED529077096966D670C354E4ABC9804F1746C08CA237327FFFFFFFFFFFFFFFF",
        16,
    ),
    DhId.MODP2048: int(
        "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
        "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
        "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
        "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05"
        "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
        "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
        "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718"
        "3995497CEA956AE515D2261898FA051015728E5A8AACAA68FFFFFFFFFFFFFFFF",
        16,
    ),
    DhId.MODP3072: int(
        "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
        "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
        "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
        "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05"
        "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
        "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
        "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718"
        "3995497CEA956AE515D2261898FA051015728E5A8AAAC42DAD33170D04507A33"
        "A85521ABDF1CBA64ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7"
        "ABF5AE8CDB0933D71E8C94E04A25619DCEE3D2261AD2EE6BF12FFA06D98A0864"
        "D87602733EC86A64521F2B18177B200CBBE117577A615D6C770988C0BAD946E2"
        "08E24FA074E5AB3143DB5BFCE0FD108E4B82D120A93AD2CAFFFFFFFFFFFFFFFF",
        16,
    ),
    DhId.MODP4096: int(
        "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
        "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
        "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
        "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05"
        "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
        "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
        "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718"
        "3995497CEA956AE515D2261898FA051015728E5A8AAAC42DAD33170D04507A33"
        "A85521ABDF1CBA64ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7"
        "ABF5AE8CDB0933D71E8C94E04A25619DCEE3D2261AD2EE6BF12FFA06D98A0864"
        "D87602733EC86A64521F2B18177B200CBBE117577A615D6C770988C0BAD946E2"
        "08E24FA074E5AB3143DB5BFCE0FD108E4B82D120A92108011A723C12A787E6D7"
        "88719A10BDBA5B2699C327186AF4E23C1A946834B6150BDA2583E9CA2AD44CE8"
        "DBBBC2DB04DE8EF92E8EFC141FBECAA6287C59474E6BC05D99B2964FA090C3A2"
        "233BA186515BE7ED1F612970CEE2D7AFB81BDD762170481CD0069127D5B05AA9"
        "93B4EA988D8FDDC186FFB7DC90A6C08F4DF435C934063199FFFFFFFFFFFFFFFF",
        16,
    ),
}

_ECP_CURVES: dict[int, tuple[type[ec.EllipticCurve], int]] = {
    DhId.ECP256: (ec.SECP256R1, 32),
    DhId.ECP384: (ec.SECP384R1, 48),
    DhId.ECP521: (ec.SECP521R1, 66),
}

_X_LENGTHS: dict[int, int] = {DhId.CURVE25519: 32, DhId.CURVE448: 56}

SUPPORTED_GROUPS: frozenset[int] = frozenset(
    {*MODP_PRIMES, *_ECP_CURVES, *_X_LENGTHS}
)


class KeyExchange(Protocol):
    group: int

    def public_value(self) -> bytes:
        """Our KE payload data."""
        ...

    def shared_secret(self, peer_value: bytes) -> bytes:
        """g^ir from the peer's KE payload data; raises IkeCryptoError on a bad value."""
        ...


def public_value_length(group: int) -> int:
    """The exact KE data length the group requires (RFC 7296 3.4: others are INVALID_SYNTAX)."""
    if group in MODP_PRIMES:
        return (MODP_PRIMES[group].bit_length() + 7) // 8
    if group in _ECP_CURVES:
        return 2 * _ECP_CURVES[group][1]
    if group in _X_LENGTHS:
        return _X_LENGTHS[group]
    raise IkeCryptoError(f"unsupported DH group {group}", NotifyType.INVALID_KE_PAYLOAD)


def _check_length(group: int, value: bytes) -> None:
    expected = public_value_length(group)
    if len(value) != expected:
        raise IkeCryptoError(f"DH group {group}: public value is {len(value)} bytes, "
                             f"expected {expected}")


@dataclass(slots=True)
class ModpKeyExchange:
    group: int
    _key: dh.DHPrivateKey = field(repr=False)

    def public_value(self) -> bytes:
        size = public_value_length(self.group)
        return self._key.public_key().public_numbers().y.to_bytes(size, "big")

    def shared_secret(self, peer_value: bytes) -> bytes:
        _check_length(self.group, peer_value)
        p = MODP_PRIMES[self.group]
        y = int.from_bytes(peer_value, "big")
        if not 1 < y < p - 1:
            raise IkeCryptoError(f"DH group {self.group}: public value out of range 1 < y < p-1")
        params = self._key.parameters().parameter_numbers()
        try:
            secret = self._key.exchange(dh.DHPublicNumbers(y, params).public_key())
        except ValueError as exc:
            raise IkeCryptoError(f"DH group {self.group}: {exc}") from None
        return secret.rjust(len(peer_value), b"\0")


@dataclass(slots=True)
class EcpKeyExchange:
    group: int
    _key: ec.EllipticCurvePrivateKey = field(repr=False)

    def public_value(self) -> bytes:
        numbers = self._key.public_key().public_numbers()
        size = _ECP_CURVES[self.group][1]
        return numbers.x.to_bytes(size, "big") + numbers.y.to_bytes(size, "big")

    def shared_secret(self, peer_value: bytes) -> bytes:
        _check_length(self.group, peer_value)
        curve = _ECP_CURVES[self.group][0]()
        try:
            # Decoding an uncompressed point checks that it lies on the curve.
            peer = ec.EllipticCurvePublicKey.from_encoded_point(curve, b"\x04" + peer_value)
            return self._key.exchange(ec.ECDH(), peer)
        except ValueError:
            raise IkeCryptoError(f"DH group {self.group}: public value is not a point on the "
                                 "curve") from None


@dataclass(slots=True)
class MontgomeryKeyExchange:
    group: int
    _key: x25519.X25519PrivateKey | x448.X448PrivateKey = field(repr=False)

    def public_value(self) -> bytes:
        return self._key.public_key().public_bytes_raw()

    def shared_secret(self, peer_value: bytes) -> bytes:
        _check_length(self.group, peer_value)
        try:
            if isinstance(self._key, x25519.X25519PrivateKey):
                secret = self._key.exchange(x25519.X25519PublicKey.from_public_bytes(peer_value))
            else:
                secret = self._key.exchange(x448.X448PublicKey.from_public_bytes(peer_value))
        except ValueError:
            secret = b""
        # RFC 7748 6 / RFC 8031 2.3: an all-zero result means a low-order peer point.
        if not secret or not any(secret):
            raise IkeCryptoError(f"DH group {self.group}: peer value gives an all-zero secret")
        return secret


def new_key_exchange(group: int, private_value: bytes | None = None) -> KeyExchange:
    """A fresh key pair for `group`, or one from `private_value` (for test vectors).

    Raises IkeCryptoError(INVALID_KE_PAYLOAD) for a group we do not implement.
    """
    if group in MODP_PRIMES:
        numbers = dh.DHParameterNumbers(MODP_PRIMES[group], 2)
        if private_value is None:
            return ModpKeyExchange(group, numbers.parameters().generate_private_key())
        x = int.from_bytes(private_value, "big")
        public = dh.DHPublicNumbers(pow(2, x, numbers.p), numbers)
        return ModpKeyExchange(group, dh.DHPrivateNumbers(x, public).private_key())
    if group in _ECP_CURVES:
        curve = _ECP_CURVES[group][0]()
        if private_value is None:
            return EcpKeyExchange(group, ec.generate_private_key(curve))
        scalar = int.from_bytes(private_value, "big")
        return EcpKeyExchange(group, ec.derive_private_key(scalar, curve))
    if group == DhId.CURVE25519:
        key25519 = (x25519.X25519PrivateKey.generate() if private_value is None
                    else x25519.X25519PrivateKey.from_private_bytes(private_value))
        return MontgomeryKeyExchange(group, key25519)
    if group == DhId.CURVE448:
        key448 = (x448.X448PrivateKey.generate() if private_value is None
                  else x448.X448PrivateKey.from_private_bytes(private_value))
        return MontgomeryKeyExchange(group, key448)
    raise IkeCryptoError(f"unsupported DH group {group}", NotifyType.INVALID_KE_PAYLOAD)
