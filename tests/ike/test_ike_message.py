import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.contrib import ikev2 as sc

from ike.constants import (
    AuthMethod,
    CertEncoding,
    CfgType,
    CpAttr,
    DhId,
    EncrId,
    ExchangeType,
    HeaderFlag,
    IdType,
    IntegId,
    NotifyType,
    PayloadType,
    PrfId,
    ProtocolId,
    TransformType,
)
from ike.errors import IkeParseError
from ike.message import IkeHeader, Message, decode_message, decode_payloads, encode_message
from ike.payloads import (
    AuthPayload,
    CertPayload,
    CertReqPayload,
    CpAttribute,
    CpPayload,
    DeletePayload,
    EapPayload,
    EncryptedPayload,
    IdiPayload,
    IdrPayload,
    KePayload,
    NoncePayload,
    NotifyPayload,
    Proposal,
    RawTrafficSelector,
    SaPayload,
    TrafficSelector,
    Transform,
    TsiPayload,
    TsrPayload,
    UnknownPayload,
    VendorIdPayload,
)

SPI_I = bytes.fromhex("0102030405060708")
SPI_R = bytes.fromhex("a1a2a3a4a5a6a7a8")


def ike_proposal() -> Proposal:
    return Proposal(1, ProtocolId.IKE, b"", (
        Transform(TransformType.ENCR, EncrId.AES_GCM_16, 256),
        Transform(TransformType.PRF, PrfId.HMAC_SHA2_256),
        Transform(TransformType.DH, DhId.CURVE25519),
    ))


def sa_init_request() -> Message:
    second = Proposal(2, ProtocolId.IKE, b"", (
        Transform(TransformType.ENCR, EncrId.AES_CBC, 128),
        Transform(TransformType.PRF, PrfId.HMAC_SHA2_256),
        Transform(TransformType.INTEG, IntegId.HMAC_SHA2_256_128),
        Transform(TransformType.DH, DhId.MODP2048),
    ))
    return Message(ExchangeType.IKE_SA_INIT, 0, SPI_I, bytes(8), HeaderFlag.INITIATOR, [
        SaPayload([ike_proposal(), second]),
        KePayload(DhId.CURVE25519, bytes(range(32))),
        NoncePayload(b"N" * 32),
        NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP, b"s" * 20),
        NotifyPayload(NotifyType.NAT_DETECTION_DESTINATION_IP, b"d" * 20),
        VendorIdPayload(b"userspace-ipsec"),
    ])


def every_payload() -> list:
    ts4 = TrafficSelector(ipaddress.ip_address("10.0.0.0"), ipaddress.ip_address("10.0.0.255"),
                          6, 80, 443)
    ts6 = TrafficSelector(ipaddress.ip_address("2001:db8::"), ipaddress.ip_address("2001:db8::ff"))
    esp = Proposal(1, ProtocolId.ESP, b"\x11\x22\x33\x44", (
        Transform(TransformType.ENCR, EncrId.AES_GCM_16, 128),
        Transform(TransformType.ESN, 0),
    ))
    return [
        IdiPayload(IdType.FQDN, b"alice.example"),
        CertPayload(CertEncoding.X509_SIGNATURE, b"\x30\x03\x02\x01\x00"),
        CertReqPayload(CertEncoding.X509_SIGNATURE, b"h" * 20),
        IdrPayload(IdType.IPV4_ADDR, bytes([192, 0, 2, 1])),
        AuthPayload(AuthMethod.SHARED_KEY_MIC, b"a" * 32),
        CpPayload(CfgType.REQUEST, [CpAttribute(CpAttr.INTERNAL_IP4_ADDRESS),
                                    CpAttribute(CpAttr.INTERNAL_IP4_DNS, bytes(4))]),
        NotifyPayload(NotifyType.USE_TRANSPORT_MODE),
        NotifyPayload(NotifyType.REKEY_SA, b"", ProtocolId.ESP, b"\xde\xad\xbe\xef"),
        SaPayload([esp]),
        TsiPayload([ts4, ts6]),
        TsrPayload([ts4, RawTrafficSelector(9, 0, b"\x00" * 12)]),
        DeletePayload(ProtocolId.ESP, [b"\x01\x02\x03\x04", b"\x05\x06\x07\x08"]),
        DeletePayload(ProtocolId.IKE, [], 0),
        EapPayload(bytes([2, 7, 0, 9, 1]) + b"user"),
        UnknownPayload(200, b"opaque", False),
        NoncePayload(bytes(256)),
    ]


def test_round_trip_every_payload() -> None:
    msg = Message(ExchangeType.IKE_AUTH, 1, SPI_I, SPI_R, HeaderFlag.INITIATOR, every_payload())
    data = encode_message(msg)
    assert decode_message(data) == msg
    assert struct.unpack_from("!I", data, 24)[0] == len(data)


def test_round_trip_sa_init_and_describe() -> None:
    msg = sa_init_request()
    back = decode_message(encode_message(msg))
    assert back == msg
    assert back.describe() == (
        "IKE_SA_INIT request 0 [ SA KE NONCE N(NAT_DETECTION_SOURCE_IP) "
        "N(NAT_DETECTION_DESTINATION_IP) VENDOR_ID ]"
    )
    assert back.notify(NotifyType.NAT_DETECTION_SOURCE_IP) is not None
    assert back.find(KePayload) == KePayload(DhId.CURVE25519, bytes(range(32)))


def _scapy_chain(first, cls):
    items = []
    node = first
    while isinstance(node, cls):
        items.append(node)
        node = node.payload
    return items


def test_scapy_parses_our_sa_init() -> None:
    data = encode_message(sa_init_request())
    pkt = sc.IKEv2(data)
    assert pkt.init_SPI == SPI_I and pkt.exch_type == 34 and pkt.length == len(data)
    assert pkt.flags.Initiator
    proposals = _scapy_chain(pkt[sc.IKEv2_SA].prop, sc.IKEv2_Proposal)
    assert [p.proposal for p in proposals] == [1, 2]
    transforms = _scapy_chain(proposals[0].trans, sc.IKEv2_Transform)
    assert [(t.transform_type, t.transform_id) for t in transforms] == [(1, 20), (2, 5), (4, 31)]
    assert transforms[0].key_length == 256
    second = _scapy_chain(proposals[1].trans, sc.IKEv2_Transform)
    assert [(t.transform_type, t.transform_id) for t in second] == [
        (1, 12), (2, 5), (3, 12), (4, 14)]
    assert pkt[sc.IKEv2_KE].group == 31 and pkt[sc.IKEv2_KE].ke == bytes(range(32))
    assert pkt[sc.IKEv2_Nonce].nonce == b"N" * 32
    notifies = [p for p in _scapy_chain(pkt[sc.IKEv2_Notify], sc.IKEv2_Notify)]
    assert [(n.type, n.notify) for n in notifies] == [(16388, b"s" * 20), (16389, b"d" * 20)]
    assert pkt[sc.IKEv2_VendorID].vendorID == b"userspace-ipsec"


def test_we_parse_scapy_built_messages() -> None:
    trans = (
        sc.IKEv2_Transform(transform_type=1, transform_id=12, length=12, key_length=128)
        / sc.IKEv2_Transform(transform_type=3, transform_id=12)
        / sc.IKEv2_Transform(transform_type=5, transform_id=0)
    )
    pkt = (
        sc.IKEv2(init_SPI=SPI_I, resp_SPI=SPI_R, exch_type=35, flags="Response", id=1)
        / sc.IKEv2_IDr(IDtype=2, ID=b"gw.example")
        / sc.IKEv2_AUTH(auth_type=2, load=b"m" * 32)
        / sc.IKEv2_SA(prop=sc.IKEv2_Proposal(proto=3, SPI=b"\x0a\x0b\x0c\x0d", trans_nb=3,
                                             trans=trans))
        / sc.IKEv2_TSi(traffic_selector=[sc.IPv4TrafficSelector(
            IP_protocol_ID=17, start_port=500, end_port=500,
            starting_address_v4="192.0.2.1", ending_address_v4="192.0.2.9")])
        # scapy's default IPv6 selector length is 20; RFC 7296 3.13.1 says 40.
        / sc.IKEv2_TSr(traffic_selector=[sc.IPv6TrafficSelector(
            IP_protocol_ID=0, length=40, starting_address_v6="2001:db8::1",
            ending_address_v6="2001:db8::2")])
        / sc.IKEv2_Delete(proto=3, SPI=[b"\x01\x02\x03\x04"], SPInum=1)
        / sc.IKEv2_Notify(proto=0, type=16394)
        / sc.IKEv2_CP(CFGType=2, attributes=[sc.ConfigurationAttribute(
            type=1, length=4, value="10.1.0.5")])
    )
    msg = decode_message(bytes(pkt))
    assert msg.is_response and msg.message_id == 1 and msg.spi_r == SPI_R
    assert msg.payloads[0] == IdrPayload(IdType.FQDN, b"gw.example")
    assert msg.payloads[1] == AuthPayload(AuthMethod.SHARED_KEY_MIC, b"m" * 32)
    assert msg.payloads[2] == SaPayload([Proposal(1, 3, b"\x0a\x0b\x0c\x0d", (
        Transform(1, 12, 128), Transform(3, 12), Transform(5, 0)))])
    assert msg.payloads[3] == TsiPayload([TrafficSelector(
        ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.9"), 17, 500, 500)])
    assert msg.payloads[4] == TsrPayload([TrafficSelector(
        ipaddress.ip_address("2001:db8::1"), ipaddress.ip_address("2001:db8::2"))])
    assert msg.payloads[5] == DeletePayload(3, [b"\x01\x02\x03\x04"])
    assert msg.payloads[6] == NotifyPayload(NotifyType.ESP_TFC_PADDING_NOT_SUPPORTED)
    assert msg.payloads[7] == CpPayload(2, [CpAttribute(1, bytes([10, 1, 0, 5]))])
    # And our encoding of what we parsed is byte-identical to scapy's.
    assert encode_message(msg) == bytes(pkt)


def test_scapy_parses_our_auth_payloads() -> None:
    msg = Message(ExchangeType.IKE_AUTH, 1, SPI_I, SPI_R, HeaderFlag.INITIATOR,
                  every_payload()[:12])
    pkt = sc.IKEv2(encode_message(msg))
    assert pkt[sc.IKEv2_IDi].ID == b"alice.example"
    assert pkt[sc.IKEv2_IDr].ID == "192.0.2.1"
    assert pkt[sc.IKEv2_AUTH].auth_type == 2 and pkt[sc.IKEv2_AUTH].load == b"a" * 32
    assert pkt[sc.IKEv2_CERTREQ].cert_encoding == 4
    tsi = pkt[sc.IKEv2_TSi].traffic_selector
    assert tsi[0].starting_address_v4 == "10.0.0.0" and tsi[0].end_port == 443
    assert tsi[1].ending_address_v6 == "2001:db8::ff"
    assert pkt[sc.IKEv2_Delete].SPI == [b"\x01\x02\x03\x04", b"\x05\x06\x07\x08"]
    assert pkt[sc.IKEv2_CP].attributes[1].value == "0.0.0.0"


def test_sk_payload_kept_encrypted_with_inner_type() -> None:
    msg = Message(ExchangeType.IKE_AUTH, 1, SPI_I, SPI_R, HeaderFlag.INITIATOR,
                  [EncryptedPayload(PayloadType.IDi, b"\xaa" * 48)])
    data = encode_message(msg)
    back = decode_message(data)
    assert back.payloads == [EncryptedPayload(PayloadType.IDi, b"\xaa" * 48)]
    assert back.sk_offset == 28
    assert sc.IKEv2(data).next_payload == 46


def _generic(nxt: int, flags: int, body: bytes) -> bytes:
    return struct.pack("!BBH", nxt, flags, 4 + len(body)) + body


def _message(first: int, chain: bytes) -> bytes:
    hdr = IkeHeader(SPI_I, SPI_R, first, 35, 0x08, 1, 28 + len(chain))
    return hdr.encode() + chain


def test_unknown_noncritical_kept_and_critical_rejected() -> None:
    nonce = _generic(0, 0, b"n" * 16)
    ok = decode_message(_message(150, _generic(PayloadType.NONCE, 0, b"xyz") + nonce))
    assert ok.payloads == [UnknownPayload(150, b"xyz"), NoncePayload(b"n" * 16)]
    with pytest.raises(IkeParseError) as info:
        decode_message(_message(150, _generic(PayloadType.NONCE, 0x80, b"xyz") + nonce))
    assert info.value.notify == NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD
    assert info.value.notify_data == bytes([150])
    assert isinstance(info.value.header, IkeHeader) and info.value.header.message_id == 1
    # The critical bit on a payload we understand is ignored (RFC 7296 3.2).
    assert decode_message(_message(PayloadType.NONCE, _generic(0, 0x80, b"n" * 16))).payloads


@pytest.mark.parametrize("data", [
    b"",
    b"\x00" * 27,
    _message(PayloadType.NONCE, _generic(0, 0, b"short")),
    _message(PayloadType.NONCE, _generic(0, 0, b"n" * 16))[:-1],
    _message(PayloadType.NONCE, _generic(0, 0, b"n" * 16)) + b"\x00",
    _message(PayloadType.NONCE, _generic(0, 0, b"n" * 16) + b"junk"),
    _message(PayloadType.NONCE, struct.pack("!BBH", 0, 0, 3) + b"n" * 16),
    _message(PayloadType.NONCE, struct.pack("!BBH", 0, 0, 200) + b"n" * 16),
    _message(PayloadType.SK, _generic(PayloadType.IDi, 0, b"x" * 20) + _generic(0, 0, b"y")),
    _message(PayloadType.KE, _generic(0, 0, b"\x00")),
    _message(PayloadType.DELETE, _generic(0, 0, bytes([3, 4, 0, 2]) + b"\x00" * 7)),
    _message(PayloadType.NOTIFY, _generic(0, 0, bytes([3, 4, 0x40, 0]) + b"\x00" * 3)),
    _message(PayloadType.TSi, _generic(0, 0, bytes([1, 0, 0, 0]))),
    _message(PayloadType.TSi, _generic(0, 0, bytes([0, 0, 0, 0]))),
    _message(PayloadType.TSi, _generic(0, 0, bytes([1, 0, 0, 0, 7, 0, 0, 20]) + bytes(16))),
    _message(PayloadType.CP, _generic(0, 0, bytes([1, 0, 0, 0, 0, 1, 0, 4, 10]))),
    _message(PayloadType.EAP, _generic(0, 0, bytes([2, 1, 0, 9, 1]))),
    _message(PayloadType.SA, _generic(0, 0, b"")),
    # proposal says 2 transforms, holds 1
    _message(PayloadType.SA, _generic(0, 0, bytes([0, 0, 0, 16, 1, 1, 0, 2])
                                         + bytes([0, 0, 0, 8, 1, 0, 0, 12]))),
    # transform marked "more" but is the last one
    _message(PayloadType.SA, _generic(0, 0, bytes([0, 0, 0, 16, 1, 1, 0, 1])
                                         + bytes([3, 0, 0, 8, 1, 0, 0, 12]))),
    # key length attribute in TLV form, and truncated attribute
    _message(PayloadType.SA, _generic(0, 0, bytes([0, 0, 0, 20, 1, 1, 0, 1])
                                         + bytes([0, 0, 0, 12, 1, 0, 0, 12, 0, 14, 0, 0]))),
    _message(PayloadType.SA, _generic(0, 0, bytes([0, 0, 0, 18, 1, 1, 0, 1])
                                         + bytes([0, 0, 0, 10, 1, 0, 0, 12, 0x80, 14]))),
])
def test_malformed_raises_parse_error(data: bytes) -> None:
    with pytest.raises(IkeParseError) as info:
        decode_message(data)
    assert info.value.notify == NotifyType.INVALID_SYNTAX


def test_wrong_major_version() -> None:
    data = bytearray(_message(PayloadType.NONCE, _generic(0, 0, b"n" * 16)))
    data[17] = 0x30
    with pytest.raises(IkeParseError) as info:
        decode_message(bytes(data))
    assert info.value.notify == NotifyType.INVALID_MAJOR_VERSION


def test_inner_chain_rejects_nested_sk() -> None:
    with pytest.raises(IkeParseError):
        decode_payloads(PayloadType.SK, _generic(0, 0, b"x" * 20))


_VALID = [
    encode_message(sa_init_request()),
    encode_message(Message(ExchangeType.IKE_AUTH, 1, SPI_I, SPI_R, 0, every_payload())),
]


@settings(max_examples=400, deadline=None)
@given(which=st.sampled_from(_VALID), data=st.data())
def test_fuzzed_input_only_raises_parse_error(which: bytes, data: st.DataObject) -> None:
    buf = bytearray(which)
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(28, len(buf) - 1))
        buf[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(28, len(buf)))
    buf = buf[:cut]
    buf[24:28] = struct.pack("!I", len(buf))  # keep the header length right: reach the payloads
    try:
        msg = decode_message(bytes(buf))
    except IkeParseError:
        return
    # Whatever parsed must re-encode without error.
    encode_message(msg)
