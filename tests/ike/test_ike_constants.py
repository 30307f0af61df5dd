from ike.constants import (
    DhId,
    EncrId,
    EsnId,
    ExchangeType,
    IntegId,
    NotifyType,
    PayloadType,
    PrfId,
    enum_name,
    is_error_notify,
)


def test_iana_values_from_the_brief() -> None:
    assert (EncrId.AES_CBC, EncrId.AES_GCM_16, EncrId.CHACHA20_POLY1305) == (12, 20, 28)
    assert (PrfId.HMAC_SHA2_256, PrfId.HMAC_SHA2_384, PrfId.HMAC_SHA2_512) == (5, 6, 7)
    assert (IntegId.HMAC_SHA2_256_128, IntegId.HMAC_SHA2_384_192) == (12, 13)
    assert IntegId.HMAC_SHA2_512_256 == 14
    assert [int(g) for g in (DhId.MODP2048, DhId.MODP3072, DhId.MODP4096)] == [14, 15, 16]
    assert [int(g) for g in (DhId.ECP256, DhId.ECP384, DhId.ECP521)] == [19, 20, 21]
    assert (DhId.CURVE25519, DhId.CURVE448) == (31, 32)
    assert (EsnId.NO_ESN, EsnId.ESN) == (0, 1)
    assert ExchangeType.IKE_SA_INIT == 34 and ExchangeType.INFORMATIONAL == 37
    assert PayloadType.SA == 33 and PayloadType.SK == 46 and PayloadType.EAP == 48
    assert NotifyType.NAT_DETECTION_SOURCE_IP == 16388
    assert NotifyType.COOKIE == 16390 and NotifyType.INVALID_KE_PAYLOAD == 17


def test_error_and_status_ranges() -> None:
    assert is_error_notify(NotifyType.INVALID_SYNTAX)
    assert is_error_notify(NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD)
    assert not is_error_notify(NotifyType.INITIAL_CONTACT)
    assert not is_error_notify(NotifyType.ESP_TFC_PADDING_NOT_SUPPORTED)
    assert not is_error_notify(0)


def test_enum_name_for_unknown_value() -> None:
    assert enum_name(NotifyType, 16391) == "USE_TRANSPORT_MODE"
    assert enum_name(NotifyType, 9999) == "9999"
