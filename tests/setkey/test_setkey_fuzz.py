"""Whatever the text, parse_script returns commands or raises SetkeyError, nothing else."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from userspace_ipsec.setkey import SetkeyError, parse_script

VALID = (
    "add 192.0.2.1[4500] 198.51.100.1 esp-udp 0x1000 -m tunnel -u 3 -r 64 -lh 60\n"
    "  -E aes-cbc 0x00112233445566778899aabbccddeeff\n"
    "  -A hmac-sha256 \"0123456789abcdef0123456789abcdef\";\n"
    "spdadd 2001:db8:1::/48[any] 2001:db8::/32 icmp6 135,0 -ctx 1 1 \"x\"\n"
    "  -P in prio def + 10 ipsec esp/tunnel/192.0.2.1[4500]-198.51.100.1/unique:5\n"
    "  ah/transport//use;\n"
    "deleteall 192.0.2.1 198.51.100.1 esp; getspi 192.0.2.1 198.51.100.1 esp 0; flush esp;\n"
)

WORDS = [
    "add", "update", "get", "getspi", "delete", "deleteall", "flush", "dump", "spdadd",
    "spdupdate", "spddelete", "spdflush", "spddump", "exit", "esp", "ah", "esp-udp", "esp-old",
    "ipcomp", "tcp", "any", "icmp", "icmp6", "gre", "-m", "-r", "-u", "-f", "-lh", "-ls", "-bh",
    "-bs", "-E", "-A", "-C", "-P", "-ctx", "-4", "-6", "-n", "in", "out", "fwd", "prio",
    "priority", "def", "low", "high", "+", "-", "ipsec", "none", "discard", "bypass", "entrust",
    "aes-cbc", "aes-gcm-16", "hmac-sha256", "null", "3des-cbc", "tunnel", "transport",
    "192.0.2.1", "198.51.100.1/24", "2001:db8::1[500]", "10.0.0.0/33", "1.2.3.4[any]", "0x1000",
    "0", "4294967296", "0x" + "ab" * 16, "0x" + "1" * 41, "\"key\"", "\"0123456789abcdef\"",
    "esp/tunnel/192.0.2.1-198.51.100.1/require", "esp/transport//unique:9", "ah/tunnel/-/",
    "esp/transport/me-any/use", "135,0", "1.2.3.4", ";", "#", "\n", "[", "]", "/", "\"",
    "random-pad", "zero-pad", "²", "٣", "\x00",
]


def check(text: str) -> None:
    try:
        commands = parse_script(text, "fuzz")
    except SetkeyError as exc:
        assert exc.line >= 1 and exc.column >= 1 and exc.filename == "fuzz"
        assert str(exc)
    else:
        assert all(cmd.messages for cmd in commands)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text(text: str) -> None:
    check(text)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(WORDS), max_size=40))
def test_token_soup(words: list[str]) -> None:
    check(" ".join(words))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, len(VALID)), st.integers(0, 3), st.text(max_size=4)),
        max_size=4,
    )
)
def test_mutated_valid_script(edits: list[tuple[int, int, str]]) -> None:
    text = VALID
    for at, cut, insert in edits:
        text = text[:at] + insert + text[at + cut :]
    check(text)


def test_the_unmutated_script_is_valid() -> None:
    assert len(parse_script(VALID)) == 5
