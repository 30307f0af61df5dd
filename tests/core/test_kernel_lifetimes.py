"""Kernel: soft/hard lifetimes by each counter, larval timeout, traffic marks, ACQUIRE."""

from __future__ import annotations

import pytest

from tests.core.helpers import NOW, A, getspi_msg, kernel, only, received, sa_msg, spd_msg
from userspace_ipsec.kernel import Audience, Delivery, Flow, Kernel
from userspace_ipsec.pfkey.constants import (
    ExtType,
    IpsecLevel,
    IpsecMode,
    MsgType,
    PolicyDir,
    PolicyType,
    SaState,
    SaType,
)
from userspace_ipsec.pfkey.messages import IpsecRequest, LifetimeExt, Message
from userspace_ipsec.sa import NO_MARK, SecurityAssociation


def setup(soft: LifetimeExt, hard: LifetimeExt) -> tuple[Kernel, int, int, SecurityAssociation]:
    k = kernel()
    registered, bystander = k.open_socket(), k.open_socket()
    k.handle(registered, Message(MsgType.REGISTER, SaType.ESP), NOW)
    k.handle(bystander, sa_msg(MsgType.ADD, 0x1000, soft=soft, hard=hard), NOW)
    sa = k.sad.get(A("10.0.0.2"), SaType.ESP, 0x1000)
    assert sa is not None
    return k, registered, bystander, sa


def expire_of(k: Kernel, out: list[Delivery], registered: int) -> Message:
    d = only(out)
    assert d.audience is Audience.REGISTERED and k.recipients(d, None) == [registered]
    assert d.message is not None and d.message.type == MsgType.EXPIRE
    assert ExtType.KEY_ENCRYPT not in d.message.ext
    return d.message


def send(k: Kernel, sa: SecurityAssociation, packets: int, nbytes: int,
         now: float) -> list[Delivery]:
    """What the datapath does per packet: count, then compare with the marks."""
    out: list[Delivery] = []
    for _ in range(packets):
        sa.packets_out += 1
        sa.bytes_out += nbytes
        if sa.packets_in + sa.packets_out >= sa.packet_mark or (
                sa.bytes_in + sa.bytes_out >= sa.byte_mark):
            out.extend(k.note_traffic(sa, now))
    return out


def test_addtime_soft_then_hard() -> None:
    k, reg, _, sa = setup(LifetimeExt(addtime=80), LifetimeExt(addtime=100))
    assert k.next_deadline() == NOW + 80
    assert k.tick(NOW + 79) == []
    msg = expire_of(k, k.tick(NOW + 80), reg)
    assert ExtType.LIFETIME_SOFT in msg.ext and ExtType.LIFETIME_HARD not in msg.ext
    assert sa.state == SaState.DYING and sa in k.sad
    assert k.next_deadline() == NOW + 100
    assert k.tick(NOW + 90) == []
    msg = expire_of(k, k.tick(NOW + 100), reg)
    assert ExtType.LIFETIME_HARD in msg.ext and ExtType.LIFETIME_SOFT not in msg.ext
    assert msg.sa is not None and msg.sa.spi == 0x1000
    assert len(k.sad) == 0 and k.next_deadline() is None


def test_usetime_counts_from_first_use() -> None:
    k, reg, _, sa = setup(LifetimeExt(usetime=10), LifetimeExt(usetime=20))
    assert k.next_deadline() is None  # never used: nothing to time
    assert send(k, sa, 1, 100, NOW + 50) == []
    assert sa.use_time == NOW + 50
    assert k.next_deadline() == NOW + 60
    assert k.tick(NOW + 59) == []
    expire_of(k, k.tick(NOW + 60), reg)
    msg = expire_of(k, k.tick(NOW + 70), reg)
    assert ExtType.LIFETIME_HARD in msg.ext and len(k.sad) == 0


@pytest.mark.parametrize("counter", ["bytes", "allocations"])
def test_traffic_limits_are_noticed_at_once(counter: str) -> None:
    soft = LifetimeExt(**{counter: 1000})
    hard = LifetimeExt(**{counter: 2000})
    k, reg, _, sa = setup(soft, hard)
    nbytes = 100 if counter == "bytes" else 1  # 10 or 1000 packets to the soft limit
    steps = 1000 // nbytes
    assert send(k, sa, steps - 1, nbytes, NOW) == []
    assert sa.packet_mark + sa.byte_mark < 2 * NO_MARK  # a limit is armed
    msg = expire_of(k, send(k, sa, 1, nbytes, NOW), reg)
    assert ExtType.LIFETIME_SOFT in msg.ext and sa.state == SaState.DYING
    current = msg.ext[ExtType.LIFETIME_CURRENT]
    assert isinstance(current, LifetimeExt) and getattr(current, counter) == 1000
    assert send(k, sa, steps - 1, nbytes, NOW) == []
    msg = expire_of(k, send(k, sa, 1, nbytes, NOW), reg)
    assert ExtType.LIFETIME_HARD in msg.ext and sa not in k.sad
    assert sa.state == SaState.DEAD and sa.packet_mark == NO_MARK
    assert send(k, sa, 5, nbytes, NOW) == []  # a dead SA reports nothing


def test_no_limits_means_one_report_only() -> None:
    k, _, _, sa = setup(LifetimeExt(), LifetimeExt())
    calls = 0
    for _ in range(100):
        sa.packets_in += 1
        if sa.packets_in + sa.packets_out >= sa.packet_mark:
            calls += 1
            assert k.note_traffic(sa, NOW) == []
    assert calls == 1 and sa.packet_mark == NO_MARK and sa.byte_mark == NO_MARK


def test_expire_goes_to_registered_sockets_only_and_dying_sa_loses_to_new() -> None:
    k, reg, other, sa = setup(LifetimeExt(addtime=10), LifetimeExt(addtime=20))
    k.tick(NOW + 10)
    k.handle(other, sa_msg(MsgType.ADD, 0x1001), NOW + 11)
    best = k.sad.best_by_endpoints(A("10.0.0.1"), A("10.0.0.2"), SaType.ESP, IpsecMode.ANY)
    assert best is not None and best.spi == 0x1001


def test_larval_sa_times_out_silently() -> None:
    k = kernel(larval_timeout=30.0)
    s = k.open_socket()
    k.handle(s, Message(MsgType.REGISTER, SaType.ESP), NOW)
    k.handle(s, getspi_msg(), NOW)
    assert len(k.sad) == 1 and k.next_deadline() == NOW + 30
    assert k.tick(NOW + 29.9) == [] and len(k.sad) == 1
    assert k.tick(NOW + 30) == [] and len(k.sad) == 0
    assert k.next_deadline() is None


def test_updated_sa_no_longer_times_out_as_larval() -> None:
    k = kernel()
    s = k.open_socket()
    reply = only(k.handle(s, getspi_msg(), NOW)).message
    assert reply is not None and reply.sa is not None
    k.handle(s, sa_msg(MsgType.UPDATE, reply.sa.spi), NOW + 1)
    assert k.tick(NOW + 100) == [] and len(k.sad) == 1
    assert k.next_deadline() is None


def test_deleted_sa_timer_is_forgotten() -> None:
    k, _, other, _ = setup(LifetimeExt(addtime=10), LifetimeExt(addtime=20))
    k.handle(other, sa_msg(MsgType.DELETE, 0x1000), NOW)
    assert k.next_deadline() is None and k.tick(NOW + 30) == []


# -- ACQUIRE -----------------------------------------------------------------------------------


def acquire_setup(interval: float = 1.0) -> tuple[Kernel, int]:
    k = kernel(acquire_interval=interval)
    ike = k.open_socket()
    k.handle(ike, Message(MsgType.REGISTER, SaType.ESP), NOW)
    k.handle(ike, spd_msg(MsgType.X_SPDADD, "10.1.0.0/16", "10.2.0.0/16"), NOW)
    k.handle(ike, spd_msg(MsgType.X_SPDADD, "10.3.0.0/16", "10.4.0.0/16", requests=[
        IpsecRequest(50, IpsecMode.TRANSPORT, IpsecLevel.REQUIRE)]), NOW)
    return k, ike


def test_acquire_message_and_rate_limit() -> None:
    k, ike = acquire_setup()
    policy = k.spd.lookup(PolicyDir.OUTBOUND, A("10.1.0.5"), A("10.2.0.7"), 6, 1000, 80)
    assert policy is not None
    flow = Flow(A("10.1.0.5"), A("10.2.0.7"), 6, 1000, 80)
    out = k.acquire(policy, flow, NOW)
    got = received(k, out, None)
    assert list(got) == [ike]
    (msg,) = got[ike]
    assert msg.type == MsgType.ACQUIRE and msg.satype == SaType.ESP and msg.seq > 0
    assert msg.src is not None and msg.src.address == A("192.0.2.1")  # tunnel endpoints
    assert msg.dst is not None and msg.dst.address == A("192.0.2.2")
    assert msg.policy is not None and msg.policy.id == policy.id
    prop = msg.ext[ExtType.PROPOSAL]
    combs = prop.combs  # type: ignore[union-attr]
    assert combs and {c.encrypt for c in combs} >= {20, 28}
    assert all(c.auth == 0 for c in combs if c.encrypt in (20, 28))
    assert all(c.encrypt not in (2, 3, 11) for c in combs)
    # Limited: the same policy and tunnel, even for another flow, within the interval.
    other_flow = Flow(A("10.1.0.6"), A("10.2.0.8"), 17, 53, 53)
    assert k.acquire(policy, flow, NOW + 0.5) == []
    assert k.acquire(policy, other_flow, NOW + 0.9) == []
    again = k.acquire(policy, flow, NOW + 1.0)
    assert only(again).message is not None
    assert only(again).message.seq == msg.seq + 1  # type: ignore[union-attr]


def test_acquire_transport_mode_is_per_host_pair() -> None:
    k, _ = acquire_setup()
    policy = k.spd.lookup(PolicyDir.OUTBOUND, A("10.3.0.1"), A("10.4.0.1"), 6, 1, 2)
    assert policy is not None
    first = k.acquire(policy, Flow(A("10.3.0.1"), A("10.4.0.1")), NOW)
    msg = only(first).message
    assert msg is not None and msg.src is not None and msg.src.address == A("10.3.0.1")
    assert k.acquire(policy, Flow(A("10.3.0.1"), A("10.4.0.1")), NOW) == []
    assert len(k.acquire(policy, Flow(A("10.3.0.2"), A("10.4.0.1")), NOW)) == 1


def test_acquire_needs_a_listener_and_an_ipsec_policy() -> None:
    k = kernel()
    s = k.open_socket()
    k.handle(s, spd_msg(MsgType.X_SPDADD, "10.1.0.0/16", "10.2.0.0/16"), NOW)
    k.handle(s, spd_msg(MsgType.X_SPDADD, "10.5.0.0/16", "10.6.0.0/16",
                        action=PolicyType.DISCARD), NOW)
    ipsec, discard = k.spd.snapshot()
    flow = Flow(A("10.1.0.1"), A("10.2.0.1"))
    assert k.acquire(ipsec, flow, NOW) == []  # nobody registered
    k.handle(s, Message(MsgType.REGISTER, SaType.ESP), NOW)
    assert k.acquire(discard, flow, NOW) == []
    assert len(k.acquire(ipsec, flow, NOW)) == 1
    # Deleting the policy forgets its rate limit.
    k.handle(s, spd_msg(MsgType.X_SPDDELETE, "10.1.0.0/16", "10.2.0.0/16"), NOW)
    k.handle(s, spd_msg(MsgType.X_SPDADD, "10.1.0.0/16", "10.2.0.0/16"), NOW)
    (new_ipsec,) = [p for p in k.spd.snapshot() if p.action == PolicyType.IPSEC]
    assert len(k.acquire(new_ipsec, flow, NOW)) == 1


def test_expire_now_removes_and_reports_hard_once() -> None:
    k, reg, _, sa = setup(LifetimeExt(), LifetimeExt(addtime=100))
    msg = expire_of(k, k.expire_now(sa, NOW + 1), reg)
    assert ExtType.LIFETIME_HARD in msg.ext and sa not in k.sad
    assert k.expire_now(sa, NOW + 2) == [] and k.tick(NOW + 200) == []
