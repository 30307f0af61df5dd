"""setkey -D / -DP / -x layouts, compared with text written by hand from libipsec's
pfkey_dump.c and real setkey listings."""

from __future__ import annotations

from datetime import UTC, timedelta, timezone
from ipaddress import IPv4Address, IPv6Address

from userspace_ipsec.algorithms import encryption_by_name, integrity_by_name
from userspace_ipsec.pfkey.constants import (
    IPPROTO_ESP,
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
    IpsecRequest,
    KeyExt,
    LifetimeExt,
    Message,
    NatTPortExt,
    NatTTypeExt,
    PolicyExt,
    SA2Ext,
    SAExt,
    UipsecExt,
)
from userspace_ipsec.setkey import (
    format_message_debug,
    format_policy,
    format_policy_spec,
    format_sa,
    parse_script,
)

CREATED = 1700000000  # Nov 14 22:13:20 2023 UTC
NOW = CREATED + 100
ENC_KEY = bytes(range(16))
AUTH_KEY = bytes(range(0x20, 0x40))


def alg(name: str) -> int:
    found = encryption_by_name(name) or integrity_by_name(name)
    assert found is not None
    return found.pfkey_id


def cbc_sha256_sa() -> Message:
    return Message(MsgType.DUMP, SaType.ESP, seq=1, pid=4242, ext={
        ExtType.SA: SAExt(0x1000, replay=32, state=SaState.MATURE, auth=alg("hmac-sha256"),
                          encrypt=alg("aes-cbc")),
        ExtType.LIFETIME_CURRENT: LifetimeExt(allocations=3, bytes=1500, addtime=CREATED),
        ExtType.LIFETIME_HARD: LifetimeExt(addtime=3600),
        ExtType.LIFETIME_SOFT: LifetimeExt(addtime=3000),
        ExtType.ADDRESS_SRC: AddressExt(IPv4Address("192.0.2.1")),
        ExtType.ADDRESS_DST: AddressExt(IPv4Address("198.51.100.1")),
        ExtType.KEY_AUTH: KeyExt(AUTH_KEY),
        ExtType.KEY_ENCRYPT: KeyExt(ENC_KEY),
        ExtType.X_SA2: SA2Ext(mode=IpsecMode.TRANSPORT),
    })


def test_sa_transport_cbc_hmac() -> None:
    expected = (
        "192.0.2.1 198.51.100.1 \n"
        "\tesp mode=transport spi=4096(0x00001000) reqid=0(0x00000000)\n"
        "\tE: aes-cbc  00010203 04050607 08090a0b 0c0d0e0f\n"
        "\tA: hmac-sha256  20212223 24252627 28292a2b 2c2d2e2f"
        " 30313233 34353637 38393a3b 3c3d3e3f\n"
        "\tseq=0x00000000 replay=32 flags=0x00000000 state=mature \n"
        "\tcreated: Nov 14 22:13:20 2023\tcurrent: Nov 14 22:15:00 2023\n"
        "\tdiff: 100(s)\thard: 3600(s)\tsoft: 3000(s)\n"
        "\tlast:                     \thard: 0(s)\tsoft: 0(s)\n"
        "\tcurrent: 1500(bytes)\thard: 0(bytes)\tsoft: 0(bytes)\n"
        "\tallocated: 3\thard: 0\tsoft: 0\n"
        "\tsadb_seq=1 pid=4242 refcnt=0\n"
    )
    assert format_sa(cbc_sha256_sa(), now=NOW, tz=UTC) == expected


def test_sa_keys_hidden_and_ports_and_zone() -> None:
    text = format_sa(cbc_sha256_sa(), now=NOW, show_keys=False, show_ports=True,
                     tz=timezone(timedelta(hours=2)), refcnt=2)
    lines = text.splitlines()
    assert lines[0] == "192.0.2.1[0] 198.51.100.1[0] "
    assert lines[2] == "\tE: aes-cbc <128 bits hidden>"
    assert lines[3] == "\tA: hmac-sha256 <256 bits hidden>"
    assert "0c0d0e0f" not in text and "3c3d3e3f" not in text
    assert lines[5] == "\tcreated: Nov 15 00:13:20 2023\tcurrent: Nov 15 00:15:00 2023"
    assert lines[-1] == "\tsadb_seq=1 pid=4242 refcnt=2"


def test_sa_tunnel_gcm_natt_long_key_and_big_replay() -> None:
    key = bytes(range(36))  # chacha20-poly1305: 288 bits, wraps after 32 bytes
    msg = Message(MsgType.GET, SaType.ESP, ext={
        ExtType.SA: SAExt(0xC0FFEE, replay=255, state=SaState.DYING,
                          encrypt=alg("chacha20-poly1305")),
        ExtType.ADDRESS_SRC: AddressExt(IPv6Address("2001:db8::1")),
        ExtType.ADDRESS_DST: AddressExt(IPv6Address("2001:db8::2")),
        ExtType.KEY_ENCRYPT: KeyExt(key),
        ExtType.X_SA2: SA2Ext(mode=IpsecMode.TUNNEL, sequence=9, reqid=16385),
        ExtType.X_NAT_T_TYPE: NatTTypeExt(NatTType.ESPINUDP),
        ExtType.X_NAT_T_SPORT: NatTPortExt(4500),
        ExtType.X_NAT_T_DPORT: NatTPortExt(31337),
        ExtType.X_NAT_T_OA: AddressExt(IPv6Address("2001:db8::99")),
        ExtType.X_UIPSEC: UipsecExt(replay_window=1024),
    })
    expected = (
        "2001:db8::1[4500] 2001:db8::2[31337] \n"
        "\tesp-udp mode=tunnel spi=12648430(0x00c0ffee) reqid=16385(0x00004001)\n"
        "\tNAT OA=2001:db8::99\n"
        "\tE: chacha20-poly1305  00010203 04050607 08090a0b 0c0d0e0f"
        " 10111213 14151617 18191a1b 1c1d1e1f\n"
        " 20212223\n"
        "\tseq=0x00000009 replay=1024 flags=0x00000000 state=dying \n"
        "\tsadb_seq=0 pid=0 refcnt=0\n"
    )
    assert format_sa(msg, now=NOW, tz=UTC) == expected


def test_sa_with_missing_extensions_says_so() -> None:
    msg = cbc_sha256_sa()
    del msg.ext[ExtType.X_SA2]
    assert format_sa(msg, now=NOW, tz=UTC) == "192.0.2.1 198.51.100.1 no SA2 extension.\n"
    assert format_sa(Message(MsgType.DUMP), now=NOW) == "no ADDRESS_SRC extension.\n"


def tunnel_policy(direction: PolicyDir = PolicyDir.OUTBOUND) -> Message:
    return Message(MsgType.X_SPDDUMP, seq=0, pid=4242, ext={
        ExtType.ADDRESS_SRC: AddressExt(IPv4Address("10.0.0.0"), 24, 255),
        ExtType.ADDRESS_DST: AddressExt(IPv4Address("10.0.1.0"), 24, 255),
        ExtType.X_POLICY: PolicyExt(PolicyType.IPSEC, direction, id=1, priority=0x80000000,
                                    requests=[IpsecRequest(
                                        IPPROTO_ESP, IpsecMode.TUNNEL, IpsecLevel.REQUIRE,
                                        src=IPv4Address("192.0.2.1"),
                                        dst=IPv4Address("198.51.100.1"))]),
        ExtType.LIFETIME_CURRENT: LifetimeExt(addtime=CREATED),
        ExtType.LIFETIME_HARD: LifetimeExt(),
    })


def test_policy_tunnel_out() -> None:
    expected = (
        "10.0.0.0/24[any] 10.0.1.0/24[any] any\n"
        "\tout prio def ipsec\n"
        "\tesp/tunnel/192.0.2.1-198.51.100.1/require\n"
        "\tcreated: Nov 14 22:13:20 2023  lastused:                     \n"
        "\tlifetime: 0(s) validtime: 0(s)\n"
        "\tspid=1 seq=0 pid=4242\n"
        "\trefcnt=1\n"
    )
    assert format_policy(tunnel_policy(), NOW, tz=UTC, refcnt=1) == expected


def test_policy_host_selectors_ports_priority_and_reqids() -> None:
    msg = Message(MsgType.X_SPDDUMP, seq=3, pid=7, ext={
        ExtType.ADDRESS_SRC: AddressExt(IPv4Address("192.0.2.1"), None, 6, 0),
        ExtType.ADDRESS_DST: AddressExt(IPv4Address("198.51.100.1"), 32, 6, 443),
        ExtType.X_POLICY: PolicyExt(PolicyType.IPSEC, PolicyDir.INBOUND, id=8,
                                    priority=0xC0000000 + 3, requests=[
            IpsecRequest(IPPROTO_ESP, IpsecMode.TRANSPORT, IpsecLevel.UNIQUE, reqid=7),
            IpsecRequest(IPPROTO_ESP, IpsecMode.TUNNEL, IpsecLevel.UNIQUE, reqid=16384,
                         src=IPv4Address("192.0.2.1"), dst=IPv4Address("203.0.113.9"),
                         src_port=4500, dst_port=4500),
        ]),
    })
    expected = (
        "192.0.2.1[any] 198.51.100.1[443] tcp\n"
        "\tin prio low - 3 ipsec\n"
        "\tesp/transport//unique:7\n"
        "\tesp/tunnel/192.0.2.1-203.0.113.9/unique#16384\n"
        "\tspid=8 seq=3 pid=7\n"
        "\trefcnt=0\n"
    )
    assert format_policy(msg, NOW) == expected
    with_ports = format_policy(msg, NOW, show_ports=True).splitlines()
    assert with_ports[3] == "\tesp/tunnel/192.0.2.1[4500]-203.0.113.9[4500]/unique#16384"


def test_policy_icmp6_and_gre_and_zero_priority() -> None:
    icmp = Message(MsgType.X_SPDDUMP, ext={
        ExtType.ADDRESS_SRC: AddressExt(IPv6Address("::"), 0, 58, 135),
        ExtType.ADDRESS_DST: AddressExt(IPv6Address("::"), 0, 58, 0),
        ExtType.X_POLICY: PolicyExt(PolicyType.NONE, PolicyDir.FWD, priority=0),
    })
    assert format_policy(icmp, NOW).splitlines()[:2] == ["::/0 ::/0 ipv6-icmp 135,0", "\tfwd none"]
    gre = Message(MsgType.X_SPDDUMP, ext={
        ExtType.ADDRESS_SRC: AddressExt(IPv4Address("0.0.0.0"), None, 47, 1),
        ExtType.ADDRESS_DST: AddressExt(IPv4Address("0.0.0.0"), None, 47, 1234),
        ExtType.X_POLICY: PolicyExt(PolicyType.DISCARD, PolicyDir.OUTBOUND,
                                    priority=0x80000000 - 100),
    })
    assert format_policy(gre, NOW).splitlines()[:2] == [
        "0.0.0.0 0.0.0.0 gre 66770", "\tout prio def + 100 discard",
    ]


def test_policy_text_parses_back_to_the_same_policy() -> None:
    script = (
        "spdadd 10.0.0.0/24 10.0.1.0/24 any -P out prio high - 7 ipsec"
        " esp/tunnel/192.0.2.1-198.51.100.1/unique:33 ah/transport//use;"
    )
    (cmd,) = parse_script(script)
    policy = cmd.messages[0].policy
    assert policy is not None
    spec = format_policy_spec(policy)
    assert spec == "out prio high - 7 ipsec esp/tunnel/192.0.2.1-198.51.100.1/unique:33" \
        " ah/transport//use"
    (again,) = parse_script(f"spdadd 10.0.0.0/24 10.0.1.0/24 any -P {spec};")
    assert again.messages[0].policy == policy


def test_round_trip_parse_add_then_format() -> None:
    enc_hex, auth_hex = "5a" * 32, "c3" * 32
    (cmd,) = parse_script(
        f"add 192.0.2.1 198.51.100.1 esp 0x12345 -m tunnel -u 77"
        f" -E aes-cbc 0x{enc_hex} -A hmac-sha256 0x{auth_hex};"
    )
    text = format_sa(cmd.messages[0], now=NOW, tz=UTC)
    assert "\tesp mode=tunnel spi=74565(0x00012345) reqid=77(0x0000004d)\n" in text
    assert f"\tE: aes-cbc  {' '.join(['5a5a5a5a'] * 8)}\n" in text
    assert f"\tA: hmac-sha256  {' '.join(['c3c3c3c3'] * 8)}\n" in text
    hidden = format_sa(cmd.messages[0], now=NOW, show_keys=False)
    assert "5a5a" not in hidden and "c3c3" not in hidden


def test_debug_dump_shows_every_field() -> None:
    (cmd,) = parse_script(
        "add 192.0.2.1[4500] 198.51.100.1 esp-udp 0x1000 -ls 30 -E aes-gcm-16 0x"
        + "ab" * 20 + ";"
    )
    text = format_message_debug(cmd.messages[0], raw=bytes(8 * 22))
    expected_lines = [
        "sadb_msg{ version=2 type=3(add) errno=0 satype=3(esp)",
        "  len=22 seq=0 pid=0 }",
        "sadb_ext{ type=1(sa) }",
        "sadb_sa{ spi=4096(0x00001000) replay=0 state=0",
        "  auth=0 encrypt=20 flags=0x00000000 }",
        "sadb_ext{ type=4(lifetime_soft) }",
        "sadb_lifetime{ alloc=0, bytes=0",
        "  addtime=30, usetime=0 }",
        "sadb_ext{ type=5(address_src) }",
        "sadb_address{ proto=255 prefixlen=32 }",
        "sockaddr{ len=16 family=2 port=4500",
        "  addr=192.0.2.1 c0000201 }",
        "sadb_ext{ type=9(key_encrypt) }",
        "sadb_key{ bits=160",
        "  key= abababab abababab abababab abababab abababab }",
        "sadb_x_nat_t_type{ type=2 }",
        "sadb_x_nat_t_port{ port=4500 }",
    ]
    lines = text.splitlines()
    for line in expected_lines:
        assert line in lines
    assert "\nhexdump{ 00000000 " in text and text.endswith(" 00000000 }\n")
