"""Every example of setkey(8)'s EXAMPLES section (and the inline ones) parses into the right
PF_KEY messages, or is refused with a clear reason where this stack lacks the feature."""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from userspace_ipsec.algorithms import encryption_by_name, integrity_by_name
from userspace_ipsec.pfkey.constants import (
    IPPROTO_AH,
    IPPROTO_ESP,
    IPSEC_PROTO_ANY,
    ExtType,
    IpsecLevel,
    IpsecMode,
    MsgType,
    PolicyDir,
    PolicyType,
    SaType,
)
from userspace_ipsec.pfkey.messages import IPAddress, KeyExt, SecCtxExt
from userspace_ipsec.setkey import CommandKind, SetkeyError, parse_script

DES = encryption_by_name("des-cbc")
MD5 = integrity_by_name("hmac-md5")
SHA1 = integrity_by_name("hmac-sha1")
CTX = "system_u:system_r:unconfined_t:SystemLow-SystemHigh"


def one(text: str, **kwargs: object):  # type: ignore[no-untyped-def]
    commands = parse_script(text, "man.conf", **kwargs)  # type: ignore[arg-type]
    assert len(commands) == 1
    return commands[0]


def key(msg, ext_type):  # type: ignore[no-untyped-def]
    ext = msg.ext[ext_type]
    assert isinstance(ext, KeyExt)
    return ext.key


def test_add_esp_des_ipv6() -> None:
    cmd = one("add 3ffe:501:4819::1 3ffe:501:481d::1 esp 123457\n\t-E des-cbc 0x3ffe05014819ffff ;")
    assert cmd.kind is CommandKind.ADD and cmd.line == 1
    (msg,) = cmd.messages
    assert msg.type is MsgType.ADD and msg.satype is SaType.ESP
    assert msg.sa is not None and msg.sa.spi == 123457
    assert DES is not None and msg.sa.encrypt == DES.pfkey_id and msg.sa.auth == 0
    assert msg.src is not None and msg.src.address == IPv6Address("3ffe:501:4819::1")
    assert msg.dst is not None and msg.dst.address == IPv6Address("3ffe:501:481d::1")
    assert key(msg, ExtType.KEY_ENCRYPT) == bytes.fromhex("3ffe05014819ffff")
    assert ExtType.KEY_AUTH not in msg.ext
    assert msg.sa2 is not None and msg.sa2.mode is IpsecMode.ANY and msg.sa2.reqid == 0
    assert any("des-cbc is weak" in w for w in cmd.warnings)


HOSTS: dict[str, list[IPAddress]] = {
    "myhost.example.com": [ip_address("2001:db8::1"), ip_address("192.0.2.1")],
    "yourhost.example.com": [ip_address("2001:db8::2"), ip_address("192.0.2.2")],
}


def resolve(name: str) -> Sequence[IPAddress]:
    return HOSTS.get(name, [])


def test_add_ah_with_host_names_and_dash_6() -> None:
    text = (
        "add -6 myhost.example.com yourhost.example.com ah 123456\n"
        '\t-A hmac-sha1 "AH SA configuration!" ;'
    )
    cmd = one(text, resolve=resolve)
    (msg,) = cmd.messages  # -6: only the IPv6 pair
    assert msg.satype is SaType.AH and msg.sa is not None and msg.sa.spi == 123456
    assert SHA1 is not None and msg.sa.auth == SHA1.pfkey_id and msg.sa.encrypt == 0
    assert msg.src is not None and msg.src.address == IPv6Address("2001:db8::1")
    assert msg.dst is not None and msg.dst.address == IPv6Address("2001:db8::2")
    assert key(msg, ExtType.KEY_AUTH) == b"AH SA configuration!"


def test_host_names_without_family_flag_give_one_message_per_same_family_pair() -> None:
    text = (
        "add myhost.example.com yourhost.example.com ah 123456"
        ' -A hmac-sha1 "AH SA configuration!";'
    )
    cmd = one(text, resolve=resolve)
    pairs = [(m.src.address, m.dst.address) for m in cmd.messages]  # type: ignore[union-attr]
    assert pairs == [
        (IPv6Address("2001:db8::1"), IPv6Address("2001:db8::2")),
        (IPv4Address("192.0.2.1"), IPv4Address("192.0.2.2")),
    ]


def test_add_esp_des_md5() -> None:
    text = (
        "add 10.0.11.41 10.0.11.33 esp 0x10001\n\t-E des-cbc 0x3ffe05014819ffff\n"
        '\t-A hmac-md5 "authentication!!" ;'
    )
    (msg,) = one(text).messages
    assert msg.sa is not None and msg.sa.spi == 0x10001
    assert DES is not None and MD5 is not None
    assert (msg.sa.encrypt, msg.sa.auth) == (DES.pfkey_id, MD5.pfkey_id)
    assert key(msg, ExtType.KEY_AUTH) == b"authentication!!"
    assert key(msg, ExtType.KEY_ENCRYPT) == bytes.fromhex("3ffe05014819ffff")
    assert msg.src is not None and msg.src.proto == IPSEC_PROTO_ANY and msg.src.prefixlen is None


def test_get() -> None:
    cmd = one("get 3ffe:501:4819::1 3ffe:501:481d::1 ah 123456 ;")
    (msg,) = cmd.messages
    assert cmd.kind is CommandKind.GET and msg.type is MsgType.GET and msg.satype is SaType.AH
    assert msg.sa is not None and msg.sa.spi == 123456
    assert ExtType.KEY_AUTH not in msg.ext and ExtType.KEY_ENCRYPT not in msg.ext


def test_flush_and_dump() -> None:
    flush, dump = parse_script("flush ;\n\ndump esp ;")
    assert flush.kind is CommandKind.FLUSH and dump.kind is CommandKind.DUMP
    assert flush.messages[0].type is MsgType.FLUSH and flush.messages[0].satype is SaType.UNSPEC
    assert dump.messages[0].type is MsgType.DUMP and dump.messages[0].satype is SaType.ESP
    assert dump.line == 3


def test_spdadd_tunnel() -> None:
    text = (
        "spdadd 10.0.11.41/32[21] 10.0.11.33/32[any] any\n"
        "\t-P out ipsec esp/tunnel/192.168.0.1-192.168.1.2/require ;"
    )
    cmd = one(text)
    (msg,) = cmd.messages  # out: no fwd twin
    assert msg.type is MsgType.X_SPDADD and msg.satype is SaType.UNSPEC
    assert msg.src is not None and msg.dst is not None
    assert (msg.src.address, msg.src.prefixlen, msg.src.port, msg.src.proto) == (
        IPv4Address("10.0.11.41"), 32, 21, IPSEC_PROTO_ANY,
    )
    assert (msg.dst.address, msg.dst.prefixlen, msg.dst.port) == (IPv4Address("10.0.11.33"), 32, 0)
    policy = msg.policy
    assert policy is not None
    assert (policy.type, policy.dir, policy.priority) == (
        PolicyType.IPSEC, PolicyDir.OUTBOUND, 0x80000000,
    )
    (req,) = policy.requests
    assert (req.proto, req.mode, req.level, req.reqid) == (
        IPPROTO_ESP, IpsecMode.TUNNEL, IpsecLevel.REQUIRE, 0,
    )
    assert (req.src, req.dst) == (IPv4Address("192.168.0.1"), IPv4Address("192.168.1.2"))


def test_tcp_md5_is_refused_with_reason() -> None:
    with pytest.raises(SetkeyError) as info:
        parse_script('add 10.1.10.34 10.1.10.36 tcp 0x1000 -A tcp-md5 "TCP-MD5 BGP secret" ;')
    assert "TCP-MD5" in info.value.reason
    assert (info.value.line, info.value.column, info.value.token) == (1, 27, "tcp")


def test_add_with_security_context() -> None:
    text = (
        "add 10.0.11.41 10.0.11.33 esp 0x10001\n"
        f'\t-ctx 1 1 "{CTX}"\n'
        "\t-E des-cbc 0x3ffe05014819ffff;"
    )
    (msg,) = one(text).messages
    ctx = msg.ext[ExtType.X_SEC_CTX]
    assert isinstance(ctx, SecCtxExt)
    assert (ctx.doi, ctx.alg, ctx.context) == (1, 1, CTX.encode())
    assert key(msg, ExtType.KEY_ENCRYPT) == bytes.fromhex("3ffe05014819ffff")


def test_spdadd_with_security_context() -> None:
    text = (
        "spdadd 10.0.11.41 10.0.11.33 any\n"
        f'\t-ctx 1 1 "{CTX}"\n'
        "\t-P out ipsec esp/transport//require ;"
    )
    (msg,) = one(text).messages
    assert isinstance(msg.ext[ExtType.X_SEC_CTX], SecCtxExt)
    assert msg.src is not None and msg.src.prefixlen is None  # the full host length
    policy = msg.policy
    assert policy is not None
    (req,) = policy.requests
    assert (req.mode, req.level, req.src, req.dst) == (
        IpsecMode.TRANSPORT, IpsecLevel.REQUIRE, None, None,
    )


def test_inline_icmp6_neighbour_solicitation_exemption() -> None:
    cmd = one("spdadd ::/0 ::/0 icmp6 135,0 -P in none ;")
    inbound, fwd = cmd.messages  # RFC mode (setkey's default) twins every in policy
    for msg in (inbound, fwd):
        assert msg.src is not None and msg.dst is not None
        assert (msg.src.proto, msg.src.port, msg.dst.port) == (58, 135, 0)
        assert msg.src.prefixlen == 0 and msg.policy is not None
        assert msg.policy.type is PolicyType.NONE
    assert inbound.policy is not None and inbound.policy.dir is PolicyDir.INBOUND
    assert fwd.policy is not None and fwd.policy.dir is PolicyDir.FWD
    (only_in,) = one("spdadd ::/0 ::/0 icmp6 135,0 -P in none ;", rfc_mode=False).messages
    assert only_in.policy is not None and only_in.policy.dir is PolicyDir.INBOUND


def test_inline_gre_key_example() -> None:
    # The man page prints this example without its -P: setkey itself rejects that.
    with pytest.raises(SetkeyError) as info:
        parse_script("spdadd 0.0.0.0 0.0.0.0 gre 1234 ipsec esp/transport//require ;")
    assert info.value.token == "ipsec" and "-P" in info.value.reason
    (msg,) = one("spdadd 0.0.0.0 0.0.0.0 gre 1234 -P out ipsec esp/transport//require ;").messages
    assert msg.src is not None and msg.dst is not None
    assert (msg.src.proto, msg.src.port, msg.dst.port) == (47, 0, 1234)
    (quad,) = one("spdadd 0.0.0.0 0.0.0.0 gre 0.1.4.210 -P out none ;").messages
    assert quad.src is not None and quad.dst is not None
    assert (quad.src.port, quad.dst.port) == (1, 1234)


def test_inline_natt_ports_in_tunnel_endpoints() -> None:
    text = (
        "spdadd 10.0.11.0/24[any] 10.0.11.33/32[any] any -P out ipsec\n"
        "    esp/tunnel/192.168.0.1[4500]-192.168.1.2[30000]/require ;\n"
    )
    (msg,) = one(text).messages
    assert msg.policy is not None
    (req,) = msg.policy.requests
    assert (req.src_port, req.dst_port) == (4500, 30000)


def test_inline_bundle_esp_then_ah() -> None:
    (msg,) = one(
        "spdadd 10.0.0.1 10.0.0.2 any -P out ipsec esp/transport//require ah/transport//require ;"
    ).messages
    assert msg.policy is not None
    assert [r.proto for r in msg.policy.requests] == [IPPROTO_ESP, IPPROTO_AH]
