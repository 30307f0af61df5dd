"""setkey(8) scripts to PF_KEY messages (ipsec-tools' parse.y, checked before anything is sent).

``parse_script`` reads the whole script first; any error raises ``SetkeyError`` and nothing of
the script is returned, so nothing is applied. It is pure: host names go through the optional
``resolve`` callback (without one, only numeric addresses are accepted), and no clock or socket is
touched. Deliberate differences from setkey are listed in docs comments where they occur and in
``__init__``'s docstring.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import ip_address

from ..algorithms import (
    AUTH_NONE,
    AlgKind,
    Algorithm,
    check_key,
    encryption_by_name,
    integrity_by_name,
)
from ..pfkey.constants import (
    IPSEC_PROTO_ANY,
    ExtType,
    IpsecLevel,
    IpsecMode,
    MsgType,
    NatTType,
    PolicyDir,
    SaState,
    SaType,
)
from ..pfkey.messages import (
    AddressExt,
    Extension,
    IPAddress,
    KeyExt,
    LifetimeExt,
    Message,
    NatTPortExt,
    NatTTypeExt,
    PolicyExt,
    SA2Ext,
    SAExt,
    SecCtxExt,
    SpiRangeExt,
    UipsecExt,
)
from .commands import Command, CommandKind, SaSelector
from .errors import SetkeyError
from .lexer import Cursor, Token, TokenKind, tokenize
from .names import IPPROTO_GRE, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_MH, PROTOCOL_NUMBERS
from .policy import parse_policy

Resolver = Callable[[str], Sequence[IPAddress]]

NATT_DEFAULT_PORT = 4500  # setkey's DEFAULT_NATT_PORT when esp-udp addresses carry no [port]
SPI_MIN = 256  # SPIs 0..255 are reserved by IANA (RFC 4303 section 2.1)
GETSPI_DEFAULT_RANGE = (SPI_MIN, 0xFFFFFFFF)
SA_REPLAY_MAX = 255  # sadb_sa_replay is 8 bits; larger windows go in the private extension
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF

_SA_KINDS = {
    "add": CommandKind.ADD,
    "update": CommandKind.UPDATE,
    "getspi": CommandKind.GETSPI,
    "get": CommandKind.GET,
    "delete": CommandKind.DELETE,
}
_SPD_KINDS = {
    "spdadd": CommandKind.SPDADD,
    "spdupdate": CommandKind.SPDUPDATE,
    "spddelete": CommandKind.SPDDELETE,
}
_MSG_TYPES = {
    CommandKind.ADD: MsgType.ADD,
    CommandKind.UPDATE: MsgType.UPDATE,
    CommandKind.GETSPI: MsgType.GETSPI,
    CommandKind.GET: MsgType.GET,
    CommandKind.DELETE: MsgType.DELETE,
    CommandKind.SPDADD: MsgType.X_SPDADD,
    CommandKind.SPDUPDATE: MsgType.X_SPDUPDATE,
    CommandKind.SPDDELETE: MsgType.X_SPDDELETE,
}
_MODES = {"transport": IpsecMode.TRANSPORT, "tunnel": IpsecMode.TUNNEL, "any": IpsecMode.ANY}
_PAD_OPTIONS = ("zero-pad", "random-pad", "seq-pad", "nocyclic-seq")
_EXIT_WORDS = ("exit", "quit", "bye")
_MISC_SPEC_PROTOCOLS = (IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_MH, IPPROTO_GRE)

# Names setkey knows that this stack does not implement: refused with a clear reason.
_UNSUPPORTED_ENCRYPTION = (
    "blowfish-cbc", "cast128-cbc", "des-deriv", "des-32iv", "twofish-cbc", "camellia-cbc",
    "simple", "rc5-cbc", "aes-gmac",
)
_UNSUPPORTED_INTEGRITY = (
    "keyed-md5", "keyed-sha1", "hmac-ripemd160", "aes-xcbc-mac", "tcp-md5",
)
_REFUSED_PROTOCOLS = {
    "esp-old": "esp-old (RFC 1827) is not supported: use esp",
    "ah-old": "ah-old (RFC 1826) is not supported: use ah",
    "ipcomp": "IPComp is not supported by userspace-ipsec",
    "tcp": "TCP-MD5 (RFC 2385) SAs are not supported by userspace-ipsec",
}
_PROTOCOLS = {"esp": SaType.ESP, "ah": SaType.AH, "esp-udp": SaType.ESP}
_HEX_KEY_RE = re.compile(r"0[xX]([0-9A-Fa-f]+)")
_NUMBER_RE = re.compile(r"[0-9]{1,20}|0[xX][0-9A-Fa-f]{1,16}")
_ADDRESS_RE = re.compile(r"([^/\[\]]+)(?:/([^/\[\]]*))?(?:\[([^\[\]]*)\])?")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})")


def parse_script(
    text: str,
    filename: str = "<stdin>",
    *,
    rfc_mode: bool = True,
    resolve: Resolver | None = None,
) -> list[Command]:
    """Parse a whole setkey script into commands, or raise ``SetkeyError`` (nothing partial).

    ``rfc_mode`` is setkey's default ``-r``: every ``in`` policy added, updated or deleted gets a
    twin ``fwd`` policy (setkey ``-k`` turns it off). ``resolve`` maps a host name to addresses;
    without it only numeric addresses are accepted. Parsing stops at ``exit``/``quit``/``bye``.
    """
    return _Parser(text, filename, rfc_mode, resolve).script()


@dataclass(slots=True)
class _Endpoint:
    addresses: list[IPAddress]
    prefixlen: int | None
    port: int
    token: Token


@dataclass(slots=True)
class _SaOptions:
    mode: IpsecMode = IpsecMode.ANY
    mode_token: Token | None = None
    replay: int = 0
    reqid: int = 0
    hard_seconds: int = 0
    soft_seconds: int = 0
    hard_bytes: int = 0
    soft_bytes: int = 0
    sec_ctx: SecCtxExt | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Algorithms:
    encrypt: Algorithm | None = None
    encrypt_key: bytes = b""
    encrypt_flag: Token | None = None  # errors point at "-E"/"-A", never at a key
    auth: Algorithm | None = None
    auth_key: bytes = b""
    auth_flag: Token | None = None


@dataclass(slots=True)
class _Protocol:
    satype: SaType
    natt: bool
    natt_oa: IPAddress | None = None


class _Parser:
    def __init__(
        self, text: str, filename: str, rfc_mode: bool, resolve: Resolver | None
    ) -> None:
        self.filename = filename
        self.cur = Cursor(tokenize(text, filename), filename)
        self.rfc_mode = rfc_mode
        self.resolve = resolve
        # Selectors that got a fwd policy (explicit or RFC-mode twin) in spdadd: line of origin.
        self.fwd_selectors: dict[tuple[object, ...], int] = {}

    def error(self, token: Token, reason: str, shown: str | None = None) -> SetkeyError:
        return self.cur.error(token, reason, shown)

    # -- statements -----------------------------------------------------------------------

    def script(self) -> list[Command]:
        commands: list[Command] = []
        while True:
            token = self.cur.next()
            if token.kind is TokenKind.EOF:
                return commands
            if token.kind is TokenKind.SEMI:
                continue  # an empty statement
            if token.kind is not TokenKind.WORD:
                raise self.error(token, "expected a command (add, spdadd, flush, ...)")
            word = token.text
            if word in _EXIT_WORDS:
                self.end()
                return commands
            if word in _SA_KINDS:
                commands.append(self.sa_statement(_SA_KINDS[word], token))
            elif word in _SPD_KINDS:
                commands.append(self.spd_statement(_SPD_KINDS[word], token))
            elif word == "deleteall":
                commands.append(self.deleteall(token))
            elif word in ("flush", "dump"):
                commands.append(self.flush_or_dump(word, token))
            elif word in ("spdflush", "spddump"):
                self.end()
                kind = CommandKind.SPDFLUSH if word == "spdflush" else CommandKind.SPDDUMP
                msgtype = MsgType.X_SPDFLUSH if word == "spdflush" else MsgType.X_SPDDUMP
                commands.append(self.command(kind, token, [Message(msgtype)]))
            else:
                raise self.error(token, "unknown command")

    def command(
        self,
        kind: CommandKind,
        token: Token,
        messages: list[Message],
        warnings: list[str] | None = None,
        selectors: list[SaSelector] | None = None,
    ) -> Command:
        return Command(
            kind, messages, self.filename, token.line, token.column,
            warnings=warnings or [], selectors=selectors or [],
        )

    def end(self) -> None:
        token = self.cur.next()
        if token.kind is not TokenKind.SEMI:
            raise self.error(token, "expected ';' to end the statement")

    def flush_or_dump(self, word: str, token: Token) -> Command:
        satype: SaType = SaType.UNSPEC
        proto = self.cur.peek_word()
        if proto in _PROTOCOLS or proto in _REFUSED_PROTOCOLS:
            satype = self.protocol().satype
        self.end()
        if word == "flush":
            return self.command(CommandKind.FLUSH, token, [Message(MsgType.FLUSH, satype)])
        return self.command(CommandKind.DUMP, token, [Message(MsgType.DUMP, satype)])

    def deleteall(self, token: Token) -> Command:
        family = self.aiflags()
        src = self.endpoint(family, prefix=False, port=False)
        dst = self.endpoint(family, prefix=False, port=False)
        satype = self.protocol().satype
        self.end()
        if satype is SaType.UNSPEC:
            raise self.error(token, "deleteall needs a protocol")
        pairs = self.pairs(src, dst)
        selectors = [SaSelector(satype, s, d) for s, d in pairs]
        return self.command(
            CommandKind.DELETEALL, token, [Message(MsgType.DUMP, satype)], selectors=selectors
        )

    def sa_statement(self, kind: CommandKind, token: Token) -> Command:
        family = self.aiflags()
        src = self.endpoint(family, prefix=False, port=True)
        dst = self.endpoint(family, prefix=False, port=True)
        proto = self.protocol(required=True)
        spi_token = self.cur.word("an SPI")
        spi = self.number(spi_token, "SPI", _U32)
        if spi < SPI_MIN and not (kind is CommandKind.GETSPI and spi == 0):
            raise self.error(spi_token, "SPIs 0-255 are reserved (RFC 4303)")
        options = self.sa_options(kind)
        algs = self.algorithms(proto.satype) if kind in (CommandKind.ADD, CommandKind.UPDATE) \
            else None
        self.end()
        pairs = self.pairs(src, dst)
        if kind in (CommandKind.GET, CommandKind.DELETE) and len(pairs) > 1:
            raise self.error(src.token, "multiple addresses specified")
        messages = [
            _sa_message(_MSG_TYPES[kind], proto, spi, options, algs, s, d, src.port, dst.port)
            for s, d in pairs
        ]
        warnings = list(options.warnings)
        if algs is not None:
            warnings += [
                f"{alg.name} is weak (RFC 8221): the kernel refuses it unless weak algorithms"
                " are allowed"
                for alg in (algs.encrypt, algs.auth)
                if alg is not None and alg.weak
            ]
            if proto.satype is SaType.ESP and algs.auth is None and algs.encrypt is not None \
                    and algs.encrypt.kind is AlgKind.CIPHER:
                warnings.append(f"{algs.encrypt.name} without -A: no integrity protection")
        return self.command(kind, token, messages, warnings=warnings)

    def spd_statement(self, kind: CommandKind, token: Token) -> Command:
        if self.cur.peek_word() == "tagged":
            raise self.error(self.cur.peek(), "policies on PF tags (tagged) are BSD-only")
        family = self.aiflags()
        src = self.endpoint(family, prefix=True, port=True)
        dst = self.endpoint(family, prefix=True, port=True)
        if len(src.addresses) > 1 or len(dst.addresses) > 1:
            raise self.error(src.token, "multiple addresses specified")
        (src_addr, dst_addr), = self.pairs(src, dst)
        upper_token = self.cur.word("an upper-layer protocol (any, tcp, udp, icmp, number...)")
        upper = self.upper_protocol(upper_token)
        sport, dport = src.port, dst.port
        misc = self.cur.peek_word()
        if misc is not None and not misc.startswith("-") and upper in _MISC_SPEC_PROTOCOLS:
            sport, dport = self.upper_misc(upper, self.cur.next(), sport, dport)
        sec_ctx = None
        if self.cur.peek_word() == "-ctx":
            sec_ctx = self.sec_ctx(self.cur.next())
        flag = self.cur.next()
        if flag.kind is not TokenKind.WORD or flag.text != "-P":
            raise self.error(flag, "expected -P and a policy, e.g. -P out ipsec esp/transport//use")
        words: list[Token] = []
        while self.cur.peek().kind is TokenKind.WORD:
            words.append(self.cur.next())
        parsed = parse_policy(self.cur, flag, words)
        self.end()
        if not parsed.action_given and kind is not CommandKind.SPDDELETE:
            raise self.error(words[0], "policy action missing: discard, none, ipsec, ...")
        policies = [parsed.policy]
        if self.rfc_mode and parsed.policy.dir is PolicyDir.INBOUND:
            policies.append(_fwd_twin(parsed.policy))
        messages = []
        for policy in policies:
            ext: dict[ExtType, Extension] = {
                ExtType.ADDRESS_SRC: AddressExt(src_addr, src.prefixlen, upper, sport),
                ExtType.ADDRESS_DST: AddressExt(dst_addr, dst.prefixlen, upper, dport),
                ExtType.X_POLICY: policy,
            }
            if sec_ctx is not None:
                ext[ExtType.X_SEC_CTX] = sec_ctx
            messages.append(Message(_MSG_TYPES[kind], SaType.UNSPEC, ext=ext))
        warnings = []
        if kind is CommandKind.SPDADD and any(p.dir is PolicyDir.FWD for p in policies):
            selector = (src_addr, src.prefixlen, dst_addr, dst.prefixlen, upper, sport, dport)
            first = self.fwd_selectors.setdefault(selector, token.line)
            if first != token.line:
                warnings.append(
                    f"a fwd policy for this selector already comes from line {first}"
                    + (" (setkey's RFC mode twins every in policy; use -k)" if self.rfc_mode
                       else "")
                )
        return self.command(kind, token, messages, warnings=warnings)

    # -- pieces ---------------------------------------------------------------------------

    def aiflags(self) -> int | None:
        """setkey's ``-4``/``-6``/``-n``: returns the IP version wanted (None: either)."""
        family: int | None = None
        while (word := self.cur.peek_word()) is not None and re.fullmatch("-[n46]+", word):
            self.cur.next()
            for ch in word[1:]:
                if ch != "n":
                    family = int(ch)
        return family

    def endpoint(self, family: int | None, *, prefix: bool, port: bool) -> _Endpoint:
        token = self.cur.word("an address")
        text = token.text
        # setkey's scanner also takes "/24" and "[80]" as separate tokens after the address.
        while (more := self.cur.peek_word()) is not None and more[:1] in ("/", "[") \
                and more[:1] not in text:
            text += self.cur.next().text
        match = _ADDRESS_RE.fullmatch(text)
        if match is None:
            raise self.error(token, "bad address: ADDRESS, ADDRESS/PREFIXLEN or ADDRESS[PORT]",
                             shown=text)
        host, plen_text, port_text = match.groups()
        addresses = self.addresses(token, host, family)
        prefixlen: int | None = None
        if plen_text is not None:
            if not prefix:
                raise self.error(token, "a prefix length is only allowed in spd commands",
                                 shown=text)
            if not plen_text.isascii() or not plen_text.isdigit() or len(plen_text) > 3:
                raise self.error(token, "prefix length must be a decimal number", shown=text)
            prefixlen = int(plen_text)
            if any(prefixlen > a.max_prefixlen for a in addresses):
                raise self.error(token, f"prefix length {prefixlen} too long", shown=text)
        port_number = 0
        if port_text is not None:
            if not port:
                raise self.error(token, "a port is not allowed here", shown=text)
            port_number = self.port(token, port_text, text)
        return _Endpoint(addresses, prefixlen, port_number, token)

    def addresses(self, token: Token, host: str, family: int | None) -> list[IPAddress]:
        try:
            addresses: list[IPAddress] = [ip_address(host)]
        except ValueError:
            addresses = self.resolve_name(token, host)
        if family is not None:
            addresses = [a for a in addresses if a.version == family]
            if not addresses:
                raise self.error(token, f"no IPv{family} address (-{family} given)")
        return addresses

    def resolve_name(self, token: Token, host: str) -> list[IPAddress]:
        if _HOSTNAME_RE.fullmatch(host) is None:
            raise self.error(token, "not an IP address or host name")
        if self.resolve is None:
            raise self.error(token, "host names are not resolved here: use a numeric address")
        try:
            addresses = list(self.resolve(host))
        except (OSError, UnicodeError, ValueError) as exc:
            raise self.error(token, f"cannot resolve host name: {exc}") from None
        if not addresses:
            raise self.error(token, "host name resolves to no address")
        return addresses

    def port(self, token: Token, text: str, shown: str) -> int:
        if text == "any":
            return 0
        if not text.isascii() or not text.isdigit() or len(text) > 5 or int(text) > 0xFFFF:
            raise self.error(token, "port must be a number 0-65535 or any", shown=shown)
        return int(text)

    def pairs(self, src: _Endpoint, dst: _Endpoint) -> list[tuple[IPAddress, IPAddress]]:
        pairs = [(s, d) for s in src.addresses for d in dst.addresses if s.version == d.version]
        if not pairs:
            raise self.error(dst.token, "source and destination are of different address families")
        return pairs

    def protocol(self, *, required: bool = False) -> _Protocol:
        token = self.cur.next()
        if token.kind is not TokenKind.WORD:
            raise self.error(token, "expected a protocol: esp, ah or esp-udp")
        if token.text in _REFUSED_PROTOCOLS:
            raise self.error(token, _REFUSED_PROTOCOLS[token.text])
        satype = _PROTOCOLS.get(token.text)
        if satype is None:
            raise self.error(token, "protocol must be esp, ah or esp-udp")
        proto = _Protocol(satype, natt=token.text == "esp-udp")
        if proto.natt and required:
            # "esp-udp ADDRESS": the NAT original address (NAT-OA) comes before the SPI.
            word = self.cur.peek_word()
            if word is not None and ("." in word or ":" in word):
                oa_token = self.cur.next()
                proto.natt_oa = self.addresses(oa_token, word, None)[0]
        return proto

    def number(self, token: Token, what: str, maximum: int) -> int:
        if _NUMBER_RE.fullmatch(token.text) is None:
            raise self.error(token, f"{what} must be a decimal number or 0x hexadecimal")
        value = int(token.text, 0) if token.text[:2].lower() == "0x" else int(token.text)
        if value > maximum:
            raise self.error(token, f"{what} too big (at most {maximum})")
        return value

    def sa_options(self, kind: CommandKind) -> _SaOptions:
        options = _SaOptions()
        while (word := self.cur.peek_word()) is not None:
            if word == "-m":
                self.cur.next()
                mode_token = self.cur.word("a mode: transport, tunnel or any")
                mode = _MODES.get(mode_token.text)
                if mode is None:
                    raise self.error(mode_token, "mode must be transport, tunnel or any")
                options.mode, options.mode_token = mode, mode_token
                if kind in (CommandKind.GET, CommandKind.DELETE):
                    options.warnings.append("-m is obsolete for get and delete (ignored)")
            elif word == "-r":
                options.replay = self.number(self.option_value(), "replay window", _U32)
            elif word == "-u":
                options.reqid = self.number(self.option_value(), "reqid", _U32)
            elif word == "-f":
                pad = self.option_value()
                if pad.text not in _PAD_OPTIONS:
                    raise self.error(pad, f"-f takes one of {', '.join(_PAD_OPTIONS)}")
                options.warnings.append(
                    f"-f {pad.text} accepted and ignored: ESP padding is always the RFC 4303"
                    " sequence 1, 2, 3... and sequence numbers never cycle"
                )
            elif word in ("-lh", "-ls", "-bh", "-bs"):
                value = self.number(self.option_value(), word, _U64)
                if word == "-lh":
                    options.hard_seconds = value
                elif word == "-ls":
                    options.soft_seconds = value
                elif word == "-bh":
                    options.hard_bytes = value
                else:
                    options.soft_bytes = value
            elif word == "-ctx":
                options.sec_ctx = self.sec_ctx(self.cur.next())
            else:
                break
        return options

    def option_value(self) -> Token:
        flag = self.cur.next()
        return self.cur.word(f"a value after {flag.text}")

    def sec_ctx(self, flag: Token) -> SecCtxExt:
        doi = self.number(self.cur.word("-ctx DOI"), "-ctx DOI", 255)
        alg = self.number(self.cur.word("-ctx algorithm"), "-ctx algorithm", 255)
        name = self.cur.next()
        if name.kind is not TokenKind.QUOTED:
            raise self.error(name, "-ctx needs a quoted context name")
        return SecCtxExt(alg=alg, doi=doi, context=name.text.encode())

    def algorithms(self, satype: SaType) -> _Algorithms:
        algs = _Algorithms()
        while (word := self.cur.peek_word()) in ("-E", "-A", "-C"):
            flag = self.cur.next()
            if word == "-C":
                raise self.error(flag, "IPComp compression (-C) is not supported")
            name = self.cur.word("an algorithm name")
            if word == "-E":
                if algs.encrypt is not None:
                    raise self.error(flag, "-E given twice")
                algs.encrypt = self.algorithm(name, encryption_by_name, _UNSUPPORTED_ENCRYPTION)
                algs.encrypt_key, algs.encrypt_flag = self.key(algs.encrypt), flag
            else:
                if algs.auth is not None:
                    raise self.error(flag, "-A given twice")
                algs.auth = self.algorithm(name, integrity_by_name, _UNSUPPORTED_INTEGRITY)
                algs.auth_key, algs.auth_flag = self.key(algs.auth), flag
        self.check_combination(satype, algs)
        return algs

    def algorithm(
        self,
        name: Token,
        lookup: Callable[[str], Algorithm | None],
        unsupported: tuple[str, ...],
    ) -> Algorithm:
        alg = lookup(name.text)
        if alg is not None:
            return alg
        if name.text in unsupported:
            raise self.error(name, "algorithm not supported by userspace-ipsec")
        raise self.error(name, "unknown algorithm")

    def key(self, alg: Algorithm) -> bytes:
        token = self.cur.peek()
        is_key = token.kind is TokenKind.QUOTED or (
            token.kind is TokenKind.WORD and token.text[:2].lower() == "0x"
        )
        if not is_key:
            if alg.key_bits == (0,):
                return b""  # setkey's "null" takes no key
            raise self.error(token, f"{alg.name} needs a key: 0x... hex or \"string\"")
        self.cur.next()
        if token.kind is TokenKind.QUOTED:
            key = token.text.encode()
            shown = token.shown()
        else:
            match = _HEX_KEY_RE.fullmatch(token.text)
            if match is None:
                raise self.error(token, "bad hexadecimal key", shown="0x<key>")
            digits = match.group(1)
            key = bytes.fromhex(digits if len(digits) % 2 == 0 else "0" + digits)
            shown = f"0x<{len(digits)} hex digits>"
        reason = check_key(alg, key)
        if reason is not None:
            raise self.error(token, reason, shown=shown)
        return key

    def check_combination(self, satype: SaType, algs: _Algorithms) -> None:
        where = self.cur.peek()
        if satype is SaType.AH:
            if algs.encrypt is not None:
                raise self.error(algs.encrypt_flag or where, "ah takes only -A, not -E")
            if algs.auth is None:
                raise self.error(where, "ah needs -A ALGORITHM KEY")
            return
        if algs.encrypt is None:
            raise self.error(algs.auth_flag or where, "esp needs -E ALGORITHM KEY")
        if algs.encrypt.kind is AlgKind.AEAD and algs.auth is not None:
            raise self.error(
                algs.auth_flag or where,
                f"{algs.encrypt.name} is AEAD (it authenticates itself): drop -A",
            )
        if algs.encrypt.name == "null" and (algs.auth is None or algs.auth.name == "null"):
            raise self.error(
                algs.auth_flag or algs.encrypt_flag or where,
                "esp with null encryption needs a real -A algorithm (RFC 4303)",
            )

    def upper_protocol(self, token: Token) -> int:
        text = token.text
        if text.isascii() and text.isdigit() and len(text) <= 3:
            number = int(text)
            if number > 255:
                raise self.error(token, "upper-layer protocol number must be 0-255")
            return number
        named = PROTOCOL_NUMBERS.get(text)
        if named is None:
            raise self.error(token, "invalid upper layer protocol")
        return named

    def upper_misc(self, upper: int, token: Token, sport: int, dport: int) -> tuple[int, int]:
        """ICMP "type[,code]" or GRE key after the protocol: carried in the port fields."""
        text = token.text
        if upper in (IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_MH):
            match = re.fullmatch(r"([0-9]{1,3})(?:,([0-9]{1,3}))?", text)
            if match is None or int(match.group(1)) > 255 or int(match.group(2) or 0) > 255:
                raise self.error(token, "ICMP spec must be TYPE or TYPE,CODE (0-255)")
            return int(match.group(1)), int(match.group(2)) if match.group(2) else dport
        if upper == IPPROTO_GRE:
            quad = re.fullmatch(r"([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})", text)
            if quad is not None and all(int(b) <= 255 for b in quad.groups()):
                a, b, c, d = (int(x) for x in quad.groups())
                return (a << 8) + b, (c << 8) + d
            if re.fullmatch("[0-9]{1,10}", text) and int(text) <= _U32:
                key = int(text)
                return key >> 16, key & 0xFFFF
        raise self.error(token, "GRE key must be a number or dotted quad")


def _sa_message(
    msgtype: MsgType,
    proto: _Protocol,
    spi: int,
    options: _SaOptions,
    algs: _Algorithms | None,
    src: IPAddress,
    dst: IPAddress,
    sport: int,
    dport: int,
) -> Message:
    ext: dict[ExtType, Extension] = {}
    if msgtype is not MsgType.GETSPI:
        ext[ExtType.SA] = SAExt(
            spi=spi,
            replay=min(options.replay, SA_REPLAY_MAX),
            state=SaState.LARVAL,  # what setkey sends; the kernel sets the state
            auth=algs.auth.pfkey_id if algs and algs.auth else AUTH_NONE,
            encrypt=algs.encrypt.pfkey_id if algs and algs.encrypt else 0,
        )
    if options.hard_seconds or options.hard_bytes:
        ext[ExtType.LIFETIME_HARD] = LifetimeExt(
            bytes=options.hard_bytes, addtime=options.hard_seconds
        )
    if options.soft_seconds or options.soft_bytes:
        ext[ExtType.LIFETIME_SOFT] = LifetimeExt(
            bytes=options.soft_bytes, addtime=options.soft_seconds
        )
    ext[ExtType.ADDRESS_SRC] = AddressExt(src, proto=IPSEC_PROTO_ANY, port=sport)
    ext[ExtType.ADDRESS_DST] = AddressExt(dst, proto=IPSEC_PROTO_ANY, port=dport)
    if algs is not None:
        if algs.auth is not None and algs.auth_key:
            ext[ExtType.KEY_AUTH] = KeyExt(algs.auth_key)
        if algs.encrypt is not None and algs.encrypt_key:
            ext[ExtType.KEY_ENCRYPT] = KeyExt(algs.encrypt_key)
    if msgtype is MsgType.GETSPI:
        low, high = (spi, spi) if spi else GETSPI_DEFAULT_RANGE
        ext[ExtType.SPIRANGE] = SpiRangeExt(low, high)
    ext[ExtType.X_SA2] = SA2Ext(mode=options.mode, reqid=options.reqid)
    if proto.natt and msgtype in (MsgType.ADD, MsgType.UPDATE, MsgType.GETSPI):
        ext[ExtType.X_NAT_T_TYPE] = NatTTypeExt(NatTType.ESPINUDP)
        ext[ExtType.X_NAT_T_SPORT] = NatTPortExt(sport or NATT_DEFAULT_PORT)
        ext[ExtType.X_NAT_T_DPORT] = NatTPortExt(dport or NATT_DEFAULT_PORT)
        if proto.natt_oa is not None:
            ext[ExtType.X_NAT_T_OA] = AddressExt(proto.natt_oa, proto=IPSEC_PROTO_ANY)
    if options.sec_ctx is not None:
        ext[ExtType.X_SEC_CTX] = options.sec_ctx
    if options.replay > SA_REPLAY_MAX:
        ext[ExtType.X_UIPSEC] = UipsecExt(replay_window=options.replay)
    return Message(msgtype, proto.satype, ext=ext)


def _fwd_twin(policy: PolicyExt) -> PolicyExt:
    """setkey's RFC mode: the fwd copy of an in policy; its first unique request becomes require."""
    requests = [replace(r) for r in policy.requests]
    if requests and requests[0].level is IpsecLevel.UNIQUE:
        requests[0].level, requests[0].reqid = IpsecLevel.REQUIRE, 0
    return PolicyExt(
        policy.type, PolicyDir.FWD, priority=policy.priority, requests=requests
    )
