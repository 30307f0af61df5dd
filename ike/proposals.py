"""Proposal strings in strongSwan syntax, and proposal selection (RFC 7296 2.7, 3.3).

`parse_proposal("aes128gcm16-prfsha256-x25519", "ike")` gives a `ProposalSpec`: the ordered
algorithms of each transform type. Weak algorithms (RFC 8247, RFC 8221) are refused unless
`allow_weak=True`. `select_proposal` is the responder's choice: the first of its configured
proposals that matches one the peer offered, and within it the first configured algorithm of
each type the peer offered (strongSwan's default, prefer_configured_proposals).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ike.constants import DhId, EncrId, EsnId, IntegId, PrfId, ProtocolId, TransformType
from ike.payloads import Proposal, SaPayload, Transform
from ike.transforms import ENCR_ALGS, INTEG_ALGS, PRF_ALGS, WEAK_DH_GROUPS, TransformSet

Kind = Literal["ike", "esp"]
Encr = tuple[int, int]  # (EncrId, key bits without salt)


class ProposalError(ValueError):
    """A proposal string that cannot be used; the message says which token and why."""


def _build_keywords() -> dict[str, tuple[TransformType, int, int]]:
    """keyword -> (transform type, transform id, key bits for ENCR else 0)."""
    words: dict[str, tuple[TransformType, int, int]] = {}
    for bits in (128, 192, 256):
        words[f"aes{bits}"] = (TransformType.ENCR, EncrId.AES_CBC, bits)
        for icv in ("gcm16", "gcm128"):
            words[f"aes{bits}{icv}"] = (TransformType.ENCR, EncrId.AES_GCM_16, bits)
    words["aes"] = words["aes128"]
    words["chacha20poly1305"] = (TransformType.ENCR, EncrId.CHACHA20_POLY1305, 256)
    words["3des"] = (TransformType.ENCR, EncrId.TRIPLE_DES, 192)
    for integ, names in ((IntegId.HMAC_SHA2_256_128, ("sha256", "sha2_256")),
                         (IntegId.HMAC_SHA2_384_192, ("sha384", "sha2_384")),
                         (IntegId.HMAC_SHA2_512_256, ("sha512", "sha2_512")),
                         (IntegId.HMAC_SHA1_96, ("sha1", "sha")),
                         (IntegId.HMAC_MD5_96, ("md5",))):
        for name in names:
            words[name] = (TransformType.INTEG, integ, 0)
    for prf, name in ((PrfId.HMAC_SHA2_256, "prfsha256"), (PrfId.HMAC_SHA2_384, "prfsha384"),
                      (PrfId.HMAC_SHA2_512, "prfsha512"), (PrfId.HMAC_SHA1, "prfsha1"),
                      (PrfId.HMAC_MD5, "prfmd5")):
        words[name] = (TransformType.PRF, prf, 0)
    for group, names in ((DhId.MODP768, ("modp768",)), (DhId.MODP1024, ("modp1024",)),
                         (DhId.MODP1536, ("modp1536",)), (DhId.MODP2048, ("modp2048",)),
                         (DhId.MODP3072, ("modp3072",)), (DhId.MODP4096, ("modp4096",)),
                         (DhId.ECP256, ("ecp256",)), (DhId.ECP384, ("ecp384",)),
                         (DhId.ECP521, ("ecp521",)), (DhId.CURVE25519, ("x25519", "curve25519")),
                         (DhId.CURVE448, ("x448", "curve448"))):
        for name in names:
            words[name] = (TransformType.DH, group, 0)
    words["esn"] = (TransformType.ESN, EsnId.ESN, 0)
    words["noesn"] = (TransformType.ESN, EsnId.NO_ESN, 0)
    return words


KEYWORDS = _build_keywords()
_WEAK_WORDS = frozenset({"des", "md5", "prfmd5", "modp768", "modp1024", "modp1536", "3des",
                         "sha1", "sha", "prfsha1"})
# Integrity algorithm -> the PRF strongSwan pairs with it when an IKE proposal names none.
_PRF_FOR_INTEG = {IntegId.HMAC_SHA2_256_128: PrfId.HMAC_SHA2_256,
                  IntegId.HMAC_SHA2_384_192: PrfId.HMAC_SHA2_384,
                  IntegId.HMAC_SHA2_512_256: PrfId.HMAC_SHA2_512,
                  IntegId.HMAC_SHA1_96: PrfId.HMAC_SHA1,
                  IntegId.HMAC_MD5_96: PrfId.HMAC_MD5}

# RFC 8247 (IKE) and RFC 8221 (ESP) recommendations, AEAD first.
DEFAULT_IKE = (
    "aes256gcm16-aes128gcm16-chacha20poly1305-prfsha256-prfsha384-prfsha512"
    "-x25519-ecp256-ecp384-modp3072-modp2048",
    "aes256-aes128-sha256-sha384-sha512-x25519-ecp256-ecp384-modp3072-modp2048",
)
DEFAULT_ESP = ("aes256gcm16-aes128gcm16-chacha20poly1305", "aes256-aes128-sha256-sha384-sha512")


@dataclass(frozen=True, slots=True)
class ProposalSpec:
    """Algorithms of one proposal, each type in preference order."""

    kind: Kind
    encr: tuple[Encr, ...]
    integ: tuple[int, ...] = ()
    prf: tuple[int, ...] = ()
    dh: tuple[int, ...] = ()
    esn: tuple[int, ...] = ()

    @property
    def aead(self) -> bool:
        return ENCR_ALGS[self.encr[0][0]].aead

    def to_proposal(self, number: int, spi: bytes = b"") -> Proposal:
        protocol = ProtocolId.IKE if self.kind == "ike" else ProtocolId.ESP
        transforms = [
            Transform(TransformType.ENCR, alg,
                      bits if ENCR_ALGS[alg].key_length_attr else None)
            for alg, bits in self.encr
        ]
        transforms += [Transform(TransformType.PRF, p) for p in self.prf]
        transforms += [Transform(TransformType.INTEG, i) for i in self.integ]
        transforms += [Transform(TransformType.DH, d) for d in self.dh]
        transforms += [Transform(TransformType.ESN, e) for e in self.esn]
        return Proposal(number, protocol, spi, tuple(transforms))


def parse_proposal(text: str, kind: Kind, *, allow_weak: bool = False) -> ProposalSpec:
    """Parse one strongSwan-style proposal string such as "aes256-sha256-modp3072"."""
    encr_list: list[Encr] = []
    lists: dict[int, list[int]] = {t: [] for t in TransformType}
    tokens = text.strip().lower().split("-")
    if tokens == [""]:
        raise ProposalError("empty proposal")
    for token in tokens:
        entry = KEYWORDS.get(token)
        if entry is None:
            raise ProposalError(f"{text!r}: unknown algorithm {token!r}")
        if token in _WEAK_WORDS and not allow_weak:
            raise ProposalError(f"{text!r}: {token} is weak (RFC 8247/8221); "
                                "set allow_weak to use it")
        ttype, value, bits = entry
        if ttype == TransformType.ENCR:
            if (value, bits) not in encr_list:
                encr_list.append((value, bits))
        elif value not in lists[ttype]:
            lists[ttype].append(value)
    encr = tuple(encr_list)
    integ = tuple(lists[TransformType.INTEG])
    prf = tuple(lists[TransformType.PRF])
    dh = tuple(lists[TransformType.DH])
    esn = tuple(lists[TransformType.ESN])
    if not encr:
        raise ProposalError(f"{text!r}: no encryption algorithm")
    aead_kinds = {ENCR_ALGS[alg].aead for alg, _ in encr}
    if len(aead_kinds) > 1:
        raise ProposalError(f"{text!r}: mixes AEAD and non-AEAD encryption; "
                            "use two proposals")
    aead = aead_kinds.pop()
    if aead and integ:
        raise ProposalError(f"{text!r}: AEAD encryption takes no integrity algorithm")
    if not aead and not integ:
        raise ProposalError(f"{text!r}: encryption without an integrity algorithm")
    if kind == "ike":
        if esn:
            raise ProposalError(f"{text!r}: ESN is not an IKE transform")
        if not prf:
            if aead:
                raise ProposalError(f"{text!r}: an AEAD IKE proposal needs a prf")
            prf = tuple(dict.fromkeys(_PRF_FOR_INTEG[IntegId(i)] for i in integ))
        if not dh:
            raise ProposalError(f"{text!r}: an IKE proposal needs a DH group")
    else:
        if prf:
            raise ProposalError(f"{text!r}: a PRF is not an ESP transform")
        esn = esn or (EsnId.NO_ESN,)
    return ProposalSpec(kind, encr, integ, prf, dh, esn)


def parse_proposals(text: str | list[str] | tuple[str, ...], kind: Kind, *,
                    allow_weak: bool = False) -> list[ProposalSpec]:
    """Comma-separated strings (or a list); "default" stands for the RFC 8247/8221 set."""
    items = text.split(",") if isinstance(text, str) else list(text)
    specs: list[ProposalSpec] = []
    for item in items:
        if item.strip().lower() == "default":
            defaults = DEFAULT_IKE if kind == "ike" else DEFAULT_ESP
            specs += [parse_proposal(d, kind) for d in defaults]
        else:
            specs.append(parse_proposal(item, kind, allow_weak=allow_weak))
    if not specs:
        raise ProposalError("no proposal")
    return specs


def sa_payload(specs: list[ProposalSpec], spi: bytes = b"") -> SaPayload:
    """The initiator's SA payload: proposals numbered from 1."""
    return SaPayload([spec.to_proposal(i + 1, spi) for i, spec in enumerate(specs)])


# --- Selection ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Selection:
    """The chosen offered proposal: its number and SPI, and one algorithm per type."""

    number: int
    spi: bytes
    transforms: TransformSet

    def proposal(self, spi: bytes | None = None) -> Proposal:
        """The responder's reply proposal (with its own SPI for a Child SA)."""
        protocol = ProtocolId.IKE if self.transforms.prf is not None else ProtocolId.ESP
        return self.transforms.proposal(self.number, protocol,
                                        self.spi if spi is None else spi)


_KNOWN_TYPES = frozenset(int(t) for t in TransformType)


def _offered_lists(proposal: Proposal) -> tuple[list[Encr], dict[int, list[int]]] | None:
    """Acceptable (encr, other types) of an offered proposal, or None when it is unusable."""
    encr: list[Encr] = []
    lists: dict[int, list[int]] = {t: [] for t in _KNOWN_TYPES}
    for t in proposal.transforms:
        if t.type not in _KNOWN_TYPES:
            return None  # RFC 7296 3.3.6: an unknown transform type spoils the proposal
        if t.other_attributes:
            continue  # unknown attribute: this transform cannot be chosen
        if t.type == TransformType.ENCR:
            alg = ENCR_ALGS.get(t.id)
            if alg is None:
                continue
            if alg.key_length_attr:
                bits = t.key_length
            else:
                bits = alg.key_bits[0] if t.key_length is None else None
            if bits is not None and bits in alg.key_bits:
                encr.append((t.id, bits))
        else:
            lists[t.type].append(t.id)
    return encr, lists


def _pick(mine: tuple[int, ...], theirs: list[int]) -> int | None:
    return next((m for m in mine if m in theirs), None)


def _match(spec: ProposalSpec, offer: Proposal, skip_dh: bool) -> TransformSet | None:
    protocol = ProtocolId.IKE if spec.kind == "ike" else ProtocolId.ESP
    if offer.protocol != protocol:
        return None
    # ESP: 4-octet SPI; IKE: none in IKE_SA_INIT, 8 octets when rekeying.
    if len(offer.spi) not in ((4,) if spec.kind == "esp" else (0, 8)):
        return None
    offered = _offered_lists(offer)
    if offered is None:
        return None
    offered_encr, lists = offered
    encr = next((e for e in spec.encr if e in offered_encr), None)
    if encr is None:
        return None
    integ: int | None = IntegId.NONE
    offered_integ = lists[TransformType.INTEG]
    if spec.integ:
        integ = _pick(spec.integ, offered_integ)
    elif any(i != IntegId.NONE for i in offered_integ):
        integ = None  # AEAD: the peer may list INTEG NONE only
    prf = _pick(spec.prf, lists[TransformType.PRF]) if spec.kind == "ike" else None
    dh: int | None = DhId.NONE
    offered_dh = lists[TransformType.DH]
    if skip_dh:
        pass
    elif spec.dh:
        dh = _pick(spec.dh, offered_dh)
    elif offered_dh and DhId.NONE not in offered_dh:
        dh = None  # the peer insists on PFS, we are configured without
    esn = (_pick(spec.esn, lists[TransformType.ESN] or [EsnId.NO_ESN])
           if spec.kind == "esp" else None)
    if (integ is None or dh is None or (spec.kind == "ike" and prf is None)
            or (spec.kind == "esp" and esn is None)):
        return None
    return TransformSet(encr[0], encr[1], integ, prf, dh, esn)


def select_proposal(configured: list[ProposalSpec], offered: list[Proposal], *,
                    skip_dh: bool = False) -> Selection | None:
    """Responder's choice, or None (send NO_PROPOSAL_CHOSEN).

    skip_dh: ignore DH transforms, for the Child SA negotiated inside IKE_AUTH (no KE there).
    """
    for spec in configured:
        for offer in offered:
            chosen = _match(spec, offer, skip_dh)
            if chosen is not None:
                return Selection(offer.number, offer.spi, chosen)
    return None


def check_response(offered: list[ProposalSpec], reply: SaPayload, *,
                   skip_dh: bool = False) -> Selection | None:
    """Initiator's check of the responder's SA: one proposal, one transform per type, all
    of them from what we offered. None means the reply is unacceptable."""
    if len(reply.proposals) != 1:
        return None
    proposal = reply.proposals[0]
    types = [t.type for t in proposal.transforms]
    if len(types) != len(set(types)):
        return None
    if not 1 <= proposal.number <= len(offered):
        return None
    return select_proposal([offered[proposal.number - 1]], [proposal], skip_dh=skip_dh)


def weak_transforms(ts: TransformSet) -> list[str]:
    """Names of weak algorithms in a transform set (for a log warning with allow_weak)."""
    weak = []
    if ENCR_ALGS[ts.encr].weak:
        weak.append(EncrId(ts.encr).name)
    integ = INTEG_ALGS.get(ts.integ)
    if integ and integ.weak:
        weak.append(integ.id.name)
    if ts.prf is not None and PRF_ALGS[ts.prf].weak:
        weak.append(PrfId(ts.prf).name)
    if ts.dh in WEAK_DH_GROUPS:
        weak.append(DhId(ts.dh).name)
    return weak
