"""What the parser builds survives the PF_KEY wire codec unchanged (every man page example and
example script), and ``format_message_debug`` takes the wire bytes for its length and dump."""

from __future__ import annotations

from pathlib import Path

import pytest

from userspace_ipsec.pfkey.codec import check_sa_keys, decode, encode
from userspace_ipsec.pfkey.constants import ExtType, MsgType
from userspace_ipsec.pfkey.messages import AddressExt, KeyExt, Message
from userspace_ipsec.setkey import format_message_debug, parse_script

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "setkey"
MAN_PAGE = """
add 3ffe:501:4819::1 3ffe:501:481d::1 esp 123457 -E des-cbc 0x3ffe05014819ffff ;
add 10.0.11.41 10.0.11.33 esp 0x10001 -E des-cbc 0x3ffe05014819ffff
    -A hmac-md5 "authentication!!" ;
get 3ffe:501:4819::1 3ffe:501:481d::1 ah 123456 ;
flush ;
dump esp ;
spdadd 10.0.11.41/32[21] 10.0.11.33/32[any] any
    -P out ipsec esp/tunnel/192.168.0.1-192.168.1.2/require ;
add 10.0.11.41 10.0.11.33 esp 0x10001
    -ctx 1 1 "system_u:system_r:unconfined_t:SystemLow-SystemHigh"
    -E des-cbc 0x3ffe05014819ffff;
spdadd 10.0.11.41 10.0.11.33 any
    -ctx 1 1 "system_u:system_r:unconfined_t:SystemLow-SystemHigh"
    -P out ipsec esp/transport//require ;
spdadd ::/0 ::/0 icmp6 135,0 -P in none ;
spdadd 10.0.11.0/24[any] 10.0.11.33/32[any] any -P out ipsec
    esp/tunnel/192.168.0.1[4500]-192.168.1.2[30000]/require ;
getspi 192.0.2.1 198.51.100.1 esp 0 -m tunnel -u 4;
add 192.0.2.1 198.51.100.1 esp 0x999 -r 2048 -lh 60 -bs 1000 -E null -A hmac-sha1 0x{sha1};
"""


def _normalised(msg: Message) -> Message:
    """The codec spells the defaults out: full prefix length, bits of a key."""
    for ext in msg.ext.values():
        if isinstance(ext, AddressExt) and ext.prefixlen is None:
            ext.prefixlen = ext.address.max_prefixlen
        if isinstance(ext, KeyExt) and ext.bits is None:
            ext.bits = len(ext.key) * 8
    return msg


def _scripts() -> list[tuple[str, str]]:
    scripts = [("man page", MAN_PAGE.replace("{sha1}", "ab" * 20))]
    scripts += [(p.name, p.read_text()) for p in sorted(EXAMPLES.glob("*.conf"))]
    return scripts


@pytest.mark.parametrize(("name", "text"), _scripts(), ids=[n for n, _ in _scripts()])
def test_parsed_messages_survive_the_codec(name: str, text: str) -> None:
    messages = [m for c in parse_script(text, name, rfc_mode="tunnel" not in name)
                for m in c.messages]
    assert messages
    for msg in messages:
        wire = encode(msg)
        back = decode(wire)
        assert _normalised(back) == _normalised(msg)
        if msg.type in (MsgType.ADD, MsgType.UPDATE):
            assert check_sa_keys(msg) is None
        assert f"  len={len(wire) // 8} " in format_message_debug(msg, raw=wire)


def test_natt_policy_ports_reach_the_wire() -> None:
    (cmd,) = parse_script(
        "spdadd 10.0.0.0/24 10.0.1.0/24 any -P out ipsec"
        " esp/tunnel/192.0.2.1[4500]-198.51.100.1[31337]/require;"
    )
    back = decode(encode(cmd.messages[0]))
    policy = back.ext[ExtType.X_POLICY]
    assert policy == cmd.messages[0].policy
