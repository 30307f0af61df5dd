"""Kernel: X_SPD* messages."""

from __future__ import annotations

import errno

from tests.core.helpers import (
    NOW,
    A,
    errno_of,
    kernel,
    only,
    policy_id_msg,
    received,
    spd_msg,
    tunnel,
)
from userspace_ipsec.kernel import Audience
from userspace_ipsec.pfkey.constants import (
    IPPROTO_AH,
    IPSEC_MANUAL_REQID_MAX,
    IpsecLevel,
    IpsecMode,
    MsgType,
    PolicyDir,
    PolicyType,
)
from userspace_ipsec.pfkey.messages import IpsecRequest, Message

OUT, IN, FWD = PolicyDir.OUTBOUND, PolicyDir.INBOUND, PolicyDir.FWD


def test_spdadd_broadcasts_and_assigns_ids() -> None:
    k = kernel()
    s, t = k.open_socket(), k.open_socket()
    got = received(k, k.handle(s, spd_msg(MsgType.X_SPDADD, "10.1.0.0/16", "10.2.0.0/16",
                                           seq=3), NOW), s)
    assert set(got) == {s, t}
    msg = got[t][0]
    assert msg.type == MsgType.X_SPDADD and msg.seq == 3 and msg.policy is not None
    policy = k.spd.get(msg.policy.id)
    assert policy is not None and policy.direction == OUT
    assert msg.src is not None and msg.src.prefixlen == 16
    assert k.spd.lookup(OUT, A("10.1.1.1"), A("10.2.2.2"), 6, 1, 2) is policy
    # Same selector and direction: EEXIST; other direction: fine.
    assert errno_of(k.handle(s, spd_msg(MsgType.X_SPDADD, "10.1.0.0/16", "10.2.0.0/16"),
                             NOW)) == errno.EEXIST
    only(k.handle(s, spd_msg(MsgType.X_SPDADD, "10.1.0.0/16", "10.2.0.0/16", FWD), NOW))
    assert len(k.spd) == 2


def test_spdupdate_replaces_keeping_the_id_or_adds() -> None:
    k = kernel()
    s = k.open_socket()
    first = only(k.handle(s, spd_msg(MsgType.X_SPDUPDATE, "10.1.0.0/16", "10.2.0.0/16"), NOW))
    assert first.message is not None and first.message.policy is not None
    pid = first.message.policy.id
    out = only(k.handle(s, spd_msg(MsgType.X_SPDUPDATE, "10.1.0.0/16", "10.2.0.0/16",
                                   action=PolicyType.DISCARD), NOW))
    assert out.audience is Audience.ALL
    assert out.message is not None and out.message.policy is not None
    assert out.message.policy.id == pid and out.message.type == MsgType.X_SPDUPDATE
    policy = k.spd.get(pid)
    assert policy is not None and policy.action == PolicyType.DISCARD and len(k.spd) == 1


def test_spddelete_by_selector_and_by_id() -> None:
    k = kernel()
    s, t = k.open_socket(), k.open_socket()
    k.handle(s, spd_msg(MsgType.X_SPDADD, "10.1.0.0/16", "10.2.0.0/16"), NOW)
    k.handle(s, spd_msg(MsgType.X_SPDADD, "10.1.0.0/16", "10.2.0.0/16", IN), NOW)
    assert errno_of(k.handle(s, spd_msg(MsgType.X_SPDDELETE, "10.1.0.0/16", "10.2.0.0/24"),
                             NOW)) == errno.ENOENT
    out = k.handle(s, spd_msg(MsgType.X_SPDDELETE, "10.1.0.0/16", "10.2.0.0/16"), NOW)
    assert set(received(k, out, s)) == {s, t}
    (remaining,) = k.spd.snapshot()
    assert remaining.direction == IN
    reply = only(k.handle(t, policy_id_msg(MsgType.X_SPDGET, remaining.id), NOW))
    assert reply.audience is Audience.SENDER and k.recipients(reply, t) == [t]
    assert reply.message is not None and reply.message.policy is not None
    assert reply.message.policy.id == remaining.id
    out = k.handle(t, policy_id_msg(MsgType.X_SPDDELETE2, remaining.id), NOW)
    assert only(out).audience is Audience.ALL and len(k.spd) == 0
    for mtype in (MsgType.X_SPDGET, MsgType.X_SPDDELETE2):
        assert errno_of(k.handle(t, policy_id_msg(mtype, remaining.id), NOW)) == errno.ENOENT
        assert errno_of(k.handle(t, Message(mtype), NOW)) == errno.EINVAL


def test_spdflush_and_spddump() -> None:
    k = kernel()
    s, t = k.open_socket(), k.open_socket()
    assert errno_of(k.handle(s, Message(MsgType.X_SPDDUMP, seq=5), NOW)) == errno.ENOENT
    for i in range(20):
        k.handle(s, spd_msg(MsgType.X_SPDADD, f"10.{i}.0.0/16", "0.0.0.0/0"), NOW)
    out = only(k.handle(s, Message(MsgType.X_SPDDUMP, seq=5, pid=77), NOW))
    assert out.stream is not None and k.recipients(out, s) == [s]
    msgs = list(out.stream)
    assert [m.seq for m in msgs] == list(range(19, -1, -1))
    assert all(m.type == MsgType.X_SPDDUMP and m.pid == 77 for m in msgs)
    assert len({m.policy.id for m in msgs if m.policy}) == 20
    out = only(k.handle(s, Message(MsgType.X_SPDFLUSH), NOW))
    assert out.audience is Audience.ALL and set(k.recipients(out, s)) == {s, t}
    assert len(k.spd) == 0


def test_spd_refusals_change_nothing() -> None:
    k = kernel()
    s = k.open_socket()
    cases = [
        spd_msg(MsgType.X_SPDADD, "10.0.0.0/8", "2001:db8::/32"),  # families
        spd_msg(MsgType.X_SPDADD, "10.0.0.0/33", "10.0.0.0/8"),  # prefix length
        spd_msg(MsgType.X_SPDADD, "10.0.0.0/8", "10.0.0.0/8", PolicyDir.ANY),
        spd_msg(MsgType.X_SPDADD, "10.0.0.0/8", "10.0.0.0/8", action=PolicyType.ENTRUST),
        spd_msg(MsgType.X_SPDADD, "10.0.0.0/8", "10.0.0.0/8", requests=[]),  # ipsec, no request
        spd_msg(MsgType.X_SPDADD, "10.0.0.0/8", "10.0.0.0/8", requests=[
            IpsecRequest(99, IpsecMode.TRANSPORT, IpsecLevel.REQUIRE)]),
        spd_msg(MsgType.X_SPDADD, "10.0.0.0/8", "10.0.0.0/8", requests=[
            IpsecRequest(50, IpsecMode.TUNNEL, IpsecLevel.REQUIRE)]),  # tunnel, no endpoints
        spd_msg(MsgType.X_SPDADD, "10.0.0.0/8", "10.0.0.0/8", requests=[
            IpsecRequest(50, IpsecMode.TRANSPORT, IpsecLevel.REQUIRE, 0, A("1.1.1.1"),
                         A("2.2.2.2"))]),  # transport with endpoints
        spd_msg(MsgType.X_SPDADD, "10.0.0.0/8", "10.0.0.0/8", requests=[
            IpsecRequest(50, IpsecMode.TUNNEL, IpsecLevel.REQUIRE, 0, A("1.1.1.1"),
                         A("::2"))]),
        spd_msg(MsgType.X_SPDADD, "10.0.0.0/8", "10.0.0.0/8", requests=[
            IpsecRequest(50, IpsecMode.ANY, IpsecLevel.REQUIRE)]),
    ]
    no_policy = spd_msg(MsgType.X_SPDADD, "10.0.0.0/8", "10.0.0.0/8")
    no_policy.ext.pop(next(e for e in no_policy.ext if e.name == "X_POLICY"))
    cases.append(no_policy)
    for msg in cases:
        assert errno_of(k.handle(s, msg, NOW)) == errno.EINVAL, msg
    ah = spd_msg(MsgType.X_SPDADD, "10.0.0.0/8", "10.0.0.0/8", requests=[
        IpsecRequest(IPPROTO_AH, IpsecMode.TRANSPORT, IpsecLevel.REQUIRE)])
    assert errno_of(k.handle(s, ah, NOW)) == errno.EPROTONOSUPPORT
    assert len(k.spd) == 0 and k.spd.generation == 0


def test_reqid_kept_only_for_unique_level_and_generated_when_absent() -> None:
    k = kernel()
    s = k.open_socket()
    k.handle(s, spd_msg(MsgType.X_SPDADD, "10.1.0.0/16", "0.0.0.0/0", requests=[
        tunnel("1.1.1.1", "2.2.2.2", IpsecLevel.UNIQUE, 42)]), NOW)
    k.handle(s, spd_msg(MsgType.X_SPDADD, "10.2.0.0/16", "0.0.0.0/0", requests=[
        tunnel("1.1.1.1", "2.2.2.2", IpsecLevel.UNIQUE, 0)]), NOW)
    k.handle(s, spd_msg(MsgType.X_SPDADD, "10.3.0.0/16", "0.0.0.0/0", requests=[
        tunnel("1.1.1.1", "2.2.2.2", IpsecLevel.UNIQUE, 0)]), NOW)
    k.handle(s, spd_msg(MsgType.X_SPDADD, "10.4.0.0/16", "0.0.0.0/0", requests=[
        tunnel("1.1.1.1", "2.2.2.2", IpsecLevel.REQUIRE, 42)]), NOW)
    reqids = [p.requests[0].reqid for p in k.spd.snapshot()]
    assert reqids[0] == 42 and reqids[3] == 0
    assert IPSEC_MANUAL_REQID_MAX < reqids[1] < reqids[2]


def test_spd_changes_through_the_kernel_invalidate_the_cache() -> None:
    k = kernel()
    s = k.open_socket()
    assert k.spd.lookup(OUT, A("10.1.1.1"), A("10.2.2.2"), 6, 1, 2) is None
    k.handle(s, spd_msg(MsgType.X_SPDADD, "10.1.0.0/16", "10.2.0.0/16"), NOW)
    policy = k.spd.lookup(OUT, A("10.1.1.1"), A("10.2.2.2"), 6, 1, 2)
    assert policy is not None
    k.handle(s, policy_id_msg(MsgType.X_SPDDELETE2, policy.id), NOW)
    assert k.spd.lookup(OUT, A("10.1.1.1"), A("10.2.2.2"), 6, 1, 2) is None
