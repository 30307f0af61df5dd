import pytest

from ike.constants import DhId, EncrId, EsnId, IntegId, PrfId, ProtocolId, TransformType
from ike.payloads import Proposal, SaPayload, Transform, TransformAttribute
from ike.proposals import (
    ProposalError,
    check_response,
    parse_proposal,
    parse_proposals,
    sa_payload,
    select_proposal,
    weak_transforms,
)
from ike.transforms import TransformSet


def test_parse_ike_aead() -> None:
    spec = parse_proposal("aes128gcm16-prfsha256-x25519", "ike")
    assert spec.encr == ((EncrId.AES_GCM_16, 128),)
    assert spec.prf == (PrfId.HMAC_SHA2_256,) and spec.integ == ()
    assert spec.dh == (DhId.CURVE25519,) and spec.esn == ()
    spec = parse_proposal("aes256gcm16-prfsha384-ecp384", "ike")
    assert spec.encr == ((EncrId.AES_GCM_16, 256),) and spec.dh == (DhId.ECP384,)
    spec = parse_proposal("chacha20poly1305-prfsha256-curve25519", "ike")
    assert spec.encr == ((EncrId.CHACHA20_POLY1305, 256),) and spec.dh == (DhId.CURVE25519,)


def test_parse_ike_cbc_derives_prf_from_integ() -> None:
    spec = parse_proposal("aes256-sha256-modp2048", "ike")
    assert spec.encr == ((EncrId.AES_CBC, 256),)
    assert spec.integ == (IntegId.HMAC_SHA2_256_128,)
    assert spec.prf == (PrfId.HMAC_SHA2_256,)
    assert spec.dh == (DhId.MODP2048,)
    multi = parse_proposal("aes128-aes256-sha384-sha256-ecp256-modp3072", "ike")
    assert multi.prf == (PrfId.HMAC_SHA2_384, PrfId.HMAC_SHA2_256)


def test_parse_esp() -> None:
    assert parse_proposal("aes128gcm16", "esp").esn == (EsnId.NO_ESN,)
    spec = parse_proposal("aes256-sha256", "esp")
    assert spec.integ == (IntegId.HMAC_SHA2_256_128,) and spec.prf == () and spec.dh == ()
    assert parse_proposal("aes128gcm16-x25519", "esp").dh == (DhId.CURVE25519,)
    assert parse_proposal("aes128gcm16-esn", "esp").esn == (EsnId.ESN,)
    assert parse_proposal("aes128gcm16-esn-noesn", "esp").esn == (EsnId.ESN, EsnId.NO_ESN)
    assert parse_proposal("AES128GCM16-NOESN", "esp").esn == (EsnId.NO_ESN,)


@pytest.mark.parametrize(("text", "kind", "reason"), [
    ("", "ike", "empty"),
    ("aes128-foo-modp2048", "ike", "unknown algorithm 'foo'"),
    ("aes256gcm16-x25519", "ike", "needs a prf"),
    ("aes256-sha256", "ike", "needs a DH group"),
    ("aes256", "esp", "without an integrity"),
    ("aes128gcm16-sha256", "esp", "takes no integrity"),
    ("aes128gcm16-aes128-sha256", "esp", "mixes AEAD"),
    ("aes128gcm16-prfsha256", "esp", "not an ESP transform"),
    ("aes128gcm16-prfsha256-x25519-esn", "ike", "not an IKE transform"),
    ("sha256-modp2048", "ike", "no encryption"),
])
def test_parse_errors(text: str, kind: str, reason: str) -> None:
    with pytest.raises(ProposalError, match=reason):
        parse_proposal(text, kind)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", [
    "aes128-sha256-modp1024", "aes128-sha256-modp768", "3des-sha256-modp2048",
    "aes128-md5-modp2048", "aes128-sha1-modp2048", "aes128gcm16-prfsha1-x25519",
])
def test_weak_refused_unless_allowed(text: str) -> None:
    with pytest.raises(ProposalError, match="weak"):
        parse_proposal(text, "ike")
    spec = parse_proposal(text, "ike", allow_weak=True)
    assert spec.encr


def test_weak_transforms_listed() -> None:
    ts = TransformSet(EncrId.TRIPLE_DES, 192, IntegId.HMAC_SHA1_96, PrfId.HMAC_SHA1,
                      DhId.MODP1024)
    assert weak_transforms(ts) == ["TRIPLE_DES", "HMAC_SHA1_96", "HMAC_SHA1", "MODP1024"]
    assert weak_transforms(TransformSet(EncrId.AES_GCM_16, 128, prf=5, dh=31)) == []


def test_defaults_are_strong_and_parse() -> None:
    ike = parse_proposals("default", "ike")
    esp = parse_proposals("default", "esp")
    assert len(ike) == 2 and len(esp) == 2
    assert (EncrId.AES_GCM_16, 128) in ike[0].encr and DhId.CURVE25519 in ike[0].dh
    assert (EncrId.AES_GCM_16, 128) in esp[0].encr  # RFC 8221 MUST
    assert parse_proposals("aes128gcm16-prfsha256-x25519, default", "ike")[0].encr == (
        (EncrId.AES_GCM_16, 128),)


def test_sa_payload_wire_transforms() -> None:
    sa = sa_payload(parse_proposals(["aes128gcm16-aes256gcm16-prfsha256-x25519-ecp256"],
                                    "ike"))
    (p,) = sa.proposals
    assert p.number == 1 and p.protocol == ProtocolId.IKE and p.spi == b""
    assert p.transforms == (
        Transform(TransformType.ENCR, EncrId.AES_GCM_16, 128),
        Transform(TransformType.ENCR, EncrId.AES_GCM_16, 256),
        Transform(TransformType.PRF, PrfId.HMAC_SHA2_256),
        Transform(TransformType.DH, DhId.CURVE25519),
        Transform(TransformType.DH, DhId.ECP256),
    )
    chacha = parse_proposal("chacha20poly1305", "esp").to_proposal(1, b"\x01\x02\x03\x04")
    assert chacha.transforms[0] == Transform(TransformType.ENCR, 28, None)  # no key length


def _offer(specs: list[str], kind: str, spi: bytes = b"") -> list[Proposal]:
    return sa_payload(parse_proposals(specs, kind, allow_weak=True),  # type: ignore[arg-type]
                      spi).proposals


def test_responder_prefers_its_own_order() -> None:
    offered = _offer(["aes128-sha256-modp2048", "aes256gcm16-prfsha384-ecp384-x25519"], "ike")
    mine = parse_proposals(["aes256gcm16-prfsha384-x25519-ecp384", "aes128-sha256-modp2048"],
                           "ike")
    sel = select_proposal(mine, offered)
    assert sel is not None and sel.number == 2
    # Within the proposal, the first of *our* algorithms that the peer offered: x25519.
    assert sel.transforms == TransformSet(EncrId.AES_GCM_16, 256, IntegId.NONE,
                                          PrfId.HMAC_SHA2_384, DhId.CURVE25519)
    reply = sel.proposal()
    assert reply.number == 2 and len(reply.transforms) == 3


def test_key_length_must_match() -> None:
    offered = _offer(["aes128-sha256-modp2048"], "ike")
    assert select_proposal(parse_proposals(["aes256-sha256-modp2048"], "ike"), offered) is None
    assert select_proposal(parse_proposals(["aes128-sha256-modp2048"], "ike"), offered)


def test_no_common_dh_or_prf() -> None:
    offered = _offer(["aes128gcm16-prfsha256-ecp256"], "ike")
    assert select_proposal(parse_proposals(["aes128gcm16-prfsha256-x25519"], "ike"),
                           offered) is None
    assert select_proposal(parse_proposals(["aes128gcm16-prfsha512-ecp256"], "ike"),
                           offered) is None


def test_esp_selection_pfs_and_esn() -> None:
    spi = b"\xc0\x01\xc0\x01"
    offered = _offer(["aes128gcm16-x25519-esn-noesn"], "esp", spi)
    # Configured with PFS: picks the group.
    sel = select_proposal(parse_proposals(["aes128gcm16-x25519-noesn"], "esp"), offered)
    assert sel is not None and sel.spi == spi
    assert sel.transforms == TransformSet(EncrId.AES_GCM_16, 128, dh=DhId.CURVE25519,
                                          esn=EsnId.NO_ESN)
    # Configured without PFS, peer insists on it: no match, unless inside IKE_AUTH.
    assert select_proposal(parse_proposals(["aes128gcm16"], "esp"), offered) is None
    sel = select_proposal(parse_proposals(["aes128gcm16"], "esp"), offered, skip_dh=True)
    assert sel is not None and sel.transforms.dh == DhId.NONE
    assert sel.proposal(b"\x00\x00\x00\x07").spi == b"\x00\x00\x00\x07"
    # ESN only on our side.
    assert select_proposal(parse_proposals(["aes128gcm16-esn"], "esp"),
                           _offer(["aes128gcm16-noesn"], "esp", spi)) is None


def test_esp_cbc_selection_and_bad_spi() -> None:
    offered = _offer(["aes256-sha512-sha256"], "esp", b"\x00\x00\x10\x00")
    sel = select_proposal(parse_proposals(["aes256-sha256"], "esp"), offered)
    assert sel is not None and sel.transforms.integ == IntegId.HMAC_SHA2_256_128
    bad_spi = _offer(["aes256-sha256"], "esp", b"\x00\x01")
    assert select_proposal(parse_proposals(["aes256-sha256"], "esp"), bad_spi) is None
    assert select_proposal(parse_proposals(["aes256-sha256"], "esp"),
                           _offer(["aes256-sha256-modp2048"], "ike")) is None


def test_unknown_transform_type_or_attribute_spoils() -> None:
    base = _offer(["aes128gcm16-prfsha256-x25519"], "ike")[0]
    mine = parse_proposals(["aes128gcm16-prfsha256-x25519"], "ike")
    unknown_type = Proposal(1, 1, b"", base.transforms + (Transform(99, 1),))
    assert select_proposal(mine, [unknown_type]) is None
    with_attr = Proposal(1, 1, b"", (
        Transform(1, 20, 128, (TransformAttribute(77, b"\x00\x01"),)),) + base.transforms[1:])
    assert select_proposal(mine, [with_attr]) is None
    aead_with_integ = Proposal(1, 1, b"", base.transforms + (Transform(3, 12),))
    assert select_proposal(mine, [aead_with_integ]) is None
    aead_integ_none = Proposal(1, 1, b"", base.transforms + (Transform(3, 0),))
    assert select_proposal(mine, [aead_integ_none]) is not None


def test_initiator_checks_response() -> None:
    mine = parse_proposals(["aes256-sha256-modp2048", "aes128gcm16-prfsha256-x25519-ecp256"],
                           "ike")
    good = SaPayload([TransformSet(EncrId.AES_GCM_16, 128, prf=PrfId.HMAC_SHA2_256,
                                   dh=DhId.ECP256).proposal(2, ProtocolId.IKE)])
    sel = check_response(mine, good)
    assert sel is not None and sel.transforms.dh == DhId.ECP256
    # Two DH transforms in the reply, wrong proposal number, algorithm we never offered.
    two = SaPayload([Proposal(2, 1, b"", good.proposals[0].transforms
                              + (Transform(4, DhId.CURVE25519),))])
    assert check_response(mine, two) is None
    assert check_response(mine, SaPayload([Proposal(1, 1, b"", good.proposals[0].transforms)]))\
        is None
    assert check_response(mine, SaPayload([Proposal(3, 1, b"", good.proposals[0].transforms)]))\
        is None
    assert check_response(mine, SaPayload(good.proposals * 2)) is None
