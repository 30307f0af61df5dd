"""SAD: indexes, best outbound SA, SPI allocation."""

from __future__ import annotations

import random

import pytest

from tests.core.helpers import A
from userspace_ipsec.pfkey.constants import IPPROTO_ESP, IpsecLevel, IpsecMode, SaState, SaType
from userspace_ipsec.pfkey.messages import IpsecRequest
from userspace_ipsec.sa import SecurityAssociation
from userspace_ipsec.sad import SAD, SpiExhausted


def make(spi: int, *, src: str = "10.0.0.1", dst: str = "10.0.0.2",
         mode: IpsecMode = IpsecMode.TUNNEL, reqid: int = 0, t: float = 0.0,
         state: SaState = SaState.MATURE) -> SecurityAssociation:
    return SecurityAssociation(spi, SaType.ESP, A(src), A(dst), mode, reqid, state, add_time=t)


def test_get_by_dst_proto_spi() -> None:
    sad = SAD()
    sa = make(0x1000)
    sad.add(sa)
    assert sad.get(A("10.0.0.2"), SaType.ESP, 0x1000) is sa
    assert sad.get(A("10.0.0.2"), SaType.AH, 0x1000) is None
    assert sad.get(A("10.0.0.3"), SaType.ESP, 0x1000) is None
    assert sa in sad and len(sad) == 1


def test_same_spi_other_dst_is_allowed_same_dst_is_not() -> None:
    sad = SAD()
    sad.add(make(0x1000))
    sad.add(make(0x1000, dst="10.0.0.3"))
    with pytest.raises(KeyError):
        sad.add(make(0x1000))
    assert len(sad) == 2


def test_best_is_newest_mature_then_dying() -> None:
    sad = SAD()
    old, new = make(0x1000, t=1), make(0x1001, t=2)
    sad.add(old)
    sad.add(new)
    best = sad.best_by_endpoints(A("10.0.0.1"), A("10.0.0.2"), SaType.ESP, IpsecMode.TUNNEL)
    assert best is new
    sad.set_state(new, SaState.DYING)
    assert sad.best_by_endpoints(A("10.0.0.1"), A("10.0.0.2"), SaType.ESP,
                                 IpsecMode.TUNNEL) is old
    sad.set_state(old, SaState.DYING)
    assert sad.best_by_endpoints(A("10.0.0.1"), A("10.0.0.2"), SaType.ESP,
                                 IpsecMode.TUNNEL) is new
    sad.remove(new)
    assert sad.best_by_endpoints(A("10.0.0.1"), A("10.0.0.2"), SaType.ESP,
                                 IpsecMode.TUNNEL) is old
    sad.remove(old)
    assert sad.best_by_endpoints(A("10.0.0.1"), A("10.0.0.2"), SaType.ESP,
                                 IpsecMode.TUNNEL) is None


def test_larval_is_never_chosen_for_output() -> None:
    sad = SAD()
    sad.add(make(0x1000, state=SaState.LARVAL))
    assert sad.best_by_endpoints(A("10.0.0.1"), A("10.0.0.2"), SaType.ESP,
                                 IpsecMode.TUNNEL) is None


def test_mode_any_sa_serves_any_mode_and_exact_mode_is_separate() -> None:
    sad = SAD()
    wild = make(0x1000, mode=IpsecMode.ANY, t=5)
    sad.add(wild)
    sad.add(make(0x1001, mode=IpsecMode.TRANSPORT, t=9))
    src, dst = A("10.0.0.1"), A("10.0.0.2")
    assert sad.best_by_endpoints(src, dst, SaType.ESP, IpsecMode.TUNNEL) is wild
    exact = sad.best_by_endpoints(src, dst, SaType.ESP, IpsecMode.TRANSPORT)
    assert exact is not None and exact.spi == 0x1001  # newer than the "any" one
    newer_wild = make(0x1002, mode=IpsecMode.ANY, t=12)
    sad.add(newer_wild)
    assert sad.best_by_endpoints(src, dst, SaType.ESP, IpsecMode.TRANSPORT) is newer_wild


def test_reqid_index() -> None:
    sad = SAD()
    a, b = make(0x1000, reqid=7, t=1), make(0x1001, reqid=8, t=2)
    sad.add(a)
    sad.add(b)
    src, dst = A("10.0.0.1"), A("10.0.0.2")
    assert sad.best_by_reqid(src, dst, SaType.ESP, 7) is a
    assert sad.best_by_reqid(src, dst, SaType.ESP, 8) is b
    assert sad.best_by_reqid(dst, src, SaType.ESP, 7) is None
    sad.remove(a)
    assert sad.best_by_reqid(src, dst, SaType.ESP, 7) is None


def test_remove_and_clear_keep_indexes_consistent() -> None:
    sad = SAD()
    sas = [make(0x1000 + i, reqid=i % 3, t=i) for i in range(30)]
    for sa in sas:
        sad.add(sa)
    for sa in sas[::2]:
        sad.remove(sa)
        assert sa.state == SaState.DEAD
    assert len(sad) == 15
    src, dst = A("10.0.0.1"), A("10.0.0.2")
    assert sad.best_by_endpoints(src, dst, SaType.ESP, IpsecMode.TUNNEL) is sas[29]
    assert sad.best_by_reqid(src, dst, SaType.ESP, 1) is sas[25]
    generation = sad.generation
    removed = sad.clear()
    assert len(removed) == 15 and len(sad) == 0 and sad.generation > generation
    assert sad.best_by_endpoints(src, dst, SaType.ESP, IpsecMode.TUNNEL) is None
    assert sad.best_by_reqid(src, dst, SaType.ESP, 2) is None
    with pytest.raises(KeyError):
        sad.remove(sas[1])


def test_allocate_spi_avoids_reserved_and_used() -> None:
    sad = SAD()
    rng = random.Random(1)
    dst = A("10.0.0.2")
    seen = set()
    for _ in range(200):
        spi = sad.allocate_spi(dst, SaType.ESP, 0, 511, rng)
        assert 256 <= spi <= 511 and spi not in seen
        seen.add(spi)
        sad.add(make(spi))
    # 256 values, 200 used: the rest are still found, then the range is exhausted.
    for _ in range(56):
        sad.add(make(sad.allocate_spi(dst, SaType.ESP, 0, 511, rng)))
    with pytest.raises(SpiExhausted) as info:
        sad.allocate_spi(dst, SaType.ESP, 0, 511, rng)
    assert not info.value.single
    # Another destination or protocol has its own SPI space.
    assert 256 <= sad.allocate_spi(A("10.0.0.9"), SaType.ESP, 256, 511, rng) <= 511
    assert 256 <= sad.allocate_spi(dst, SaType.AH, 256, 511, rng) <= 511


def test_allocate_single_spi() -> None:
    sad = SAD()
    rng = random.Random(1)
    assert sad.allocate_spi(A("10.0.0.2"), SaType.ESP, 0x1234, 0x1234, rng) == 0x1234
    sad.add(make(0x1234))
    with pytest.raises(SpiExhausted) as info:
        sad.allocate_spi(A("10.0.0.2"), SaType.ESP, 0x1234, 0x1234, rng)
    assert info.value.single


def test_allocate_reserved_only_range_is_refused() -> None:
    with pytest.raises(ValueError):
        SAD().allocate_spi(A("10.0.0.2"), SaType.ESP, 1, 255, random.Random(1))


def test_generations_tell_datapath_caches_to_look_again() -> None:
    sad = SAD()
    sa = make(0x1000)
    g0 = sad.generation
    sad.add(sa)
    g1, sa_g1 = sad.generation, sa.generation
    assert g1 > g0
    sad.set_state(sa, SaState.DYING)
    assert sad.generation > g1 and sa.generation > sa_g1
    g2, sa_g2 = sad.generation, sa.generation
    sad.remove(sa)
    assert sad.generation > g2 and sa.generation > sa_g2 and sa.state == SaState.DEAD


def test_for_request_follows_the_template() -> None:
    sad = SAD()
    tunnel_sa = SecurityAssociation(0x1000, SaType.ESP, A("192.0.2.1"), A("192.0.2.2"),
                                    IpsecMode.TUNNEL, 0)
    unique_sa = SecurityAssociation(0x1001, SaType.ESP, A("192.0.2.1"), A("192.0.2.2"),
                                    IpsecMode.TUNNEL, 77)
    transport_sa = SecurityAssociation(0x1002, SaType.ESP, A("10.0.0.1"), A("10.0.0.2"),
                                       IpsecMode.TRANSPORT, 0)
    for sa in (unique_sa, tunnel_sa, transport_sa):  # tunnel_sa is the newest
        sad.add(sa)
    tunnel = IpsecRequest(IPPROTO_ESP, IpsecMode.TUNNEL, IpsecLevel.REQUIRE, 0,
                          A("192.0.2.1"), A("192.0.2.2"))
    assert sad.for_request(tunnel, A("10.9.0.1"), A("10.8.0.1")) is tunnel_sa
    unique = IpsecRequest(IPPROTO_ESP, IpsecMode.TUNNEL, IpsecLevel.UNIQUE, 77,
                          A("192.0.2.1"), A("192.0.2.2"))
    assert sad.for_request(unique, A("10.9.0.1"), A("10.8.0.1")) is unique_sa
    transport = IpsecRequest(IPPROTO_ESP, IpsecMode.TRANSPORT, IpsecLevel.REQUIRE)
    assert sad.for_request(transport, A("10.0.0.1"), A("10.0.0.2")) is transport_sa
    assert sad.for_request(transport, A("10.0.0.2"), A("10.0.0.1")) is None
