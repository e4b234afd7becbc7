"""Find sensitive information in training data, then mask it or drop the example.

Kinds: e-mail addresses, phone numbers (Chinese mobile, international ``+CC`` numbers, North American
numbers), Chinese resident ID numbers (GB 11643-1999: region, a real birth date, sequence, check
character), bank card numbers (13-19 digits passing Luhn, from a card network's leading digit), IPv4/IPv6
addresses that can name a host (private ranges included), API-key-like secrets (``key=value`` pairs but not
code, credentials in URLs, bearer tokens, PEM private keys, JWTs, well-known key prefixes) and a user's
keyword list (case-insensitive).

Numbers are delimited with digit look-arounds, not ``\\b``: in Python's Unicode regexes Chinese characters
are word characters, so ``\\b`` finds nothing in ``电话13812345678``.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from qwenkit.errors import QwenkitError

PLACEHOLDERS = {
    "email": "[EMAIL]",
    "phone": "[PHONE]",
    "id_card": "[ID_CARD]",
    "bank_card": "[BANK_CARD]",
    "ip": "[IP]",
    "secret": "[SECRET]",
    "keyword": "[KEYWORD]",
}
ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
ID_CHECK = "10X98765432"

_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_CN_MOBILE = re.compile(r"(?<![\d+])(?<!\d\.)(?:(?:\+|00)86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}(?!\d)")
_INTL_PHONE = re.compile(r"(?<![\w+])\+\d{1,3}(?:[ -]?\(?\d{1,4}\)?)(?:[ -]?\d{2,4}){1,4}(?!\d)")
# North American numbers without +1: (415) 555-2671, 415-555-2671, 415.555.2671 (area code and exchange
# start 2-9, so ranges like 100-200-3000 are not numbers).
_US_PHONE = re.compile(
    r"(?<![\w+.-])(?:\([2-9]\d\d\) ?|[2-9]\d\d([-.]))[2-9]\d\d(?(1)\1|[-.])\d{4}(?![\w-]|\.\d)"
)
_ID = re.compile(r"(?<![0-9A-Za-z])(?<!\d\.)[1-9]\d{5}(?:18|19|20)\d{2}\d{4}\d{3}[0-9Xx](?![0-9A-Za-z])")
# Never a decimal's fraction (``(?<!\d\.)``: a float's 16-17 digits passed Luhn one time in ten), and written
# as cards are: unbroken, in groups of four (the last 1-3 long), or Amex's 4-6-5; any separator between
# any digits once took a list of single digits for a card.
_CARD = re.compile(
    r"(?<![\d+-])(?<!\d\.)(?:\d{13,19}(?![\d-]|\.\d)"
    r"|(?:\d{4}(?:[ -]\d{4}){2,3}(?:[ -]\d{1,3})?|\d{4}[ -]\d{6}[ -]\d{4,5})(?![\d-]|[ .]\d))"
)
# Not after an ASCII letter (``v10.0.0.1``); nor after a version word or a product token
# (``version 1.2.3.4``, ``Chrome/120.0.0.0`` in every user agent), checked on the text before.
_IPV4 = re.compile(r"(?<![\d.A-Za-z])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
_VERSION_BEFORE = re.compile(
    r"(?i)(?:\b(?:version|ver|release|build)\.?|版本(?:号)?|[A-Za-z][\w.-]*/)\s*[:=]?\s*$"
)
# Not inside a word: a hex-only look-around let ``std::vector`` be masked as ``st[IP]vector`` ("d::" is an
# address) and ``Foo::Bar`` as ``Foo[IP]r``, mangling every C++, Rust and PHP scope in code data.
_IPV6 = re.compile(r"(?<![0-9A-Za-z_:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Za-z_:])")
_SECRET_TOKENS = [
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
    re.compile(
        r"(?<![A-Za-z0-9])(?:sk-[A-Za-z0-9_-]{20,}|(?:AKIA|ASIA)[0-9A-Z]{16}|gh[opsur]_[A-Za-z0-9]{36}"
        r"|github_pat_[A-Za-z0-9_]{22,}|hf_[A-Za-z0-9]{30,}|xox[abprs]-[A-Za-z0-9-]{10,})"
    ),
]
# The value (group ``v``) is what is masked; ``q`` is its opening quote, if any.
_SECRET_VALUES = [
    # user:password in a URL (``postgres://admin:pw@host``): once only the host was masked
    re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://(?P<q>)(?P<v>[^\s:/@]*:[^\s/@]+)@"),
    re.compile(r"(?i)\bbearer\s+(?P<q>)(?P<v>(?=[^\s\"',;]*\d)[A-Za-z0-9._~+/-]{16,}=*)"),
    # A key may close its quote before the colon (``"api_key": "..."`` in JSON, a Python dict, a tool
    # call's arguments): ``\s*[:=]`` alone passed those values unmasked.
    # ``access_key`` also ends AWS's ``aws_secret_access_key`` (once missed beside the AKIA id it pairs with)
    re.compile(
        r"(?i)(?:api[_-]?key|secret[_-]?key|access[_-]?key|private[_-]?key|access[_-]?token|auth[_-]?token"
        r"|token|secret)"
        r"[\"']?\s*[:=]\s*(?P<q>[\"']?)(?P<v>[^\s\"',;]{8,})"
    ),
    # Passwords are shorter: ``password=hunter2`` slipped through the 8 above. From 4 characters with a
    # digit or symbol (``Reset your password: click ...`` keeps its prose), or 8 of any kind.
    re.compile(
        r"(?i)(?:password|passwd)[\"']?\s*[:=]\s*(?P<q>[\"']?)"
        r"(?P<v>(?=[^\s\"',;]*[^A-Za-z\s\"',;])[^\s\"',;]{4,}|[^\s\"',;]{8,})"
    ),
]
_PASSWORD_KEY = re.compile(r"(?i)pass")
# What code assigns a key from, unquoted: a call or subscript (``tokenizer.encode(text)``,
# ``os.environ['PW']``); for keys other than passwords also a snake_case, CONSTANT or dotted name
# (``token = tokenizer``, ``token: torch.Tensor``). All were masked, mangling every ML code sample.
_CODE_CALL = re.compile(r"[A-Za-z_][\w.]*[(\[]")
_CODE_NAME = re.compile(r"[a-z_]+|[A-Z_]+|[A-Za-z_]+(?:\.[A-Za-z_]+)+")


def _secret_value_ok(m: re.Match[str]) -> bool:
    if m.group("q"):  # a quoted literal is data, whatever it looks like
        return True
    v = m.group("v")
    if _CODE_CALL.match(v):
        return False
    return bool(_PASSWORD_KEY.search(m.group(0)[: m.start("v") - m.start()])) or not _CODE_NAME.fullmatch(v)


class FilterError(QwenkitError, ValueError):
    """The keyword file or the filter options are unusable."""


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int
    text: str


def valid_cn_id(s: str) -> bool:
    """GB 11643-1999: a real birth date and the mod-11 check character."""
    if len(s) != 18 or not s[:17].isdigit():
        return False
    try:
        date(int(s[6:10]), int(s[10:12]), int(s[12:14]))
    except ValueError:
        return False
    total = sum(int(d) * w for d, w in zip(s[:17], ID_WEIGHTS, strict=True))
    return ID_CHECK[total % 11] == s[17].upper()


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def card_ok(s: str) -> bool:
    """Luhn, and a leading digit a card network issues (3 Amex/JCB/Diners, 4 Visa, 5 Mastercard, 6
    UnionPay/Discover, 2221-2720 Mastercard): 13-digit millisecond timestamps (1...) once passed one in
    ten. Old Chinese domestic cards numbered from 9 are not found."""
    digits = re.sub(r"[ -]", "", s)
    return (digits[0] in "3456" or 2221 <= int(digits[:4]) <= 2720) and luhn_ok(digits)


def _ip_ok(s: str) -> bool:
    """A parseable address that can name a host. Private ranges count: an internal host in a pasted log
    or config maps a network. Loopback, unspecified, multicast and reserved addresses (a netmask,
    ``127.0.0.1`` in every web tutorial, a Python slice ``a[1::2]``) identify nothing."""
    try:
        ip = ipaddress.ip_address(s)
    except ValueError:
        return False
    return not (ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_reserved)


class Detector:
    """All kinds in one pass order; overlapping candidates keep the earlier (more specific) kind."""

    def __init__(self, keywords: list[str] | None = None) -> None:
        words = sorted({k for k in (keywords or []) if k}, key=len, reverse=True)
        self.keywords = re.compile("|".join(map(re.escape, words)), re.IGNORECASE) if words else None

    def find(self, text: str) -> list[Finding]:
        candidates: list[Finding] = []

        def add(kind: str, pattern: re.Pattern[str], ok: Callable[[str], bool] = lambda s: True):
            for m in pattern.finditer(text):
                if ok(m.group(0)):
                    candidates.append(Finding(kind, m.start(), m.end(), m.group(0)))

        for p in _SECRET_TOKENS:
            add("secret", p)
        for p in _SECRET_VALUES:
            for m in p.finditer(text):
                if _secret_value_ok(m):
                    candidates.append(Finding("secret", m.start("v"), m.end("v"), m.group("v")))
        add("email", _EMAIL)
        add("id_card", _ID, valid_cn_id)
        add("phone", _CN_MOBILE)
        add("bank_card", _CARD, card_ok)
        add("phone", _INTL_PHONE, lambda s: 8 <= sum(c.isdigit() for c in s) <= 15)
        add("phone", _US_PHONE)  # after +CC numbers, so "+1 (415) 555-2671" is masked whole
        for m in _IPV4.finditer(text):
            if _ip_ok(m.group(0)) and not _VERSION_BEFORE.search(text, max(0, m.start() - 40), m.start()):
                candidates.append(Finding("ip", m.start(), m.end(), m.group(0)))
        add("ip", _IPV6, lambda s: s.count(":") >= 2 and _ip_ok(s) and any(c.isalnum() for c in s))
        if self.keywords is not None:
            add("keyword", self.keywords)
        kept: list[Finding] = []
        for f in candidates:  # earlier kinds win overlaps
            if all(f.end <= k.start or f.start >= k.end for k in kept):
                kept.append(f)
        return sorted(kept, key=lambda f: f.start)

    def mask(self, text: str) -> tuple[str, list[Finding]]:
        found = self.find(text)
        out, pos = [], 0
        for f in found:
            out += [text[pos : f.start], PLACEHOLDERS[f.kind]]
            pos = f.end
        out.append(text[pos:])
        return "".join(out), found


@dataclass
class Report:
    examples: int = 0
    flagged: int = 0
    dropped: int = 0
    counts: Counter = field(default_factory=Counter)
    where: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.counts.items())) or "nothing"
        return (
            f"{self.examples} examples: {self.flagged} with sensitive data ({kinds}); {self.dropped} dropped"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "flagged": self.flagged,
            "dropped": self.dropped,
            "counts": dict(self.counts),
            "findings": self.where,
        }


_SKIP_KEYS = {"role", "from", "name", "type", "id", "tool_call_id"}


def scrub(obj: Any, detector: Detector, path: str, found: list[tuple[str, Finding]]) -> Any:
    """Mask every string value in a record (not keys, not roles); record (field path, finding)."""
    if isinstance(obj, str):
        masked, fs = detector.mask(obj)
        found += [(path, f) for f in fs]
        return masked
    if isinstance(obj, dict):
        return {
            k: v if k in _SKIP_KEYS else scrub(v, detector, f"{path}.{k}" if path else k, found)
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [scrub(v, detector, f"{path}[{i}]", found) for i, v in enumerate(obj)]
    return obj


def has_text(obj: Any) -> bool:
    """Whether a record holds any string outside the role-like keys: one without is not training data,
    and passing it on unchecked would look like a clean example."""
    if isinstance(obj, str):
        return bool(obj)
    if isinstance(obj, dict):
        return any(has_text(v) for k, v in obj.items() if k not in _SKIP_KEYS)
    if isinstance(obj, list):
        return any(has_text(v) for v in obj)
    return False


def filter_object(
    where: str, obj: dict[str, Any], detector: Detector, mode: str, report: Report
) -> dict[str, Any] | None:
    """The masked record, or None when ``mode == "drop"`` and something was found."""
    if mode not in ("mask", "drop"):
        raise FilterError(f"unknown filter mode {mode!r}; choose mask or drop")
    if not has_text(obj):
        raise FilterError(f"{where}: the record holds no text to check (no non-empty string values)")
    found: list[tuple[str, Finding]] = []
    masked = scrub(obj, detector, "", found)
    report.examples += 1
    if not found:
        return obj
    report.flagged += 1
    for path, f in found:
        report.counts[f.kind] += 1
        report.where.append({"where": where, "field": path, "kind": f.kind, "start": f.start, "end": f.end})
    if mode == "drop":
        report.dropped += 1
        return None
    return masked


def read_keywords(path: str | Path | None) -> list[str]:
    if path is None:
        return []
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()  # a BOM would glue onto word 1
    except FileNotFoundError:
        raise FilterError(f"{path}: keyword file not found") from None
    except UnicodeDecodeError:
        raise FilterError(f"{path}: keyword file is not valid UTF-8") from None
    words = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    if not words:  # once a silent no-op: the data passed with none of the words the user meant to find
        raise FilterError(f"{path}: the keyword file holds no keywords (one a line; # starts a comment)")
    return words


def filter_file(src: str | Path, out: str | Path, keywords: list[str], mode: str = "mask") -> Report:
    """Filter a JSONL (or .json list) file into ``out`` (JSONL), written whole or not at all."""
    import json

    from qwenkit.checkpoint.output_dir import atomic_file
    from qwenkit.finetune.data import read_objects

    detector, report = Detector(keywords), Report()
    out = Path(out)
    kept = []
    for where, obj in read_objects(src):  # every line is checked before anything is written
        result = filter_object(where, obj, detector, mode, report)
        if result is not None:
            kept.append(result)
    if not report.examples:
        raise FilterError(f"{src}: no records to filter (the file is empty)")
    with atomic_file(out) as f:
        f.writelines(json.dumps(o, ensure_ascii=False) + "\n" for o in kept)
    return report


def make_record_filter(keywords_file: str | Path | None, mode: str = "mask"):
    """``finetune --filter``: mask records after reading, before tokenizing; prints the report."""
    import sys

    from qwenkit.finetune.data import to_record

    detector = Detector(read_keywords(keywords_file))

    def apply(records):
        report, out = Report(), []
        for r in records:
            obj = filter_object(r.where, r.raw, detector, mode, report)
            if obj is not None:
                out.append(to_record(r.where, obj))
        print(f"filter: {report.summary()}", file=sys.stderr)
        return out

    return apply
