"""The setkey syntax beyond the man page examples, message by message."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest

from userspace_ipsec.algorithms import encryption_by_name, integrity_by_name
from userspace_ipsec.pfkey.constants import (
    IPSEC_PROTO_ANY,
    ExtType,
    IpsecLevel,
    IpsecMode,
    MsgType,
    NatTType,
    PolicyDir,
    PolicyType,
    SaState,
    SaType,
)
from userspace_ipsec.pfkey.messages import (
    AddressExt,
    KeyExt,
    LifetimeExt,
    Message,
    NatTPortExt,
    NatTTypeExt,
    SA2Ext,
    SAExt,
    SpiRangeExt,
    UipsecExt,
)
from userspace_ipsec.setkey import CommandKind, deleteall_requests, parse_script

K128 = "0x" + "11" * 16
K160 = "0x" + "22" * 20
K256 = "0x" + "33" * 32
K288 = "0x" + "44" * 36


def msg_of(text: str) -> Message:
    (cmd,) = parse_script(text)
    (msg,) = cmd.messages
    return msg


def alg_id(name: str) -> int:
    alg = encryption_by_name(name) or integrity_by_name(name)
    assert alg is not None
    return alg.pfkey_id


def test_sa_extensions_all_options() -> None:
    msg = msg_of(
        f"add 192.0.2.1 198.51.100.1 esp 0x1234 -m tunnel -r 32 -u 1234 -f random-pad"
        f" -lh 3600 -ls 3000 -bh 1000000 -bs 900000 -E aes-cbc {K128} -A hmac-sha256 {K256};"
    )
    assert msg.sa == SAExt(
        spi=0x1234, replay=32, state=SaState.LARVAL,  # setkey sends state 0
        auth=alg_id("hmac-sha256"), encrypt=alg_id("aes-cbc"),
    )
    assert msg.sa2 == SA2Ext(mode=IpsecMode.TUNNEL, reqid=1234)
    assert msg.ext[ExtType.LIFETIME_HARD] == LifetimeExt(bytes=1000000, addtime=3600)
    assert msg.ext[ExtType.LIFETIME_SOFT] == LifetimeExt(bytes=900000, addtime=3000)
    assert ExtType.LIFETIME_CURRENT not in msg.ext
    assert ExtType.X_UIPSEC not in msg.ext


def test_pad_option_is_accepted_with_a_warning() -> None:
    (cmd,) = parse_script(f"add 192.0.2.1 198.51.100.1 esp 0x1234 -f zero-pad -E aes-cbc {K128};")
    assert any("-f zero-pad" in w for w in cmd.warnings)


def test_cipher_without_integrity_warns() -> None:
    (cmd,) = parse_script(f"add 192.0.2.1 198.51.100.1 esp 0x1234 -E aes-cbc {K128};")
    assert cmd.warnings == ["aes-cbc without -A: no integrity protection"]
    (aead,) = parse_script(f"add 192.0.2.1 198.51.100.1 esp 0x1234 -E aes-gcm-16 {K160};")
    assert aead.warnings == []


def test_only_soft_lifetime_gives_no_hard_extension() -> None:
    msg = msg_of(f"add 192.0.2.1 198.51.100.1 esp 300 -ls 10 -E aes-gcm-16 {K160};")
    assert ExtType.LIFETIME_HARD not in msg.ext
    assert msg.ext[ExtType.LIFETIME_SOFT] == LifetimeExt(addtime=10)


def test_large_replay_window_goes_in_private_extension() -> None:
    msg = msg_of(f"add 192.0.2.1 198.51.100.1 esp 300 -r 4096 -E aes-gcm-16 {K160};")
    assert msg.sa is not None and msg.sa.replay == 255
    assert msg.ext[ExtType.X_UIPSEC] == UipsecExt(replay_window=4096)


@pytest.mark.parametrize(
    ("spec", "enc", "auth"),
    [
        (f"-E aes-gcm-16 {K160}", "aes-gcm-16", None),
        (f"-E aes-gcm-16 0x{'55' * 28}", "aes-gcm-16", None),
        (f"-E aes-gcm-16 {K288}", "aes-gcm-16", None),
        (f"-E rijndael-cbc {K128} -A hmac-sha1 {K160}", "aes-cbc", "hmac-sha1"),
        (f"-E aes-cbc 0x{'66' * 24} -A hmac-sha384 0x{'77' * 48}", "aes-cbc", "hmac-sha384"),
        (f"-E aes-ctr {K160} -A hmac-sha512 0x{'88' * 64}", "aes-ctr", "hmac-sha512"),
        (f"-E chacha20-poly1305 {K288}", "chacha20-poly1305", None),
        (f"-E 3des-cbc 0x{'99' * 24} -A hmac-md5 {K128}", "3des-cbc", "hmac-md5"),
        (f"-E null -A hmac-sha256 {K256}", "null", "hmac-sha256"),
        ('-E aes-cbc "0123456789abcdef" -A hmac-sha1 "01234567890123456789"', "aes-cbc",
         "hmac-sha1"),
    ],
)
def test_esp_algorithms(spec: str, enc: str, auth: str | None) -> None:
    msg = msg_of(f"add 192.0.2.1 198.51.100.1 esp 0x1000 {spec};")
    assert msg.sa is not None
    assert msg.sa.encrypt == alg_id(enc)
    assert msg.sa.auth == (alg_id(auth) if auth else 0)
    assert (ExtType.KEY_AUTH in msg.ext) == (auth is not None)
    assert (ExtType.KEY_ENCRYPT in msg.ext) == (enc != "null")


def test_ah_with_null_and_real_auth() -> None:
    msg = msg_of(f"add 192.0.2.1 198.51.100.1 ah 0x1000 -A hmac-sha256 {K256};")
    assert msg.satype is SaType.AH and msg.sa is not None and msg.sa.encrypt == 0
    key = msg.ext[ExtType.KEY_AUTH]
    assert isinstance(key, KeyExt) and key.key == bytes.fromhex(K256[2:])
    null = msg_of("add 192.0.2.1 198.51.100.1 ah 0x1000 -A null;")
    null_auth = integrity_by_name("null")
    assert null_auth is not None and null.sa is not None and null.sa.auth == null_auth.pfkey_id
    assert ExtType.KEY_AUTH not in null.ext


def test_odd_length_hex_key_gets_a_leading_zero_nibble() -> None:
    msg = msg_of(f"add 192.0.2.1 198.51.100.1 esp 0x1000 -E aes-cbc 0x{'1' * 31};")
    key = msg.ext[ExtType.KEY_ENCRYPT]
    assert isinstance(key, KeyExt) and key.key == bytes.fromhex("0" + "1" * 31)


def test_esp_udp_natt_extensions() -> None:
    msg = msg_of(
        f"add 192.0.2.1[4500] 203.0.113.7[31337] esp-udp 0x3000 -m tunnel -E aes-gcm-16 {K160};"
    )
    assert msg.satype is SaType.ESP
    assert msg.ext[ExtType.X_NAT_T_TYPE] == NatTTypeExt(NatTType.ESPINUDP)
    assert msg.ext[ExtType.X_NAT_T_SPORT] == NatTPortExt(4500)
    assert msg.ext[ExtType.X_NAT_T_DPORT] == NatTPortExt(31337)
    assert msg.src == AddressExt(IPv4Address("192.0.2.1"), proto=IPSEC_PROTO_ANY, port=4500)
    assert ExtType.X_NAT_T_OA not in msg.ext


def test_esp_udp_default_ports_and_original_address() -> None:
    msg = msg_of(f"add 192.0.2.1 203.0.113.7 esp-udp 10.1.2.3 0x3000 -E aes-gcm-16 {K160};")
    assert msg.ext[ExtType.X_NAT_T_SPORT] == NatTPortExt(4500)
    assert msg.ext[ExtType.X_NAT_T_DPORT] == NatTPortExt(4500)
    oa = msg.ext[ExtType.X_NAT_T_OA]
    assert isinstance(oa, AddressExt) and oa.address == IPv4Address("10.1.2.3")


def test_update_and_delete_and_getspi() -> None:
    update, delete, getspi, getspi_any = parse_script(
        f"update 192.0.2.1 198.51.100.1 esp 0x1000 -E aes-gcm-16 {K160};\n"
        "delete 192.0.2.1 198.51.100.1 esp 0x1000;\n"
        "getspi 192.0.2.1 198.51.100.1 esp 0x2000 -m tunnel -u 7;\n"
        "getspi 192.0.2.1 198.51.100.1 esp 0;\n"
    )
    assert update.messages[0].type is MsgType.UPDATE
    assert delete.kind is CommandKind.DELETE and delete.messages[0].type is MsgType.DELETE
    assert delete.messages[0].sa is not None and delete.messages[0].sa.spi == 0x1000
    spi = getspi.messages[0]
    assert spi.type is MsgType.GETSPI and spi.ext[ExtType.SPIRANGE] == SpiRangeExt(0x2000, 0x2000)
    assert spi.sa2 == SA2Ext(mode=IpsecMode.TUNNEL, reqid=7) and spi.sa is None
    assert getspi_any.messages[0].ext[ExtType.SPIRANGE] == SpiRangeExt(256, 0xFFFFFFFF)


def test_get_with_mode_warns_obsolete() -> None:
    (cmd,) = parse_script("get 192.0.2.1 198.51.100.1 esp 0x1000 -m transport;")
    assert any("obsolete" in w for w in cmd.warnings)


def test_deleteall_two_steps() -> None:
    (cmd,) = parse_script("deleteall 192.0.2.1 198.51.100.1 esp ;")
    assert cmd.kind is CommandKind.DELETEALL
    (dump,) = cmd.messages
    assert dump.type is MsgType.DUMP and dump.satype is SaType.ESP

    def sa(spi: int, src: str, dst: str, satype: SaType = SaType.ESP) -> Message:
        return Message(MsgType.DUMP, satype, seq=1, ext={
            ExtType.SA: SAExt(spi), ExtType.X_SA2: SA2Ext(mode=IpsecMode.TUNNEL),
            ExtType.ADDRESS_SRC: AddressExt(IPv4Address(src)),
            ExtType.ADDRESS_DST: AddressExt(IPv4Address(dst)),
        })

    replies = [
        sa(0x1001, "192.0.2.1", "198.51.100.1"),
        sa(0x1002, "198.51.100.1", "192.0.2.1"),  # the other direction: kept
        sa(0x1003, "192.0.2.1", "198.51.100.1", SaType.AH),  # other protocol: kept
        sa(0x1004, "192.0.2.1", "198.51.100.1"),
    ]
    deletes = deleteall_requests(cmd, replies)
    assert [d.sa.spi for d in deletes if d.sa] == [0x1001, 0x1004]
    for d in deletes:
        assert d.type is MsgType.DELETE and d.satype is SaType.ESP
        assert d.src is not None and d.src.address == IPv4Address("192.0.2.1")
        assert d.dst is not None and d.dst.address == IPv4Address("198.51.100.1")


def test_spd_forms() -> None:
    (cmd,) = parse_script(
        "spdadd -n 2001:db8:1::/48[any] 2001:db8:2::/48[443] tcp\n"
        "  -P out priority 100 ipsec esp/transport//use ;"
    )
    (msg,) = cmd.messages
    assert msg.src is not None and msg.dst is not None and msg.policy is not None
    assert (msg.src.address, msg.src.prefixlen, msg.src.proto, msg.src.port) == (
        IPv6Address("2001:db8:1::"), 48, 6, 0,
    )
    assert msg.dst.port == 443
    assert msg.policy.priority == 0x80000000 - 100
    assert msg.policy.requests[0].level is IpsecLevel.USE


@pytest.mark.parametrize(
    ("spec", "priority"),
    [
        ("prio 100", 0x80000000 - 100),
        ("priority -100", 0x80000000 + 100),
        ("prio - 5", 0x80000000 + 5),
        ("prio high", 0x40000000),
        ("prio low", 0xC0000000),
        ("prio def + 10", 0x80000000 - 10),
        ("prio def +10", 0x80000000 - 10),
        ("prio low - 3", 0xC0000000 + 3),
        ("prio high + 1073741824", 0),
        ("", 0x80000000),
    ],
)
def test_policy_priorities(spec: str, priority: int) -> None:
    msg = msg_of(f"spdadd 10.0.0.0/8 10.1.0.0/16 any -P out {spec} discard;")
    assert msg.policy is not None and msg.policy.priority == priority
    assert msg.policy.type is PolicyType.DISCARD


@pytest.mark.parametrize(
    ("action", "ptype"),
    [("none", PolicyType.NONE), ("discard", PolicyType.DISCARD),
     ("entrust", PolicyType.ENTRUST), ("bypass", PolicyType.BYPASS)],
)
def test_policy_actions(action: str, ptype: PolicyType) -> None:
    msg = msg_of(f"spdadd 10.0.0.0/8 10.1.0.0/16 any -P fwd {action};")
    assert msg.policy is not None and msg.policy.type is ptype
    assert msg.policy.dir is PolicyDir.FWD and msg.policy.requests == []


def test_request_short_forms_and_unique() -> None:
    msg = msg_of(
        "spdadd 10.0.0.1 10.0.0.2 udp -P out ipsec esp/transport ah/transport/ "
        "esp/tunnel/192.0.2.1-198.51.100.1 esp/tunnel/192.0.2.1-198.51.100.1/ "
        "esp/transport//unique:1234 ah/transport//unique;"
    )
    assert msg.policy is not None
    levels = [(r.level, r.reqid) for r in msg.policy.requests]
    assert levels == [
        (IpsecLevel.DEFAULT, 0), (IpsecLevel.DEFAULT, 0), (IpsecLevel.DEFAULT, 0),
        (IpsecLevel.DEFAULT, 0), (IpsecLevel.UNIQUE, 1234), (IpsecLevel.UNIQUE, 0),
    ]
    assert msg.src is not None and msg.src.proto == 17


def test_rfc_mode_fwd_twin_downgrades_first_unique() -> None:
    (cmd,) = parse_script(
        "spdadd 10.1.0.0/16 10.0.0.0/16 any -P in ipsec "
        "esp/tunnel/198.51.100.1-192.0.2.1/unique:5 ah/transport//unique:6;"
    )
    inbound, fwd = (m.policy for m in cmd.messages)
    assert inbound is not None and fwd is not None
    assert [(r.level, r.reqid) for r in inbound.requests] == [
        (IpsecLevel.UNIQUE, 5), (IpsecLevel.UNIQUE, 6),
    ]
    assert fwd.dir is PolicyDir.FWD
    assert [(r.level, r.reqid) for r in fwd.requests] == [
        (IpsecLevel.REQUIRE, 0), (IpsecLevel.UNIQUE, 6),
    ]


def test_spddelete_with_bare_direction_and_spdupdate() -> None:
    delete, update = parse_script(
        "spddelete 10.0.0.0/24 10.0.1.0/24 any -P out;\n"
        "spdupdate 10.0.0.0/24 10.0.1.0/24 any -P out none;\n"
    )
    assert delete.messages[0].type is MsgType.X_SPDDELETE
    assert delete.messages[0].policy is not None
    assert delete.messages[0].policy.dir is PolicyDir.OUTBOUND
    assert update.messages[0].type is MsgType.X_SPDUPDATE


def test_spdflush_spddump_comments_exit_and_separated_suffixes() -> None:
    commands = parse_script(
        "# a comment ; with semicolons\n"
        "spdflush; spddump ;  # trailing comment\n"
        ";\n"
        "spdadd 10.0.0.0 /24 [80] 10.0.1.0/24 tcp -P out none;\n"
        "exit;\n"
        "this is not parsed at all"
    )
    kinds = [c.kind for c in commands]
    assert kinds == [CommandKind.SPDFLUSH, CommandKind.SPDDUMP, CommandKind.SPDADD]
    assert commands[0].messages[0].type is MsgType.X_SPDFLUSH
    assert commands[1].messages[0].type is MsgType.X_SPDDUMP
    src = commands[2].messages[0].src
    assert src is not None and (src.prefixlen, src.port) == (24, 80)
    assert commands[2].line == 4 and commands[1].column == 11


@pytest.mark.parametrize(
    ("upper", "number"),
    [("any", 255), ("icmp", 1), ("icmp6", 58), ("ipv6-icmp", 58), ("tcp", 6), ("udp", 17),
     ("ip4", 4), ("gre", 47), ("sctp", 132), ("50", 50), ("0", 0)],
)
def test_upper_layer_protocols(upper: str, number: int) -> None:
    msg = msg_of(f"spdadd 10.0.0.1 10.0.0.2 {upper} -P out none;")
    assert msg.src is not None and msg.src.proto == number
    assert msg.dst is not None and msg.dst.proto == number


def test_icmp_type_only_keeps_code_from_dst_port() -> None:
    msg = msg_of("spdadd 10.0.0.1 10.0.0.2 icmp 8 -P out none;")
    assert msg.src is not None and msg.dst is not None
    assert (msg.src.port, msg.dst.port) == (8, 0)


def test_statement_spanning_lines_with_tabs_and_crlf() -> None:
    (cmd,) = parse_script(
        "\r\n\tadd\r\n192.0.2.1\t198.51.100.1\r\n  esp\r\n 0x1000\r\n"
        f" -E aes-gcm-16\r\n {K160}\r\n;"
    )
    assert cmd.line == 2 and cmd.column == 2
    assert cmd.messages[0].sa is not None and cmd.messages[0].sa.spi == 0x1000
