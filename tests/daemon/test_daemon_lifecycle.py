"""SA and policy lifecycles through PfkeyClient against a running daemon."""

from __future__ import annotations

import errno

import pytest

from tests.core.helpers import (
    CBC,
    GCM_KEY,
    SHA256,
    getspi_msg,
    key_msg,
    policy_id_msg,
    sa_msg,
    spd_msg,
)
from tests.daemon.daemon_proc import RunningDaemon
from userspace_ipsec.pfkey.client import PfkeyReplyError
from userspace_ipsec.pfkey.constants import (
    ExtType,
    IpsecMode,
    MsgType,
    PolicyDir,
    PolicyType,
    SaState,
    SaType,
)
from userspace_ipsec.pfkey.messages import KeyExt, Message, SA2Ext


def _fresh(msg: Message) -> Message:
    msg.seq = 0  # the client numbers it
    return msg


def _refused(call: object, *args: object) -> int:
    with pytest.raises(PfkeyReplyError) as info:
        call(*args)  # type: ignore[operator]
    return info.value.errno


def test_add_get_delete(daemon: RunningDaemon) -> None:
    c = daemon.client()
    add = _fresh(sa_msg(MsgType.ADD, 0x1234, sa2=SA2Ext(IpsecMode.TUNNEL, reqid=7)))
    reply = c.request(add)
    assert reply.type == MsgType.ADD and reply.errno == 0 and reply.seq == add.seq
    assert reply.pid == c.pid
    assert reply.sa is not None and reply.sa.spi == 0x1234
    assert ExtType.KEY_ENCRYPT not in reply.ext  # keys never echoed by ADD

    got = c.request(_fresh(key_msg(MsgType.GET, 0x1234)))
    assert got.sa is not None and got.sa.spi == 0x1234 and got.sa.encrypt == 20
    assert got.ext[ExtType.KEY_ENCRYPT] == KeyExt(GCM_KEY, 160)
    assert got.sa2 == SA2Ext(IpsecMode.TUNNEL, 0, 7)
    assert str(got.ext[ExtType.ADDRESS_DST].address) == "10.0.0.2"  # type: ignore[union-attr]

    assert _refused(c.request, _fresh(sa_msg(MsgType.ADD, 0x1234))) == errno.EEXIST
    c.request(_fresh(key_msg(MsgType.DELETE, 0x1234)))
    assert _refused(c.request, _fresh(key_msg(MsgType.GET, 0x1234))) == errno.ESRCH
    assert _refused(c.request, _fresh(key_msg(MsgType.DELETE, 0x1234))) == errno.ESRCH


def test_getspi_update_by_owner_only(daemon: RunningDaemon) -> None:
    owner, other = daemon.client(), daemon.client()
    larval = owner.request(_fresh(getspi_msg(spirange=(0x5000, 0x5FFF))))
    assert larval.sa is not None and 0x5000 <= larval.sa.spi <= 0x5FFF
    spi = larval.sa.spi
    assert owner.request(_fresh(key_msg(MsgType.GET, spi))).sa.state == SaState.LARVAL  # type: ignore[union-attr]

    update = sa_msg(MsgType.UPDATE, spi, encrypt=CBC, enc_key=bytes(32), auth=SHA256,
                    auth_key=bytes(range(32)))
    assert _refused(other.request, _fresh(update)) == errno.EPERM
    assert owner.request(_fresh(key_msg(MsgType.GET, spi))).sa.state == SaState.LARVAL  # type: ignore[union-attr]

    owner.request(_fresh(update))
    got = other.request(_fresh(key_msg(MsgType.GET, spi)))
    assert got.sa is not None and got.sa.state == SaState.MATURE
    assert (got.sa.encrypt, got.sa.auth) == (CBC, SHA256)
    assert got.ext[ExtType.KEY_AUTH] == KeyExt(bytes(range(32)), 256)
    # Mature now: a second UPDATE is refused, even by the owner.
    assert _refused(owner.request, _fresh(update)) == errno.EEXIST


def test_larval_sa_dies_with_its_socket(daemon: RunningDaemon) -> None:
    owner, other = daemon.client(), daemon.client()
    spi = owner.request(_fresh(getspi_msg())).sa.spi  # type: ignore[union-attr]
    owner.close()
    # The daemon processes the close asynchronously: poll briefly.
    for _ in range(100):
        try:
            other.request(_fresh(key_msg(MsgType.GET, spi)))
        except PfkeyReplyError as exc:
            assert exc.errno == errno.ESRCH
            return
    raise AssertionError("larval SA outlived its socket")


def test_dump_and_flush(daemon: RunningDaemon) -> None:
    c = daemon.client()
    assert list(c.dump()) == []  # ENOENT on an empty SAD reads as an empty dump
    spis = [0x2001, 0x2002, 0x2003]
    for spi in spis:
        c.request(_fresh(sa_msg(MsgType.ADD, spi)))
    dump = list(c.dump())
    assert sorted(m.sa.spi for m in dump) == spis  # type: ignore[union-attr]
    assert [m.seq for m in dump] == [2, 1, 0]
    assert all(m.type == MsgType.DUMP and m.pid == c.pid for m in dump)
    assert all(ExtType.KEY_ENCRYPT in m.ext for m in dump)
    assert len(list(c.dump(SaType.ESP))) == 3

    flushed = c.request(Message(MsgType.FLUSH, SaType.UNSPEC))
    assert flushed.type == MsgType.FLUSH and flushed.errno == 0
    assert list(c.dump()) == []
    assert _refused(c.request, Message(MsgType.FLUSH, 9)) == errno.EINVAL


def test_policy_lifecycle(daemon: RunningDaemon) -> None:
    c = daemon.client()
    assert list(c.spddump()) == []
    out = spd_msg(MsgType.X_SPDADD, "10.1.0.0/16", "10.2.0.0/16", PolicyDir.OUTBOUND, seq=0,
                  priority=10)
    added = c.request(out)
    assert added.policy is not None and added.policy.id > 0
    out_id = added.policy.id
    assert _refused(c.request, _fresh(out)) == errno.EEXIST

    inbound = spd_msg(MsgType.X_SPDADD, "10.2.0.0/16", "10.1.0.0/16", PolicyDir.INBOUND,
                      PolicyType.DISCARD, seq=0)
    in_id = c.request(inbound).policy.id  # type: ignore[union-attr]

    got = c.request(policy_id_msg(MsgType.X_SPDGET, out_id))
    assert got.policy is not None and got.policy.priority == 10
    assert got.policy.type == PolicyType.IPSEC and got.policy.dir == PolicyDir.OUTBOUND
    assert str(got.src.address) == "10.1.0.0" and got.src.prefixlen == 16  # type: ignore[union-attr]

    # X_SPDUPDATE replaces the policy of the same selector and direction.
    update = spd_msg(MsgType.X_SPDUPDATE, "10.1.0.0/16", "10.2.0.0/16", PolicyDir.OUTBOUND,
                     PolicyType.NONE, seq=0, priority=20)
    c.request(update)
    by_dir = {m.policy.dir: m.policy for m in c.spddump()}  # type: ignore[union-attr]
    assert set(by_dir) == {PolicyDir.OUTBOUND, PolicyDir.INBOUND}
    assert by_dir[PolicyDir.OUTBOUND].type == PolicyType.NONE  # type: ignore[union-attr]
    assert by_dir[PolicyDir.OUTBOUND].priority == 20  # type: ignore[union-attr]
    assert [m.seq for m in c.spddump()] == [1, 0]

    # X_SPDDELETE by selector, X_SPDDELETE2 by id.
    c.request(_fresh(spd_msg(MsgType.X_SPDDELETE, "10.1.0.0/16", "10.2.0.0/16")))
    assert _refused(c.request, _fresh(spd_msg(MsgType.X_SPDDELETE, "10.1.0.0/16",
                                              "10.2.0.0/16"))) == errno.ENOENT
    c.request(policy_id_msg(MsgType.X_SPDDELETE2, in_id))
    assert _refused(c.request, policy_id_msg(MsgType.X_SPDGET, in_id)) == errno.ENOENT
    assert list(c.spddump()) == []

    c.request(_fresh(out))
    c.request(_fresh(inbound))
    assert len(list(c.spddump())) == 2
    c.request(Message(MsgType.X_SPDFLUSH))
    assert list(c.spddump()) == []
