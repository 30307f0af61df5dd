import pytest
from scapy.layers.tls.crypto import groups as scapy_groups

from ike.constants import DhId, NotifyType
from ike.dh import MODP_PRIMES, new_key_exchange, public_value_length
from ike.errors import IkeCryptoError

# RFC 5903 section 8: (i, g^i x||y, r, g^r x||y, g^ir x)
RFC5903: dict[int, tuple[str, ...]] = {
    DhId.ECP256: (
        "C88F01F510D9AC3F70A292DAA2316DE544E9AAB8AFE84049C62A9C57862D1433",
        "DAD0B65394221CF9B051E1FECA5787D098DFE637FC90B9EF945D0C3772581180"
        "5271A0461CDB8252D61F1C456FA3E59AB1F45B33ACCF5F58389E0577B8990BB3",
        "C6EF9C5D78AE012A011164ACB397CE2088685D8F06BF9BE0B283AB46476BEE53",
        "D12DFB5289C8D4F81208B70270398C342296970A0BCCB74C736FC7554494BF63"
        "56FBF3CA366CC23E8157854C13C58D6AAC23F046ADA30F8353E74F33039872AB",
        "D6840F6B42F6EDAFD13116E0E12565202FEF8E9ECE7DCE03812464D04B9442DE",
    ),
    DhId.ECP384: (
        "099F3C7034D4A2C699884D73A375A67F7624EF7C6B3C0F160647B67414DCE655"
        "E35B538041E649EE3FAEF896783AB194",
        "667842D7D180AC2CDE6F74F37551F55755C7645C20EF73E31634FE72B4C55EE6"
        "DE3AC808ACB4BDB4C88732AEE95F41AA9482ED1FC0EEB9CAFC4984625CCFC23F"
        "65032149E0E144ADA024181535A0F38EEB9FCFF3C2C947DAE69B4C634573A81C",
        "41CB0779B4BDB85D47846725FBEC3C9430FAB46CC8DC5060855CC9BDA0AA2942"
        "E0308312916B8ED2960E4BD55A7448FC",
        "E558DBEF53EECDE3D3FCCFC1AEA08A89A987475D12FD950D83CFA41732BC509D"
        "0D1AC43A0336DEF96FDA41D0774A3571DCFBEC7AACF3196472169E838430367F"
        "66EEBE3C6E70C416DD5F0C68759DD1FFF83FA40142209DFF5EAAD96DB9E6386C",
        "11187331C279962D93D604243FD592CB9D0A926F422E47187521287E7156C5C4"
        "D603135569B9E9D09CF5D4A270F59746",
    ),
    DhId.ECP521: (
        "0037ADE9319A89F4DABDB3EF411AACCCA5123C61ACAB57B5393DCE47608172A0"
        "95AA85A30FE1C2952C6771D937BA9777F5957B2639BAB072462F68C27A57382D4A52",
        "0015417E84DBF28C0AD3C278713349DC7DF153C897A1891BD98BAB4357C9ECBE"
        "E1E3BF42E00B8E380AEAE57C2D107564941885942AF5A7F4601723C4195D176CED3E"
        "017CAE20B6641D2EEB695786D8C946146239D099E18E1D5A514C739D7CB4A10A"
        "D8A788015AC405D7799DC75E7B7D5B6CF2261A6A7F1507438BF01BEB6CA3926F9582",
        "0145BA99A847AF43793FDD0E872E7CDFA16BE30FDC780F97BCCC3F078380201E"
        "9C677D600B343757A3BDBF2A3163E4C2F869CCA7458AA4A4EFFC311F5CB151685EB9",
        "00D0B3975AC4B799F5BEA16D5E13E9AF971D5E9B984C9F39728B5E5739735A21"
        "9B97C356436ADC6E95BB0352F6BE64A6C2912D4EF2D0433CED2B6171640012D9460F"
        "015C68226383956E3BD066E797B623C27CE0EAC2F551A10C2C724D9852077B87"
        "220B6536C5C408A1D2AEBB8E86D678AE49CB57091F4732296579AB44FCD17F0FC56A",
        "01144C7D79AE6956BC8EDB8E7C787C4521CB086FA64407F97894E5E6B2D79B04"
        "D1427E73CA4BAA240A34786859810C06B3C715A3A8CC3151F2BEE417996D19F3DDEA",
    ),
}

# RFC 7748 section 6: (Alice private, Alice public, Bob private, Bob public, shared)
RFC7748: dict[int, tuple[str, ...]] = {
    DhId.CURVE25519: (
        "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a",
        "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
        "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f",
        "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742",
    ),
    DhId.CURVE448: (
        "9a8f4925d1519f5775cf46b04b5800d4ee9ee8bae8bc5565d498c28d"
        "d9c9baf574a9419744897391006382a6f127ab1d9ac2d8c0a598726b",
        "9b08f7cc31b7e3e67d22d5aea121074a273bd2b83de09c63faa73d2c"
        "22c5d9bbc836647241d953d40c5b12da88120d53177f80e532c41fa0",
        "1c306a7ac2a0e2e0990b294470cba339e6453772b075811d8fad0d1d"
        "6927c120bb5ee8972b0d3e21374c9c921b09d1b0366f10b65173992d",
        "3eb7a829b0cd20f5bcfc0b599b6feccf6da4627107bdb0d4f345b430"
        "27d8b972fc3e34fb4232a13ca706dcb57aec3dae07bdc1c67bf33609",
        "07fff4181ac6cc95ec1c16a94a0f74d12da232ce40a77552281d282b"
        "b60c0b56fd2464c335543936521c24403085d59a449a5037514a879d",
    ),
}


@pytest.mark.parametrize("group", [*RFC5903, *RFC7748])
def test_published_vectors(group: int) -> None:
    i_priv, i_pub, r_priv, r_pub, shared = (bytes.fromhex(v)
                                            for v in {**RFC5903, **RFC7748}[group])
    alice = new_key_exchange(group, i_priv)
    bob = new_key_exchange(group, r_priv)
    assert alice.public_value() == i_pub
    assert bob.public_value() == r_pub
    assert len(i_pub) == public_value_length(group)
    assert alice.shared_secret(r_pub) == shared
    assert bob.shared_secret(i_pub) == shared


def _pi_fixed(bits: int) -> int:
    """floor(pi * 2^bits) by Machin's formula, an independent check of the embedded primes."""
    one = 1 << (bits + 64)

    def atan_inv(x: int) -> int:
        total = term = one // x
        n, sign = 1, -1
        while term:
            term //= x * x
            n += 2
            total += sign * (term // n)
            sign = -sign
        return total

    return (16 * atan_inv(5) - 4 * atan_inv(239)) >> 64


@pytest.mark.parametrize(("group", "bits", "k"), [
    (DhId.MODP768, 768, 149686), (DhId.MODP1024, 1024, 129093),
    (DhId.MODP1536, 1536, 741804), (DhId.MODP2048, 2048, 124476),
    (DhId.MODP3072, 3072, 1690314), (DhId.MODP4096, 4096, 240904),
])
def test_modp_primes_match_rfc_formula(group: int, bits: int, k: int) -> None:
    # RFC 2409 / 3526: p = 2^n - 2^(n-64) - 1 + 2^64 * ([2^(n-130) pi] + k)
    p = 2**bits - 2**(bits - 64) - 1 + 2**64 * (_pi_fixed(bits - 130) + k)
    assert MODP_PRIMES[group] == p
    assert getattr(scapy_groups, f"modp{bits}").m == p


@pytest.mark.parametrize("group", [DhId.MODP2048, DhId.MODP3072, DhId.MODP4096, DhId.ECP256,
                                   DhId.ECP384, DhId.ECP521, DhId.CURVE25519, DhId.CURVE448])
def test_fresh_pairs_agree(group: int) -> None:
    a, b = new_key_exchange(group), new_key_exchange(group)
    assert len(a.public_value()) == public_value_length(group)
    secret = a.shared_secret(b.public_value())
    assert secret == b.shared_secret(a.public_value())
    ecp_x_len: dict[int, int] = {DhId.ECP256: 32, DhId.ECP384: 48, DhId.ECP521: 66}
    assert len(secret) == ecp_x_len.get(group, public_value_length(group))


def test_modp_deterministic_private_value_and_padding() -> None:
    p = MODP_PRIMES[DhId.MODP2048]
    a = new_key_exchange(DhId.MODP2048, (12345).to_bytes(2, "big"))
    assert a.public_value() == pow(2, 12345, p).to_bytes(256, "big")
    b = new_key_exchange(DhId.MODP2048)
    # A shared secret with leading zero octets keeps the full prime length.
    assert len(a.shared_secret(b.public_value())) == 256


@pytest.mark.parametrize("offset_from_p", [None, -1, 0])
@pytest.mark.parametrize("small", [0, 1])
def test_modp_rejects_out_of_range_values(offset_from_p: int | None, small: int) -> None:
    p = MODP_PRIMES[DhId.MODP2048]
    y = small if offset_from_p is None else p + offset_from_p
    kex = new_key_exchange(DhId.MODP2048)
    with pytest.raises(IkeCryptoError, match="out of range"):
        kex.shared_secret(y.to_bytes(256, "big"))


def test_wrong_length_and_off_curve_rejected() -> None:
    with pytest.raises(IkeCryptoError, match="expected 256"):
        new_key_exchange(DhId.MODP2048).shared_secret(bytes(255))
    ecp = new_key_exchange(DhId.ECP256)
    peer = bytearray(new_key_exchange(DhId.ECP256).public_value())
    peer[-1] ^= 1
    with pytest.raises(IkeCryptoError, match="not a point on the curve"):
        ecp.shared_secret(bytes(peer))
    with pytest.raises(IkeCryptoError, match="expected 64"):
        ecp.shared_secret(b"\x04" + bytes(peer))


@pytest.mark.parametrize("group", [DhId.CURVE25519, DhId.CURVE448])
@pytest.mark.parametrize("u", [0, 1])
def test_montgomery_low_order_points_rejected(group: int, u: int) -> None:
    kex = new_key_exchange(group)
    with pytest.raises(IkeCryptoError, match="all-zero"):
        kex.shared_secret(u.to_bytes(public_value_length(group), "little"))


def test_unsupported_group_asks_for_invalid_ke() -> None:
    with pytest.raises(IkeCryptoError) as info:
        new_key_exchange(DhId.BRAINPOOL256)
    assert info.value.notify == NotifyType.INVALID_KE_PAYLOAD


def test_private_key_not_in_repr() -> None:
    priv = bytes.fromhex(RFC7748[DhId.CURVE25519][0])
    kex = new_key_exchange(DhId.CURVE25519, priv)
    assert "_key" not in repr(kex) and priv.hex() not in repr(kex)
