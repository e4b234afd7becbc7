"""GPT-2's byte <-> printable-character map, the alphabet of byte-level BPE vocabularies (vocab.json)."""

from functools import cache


@cache
def bytes_to_unicode() -> dict[int, str]:
    """Map each byte to a printable character: printable Latin-1 bytes stay, the rest go above 255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(keep)
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}


@cache
def unicode_to_bytes() -> dict[str, int]:
    """The inverse of `bytes_to_unicode`."""
    return {c: b for b, c in bytes_to_unicode().items()}


def bytes_to_piece(data: bytes) -> str:
    """Token bytes -> the vocab.json spelling (e.g. b" hi" -> "Ġhi")."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in data)


def piece_to_bytes(piece: str) -> bytes:
    """vocab.json spelling -> token bytes; raises KeyError for characters outside the byte alphabet."""
    table = unicode_to_bytes()
    return bytes(table[c] for c in piece)
