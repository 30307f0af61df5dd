"""SPD: order, matching, the flow cache and its invalidation."""

from __future__ import annotations

import pytest

from tests.core.helpers import A
from userspace_ipsec.pfkey.constants import PolicyDir, PolicyType
from userspace_ipsec.sa import Policy, Selector
from userspace_ipsec.spd import SPD

OUT, IN, FWD = PolicyDir.OUTBOUND, PolicyDir.INBOUND, PolicyDir.FWD
TCP, UDP, ICMP, GRE = 6, 17, 1, 47


def sel(src: str, dst: str, proto: int = 0, sport: int = 0, dport: int = 0) -> Selector:
    s, s_len = src.split("/")
    d, d_len = dst.split("/")
    return Selector.build(A(s), int(s_len), A(d), int(d_len), proto, sport, dport)


def pol(src: str, dst: str, direction: PolicyDir = OUT, priority: int = 0,
        action: PolicyType = PolicyType.IPSEC, **kw: int) -> Policy:
    return Policy(sel(src, dst, **kw), direction, action, priority)


def look(spd: SPD, src: str, dst: str, proto: int = TCP, sport: int = 1000, dport: int = 80,
         direction: PolicyDir = OUT) -> Policy | None:
    return spd.lookup(direction, A(src), A(dst), proto, sport, dport)


def test_first_match_by_priority_then_insertion() -> None:
    spd = SPD()
    broad = spd.insert(pol("10.0.0.0/8", "0.0.0.0/0", priority=100))
    narrow = spd.insert(pol("10.1.0.0/16", "0.0.0.0/0", priority=100))
    assert look(spd, "10.1.2.3", "1.2.3.4") is broad  # same priority: older first
    urgent = spd.insert(pol("10.1.2.0/24", "0.0.0.0/0", priority=5))
    assert look(spd, "10.1.2.3", "1.2.3.4") is urgent  # lower value wins
    assert look(spd, "10.1.9.9", "1.2.3.4") is broad
    spd.remove(broad)
    assert look(spd, "10.1.9.9", "1.2.3.4") is narrow
    assert look(spd, "11.0.0.1", "1.2.3.4") is None


def test_directions_are_separate() -> None:
    spd = SPD()
    out = spd.insert(pol("10.0.0.0/8", "10.0.0.0/8", OUT))
    fwd = spd.insert(pol("10.0.0.0/8", "10.0.0.0/8", FWD))
    assert look(spd, "10.0.0.1", "10.0.0.2") is out
    assert look(spd, "10.0.0.1", "10.0.0.2", direction=FWD) is fwd
    assert look(spd, "10.0.0.1", "10.0.0.2", direction=IN) is None


def test_ipv6_and_family_mismatch() -> None:
    spd = SPD()
    v6 = spd.insert(pol("2001:db8::/32", "::/0"))
    v4 = spd.insert(pol("0.0.0.0/0", "0.0.0.0/0"))
    assert look(spd, "2001:db8::1", "2001:db9::1") is v6
    assert look(spd, "2001:db9::1", "2001:db8::1") is None  # ::/0 dst but src outside
    assert look(spd, "192.0.2.1", "198.51.100.1") is v4
    # An IPv4-mapped address is not an IPv4 packet.
    assert look(spd, "::ffff:192.0.2.1", "::ffff:198.51.100.1") is None


def test_protocol_and_ports() -> None:
    spd = SPD()
    web = spd.insert(pol("0.0.0.0/0", "0.0.0.0/0", proto=TCP, dport=443))
    udp = spd.insert(pol("0.0.0.0/0", "0.0.0.0/0", proto=UDP))
    ping = spd.insert(pol("0.0.0.0/0", "0.0.0.0/0", proto=ICMP, sport=8))  # echo request
    any_port_22 = spd.insert(pol("0.0.0.0/0", "0.0.0.0/0", dport=22))
    assert look(spd, "1.1.1.1", "2.2.2.2", TCP, 5555, 443) is web
    assert look(spd, "1.1.1.1", "2.2.2.2", TCP, 5555, 444) is None
    assert look(spd, "1.1.1.1", "2.2.2.2", UDP, 5555, 443) is udp
    assert look(spd, "1.1.1.1", "2.2.2.2", ICMP, 8, 0) is ping
    assert look(spd, "1.1.1.1", "2.2.2.2", ICMP, 0, 0) is None
    assert look(spd, "1.1.1.1", "2.2.2.2", TCP, 1, 22) is any_port_22
    # GRE has no ports: whatever the caller passes is ignored and port selectors never match.
    assert look(spd, "1.1.1.1", "2.2.2.2", GRE, 1, 22) is None


def test_cache_remembers_answers_including_no_policy() -> None:
    spd = SPD()
    p = spd.insert(pol("10.0.0.0/8", "0.0.0.0/0"))
    assert look(spd, "10.0.0.1", "1.1.1.1") is p
    assert look(spd, "11.0.0.1", "1.1.1.1") is None
    misses = spd.cache_misses
    for _ in range(5):
        assert look(spd, "10.0.0.1", "1.1.1.1") is p
        assert look(spd, "11.0.0.1", "1.1.1.1") is None
    assert spd.cache_misses == misses and spd.cached_flows == 2
    # Ports of a protocol without ports do not split the cache.
    spd.lookup(OUT, A("12.0.0.1"), A("1.1.1.1"), GRE, 1, 2)
    spd.lookup(OUT, A("12.0.0.1"), A("1.1.1.1"), GRE, 3, 4)
    assert spd.cache_misses == misses + 1


@pytest.mark.parametrize("change", ["insert", "update", "remove", "flush"])
def test_every_change_invalidates_the_cache(change: str) -> None:
    spd = SPD()
    old = spd.insert(pol("10.0.0.0/8", "0.0.0.0/0", priority=10))
    assert look(spd, "10.0.0.1", "1.1.1.1") is old
    assert look(spd, "11.0.0.1", "1.1.1.1") is None
    generation = spd.generation
    if change == "insert":
        new = spd.insert(pol("0.0.0.0/0", "0.0.0.0/0", priority=1))
        expect_10, expect_11 = new, new
    elif change == "update":
        new = pol("10.0.0.0/8", "0.0.0.0/0", priority=10, action=PolicyType.DISCARD)
        assert spd.update(new) is old
        assert new.id == old.id
        expect_10, expect_11 = new, None
    elif change == "remove":
        spd.remove(old)
        expect_10, expect_11 = None, None
    else:
        assert spd.flush() == [old]
        expect_10, expect_11 = None, None
    assert spd.generation > generation
    assert spd.cached_flows == 0
    assert look(spd, "10.0.0.1", "1.1.1.1") is expect_10
    assert look(spd, "11.0.0.1", "1.1.1.1") is expect_11


def test_cache_is_bounded() -> None:
    spd = SPD(cache_size=16)
    p = spd.insert(pol("0.0.0.0/0", "0.0.0.0/0"))
    for i in range(100):
        assert spd.lookup(OUT, A(f"10.0.0.{i}"), A("1.1.1.1"), TCP, 1, 2) is p
        assert spd.cached_flows <= 16
    assert spd.cache_flushes >= 5


def test_ids_unique_stable_and_lookups_by_id_and_selector() -> None:
    spd = SPD()
    policies = [spd.insert(pol(f"10.{i}.0.0/16", "0.0.0.0/0", d))
                for i in range(10) for d in (IN, OUT, FWD)]
    ids = [p.id for p in policies]
    assert len(set(ids)) == 30 and 0 not in ids
    assert all(spd.get(p.id) is p for p in policies)
    assert spd.find(sel("10.3.0.0/16", "0.0.0.0/0"), FWD) is policies[11]
    assert spd.find(sel("10.3.0.0/16", "0.0.0.0/0"), OUT) is policies[10]
    # Host bits beyond the prefix do not make a different selector.
    assert spd.find(sel("10.3.1.1/16", "0.0.0.0/0"), OUT) is policies[10]
    with pytest.raises(KeyError):
        spd.insert(pol("10.3.0.0/16", "0.0.0.0/0", OUT))
    spd.remove(policies[0])
    fresh = spd.insert(pol("10.0.0.0/16", "0.0.0.0/0", IN))
    assert fresh.id not in ids
    assert spd.get(policies[0].id) is None
    assert len(spd) == 30 and len(spd.snapshot()) == 30


def test_changes_are_recorded_and_a_flush_resets_them() -> None:
    spd = SPD()
    cursor = spd.changes.cursor
    first = spd.insert(pol("10.0.0.0/24", "10.1.0.0/24"))
    second = spd.insert(pol("10.0.0.0/24", "10.2.0.0/24"))
    spd.remove(first)
    assert spd.changes.since(cursor) == [first, second, first]
    assert first not in spd and second in spd and list(spd) == [second]
    spd.flush()
    assert spd.changes.since(cursor) is None


def test_removal_keeps_priority_order_among_equal_and_unequal_priorities() -> None:
    spd = SPD()
    policies = [spd.insert(pol("10.0.0.0/8", f"10.{i}.0.0/16", priority=i % 3))
                for i in range(12)]
    for victim in policies[::4]:
        spd.remove(victim)
    remaining = [p for p in policies if p not in policies[::4]]
    expected = sorted(remaining, key=lambda p: (p.priority, policies.index(p)))
    assert list(spd) == expected
