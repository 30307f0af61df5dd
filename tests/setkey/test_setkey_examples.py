"""The example scripts of examples/setkey parse, and left and right agree with each other."""

from __future__ import annotations

from pathlib import Path

import pytest

from userspace_ipsec.pfkey.constants import ExtType, IpsecMode, MsgType, NatTType, PolicyDir
from userspace_ipsec.pfkey.messages import KeyExt, Message, NatTTypeExt
from userspace_ipsec.setkey import CommandKind, format_policy_spec, parse_script

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "setkey"


def messages(name: str, *, rfc_mode: bool = True) -> list[Message]:
    path = EXAMPLES / name
    commands = parse_script(path.read_text(), str(path), rfc_mode=rfc_mode)
    assert not [w for c in commands for w in c.warnings]
    assert [c.kind for c in commands[:2]] == [CommandKind.FLUSH, CommandKind.SPDFLUSH]
    return [m for c in commands for m in c.messages]


SaRow = tuple[int, int, IpsecMode, int, tuple[bytes, ...]]


def sa_table(msgs: list[Message]) -> dict[int, SaRow]:
    table: dict[int, SaRow] = {}
    for m in msgs:
        if m.type is MsgType.ADD:
            assert m.sa is not None and m.sa2 is not None
            keys = tuple(
                k.key for t in (ExtType.KEY_ENCRYPT, ExtType.KEY_AUTH)
                if isinstance(k := m.ext.get(t), KeyExt)
            )
            table[m.sa.spi] = (m.sa.encrypt, m.sa.auth, m.sa2.mode, m.sa2.reqid, keys)
    return table


def policies(msgs: list[Message]) -> dict[tuple[object, ...], str]:
    found: dict[tuple[object, ...], str] = {}
    for m in msgs:
        if m.type is MsgType.X_SPDADD:
            assert m.src is not None and m.dst is not None and m.policy is not None
            key = (m.policy.dir, str(m.src.address), m.src.prefixlen, str(m.dst.address))
            assert key not in found, f"duplicate policy {key}"
            found[key] = format_policy_spec(m.policy)
    return found


@pytest.mark.parametrize("pair", ["transport", "tunnel", "natt"])
def test_left_and_right_share_sas(pair: str) -> None:
    rfc_mode = pair != "tunnel"
    left = messages(f"{pair}-left.conf", rfc_mode=rfc_mode)
    right = messages(f"{pair}-right.conf", rfc_mode=rfc_mode)
    left_sas, right_sas = sa_table(left), sa_table(right)
    assert len(left_sas) == 2 and left_sas == right_sas
    keys = [k for sa in left_sas.values() for k in sa[4]]
    assert len(keys) == len(set(keys)), "every direction has its own keys"


def test_transport_policies_mirror() -> None:
    left = policies(messages("transport-left.conf"))
    right = policies(messages("transport-right.conf"))
    out = (PolicyDir.OUTBOUND, "192.0.2.1", None, "192.0.2.2")
    inbound = (PolicyDir.INBOUND, "192.0.2.1", None, "192.0.2.2")
    assert left[out] == right[inbound].replace("in ", "out ", 1)
    assert left[out] == "out prio def ipsec esp/transport//require"
    # RFC mode (the default) adds the fwd twin of each in policy.
    assert (PolicyDir.FWD, "192.0.2.2", None, "192.0.2.1") in left


def test_tunnel_gateways_have_in_out_fwd_and_need_kernel_semantics() -> None:
    left = policies(messages("tunnel-left.conf", rfc_mode=False))
    assert set(left) == {
        (PolicyDir.OUTBOUND, "198.51.100.0", 24, "203.0.113.0"),
        (PolicyDir.INBOUND, "203.0.113.0", 24, "198.51.100.0"),
        (PolicyDir.FWD, "203.0.113.0", 24, "198.51.100.0"),
    }
    assert left[(PolicyDir.OUTBOUND, "198.51.100.0", 24, "203.0.113.0")] == (
        "out prio def ipsec esp/tunnel/192.0.2.1-192.0.2.2/unique:101"
    )
    path = EXAMPLES / "tunnel-left.conf"
    rfc = parse_script(path.read_text(), str(path))
    warnings = [w for c in rfc for w in c.warnings]
    assert len(warnings) == 1 and "-k" in warnings[0]


def test_natt_sas_carry_udp_encapsulation() -> None:
    for name, (src, dst) in {
        "natt-left.conf": ("192.0.2.1", "203.0.113.77"),
        "natt-right.conf": ("192.0.2.1", "203.0.113.10"),
    }.items():
        adds = [m for m in messages(name) if m.type is MsgType.ADD]
        first = adds[0]
        assert first.src is not None and first.dst is not None and first.sa2 is not None
        assert (str(first.src.address), str(first.dst.address)) == (src, dst)
        assert first.sa2.mode is IpsecMode.TUNNEL
        for m in adds:
            natt = m.ext[ExtType.X_NAT_T_TYPE]
            assert isinstance(natt, NatTTypeExt) and natt.type is NatTType.ESPINUDP
            assert ExtType.X_NAT_T_SPORT in m.ext and ExtType.X_NAT_T_DPORT in m.ext
