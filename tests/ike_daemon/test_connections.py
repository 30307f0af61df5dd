"""Parsing of connections, identities, selectors and secrets: values and located errors."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from ike.connections import format_identity, load, loads, parse_identity, parse_ts
from ike.constants import IdType
from tests.ike_daemon.gateways import config_text
from userspace_ipsec.config import ConfigError

BASE = config_text("192.0.2.1", "198.51.100.7", local_ts='"10.1.0.0/16"',
                   remote_ts='"10.2.0.0/16"')


@pytest.mark.parametrize(("text", "kind", "data"), [
    ("192.0.2.1", IdType.IPV4_ADDR, ipaddress.ip_address("192.0.2.1").packed),
    ("2001:db8::1", IdType.IPV6_ADDR, ipaddress.ip_address("2001:db8::1").packed),
    ("gw.example.org", IdType.FQDN, b"gw.example.org"),
    ("@gw.example.org", IdType.FQDN, b"gw.example.org"),
    ("alice@example.org", IdType.RFC822_ADDR, b"alice@example.org"),
    ("keyid:tunnel-7", IdType.KEY_ID, b"tunnel-7"),
    ("@#0a0b", IdType.KEY_ID, b"\x0a\x0b"),
    ("email:x@y", IdType.RFC822_ADDR, b"x@y"),
])
def test_identities(text: str, kind: IdType, data: bytes) -> None:
    assert parse_identity(text) == (kind, data)


def test_identity_round_trip_and_refusals() -> None:
    for text in ("192.0.2.1", "2001:db8::1", "alice@example.org", "@#0a0b", "gw.example"):
        assert format_identity(parse_identity(text)) == text
    for bad in ("", "two words", "ipv4:2001:db8::1"):
        with pytest.raises(ValueError):
            parse_identity(bad)


def test_traffic_selectors() -> None:
    ts = parse_ts("10.2.0.0/16[tcp/443]")
    assert (str(ts.start_addr), str(ts.end_addr), ts.ip_protocol, ts.start_port,
            ts.end_port) == ("10.2.0.0", "10.2.255.255", 6, 443, 443)
    ts = parse_ts("10.0.0.1-10.0.0.9[udp/1000-1010]")
    assert (str(ts.end_addr), ts.ip_protocol, ts.start_port, ts.end_port) == \
        ("10.0.0.9", 17, 1000, 1010)
    assert str(parse_ts("dynamic", "192.0.2.1").end_addr) == "192.0.2.1"
    for bad in ("10.0.0.0/33", "10.0.0.9-10.0.0.1", "10.0.0.0/8[nosuchproto]",
                "10.0.0.0/8[gre/80]", "dynamic"):
        with pytest.raises(ValueError):
            parse_ts(bad)


def test_connection_values() -> None:
    _, conns = loads(BASE.replace('proposals = ["aes256gcm16-prfsha256-x25519"]',
                                  'proposals = ["aes256gcm16-prfsha256-x25519"]\n'
                                  'local_id = "gw1.example"\nremote_id = "bob@example"\n'
                                  'dpd_delay = 30\nencap = true'))
    conn = conns.connections["site"]
    assert conn.local_id == (IdType.FQDN, b"gw1.example")
    assert conn.remote_id == (IdType.RFC822_ADDR, b"bob@example")
    assert conn.psk == bytes.fromhex("5e" * 32) and "5e5e" not in repr(conn)
    assert conn.encap and conn.dpd_delay == 30 and conn.remote_port == 15500
    child = conn.children["net"]
    assert child.mode == "tunnel" and child.rekey_time == 3600
    assert child.life_time == pytest.approx(3960) and child.jitter == pytest.approx(360)
    assert conns.settings.listen == ("192.0.2.1",)


def _line_of(text: str, needle: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize(("old", "new", "reason"), [
    ('remote_port = 15500', 'remote_port = 0', "remote_port must be within 1..65535"),
    ('local_ts = ["10.1.0.0/16"]', 'local_ts = ["10.1.0.0/40"]', "local_ts"),
    ('proposals = ["aes256gcm16-prfsha256-x25519"]', 'proposals = ["aes256-md5-modp1024"]',
     "md5"),
    ('esp_proposals = ["aes128gcm16", "aes256-sha256"]',
     'esp_proposals = ["aes128gcm16"]\nstart_action = "sometimes"', "start_action"),
    ('local_addrs = ["192.0.2.1"]', 'local_addrs = ["192.0.2.1"]\nlocal_id = "a b"',
     "local_id"),
    ('remote_port = 15500', 'remote_port = 15500\ncolour = "blue"', "unknown setting"),
])
def test_errors_name_the_line(old: str, new: str, reason: str) -> None:
    text = BASE.replace(old, new)
    assert text != BASE
    with pytest.raises(ConfigError) as info:
        loads(text, "conf.toml")
    needle = new.splitlines()[-1]
    assert info.value.line == _line_of(text, needle), str(info.value)
    assert reason in info.value.reason and str(info.value).startswith("conf.toml:")


def test_missing_secret_is_refused() -> None:
    text = BASE.replace('[secrets.psk.site]\nsecret = "0x' + "5e" * 32 + '"', "")
    with pytest.raises(ConfigError, match="no pre-shared key"):
        loads(text, "conf.toml")


def test_secrets_in_a_readable_file_are_refused(tmp_path: Path) -> None:
    conf = tmp_path / "uipsec.toml"
    conf.write_text(BASE)
    os.chmod(conf, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load(conf)
    os.chmod(conf, 0o600)
    load(conf)


def test_secrets_file(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets.toml"
    secrets.write_text('[secrets.psk.site]\nid = ["192.0.2.1"]\nsecret = "correct horse"\n')
    conf = tmp_path / "uipsec.toml"
    text = BASE.split("[secrets.psk.site]")[0] + '[secrets]\nfile = "secrets.toml"\n'
    conf.write_text(text)
    os.chmod(conf, 0o644)  # no secret inside: may be world-readable
    os.chmod(secrets, 0o640)
    with pytest.raises(ConfigError, match="secrets file mode is 0640"):
        load(conf)
    os.chmod(secrets, 0o600)
    _, conns = load(conf)
    assert conns.connections["site"].psk == b"correct horse"
    (tmp_path / "secrets.toml").unlink()
    with pytest.raises(ConfigError) as info:
        load(conf)
    assert info.value.line == _line_of(text, "file = ")
