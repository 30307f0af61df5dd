"""Kernel: SA messages, their errnos, audiences, key stripping, dumps, sockets."""

from __future__ import annotations

import errno

import pytest

from tests.core.helpers import (
    CBC,
    GCM,
    GCM_KEY,
    NOW,
    SHA256,
    A,
    errno_of,
    getspi_msg,
    kernel,
    key_msg,
    only,
    received,
    sa_msg,
)
from userspace_ipsec.kernel import Audience, Kernel
from userspace_ipsec.pfkey.constants import (
    UIPSEC_FLAG_ESN,
    ExtType,
    IpsecMode,
    MsgType,
    SaState,
    SaType,
)
from userspace_ipsec.pfkey.messages import Message, SA2Ext, UipsecExt


def getspi(k: Kernel, sock: int, **kw: object) -> int:
    reply = only(k.handle(sock, getspi_msg(**kw), NOW))  # type: ignore[arg-type]
    assert reply.audience is Audience.SENDER and reply.message is not None
    assert reply.message.errno == 0, reply.message
    assert reply.message.sa is not None and reply.message.sa.state == SaState.LARVAL
    return reply.message.sa.spi


def sad_keys(k: Kernel) -> set[tuple[object, int, int]]:
    return {sa.key for sa in k.sad}


def test_getspi_update_by_owner_makes_a_mature_sa_broadcast_without_keys() -> None:
    k = kernel()
    owner, other = k.open_socket(), k.open_socket()
    spi = getspi(k, owner, spirange=(0x2000, 0x2FFF))
    assert 0x2000 <= spi <= 0x2FFF
    out = k.handle(owner, sa_msg(MsgType.UPDATE, spi, seq=9, sa2=SA2Ext(IpsecMode.TUNNEL, 0, 5)),
                   NOW + 1)
    got = received(k, out, owner)
    assert set(got) == {owner, other}
    for (msg,) in got.values():
        assert msg.type == MsgType.UPDATE and msg.errno == 0 and msg.seq == 9
        assert msg.sa is not None and msg.sa.spi == spi and msg.sa.state == SaState.MATURE
        assert ExtType.KEY_ENCRYPT not in msg.ext and ExtType.KEY_AUTH not in msg.ext
    sa = k.sad.get(A("10.0.0.2"), SaType.ESP, spi)
    assert sa is not None and sa.state == SaState.MATURE and sa.enc_key == GCM_KEY
    assert sa.mode == IpsecMode.TUNNEL and sa.reqid == 5 and sa.owner is None
    assert k.sad.best_by_reqid(A("10.0.0.1"), A("10.0.0.2"), SaType.ESP, 5) is sa


def test_update_errnos() -> None:
    k = kernel()
    owner, other = k.open_socket(), k.open_socket()
    spi = getspi(k, owner)
    assert errno_of(k.handle(other, sa_msg(MsgType.UPDATE, spi), NOW)) == errno.EPERM
    assert errno_of(k.handle(owner, sa_msg(MsgType.UPDATE, spi + 1), NOW)) == errno.ESRCH
    wrong_src = sa_msg(MsgType.UPDATE, spi, src="10.9.9.9")
    assert errno_of(k.handle(owner, wrong_src, NOW)) == errno.ENOENT
    bad_key = sa_msg(MsgType.UPDATE, spi, enc_key=b"short")
    assert errno_of(k.handle(owner, bad_key, NOW)) == errno.EINVAL
    sa = k.sad.get(A("10.0.0.2"), SaType.ESP, spi)
    assert sa is not None and sa.state == SaState.LARVAL  # nothing changed
    assert only(k.handle(owner, sa_msg(MsgType.UPDATE, spi), NOW)).audience is Audience.ALL
    # Only a larval SA can be updated.
    assert errno_of(k.handle(owner, sa_msg(MsgType.UPDATE, spi), NOW)) == errno.EEXIST


def test_getspi_errnos() -> None:
    k = kernel()
    s = k.open_socket()
    assert errno_of(k.handle(s, getspi_msg(spirange=(0x3000, 0x2000)), NOW)) == errno.EINVAL
    assert errno_of(k.handle(s, getspi_msg(spirange=(1, 255)), NOW)) == errno.EINVAL
    assert getspi(k, s, spirange=(0x3000, 0x3000)) == 0x3000
    assert errno_of(k.handle(s, getspi_msg(spirange=(0x3000, 0x3000)), NOW)) == errno.EEXIST
    assert getspi(k, s, spirange=(0x3001, 0x3001)) == 0x3001
    assert errno_of(k.handle(s, getspi_msg(spirange=(0x3000, 0x3001)), NOW)) == errno.ENOENT
    mixed = getspi_msg(src="10.0.0.1", dst="2001:db8::1")
    assert errno_of(k.handle(s, mixed, NOW)) == errno.EINVAL
    no_dst = getspi_msg()
    del no_dst.ext[ExtType.ADDRESS_DST]
    assert errno_of(k.handle(s, no_dst, NOW)) == errno.EINVAL
    assert errno_of(k.handle(s, getspi_msg(satype=SaType.AH), NOW)) == errno.EPROTONOSUPPORT
    assert errno_of(k.handle(s, getspi_msg(satype=SaType.UNSPEC), NOW)) == errno.EINVAL
    assert len(k.sad) == 2


def test_getspi_spis_are_unique() -> None:
    k = kernel()
    s = k.open_socket()
    spis = [getspi(k, s, spirange=(0x100, 0x1FF)) for _ in range(256)]
    assert sorted(spis) == list(range(0x100, 0x200))
    assert errno_of(k.handle(s, getspi_msg(spirange=(0x100, 0x1FF)), NOW)) == errno.ENOENT


def test_add_get_delete() -> None:
    k = kernel()
    s, t = k.open_socket(), k.open_socket()
    add = sa_msg(MsgType.ADD, 0x1000, encrypt=CBC, enc_key=bytes(16), auth=SHA256,
                 auth_key=bytes(32))
    got = received(k, k.handle(s, add, NOW), s)
    assert set(got) == {s, t}
    assert all(ExtType.KEY_AUTH not in m.ext and ExtType.KEY_ENCRYPT not in m.ext
               for (m,) in got.values())
    assert errno_of(k.handle(s, add, NOW)) == errno.EEXIST
    # GET: only the asker, with keys.
    reply = only(k.handle(t, key_msg(MsgType.GET, 0x1000), NOW))
    assert reply.audience is Audience.SENDER and k.recipients(reply, t) == [t]
    msg = k.message_for(reply, t)
    assert msg.ext[ExtType.KEY_ENCRYPT].key == bytes(16)  # type: ignore[union-attr]
    assert msg.ext[ExtType.KEY_AUTH].key == bytes(32)  # type: ignore[union-attr]
    assert msg.sa is not None and msg.sa.auth == SHA256 and msg.sa.encrypt == CBC
    assert errno_of(k.handle(t, key_msg(MsgType.GET, 0x1001), NOW)) == errno.ESRCH
    # DELETE broadcasts to all, without keys.
    deleted = received(k, k.handle(t, key_msg(MsgType.DELETE, 0x1000), NOW), t)
    assert set(deleted) == {s, t}
    assert all(ExtType.KEY_ENCRYPT not in m.ext for (m,) in deleted.values())
    assert len(k.sad) == 0
    assert errno_of(k.handle(t, key_msg(MsgType.DELETE, 0x1000), NOW)) == errno.ESRCH


@pytest.mark.parametrize(
    ("changes", "err"),
    [
        ({"spi": 0x10}, errno.EINVAL),  # reserved SPI
        ({"encrypt": 99}, errno.EINVAL),  # unknown algorithm
        ({"enc_key": bytes(19)}, errno.EINVAL),  # wrong key length
        ({"encrypt": GCM, "auth": SHA256, "auth_key": bytes(32)}, errno.EINVAL),  # AEAD + integ
        ({"encrypt": CBC, "enc_key": bytes(16)}, errno.EINVAL),  # cipher without integrity
        ({"encrypt": CBC, "enc_key": bytes(16), "auth": SHA256, "auth_key": bytes(31)},
         errno.EINVAL),
        ({"encrypt": 3, "enc_key": bytes(24), "auth": SHA256, "auth_key": bytes(32)},
         errno.EINVAL),  # 3DES is weak
        ({"encrypt": 11, "enc_key": None, "auth": 251}, errno.EINVAL),  # null + null
        ({"dst": "2001:db8::2"}, errno.EINVAL),  # families differ
        ({"satype": SaType.AH, "encrypt": 0, "enc_key": None, "auth": SHA256,
          "auth_key": bytes(32)}, errno.EPROTONOSUPPORT),
        ({"satype": SaType.RSVP}, errno.EINVAL),
        ({"sa2": SA2Ext(IpsecMode.BEET)}, errno.EINVAL),
        ({"replay": 0, "hard": None}, 0),  # control: valid
    ],
)
def test_add_refusals_change_nothing(changes: dict[str, object], err: int) -> None:
    k = kernel()
    s = k.open_socket()
    spi = changes.pop("spi", 0x1000)
    msg = sa_msg(MsgType.ADD, spi, **changes)  # type: ignore[arg-type]
    out = only(k.handle(s, msg, NOW))
    assert out.message is not None and out.message.errno == err
    assert len(k.sad) == (1 if err == 0 else 0)
    if err:
        assert out.audience is Audience.SENDER
        assert (out.message.type, out.message.seq, out.message.pid) == (msg.type, msg.seq, msg.pid)
        assert out.message.ext == {}


def test_missing_extensions_are_einval() -> None:
    k = kernel()
    s = k.open_socket()
    for mtype in (MsgType.ADD, MsgType.UPDATE, MsgType.DELETE, MsgType.GET):
        for missing in (ExtType.SA, ExtType.ADDRESS_SRC, ExtType.ADDRESS_DST):
            msg = sa_msg(mtype, 0x1000)
            del msg.ext[missing]
            assert errno_of(k.handle(s, msg, NOW)) == errno.EINVAL, (mtype, missing)


def test_weak_algorithms_allowed_by_option() -> None:
    k = kernel(allow_weak=True)
    s = k.open_socket()
    msg = sa_msg(MsgType.ADD, 0x1000, encrypt=3, enc_key=bytes(24), auth=2, auth_key=bytes(16))
    assert only(k.handle(s, msg, NOW)).audience is Audience.ALL


def test_replay_window_and_esn_from_uipsec_and_opt_in() -> None:
    k = kernel()
    plain, fancy = k.open_socket(), k.open_socket()
    msg = sa_msg(MsgType.ADD, 0x1000, replay=64)
    msg.ext[ExtType.X_UIPSEC] = UipsecExt(UIPSEC_FLAG_ESN, 4096)
    got = received(k, k.handle(fancy, msg, NOW), fancy)
    sa = k.sad.get(A("10.0.0.2"), SaType.ESP, 0x1000)
    assert sa is not None and sa.replay_window == 4096 and sa.esn
    assert ExtType.X_UIPSEC not in got[plain][0].ext
    ext = got[fancy][0].uipsec
    assert ext is not None and ext.replay_window == 4096 and ext.flags & UIPSEC_FLAG_ESN
    plain_sa = got[plain][0].sa
    assert plain_sa is not None and plain_sa.replay == 255  # the u8 field saturates
    # Without the extension sadb_sa_replay is the window.
    k.handle(plain, sa_msg(MsgType.ADD, 0x1001, replay=64), NOW)
    sa2 = k.sad.get(A("10.0.0.2"), SaType.ESP, 0x1001)
    assert sa2 is not None and sa2.replay_window == 64 and not sa2.esn
    # Counters reach opted-in sockets on GET.
    sa.packets_in, sa.auth_failures = 10, 2
    reply = only(k.handle(fancy, key_msg(MsgType.GET, 0x1000), NOW))
    counters = k.message_for(reply, fancy).uipsec
    assert counters is not None and (counters.packets_in, counters.auth_failures) == (10, 2)


def test_flush_per_satype_and_all() -> None:
    k = kernel()
    s, t = k.open_socket(), k.open_socket()
    for spi in range(0x1000, 0x1005):
        k.handle(s, sa_msg(MsgType.ADD, spi), NOW)
    assert errno_of(k.handle(s, Message(MsgType.FLUSH, SaType.RSVP), NOW)) == errno.EINVAL
    out = only(k.handle(s, Message(MsgType.FLUSH, SaType.AH, 3, 1), NOW))
    assert out.audience is Audience.ALL and len(k.sad) == 5
    out = only(k.handle(s, Message(MsgType.FLUSH, SaType.ESP, 4, 1), NOW))
    assert len(k.sad) == 0 and set(k.recipients(out, s)) == {s, t}
    for spi in range(0x1000, 0x1005):
        k.handle(s, sa_msg(MsgType.ADD, spi), NOW)
    k.handle(s, Message(MsgType.FLUSH), NOW)
    assert len(k.sad) == 0


def test_dump_streams_with_seq_counting_down_and_keys() -> None:
    k = kernel()
    s, t = k.open_socket(), k.open_socket()
    assert errno_of(k.handle(s, Message(MsgType.DUMP, SaType.ESP, 7, 1), NOW)) == errno.ENOENT
    for spi in range(0x1000, 0x1000 + 50):
        k.handle(s, sa_msg(MsgType.ADD, spi), NOW)
    out = only(k.handle(s, Message(MsgType.DUMP, SaType.ESP, 7, 1), NOW))
    assert out.audience is Audience.SENDER and out.stream is not None
    assert k.recipients(out, s) == [s]
    msgs = list(out.stream)
    assert [m.seq for m in msgs] == list(range(49, -1, -1))
    assert {m.sa.spi for m in msgs if m.sa} == set(range(0x1000, 0x1032))
    assert all(m.type == MsgType.DUMP and m.pid == 1 for m in msgs)
    assert all(ExtType.KEY_ENCRYPT in m.ext for m in msgs)
    assert errno_of(k.handle(t, Message(MsgType.DUMP, SaType.RSVP), NOW)) == errno.EINVAL


def test_dump_is_lazy_and_survives_changes() -> None:
    k = kernel()
    s = k.open_socket()
    for spi in range(0x1000, 0x1000 + 2000):
        k.handle(s, sa_msg(MsgType.ADD, spi), NOW)
    stream = only(k.handle(s, Message(MsgType.DUMP), NOW)).stream
    assert stream is not None
    first = next(stream)
    assert first.seq == 1999
    k.handle(s, Message(MsgType.FLUSH), NOW)  # the SAD changes while the dump is read
    rest = list(stream)
    assert len(rest) == 1999 and rest[-1].seq == 0


def test_register_replies_to_registered_sockets_only() -> None:
    k = kernel()
    a, b, c = k.open_socket(), k.open_socket(), k.open_socket()
    out = only(k.handle(a, Message(MsgType.REGISTER, SaType.ESP, 1, 1), NOW))
    assert out.audience is Audience.REGISTERED and k.recipients(out, a) == [a]
    msg = k.message_for(out, a)
    enc = msg.ext[ExtType.SUPPORTED_ENCRYPT].algs  # type: ignore[union-attr]
    auth = msg.ext[ExtType.SUPPORTED_AUTH].algs  # type: ignore[union-attr]
    assert {x.id for x in enc} == {11, 12, 13, 20, 28}  # no DES/3DES
    assert 2 not in {x.id for x in auth}  # no HMAC-MD5
    gcm = next(x for x in enc if x.id == GCM)
    assert (gcm.minbits, gcm.maxbits) == (160, 288)
    assert errno_of(k.handle(a, Message(MsgType.REGISTER, SaType.ESP), NOW)) == errno.EEXIST
    # AH registration is accepted (strongSwan needs it) and carries integrity algorithms only.
    out = only(k.handle(b, Message(MsgType.REGISTER, SaType.AH), NOW))
    assert sorted(k.recipients(out, b)) == [a, b]
    assert ExtType.SUPPORTED_ENCRYPT not in out.message.ext  # type: ignore[union-attr]
    # UNSPEC registers nothing but still answers the asker.
    out = only(k.handle(c, Message(MsgType.REGISTER), NOW))
    assert sorted(k.recipients(out, c)) == [a, b, c]
    assert k.registered(c) == frozenset()
    assert errno_of(k.handle(c, Message(MsgType.REGISTER, 200), NOW)) == errno.EINVAL


def test_register_lists_weak_algorithms_when_allowed() -> None:
    k = kernel(allow_weak=True)
    s = k.open_socket()
    msg = only(k.handle(s, Message(MsgType.REGISTER, SaType.ESP), NOW)).message
    assert msg is not None
    assert {2, 3} <= {x.id for x in msg.ext[ExtType.SUPPORTED_ENCRYPT].algs}  # type: ignore


def test_unknown_request_is_eopnotsupp() -> None:
    k = kernel()
    s = k.open_socket()
    for mtype in (MsgType.EXPIRE, MsgType.X_MIGRATE, MsgType.RESERVED):
        assert errno_of(k.handle(s, Message(mtype, SaType.ESP), NOW)) == errno.EOPNOTSUPP
    assert k.handle(s, Message(MsgType.ACQUIRE, SaType.ESP, errno=errno.ENOENT), NOW) == []


def test_close_socket_drops_its_larval_sas_and_registration() -> None:
    k = kernel()
    s, t = k.open_socket(), k.open_socket()
    k.handle(s, Message(MsgType.REGISTER, SaType.ESP), NOW)
    larval = getspi(k, s)
    mature = getspi(k, s)
    k.handle(s, sa_msg(MsgType.UPDATE, mature), NOW)
    kept = getspi(k, t)
    assert k.close_socket(s, NOW) == []
    assert {key[2] for key in sad_keys(k)} == {mature, kept}
    assert larval not in {key[2] for key in sad_keys(k)}
    out = only(k.handle(t, Message(MsgType.FLUSH), NOW))
    assert k.recipients(out, t) == [t]
    assert k.handle(s, Message(MsgType.FLUSH), NOW) == []  # a closed socket is ignored


def test_promiscuous_socket_sees_requests_without_keys_and_replies_to_others() -> None:
    k = kernel()
    watcher, actor = k.open_socket(), k.open_socket()
    assert errno_of(k.handle(watcher, Message(MsgType.X_PROMISC, 2), NOW)) == errno.EINVAL
    on = only(k.handle(watcher, Message(MsgType.X_PROMISC, 1), NOW))
    assert on.audience is Audience.ALL
    add = sa_msg(MsgType.ADD, 0x1000, seq=3)
    got = received(k, k.handle(actor, add, NOW), actor)
    request, broadcast = got[watcher]
    assert request.type == MsgType.ADD and request.seq == 3
    assert ExtType.KEY_ENCRYPT not in request.ext and ExtType.SA in request.ext
    assert ExtType.KEY_ENCRYPT in add.ext  # the caller's message is left alone
    assert broadcast.type == MsgType.ADD and got[actor] == [broadcast]
    # A reply meant for the actor alone (an error) reaches the watcher too; a dump does not.
    got = received(k, k.handle(actor, add, NOW), actor)
    assert got[actor][0].errno == errno.EEXIST and got[watcher][-1].errno == errno.EEXIST
    dump = k.handle(actor, Message(MsgType.DUMP), NOW)
    assert [k.recipients(d, actor) for d in dump] == [[watcher], [actor]]
    k.handle(watcher, Message(MsgType.X_PROMISC, 0), NOW)
    assert set(received(k, k.handle(actor, key_msg(MsgType.GET, 0x1000), NOW), actor)) == {actor}
