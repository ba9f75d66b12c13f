"""``longtrain plan ... --plot FILE.png``: the plan at a glance, drawn without a plotting library.

    top     the level-2 arena (step_arena.py): time (slots: embedding, each layer's forward, the
            loss, each layer's backward, the optimizer) left to right, arena offset bottom to top,
            one rectangle per tensor coloured by kind, the peak as a red line
    bottom  one bar per layer: its height the token-wise alpha (full height for keep, recompute,
            offload, which hold or rebuild all their rows), its colour the mode and tier, a
            black cap when the layer runs in tiles; the layers line of ``longtrain plan``'s text
            under it

The image is an RGB raster written as a PNG with zlib (no matplotlib or PIL on these machines);
text uses a 3 x 5 pixel font scaled 2x.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

from .estimate import format_bytes
from .step_arena import StepArena

RGB = tuple[int, int, int]

KIND_COLOURS: dict[str, RGB] = {
    "embedding": (140, 86, 75),
    "forward": (31, 119, 180),
    "held": (255, 127, 14),
    "swap": (214, 39, 40),
    "loss": (148, 103, 189),
    "prefetch": (23, 190, 207),
    "backward": (44, 160, 44),
    "grads": (127, 127, 127),
}
MODE_COLOURS: dict[str, RGB] = {
    "keep": (255, 127, 14),
    "recompute": (148, 103, 189),
    "tokenwise host": (31, 119, 180),
    "tokenwise file": (44, 160, 44),
    "offload": (214, 39, 40),
}
WHITE, BLACK, GREY, RED = (255, 255, 255), (0, 0, 0), (200, 200, 200), (220, 0, 0)

# 3 x 5 glyphs, rows top to bottom
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001010010",
    "8": "111101111101111", "9": "111101111001111", "A": "010101111101101", "B": "110101110101110",
    "C": "011100100100011", "D": "110101101101110", "E": "111100110100111", "F": "111100110100100",
    "G": "011100101101011", "H": "101101111101101", "I": "111010010010111", "J": "001001001101010",
    "K": "101101110101101", "L": "100100100100111", "M": "101111111101101", "N": "110101101101101",
    "O": "010101101101010", "P": "110101110100100", "Q": "010101101110011", "R": "110101110101101",
    "S": "011100010001110", "T": "111010010010010", "U": "101101101101111", "V": "101101101101010",
    "W": "101101111111101", "X": "101101010101101", "Y": "101101010010010", "Z": "111001010100111",
    " ": "000000000000000", ".": "000000000000010", ":": "000010000010000", "-": "000000111000000",
    "/": "001001010100100", "(": "010100100100010", ")": "010001001001010", "%": "101001010100101",
    "=": "000111000111000", ",": "000000000010100", "_": "000000000000111", "+": "000010111010000",
    ">": "100010001010100", "<": "001010100010001", ";": "000010000010100", "?": "111001010000010",
}  # fmt: skip
SCALE = 2
CHAR_W = 4 * SCALE  # glyph and one column of space


class Canvas:
    def __init__(self, width: int, height: int, background: RGB = WHITE):
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def rect(self, x0: float, y0: float, x1: float, y1: float, colour: RGB) -> None:
        """Fill [x0, x1) x [y0, y1), clipped; at least one pixel wide and high."""
        xa, xb = max(0, int(x0)), min(self.width, max(int(x1), int(x0) + 1))
        ya, yb = max(0, int(y0)), min(self.height, max(int(y1), int(y0) + 1))
        if xa >= xb or ya >= yb:
            return
        row = bytes(colour) * (xb - xa)
        for y in range(ya, yb):
            i = 3 * (y * self.width + xa)
            self.pixels[i : i + len(row)] = row

    def frame(self, x0: float, y0: float, x1: float, y1: float, colour: RGB) -> None:
        self.rect(x0, y0, x1, y0 + 1, colour)
        self.rect(x0, y1 - 1, x1, y1, colour)
        self.rect(x0, y0, x0 + 1, y1, colour)
        self.rect(x1 - 1, y0, x1, y1, colour)

    def text(self, x: int, y: int, s: str, colour: RGB = BLACK) -> int:
        """Draw ``s`` (upper-cased) with its top left at (x, y); returns the x after it."""
        for ch in s.upper():
            bits = _GLYPHS.get(ch, _GLYPHS["?"])
            for k, bit in enumerate(bits):
                if bit == "1":
                    r, c = divmod(k, 3)
                    self.rect(x + c * SCALE, y + r * SCALE, x + (c + 1) * SCALE, y + (r + 1) * SCALE, colour)
            x += CHAR_W
        return x

    def png(self) -> bytes:
        raw = b"".join(
            b"\x00" + bytes(self.pixels[3 * y * self.width : 3 * (y + 1) * self.width])
            for y in range(self.height)
        )

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b"")
        )


def _legend(canvas: Canvas, x: int, y: int, colours: dict[str, RGB]) -> None:
    for name, colour in colours.items():
        canvas.rect(x, y, x + 12, y + 10, colour)
        x = canvas.text(x + 16, y, name) + 16


def draw_arena(canvas: Canvas, step: StepArena, n_layers: int, box: tuple[int, int, int, int]) -> None:
    """The level-2 layout in ``box`` (x0, y0, x1, y1): slots across, offsets up."""
    x0, y0, x1, y1 = box
    peak = max(step.peak, 1)
    dx = (x1 - x0) / step.slots
    for placed, offset in zip(step.tensors, step.layout.offsets, strict=True):
        it = placed.item
        top = y1 - (offset + it.size) / peak * (y1 - y0)
        bottom = y1 - offset / peak * (y1 - y0)
        colour = KIND_COLOURS[placed.kind]
        canvas.rect(x0 + it.start * dx, top, x0 + it.end * dx, bottom, colour)
        if bottom - top >= 3 and dx >= 3:  # a lighter edge separates neighbours of one kind
            canvas.frame(x0 + it.start * dx, top, x0 + it.end * dx, bottom, WHITE)
    # phase boundaries: forward | loss | backward | optimizer
    marks = ((1, "FWD"), (n_layers + 1, "LOSS"), (n_layers + 2, "BWD"), (2 * n_layers + 2, "OPT"))
    for k, (slot, name) in enumerate(marks):
        canvas.rect(x0 + slot * dx, y0, x0 + slot * dx + 1, y1, GREY)
        canvas.text(int(x0 + slot * dx) + 2, y1 + 4 + 14 * (k % 2), name)
    canvas.rect(x0, y0, x1, y0 + 2, RED)  # the peak
    canvas.frame(x0, y0, x1, y1, BLACK)
    canvas.text(x0, y0 - 14, f"peak {format_bytes(step.peak)}", RED)
    canvas.text(x0 - 2 * CHAR_W, y1 - 10, "0")


def draw_layers(canvas: Canvas, result: dict, box: tuple[int, int, int, int]) -> None:
    """One bar per layer (module docstring) in ``box``."""
    x0, y0, x1, y1 = box
    modes: Sequence[str] = result["modes"]
    n = max(len(modes), 1)
    dx = (x1 - x0) / n
    for i, mode in enumerate(modes):
        alpha, tier, rows = result["alpha"][i], result["tiers"][i], result["tile_rows"][i]
        key = f"tokenwise {tier}" if mode == "tokenwise" else mode
        height = (alpha if mode == "tokenwise" else 1.0) * (y1 - y0)
        left, right = x0 + i * dx + (1 if dx > 4 else 0), x0 + (i + 1) * dx - (1 if dx > 4 else 0)
        height = max(height, 4)  # alpha 0 still shows its colour
        canvas.rect(left, y1 - height, right, y1, MODE_COLOURS.get(key, GREY))
        if rows:
            canvas.rect(left, y1 - height - 3, right, y1 - height, BLACK)
    canvas.frame(x0, y0, x1, y1, BLACK)
    canvas.text(x0 - 2 * CHAR_W, y0, "1")
    canvas.text(x0 - 2 * CHAR_W, y1 - 10, "0")
    canvas.text(x0, y1 + 4, "LAYER 0")
    canvas.text(x1 - 9 * CHAR_W, y1 + 4, f"LAYER {n - 1}")


def plan_png(result: dict, step: StepArena, layers_line: str, title: str) -> bytes:
    """The picture of one ``longtrain plan`` result (module docstring)."""
    width, height = 1000, 760
    canvas = Canvas(width, height)
    left, right = 80, width - 20
    canvas.text(left, 8, title[: (right - left) // CHAR_W])
    arena = result["arena"]
    canvas.text(
        left,
        26,
        f"arena (level 2): peak {format_bytes(arena['peak'])}, {format_bytes(arena['fragmentation'])} above "
        f"max-live, {arena['method']}; offset up, time across",
    )
    _legend(canvas, left, 46, KIND_COLOURS)
    draw_arena(canvas, step, len(result["modes"]), (left, 80, right, 460))
    canvas.text(left, 496, "per layer: alpha (bar height), mode and tier (colour), tiles (black cap)")
    _legend(canvas, left, 514, MODE_COLOURS)
    draw_layers(canvas, result, (left, 534, right, 690))
    y, per_line = 714, (right - left) // CHAR_W
    for line in _wrap(layers_line, per_line)[:3]:
        canvas.text(left, y, line)
        y += 14
    return canvas.png()


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, line]


def check_writable(path: str) -> str | None:
    """Why ``path`` cannot take the picture (None: it can), before any planning runs."""
    p = Path(path)
    if p.is_dir():
        return "is a directory"
    if not p.parent.is_dir():
        return f"directory {p.parent} does not exist"
    return None
