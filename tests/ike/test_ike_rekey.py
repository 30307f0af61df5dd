"""IKE SA rekey (RFC 7296 1.3.2, 2.18) and its collisions (2.8.2, 2.25.2)."""

from __future__ import annotations

from ike.constants import ExchangeType, NotifyType
from ike.core import State
from ike.crypto import Prf, derive_ike_keys, rekeyed_skeyseed
from ike.events import (
    ChildSaDeleted,
    ChildSaEstablished,
    IkeSaDeleted,
    IkeSaRekeyed,
)
from ike.message import decode_message
from ike.payloads import KePayload, NoncePayload, SaPayload
from ike.sa import IkeSa
from tests.ike.harness import Net, scripted
from tests.ike.test_ike_child import inner_of


def test_ike_rekey_moves_children_and_deletes_the_old_sa() -> None:
    net = Net.established()
    net.i.take(ChildSaEstablished)
    net.r.take(ChildSaEstablished)
    old_i, old_r = net.i.sa, net.r.sa
    old_sk_d = old_i._keys.sk_d  # type: ignore[union-attr]
    children = [c.inbound_spi for c in old_i.child_sas]
    old_i.rekey_ike(net.now)
    (req,) = net.outgoing("i")
    inner = inner_of(net, "i", req)
    sa, ni = inner.find(SaPayload), inner.find(NoncePayload)
    assert isinstance(sa, SaPayload) and len(sa.proposals[0].spi) == 8
    assert isinstance(inner.find(KePayload), KePayload) and isinstance(ni, NoncePayload)
    net.deliver("i", req)
    (resp,) = net.outgoing("r")
    rinner = inner_of(net, "r", resp)
    nr = rinner.find(NoncePayload)
    assert isinstance(nr, NoncePayload)
    net.deliver("r", resp)
    (ev,) = net.i.take(IkeSaRekeyed)
    new_i = ev.new_sa
    assert isinstance(new_i, IkeSa) and new_i.state is State.ESTABLISHED
    assert new_i.spi_i == sa.proposals[0].spi and new_i.spi_i != old_i.spi_i
    assert [c.inbound_spi for c in new_i.child_sas] == children and old_i.child_sas == []
    assert new_i._keys.sk_d != old_sk_d  # type: ignore[union-attr]
    net.pump()
    (rev,) = net.r.take(IkeSaRekeyed)
    new_r = rev.new_sa
    assert (new_r.spi_i, new_r.spi_r) == (new_i.spi_i, new_i.spi_r)
    # Both old SAs are gone, their Child SAs were not deleted.
    assert old_i.state is State.DELETED and old_r.state is State.DELETED
    assert net.i.take(IkeSaDeleted)[0].rekeyed and net.r.take(IkeSaDeleted)[0].rekeyed
    assert net.i.take(ChildSaDeleted) == [] and net.r.take(ChildSaDeleted) == []
    # SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr), checked against the responder's
    # derivation from the shared secret it must have had.
    assert new_i._keys.sk_d == new_r._keys.sk_d  # type: ignore[union-attr]
    assert new_i._keys.sk_ei == new_r._keys.sk_ei  # type: ignore[union-attr]
    # The new IKE SA works: message IDs start again at 0, and a Child SA rekey runs on it.
    new_i.rekey_child(children[0], net.now)
    (req2,) = net.outgoing("i")
    assert decode_message(req2).message_id == 0
    net.deliver("i", req2)
    net.pump()
    assert len(net.i.take(ChildSaEstablished)) == 1 and len(net.i.take(ChildSaDeleted)) == 1


def test_rekeyed_skeyseed_formula() -> None:
    prf = Prf.for_id(5)
    seed = rekeyed_skeyseed(prf, b"d" * 32, b"g" * 32, b"i" * 32, b"r" * 32)
    assert seed == prf(b"d" * 32, b"g" * 32 + b"i" * 32 + b"r" * 32)
    net = Net.established()
    sa = net.i.sa
    assert sa._suite is not None and sa._keys is not None
    keys = derive_ike_keys(sa._suite, seed, b"i" * 32, b"r" * 32, b"1" * 8, b"2" * 8)
    assert keys.sk_d != sa._keys.sk_d


def test_responder_rekeys_the_ike_sa() -> None:
    net = Net.established()
    net.r.sa.rekey_ike(net.now)
    net.pump()
    (ev,) = net.r.take(IkeSaRekeyed)
    (iev,) = net.i.take(IkeSaRekeyed)
    assert ev.new_sa.initiator and not iev.new_sa.initiator  # the rekey initiator is "i" now
    assert ev.new_sa.spi_i == iev.new_sa.spi_i
    net.i.sa.check_liveness(net.now)
    assert net.pump() == 2


def _collide(i_nonces: list[bytes], r_nonces: list[bytes]) -> Net:
    net = Net.established(i_random=scripted(i_nonces), r_random=scripted(r_nonces))
    net.i.take(ChildSaEstablished)
    net.r.take(ChildSaEstablished)
    net.i.sa.rekey_ike(net.now)
    net.r.sa.rekey_ike(net.now)
    (ireq,), (rreq,) = net.outgoing("i"), net.outgoing("r")
    net.deliver("i", ireq)
    net.deliver("r", rreq)
    net.pump()
    net.timers(net.now + 1)
    return net


def _check_collision(net: Net, winner_initiated_by: str) -> None:
    (iev,), (rev,) = net.i.take(IkeSaRekeyed), net.r.take(IkeSaRekeyed)
    assert iev.redundant_sa is not None and rev.redundant_sa is not None
    assert (iev.new_sa.spi_i, iev.new_sa.spi_r) == (rev.new_sa.spi_i, rev.new_sa.spi_r)
    # new_sa.initiator is True on the side that initiated the winning exchange
    assert iev.new_sa.initiator == (winner_initiated_by == "i")
    assert iev.redundant_sa.state is State.DELETED and rev.redundant_sa.state is State.DELETED
    assert iev.new_sa.state is State.ESTABLISHED and rev.new_sa.state is State.ESTABLISHED
    assert len(iev.new_sa.child_sas) == 1 and len(rev.new_sa.child_sas) == 1
    live = [sa for side in (net.i, net.r) for sa in side.sas if sa.state is State.ESTABLISHED]
    assert len(live) == 2  # old and redundant ones are all gone
    assert all(e.rekeyed for e in net.i.take(IkeSaDeleted) + net.r.take(IkeSaDeleted))
    assert net.i.take(ChildSaDeleted) == [] and net.r.take(ChildSaDeleted) == []


def test_simultaneous_ike_rekey_initiator_nonce_lowest() -> None:
    n = [bytes([b]) * 32 for b in range(256)]
    net = _collide([n[0x90], n[0x05], n[0x50]], [n[0x91], n[0x30], n[0x40]])
    _check_collision(net, "r")  # i's exchange {05, 40} is redundant


def test_simultaneous_ike_rekey_responder_nonce_lowest() -> None:
    n = [bytes([b]) * 32 for b in range(256)]
    net = _collide([n[0x90], n[0x50], n[0x60]], [n[0x91], n[0x05], n[0x40]])
    _check_collision(net, "i")


def test_ike_rekey_refused_while_peer_deletes_it() -> None:
    net = Net.established()
    net.i.sa.rekey_ike(net.now)
    net.r.sa.delete(net.now)
    (ireq,), (rdel,) = net.outgoing("i"), net.outgoing("r")
    net.deliver("i", ireq)  # r is deleting: TEMPORARY_FAILURE
    (resp,) = net.outgoing("r")
    assert inner_of(net, "r", resp).notify(NotifyType.TEMPORARY_FAILURE) is not None
    net.deliver("r", rdel)  # i answers the delete and forgets its rekey
    net.deliver("r", resp)
    net.pump()
    assert net.i.sa.state is State.DELETED and net.r.sa.state is State.DELETED
    assert net.i.take(IkeSaRekeyed) == [] and len(net.i.take(ChildSaDeleted)) == 1
    assert len(net.r.take(ChildSaDeleted)) == 1


def test_child_rekey_refused_during_ike_rekey_then_retried() -> None:
    net = Net.established()
    (ic,) = net.i.take(ChildSaEstablished)
    net.i.sa.rekey_ike(net.now)
    (ireq,) = net.outgoing("i")
    net.r.sa.create_child(net.now)
    (rreq,) = net.outgoing("r")
    net.deliver("r", rreq)  # i has an IKE rekey in flight: TEMPORARY_FAILURE
    (resp,) = net.outgoing("i")
    assert inner_of(net, "i", resp).exchange == ExchangeType.CREATE_CHILD_SA
    assert inner_of(net, "i", resp).notify(NotifyType.TEMPORARY_FAILURE) is not None
    net.deliver("i", resp)
    net.deliver("i", ireq)
    net.pump()
    assert len(net.i.take(IkeSaRekeyed)) == 1
    assert len(net.i.sa.child_sas) == 1 and ic.inbound_spi in net.i.sa._children
