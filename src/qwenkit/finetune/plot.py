"""A loss-curve PNG without a plotting library: lines rasterized into RGB rows, written with zlib.

matplotlib would add ~40 MB of dependencies for one chart; this draws axes, the train and eval curves
and tick marks (no text: the numbers are in the JSONL log beside it).
"""

from __future__ import annotations

import itertools
import math
import struct
import zlib
from pathlib import Path

Color = tuple[int, int, int]
TRAIN: Color = (31, 119, 180)
EVAL: Color = (214, 39, 40)


def write_png(path: str | Path, pixels: list[bytearray], width: int) -> None:
    """Write RGB rows (each ``3 * width`` bytes) as an 8-bit truecolor PNG."""
    raw = b"".join(b"\x00" + bytes(row) for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, len(pixels), 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
    Path(path).write_bytes(png + chunk(b"IEND", b""))


def plot_losses(
    path: str | Path,
    train: list[tuple[float, float]],
    evals: list[tuple[float, float]] = (),
    width: int = 640,
    height: int = 400,
) -> None:
    """(step, loss) series as lines on a white canvas with axes; the y range spans both series. A NaN or
    infinite loss (a held-out loss overflowing in float16) is left out: it once failed the finished run."""
    train = [(x, y) for x, y in train if math.isfinite(y)]
    evals = [(x, y) for x, y in evals if math.isfinite(y)]
    img = [bytearray(b"\xff" * (3 * width)) for _ in range(height)]
    m = 40  # margin
    points = list(train) + list(evals)
    if not points:
        write_png(path, img, width)
        return
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + 1

    def to_px(x: float, y: float) -> tuple[int, int]:
        px = m + round((x - x0) / (x1 - x0) * (width - 2 * m))
        py = height - m - round((y - y0) / (y1 - y0) * (height - 2 * m))
        return px, py

    def put(x: int, y: int, c: Color) -> None:
        if 0 <= x < width and 0 <= y < height:
            img[y][3 * x : 3 * x + 3] = bytes(c)

    def line(a: tuple[int, int], b: tuple[int, int], c: Color, thick: int = 1) -> None:
        n = max(abs(b[0] - a[0]), abs(b[1] - a[1]), 1)
        for i in range(n + 1):
            x = a[0] + (b[0] - a[0]) * i / n
            y = a[1] + (b[1] - a[1]) * i / n
            for d in range(-(thick // 2), thick // 2 + 1):
                put(round(x), round(y) + d, c)

    black: Color = (0, 0, 0)
    line((m, height - m), (width - m, height - m), black)
    line((m, m), (m, height - m), black)
    for i in range(11):  # ticks at tenths of each axis
        tx = m + i * (width - 2 * m) // 10
        ty = height - m - i * (height - 2 * m) // 10
        line((tx, height - m), (tx, height - m + 5), black)
        line((m - 5, ty), (m, ty), black)
    for series, color in ((train, TRAIN), (evals, EVAL)):
        pts = [to_px(x, y) for x, y in series]
        for a, b in itertools.pairwise(pts):
            line(a, b, color, thick=2)
        for p in pts if len(pts) == 1 else ():
            line(p, p, color, thick=3)
    write_png(path, img, width)
