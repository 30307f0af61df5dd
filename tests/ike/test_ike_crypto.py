import hashlib
import hmac
import os

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from ike.constants import DhId, EncrId, ExchangeType, HeaderFlag, IdType, IntegId, PrfId
from ike.crypto import (
    AeadCipher,
    CbcHmacCipher,
    Prf,
    derive_child_keys,
    derive_ike_keys,
    ike_sa_ciphers,
    new_sk_cipher,
    prf_plus,
    psk_auth,
    rekeyed_skeyseed,
    signed_octets,
    skeyseed,
)
from ike.errors import IkeIntegrityError, IkeParseError
from ike.message import (
    Message,
    decode_message,
    decrypt_message,
    encode_payloads,
    encrypt_message,
)
from ike.payloads import AuthPayload, IdiPayload, NoncePayload, NotifyPayload
from ike.transforms import TransformSet

# RFC 4231 test cases 1, 2 and 6: (key, data, {hash: mac})
RFC4231 = [
    (b"\x0b" * 20, b"Hi There", {
        "sha256": "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
        "sha384": "afd03944d84895626b0825f4ab46907f15f9dadbe4101ec682aa034c7cebc59c"
                  "faea9ea9076ede7f4af152e8b2fa9cb6",
        "sha512": "87aa7cdea5ef619d4ff0b4241a1d6cb02379f4e2ce4ec2787ad0b30545e17cde"
                  "daa833b7d6b8a702038b274eaea3f4e4be9d914eeb61f1702e696c203a126854",
    }),
    (b"Jefe", b"what do ya want for nothing?", {
        "sha256": "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
        "sha384": "af45d2e376484031617f78d2b58a6b1b9c7ef464f5a01b47e42ec3736322445e"
                  "8e2240ca5e69e2c78b3239ecfab21649",
        "sha512": "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea250554"
                  "9758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737",
    }),
    (b"\xaa" * 131, b"Test Using Larger Than Block-Size Key - Hash Key First", {
        "sha256": "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
    }),
]
PRFS = {"sha256": PrfId.HMAC_SHA2_256, "sha384": PrfId.HMAC_SHA2_384,
        "sha512": PrfId.HMAC_SHA2_512}

GCM128 = TransformSet(EncrId.AES_GCM_16, 128, prf=PrfId.HMAC_SHA2_256, dh=DhId.CURVE25519)
CBC256 = TransformSet(EncrId.AES_CBC, 256, IntegId.HMAC_SHA2_256_128, PrfId.HMAC_SHA2_256,
                      DhId.MODP2048)
CHACHA = TransformSet(EncrId.CHACHA20_POLY1305, 256, prf=PrfId.HMAC_SHA2_512,
                      dh=DhId.CURVE448)
CBC_SHA384 = TransformSet(EncrId.AES_CBC, 128, IntegId.HMAC_SHA2_384_192, PrfId.HMAC_SHA2_384)


@pytest.mark.parametrize(("key", "data", "macs"), RFC4231)
def test_prf_hmac_sha2_rfc4231(key: bytes, data: bytes, macs: dict[str, str]) -> None:
    for name, mac in macs.items():
        assert Prf.for_id(PRFS[name])(key, data).hex() == mac


def _reference_prf_plus(hash_name: str, key: bytes, seed: bytes, n: int) -> bytes:
    """RFC 7296 2.13 written out term by term: T1 = prf(K, S|0x01), Tk = prf(K, Tk-1|S|k)."""
    terms = [hmac.new(key, seed + b"\x01", hash_name).digest()]
    for k in range(2, 256):
        terms.append(hmac.new(key, terms[-1] + seed + bytes([k]), hash_name).digest())
    return b"".join(terms)[:n]


@pytest.mark.parametrize("name", ["sha256", "sha384", "sha512"])
@pytest.mark.parametrize("length", [1, 32, 33, 200, 1000])
def test_prf_plus_matches_definition(name: str, length: int) -> None:
    prf = Prf.for_id(PRFS[name])
    assert prf_plus(prf, b"key", b"seed", length) == _reference_prf_plus(
        name, b"key", b"seed", length)


def test_prf_plus_first_block_by_hand() -> None:
    sha256 = hashlib.sha256  # HMAC-SHA256 written out with the RFC 2104 pads
    key = b"K" * 32 + bytes(32)
    inner = sha256(bytes(b ^ 0x36 for b in key) + b"S\x01").digest()
    outer = sha256(bytes(b ^ 0x5C for b in key) + inner).digest()
    assert prf_plus(Prf.for_id(PrfId.HMAC_SHA2_256), b"K" * 32, b"S", 32) == outer


def test_prf_plus_limit() -> None:
    prf = Prf.for_id(PrfId.HMAC_SHA2_256)
    assert len(prf_plus(prf, b"k", b"s", 255 * 32)) == 255 * 32
    with pytest.raises(ValueError):
        prf_plus(prf, b"k", b"s", 255 * 32 + 1)


NI, NR = bytes(range(32)), bytes(range(100, 132))
SPI_I, SPI_R = bytes.fromhex("1111111111111111"), bytes.fromhex("2222222222222222")
GIR = bytes(range(200, 232))


@pytest.mark.parametrize("suite", [GCM128, CBC256, CHACHA, CBC_SHA384])
def test_ike_keys_split(suite: TransformSet) -> None:
    name = suite.prf_alg.hash_name
    seed = skeyseed(Prf.for_id(suite.prf_alg.id), NI, NR, GIR)
    assert seed == hmac.new(NI + NR, GIR, name).digest()
    keys = derive_ike_keys(suite, seed, NI, NR, SPI_I, SPI_R)
    p, a, e = suite.prf_alg.size, suite.integ_key_bytes, suite.encr_key_bytes
    stream = _reference_prf_plus(name, seed, NI + NR + SPI_I + SPI_R, 3 * p + 2 * a + 2 * e)
    expect = []
    pos = 0
    for size in (p, a, a, e, e, p, p):
        expect.append(stream[pos:pos + size])
        pos += size
    assert [keys.sk_d, keys.sk_ai, keys.sk_ar, keys.sk_ei, keys.sk_er, keys.sk_pi,
            keys.sk_pr] == expect
    assert len(keys.sk_ei) == {EncrId.AES_GCM_16: 20, EncrId.AES_CBC: suite.encr_key_bits // 8,
                               EncrId.CHACHA20_POLY1305: 36}[EncrId(suite.encr)]
    text = repr(keys)
    assert all(k.hex() not in text for k in expect if k)


def test_rekeyed_skeyseed_uses_old_sk_d() -> None:
    old = Prf.for_id(PrfId.HMAC_SHA2_384)
    sk_d = b"d" * 48
    assert rekeyed_skeyseed(old, sk_d, GIR, NI, NR) == hmac.new(
        sk_d, GIR + NI + NR, "sha384").digest()


@pytest.mark.parametrize("pfs", [False, True])
def test_child_keymat_order(pfs: bool) -> None:
    prf = Prf.for_id(PrfId.HMAC_SHA2_256)
    sk_d = b"D" * 32
    esp_gcm = TransformSet(EncrId.AES_GCM_16, 256, esn=0)
    keys = derive_child_keys(prf, sk_d, esp_gcm, NI, NR, GIR if pfs else None)
    stream = _reference_prf_plus("sha256", sk_d, (GIR if pfs else b"") + NI + NR, 72)
    # AES-256-GCM: 32-byte key + 4-byte salt each way, initiator->responder first.
    assert (keys.encr_i, keys.integ_i, keys.encr_r, keys.integ_r) == (
        stream[:36], b"", stream[36:72], b"")
    esp_cbc = TransformSet(EncrId.AES_CBC, 128, IntegId.HMAC_SHA2_256_128)
    keys = derive_child_keys(prf, sk_d, esp_cbc, NI, NR, GIR if pfs else None)
    stream = _reference_prf_plus("sha256", sk_d, (GIR if pfs else b"") + NI + NR, 96)
    assert (keys.encr_i, keys.integ_i, keys.encr_r, keys.integ_r) == (
        stream[:16], stream[16:48], stream[48:64], stream[64:96])
    assert stream[:16].hex() not in repr(keys)


def test_psk_auth_and_signed_octets() -> None:
    prf = Prf.for_id(PrfId.HMAC_SHA2_256)
    idi = IdiPayload(IdType.FQDN, b"alice")
    octets = signed_octets(prf, b"<msg1>", NR, b"p" * 32, idi.body)
    assert octets == b"<msg1>" + NR + hmac.new(b"p" * 32, b"\x02\x00\x00\x00alice",
                                               "sha256").digest()
    pad_key = hmac.new(b"secret", b"Key Pad for IKEv2", "sha256").digest()
    assert psk_auth(prf, b"secret", octets) == hmac.new(pad_key, octets, "sha256").digest()


# --- SK payload ---------------------------------------------------------------------------


def _auth_message() -> tuple[Message, list]:
    msg = Message(ExchangeType.IKE_AUTH, 1, SPI_I, SPI_R, HeaderFlag.INITIATOR)
    inner = [IdiPayload(IdType.FQDN, b"alice.example"),
             AuthPayload(2, b"A" * 32), NotifyPayload(16384)]
    return msg, inner


@pytest.mark.parametrize("suite", [GCM128, CBC256, CHACHA, CBC_SHA384])
def test_sk_round_trip_and_tamper(suite: TransformSet) -> None:
    keys = derive_ike_keys(suite, b"s" * 32, NI, NR, SPI_I, SPI_R)
    i_out, i_in = ike_sa_ciphers(suite, keys, initiator=True)
    r_out, r_in = ike_sa_ciphers(suite, keys, initiator=False)
    msg, inner = _auth_message()
    data = encrypt_message(msg, inner, i_out)
    parsed = decode_message(data)
    assert decrypt_message(parsed, r_in) == inner
    # The responder's outbound direction uses other keys: the initiator's own inbound.
    with pytest.raises(IkeIntegrityError):
        decrypt_message(parsed, i_in)
    for pos in (0, 17, 27, 28, 31, 40, len(data) - 1):
        bad = bytearray(data)
        bad[pos] ^= 0x01
        with pytest.raises(IkeParseError):
            decrypt_message(decode_message(bytes(bad)), r_in)
    # Empty INFORMATIONAL (liveness check) works too.
    empty = encrypt_message(Message(ExchangeType.INFORMATIONAL, 2, SPI_I, SPI_R, 0), [], r_out)
    assert decrypt_message(decode_message(empty), i_in) == []


def test_gcm_wire_format_independently() -> None:
    key = os.urandom(16) + b"SALT"
    cipher = AeadCipher(EncrId.AES_GCM_16, key)
    msg, inner = _auth_message()
    data = encrypt_message(msg, inner, cipher)
    assert data[16] == 46 and data[28] == 35  # next payload SK; SK's next = IDi
    iv, rest = data[32:40], data[40:]
    plain = AESGCM(key[:16]).decrypt(b"SALT" + iv, rest, data[:32])
    assert plain[-1] == 0  # pad length octet, no padding for AEAD
    assert plain[:-1] == encode_payloads(inner)[1]
    assert len(data) == 28 + 4 + 8 + len(plain) + 16


def test_chacha_wire_format_independently() -> None:
    key = os.urandom(32) + b"salt"
    msg, inner = _auth_message()
    data = encrypt_message(msg, inner, AeadCipher(EncrId.CHACHA20_POLY1305, key))
    plain = ChaCha20Poly1305(key[:32]).decrypt(b"salt" + data[32:40], data[40:], data[:32])
    assert plain[:-1] == encode_payloads(inner)[1] and plain[-1] == 0


def test_cbc_wire_format_independently() -> None:
    ek, ak = os.urandom(32), os.urandom(32)
    cipher = new_sk_cipher(CBC256, ek, ak)
    assert isinstance(cipher, CbcHmacCipher)
    msg, inner = _auth_message()
    data = encrypt_message(msg, inner, cipher)
    icv = data[-16:]
    assert hmac.compare_digest(icv, hmac.new(ak, data[:-16], "sha256").digest()[:16])
    iv, ct = data[32:48], data[48:-16]
    dec = Cipher(algorithms.AES(ek), modes.CBC(iv)).decryptor()
    plain = dec.update(ct) + dec.finalize()
    assert len(plain) % 16 == 0
    pad = plain[-1]
    assert plain[:-1 - pad] == encode_payloads(inner)[1]


def test_aead_ivs_unique_and_no_keys_in_repr() -> None:
    key = b"K" * 16 + b"SALT"
    cipher = AeadCipher(EncrId.AES_GCM_16, key)
    msg, inner = _auth_message()
    ivs = {encrypt_message(msg, inner, cipher)[32:40] for _ in range(50)}
    assert len(ivs) == 50
    assert "KKKK" not in repr(cipher) and "SALT" not in repr(cipher)
    cbc = new_sk_cipher(CBC256, b"E" * 32, b"A" * 32)
    assert "EEEE" not in repr(cbc) and "AAAA" not in repr(cbc)


def test_bad_padding_and_short_body_are_parse_errors() -> None:
    key = b"K" * 16 + b"SALT"
    cipher = AeadCipher(EncrId.AES_GCM_16, key)
    aad = b"h" * 32
    body = b"\x00" * 8 + AESGCM(b"K" * 16).encrypt(b"SALT" + b"\x00" * 8, b"ab\x09", aad)
    with pytest.raises(IkeParseError, match="pad length"):
        cipher.open(body, aad)
    with pytest.raises(IkeParseError, match="too short"):
        cipher.open(b"\x00" * 20, aad)
    cbc = new_sk_cipher(CBC256, b"E" * 32, b"A" * 32)
    with pytest.raises(IkeParseError, match="does not fit"):
        cbc.open(b"\x00" * 40, aad)


def test_nonce_payload_used_in_inner() -> None:
    suite = GCM128
    keys = derive_ike_keys(suite, b"x" * 32, NI, NR, SPI_I, SPI_R)
    out, _ = ike_sa_ciphers(suite, keys, True)
    _, inbound = ike_sa_ciphers(suite, keys, False)
    msg = Message(ExchangeType.CREATE_CHILD_SA, 3, SPI_I, SPI_R, HeaderFlag.INITIATOR)
    data = encrypt_message(msg, [NoncePayload(NI)], out)
    assert decrypt_message(decode_message(data), inbound) == [NoncePayload(NI)]
