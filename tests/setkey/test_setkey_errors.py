"""Bad scripts: a SetkeyError naming file, line, column and token, and nothing returned."""

from __future__ import annotations

import pytest

from userspace_ipsec.setkey import SetkeyError, parse_script

GOOD = "add 192.0.2.1 198.51.100.1 esp 0x1000 -E aes-gcm-16 0x" + "11" * 20 + ";\n"
K128 = "0x" + "ab" * 16


def error_of(text: str, **kwargs: object) -> SetkeyError:
    with pytest.raises(SetkeyError) as info:
        parse_script(text, "bad.conf", **kwargs)  # type: ignore[arg-type]
    return info.value


@pytest.mark.parametrize(
    ("line3", "column", "token", "reason"),
    [
        ("frobnicate 1 2;", 1, "frobnicate", "unknown command"),
        ("add 192.0.2.1 198.51.100.1 esp-old 0x1000 -E aes-cbc " + K128 + ";", 28, "esp-old",
         "esp-old"),
        ("add 192.0.2.1 198.51.100.1 ah-old 0x1000 -A hmac-sha1 " + K128 + ";", 28, "ah-old",
         "ah-old"),
        ("add 192.0.2.1 198.51.100.1 ipcomp 0x1000 -C deflate;", 28, "ipcomp", "IPComp"),
        ("add 192.0.2.1 198.51.100.1 esp 0x1000 -C deflate;", 39, "-C", "-C"),
        ("add 192.0.2.1 198.51.100.1 esp 0x10 -E aes-cbc " + K128 + ";", 32, "0x10",
         "reserved"),
        ("add 192.0.2.1 198.51.100.1 esp 0x100000000 -E aes-cbc " + K128 + ";", 32,
         "0x100000000", "too big"),
        ("add 192.0.2.1 198.51.100.1 esp 0x1000 -E blowfish-cbc " + K128 + ";", 42,
         "blowfish-cbc", "not supported"),
        ("add 192.0.2.1 198.51.100.1 esp 0x1000 -E rot13 " + K128 + ";", 42, "rot13",
         "unknown algorithm"),
        ("add 192.0.2.1 198.51.100.1 esp 0x1000 -E aes-gcm-16 0x" + "11" * 20
         + " -A hmac-sha256 0x" + "22" * 32 + ";", 96, "-A", "AEAD"),
        ("add 192.0.2.1 198.51.100.1 esp 0x1000 -A hmac-sha1 0x" + "22" * 20 + ";", 39, "-A",
         "esp needs -E"),
        ("add 192.0.2.1 198.51.100.1 ah 0x1000 -E aes-cbc " + K128 + " -A hmac-md5 " + K128
         + ";", 38, "-E", "ah takes only -A"),
        ("add 192.0.2.1 198.51.100.1 esp 0x1000 -E null;", 39, "-E", "null encryption"),
        ("add 192.0.2.1 198.51.100.1 esp 0x1000 -E aes-cbc;", 49, ";", "needs a key"),
        ("add 192.0.2.1 198.51.100.1 esp 0x1000 -m sideways -E aes-cbc " + K128 + ";", 42,
         "sideways", "mode"),
        ("add 192.0.2.1 198.51.100.1 esp 0x1000 -f fancy-pad -E aes-cbc " + K128 + ";", 42,
         "fancy-pad", "-f takes"),
        ("add 192.0.2.1 2001:db8::1 esp 0x1000 -E aes-cbc " + K128 + ";", 15, "2001:db8::1",
         "families"),
        ("add 192.0.2.1 gateway.example esp 0x1000 -E aes-cbc " + K128 + ";", 15,
         "gateway.example", "numeric"),
        ("add 192.0.2.1/24 198.51.100.1 esp 0x1000 -E aes-cbc " + K128 + ";", 5,
         "192.0.2.1/24", "prefix length"),
        ("add 192.0.2.1[99999] 198.51.100.1 esp 0x1000 -E aes-cbc " + K128 + ";", 5,
         "192.0.2.1[99999]", "port"),
        ("add -4 2001:db8::1 2001:db8::2 esp 0x1000 -E aes-cbc " + K128 + ";", 8,
         "2001:db8::1", "IPv4"),
        ("deleteall 192.0.2.1 198.51.100.1;", 33, ";", "protocol"),
        ("deleteall 192.0.2.1[500] 198.51.100.1 esp;", 11, "192.0.2.1[500]", "port"),
        ("spdadd tagged \"foo\" -P out none;", 8, "tagged", "BSD"),
        ("spdadd 10.0.0.0/33 10.1.0.0/16 any -P out none;", 8, "10.0.0.0/33", "too long"),
        ("spdadd 10.0.0.0/8 10.1.0.0/16 bogus -P out none;", 31, "bogus", "upper layer"),
        ("spdadd 10.0.0.0/8 10.1.0.0/16 any out none;", 35, "out", "-P"),
        ("spdadd 10.0.0.0/8 10.1.0.0/16 any -P sideways none;", 38, "sideways", "direction"),
        ("spdadd 10.0.0.0/8 10.1.0.0/16 any -P out default;", 42, "default", "level"),
        ("spdadd 10.0.0.0/8 10.1.0.0/16 any -P out;", 38, "out", "action missing"),
        ("spdadd 10.0.0.0/8 10.1.0.0/16 any -P out ipsec;", 42, "ipsec", "request"),
        ("spdadd 10.0.0.0/8 10.1.0.0/16 any -P out none esp/transport//use;", 47,
         "esp/transport//use", "only allowed with the ipsec"),
        ("spdadd 10.0.0.0/8 10.1.0.0/16 any -P out ipsec esp/tunnel//require;", 48,
         "esp/tunnel//require", "tunnel mode needs"),
        ("spdadd 10.0.0.0/8 10.1.0.0/16 any -P out ipsec esp/transport//sometimes;", 48,
         "esp/transport//sometimes", "level"),
        ("spdadd 10.0.0.0/8 10.1.0.0/16 any -P out ipsec ipcomp/transport//use;", 48,
         "ipcomp/transport//use", "IPComp"),
        ("spdadd 10.0.0.0/8 10.1.0.0/16 any -P out ipsec esp/any//use;", 48,
         "esp/any//use", "transport or tunnel"),
        ("spdadd 10.0.0.0/8 10.1.0.0/16 any -P out ipsec esp/tunnel/1.2.3.4-2001:db8::1/use;",
         48, "esp/tunnel/1.2.3.4-2001:db8::1/use", "families"),
        ("spdadd 10.0.0.0/8 10.1.0.0/16 any -P in ipsec esp/transport/me-any/use;", 47,
         "esp/transport/me-any/use", "outbound"),
        ("spdadd 10.0.0.0/8 10.1.0.0/16 any -P out prio def 5 none;", 47, "def", "+ N"),
        ("spdadd 10.0.0.0/8 10.1.0.0/16 any -P out prio high - 1073741824 none;", 47, "high",
         "above"),
        ("spdadd 10.0.0.0/8 10.1.0.0/16 icmp 300,0 -P out none;", 36, "300,0", "ICMP"),
        ("spdadd 10.0.0.0/8 10.1.0.0/16 any -ctx 1 1 unquoted -P out none;", 44, "unquoted",
         "quoted"),
    ],
)
def test_error_points_at_line_column_token(
    line3: str, column: int, token: str, reason: str
) -> None:
    text = GOOD + "# the next statement is wrong\n" + line3 + "\n" + GOOD
    err = error_of(text)
    assert (err.filename, err.line, err.column, err.token) == ("bad.conf", 3, column, token)
    assert reason in err.reason
    assert str(err).startswith(f"bad.conf:{err.line}:{err.column}: ")


def test_missing_semicolon() -> None:
    err = error_of(GOOD + "flush\n" + GOOD)
    assert (err.line, err.column, err.token) == (3, 1, "add")
    assert "';'" in err.reason
    err = error_of(GOOD + "dump esp")
    assert (err.line, err.column, err.token) == (2, 9, "end of file")


def test_bad_key_length_names_line_and_hides_the_key() -> None:
    secret_hex = "0x" + "c0ffee" * 5  # 15 bytes: no AES key size
    err = error_of(GOOD + f"add 192.0.2.1 198.51.100.1 esp 0x1001\n   -E aes-cbc {secret_hex};")
    assert (err.line, err.column) == (3, 15)
    assert "aes-cbc takes a key of 128, 192, 256 bits, got 120" in err.reason
    assert "c0ffee" not in str(err) and err.token == "0x<30 hex digits>"


def test_key_in_the_wrong_place_is_hidden() -> None:
    err = error_of(f"add 192.0.2.1 198.51.100.1 esp 0x1001 -E {K128};")
    assert err.token == "0x<32 hex digits>" and "abab" not in str(err)


def test_bad_quoted_key_is_hidden_too() -> None:
    err = error_of('add 192.0.2.1 198.51.100.1 ah 0x1001 -A hmac-sha256 "too short";')
    assert "too short" not in str(err) and err.token == '"<9 characters>"'
    assert "256" in err.reason


def test_bad_hex_digits_in_key() -> None:
    err = error_of(f"add 192.0.2.1 198.51.100.1 esp 0x1001 -E aes-cbc 0x{'zz' * 16};")
    assert "hexadecimal" in err.reason and "zz" not in str(err)


def test_unterminated_quote_reports_where_it_opens() -> None:
    err = error_of(GOOD + 'add 192.0.2.1 198.51.100.1 ah 0x1001 -A hmac-sha1 "abc\n\n')
    assert (err.line, err.column, err.token) == (2, 51, '"')
    assert "unterminated" in err.reason


def test_error_after_a_multiline_quoted_string_counts_its_lines() -> None:
    err = error_of('add 192.0.2.1 198.51.100.1 esp 0x1001 -ctx 1 1 "a\nb\nc" -E bogus 0x00;')
    assert (err.line, err.token) == (3, "bogus")


def test_nothing_partial_on_error_in_the_last_statement() -> None:
    # Twenty good statements, then a bad one: the caller gets an exception, no commands.
    text = GOOD * 20 + "spdadd 10.0.0.0/8 10.1.0.0/16 any -P out ipsec esp/tunnel//require;"
    with pytest.raises(SetkeyError) as info:
        result = parse_script(text)
        raise AssertionError(f"returned {len(result)} commands")  # pragma: no cover
    assert info.value.line == 21


def test_resolver_failures_are_setkey_errors() -> None:
    def broken(name: str) -> list:  # type: ignore[type-arg]
        raise OSError("no DNS here")

    err = error_of(f"add a.example b.example esp 0x1000 -E aes-cbc {K128};", resolve=broken)
    assert "cannot resolve" in err.reason and err.token == "a.example"
    err = error_of(f"add a.example b.example esp 0x1000 -E aes-cbc {K128};", resolve=lambda n: [])
    assert "no address" in err.reason


def test_multiple_addresses_refused_for_get_and_spd() -> None:
    from ipaddress import ip_address

    def two(name: str) -> list:  # type: ignore[type-arg]
        return [ip_address("192.0.2.1"), ip_address("192.0.2.2")]

    err = error_of("get a.example 198.51.100.1 esp 0x1000;", resolve=two)
    assert "multiple" in err.reason
    err = error_of("spdadd a.example 198.51.100.1 any -P out none;", resolve=two)
    assert "multiple" in err.reason
