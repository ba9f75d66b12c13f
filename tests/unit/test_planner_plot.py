"""``longtrain plan ... --plot FILE.png`` (planner/plot.py): a valid PNG of a sane size that shows
the arena and the layers, and a bad path as a one-line error naming ``--plot``."""

from __future__ import annotations

import struct
import zlib

import pytest

from longtrain.planner.plot import KIND_COLOURS, MODE_COLOURS
from longtrain.trainer.cli import main


def read_png(data: bytes) -> tuple[int, int, bytes]:
    """(width, height, raw scanlines) of an 8-bit RGB PNG, every chunk's CRC checked."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        pos += 12 + length
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, colour, _, _, _ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour) == (8, 2)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    return width, height, raw


def test_plot_writes_a_png_of_the_arena_and_the_layers(capsys, tmp_path):
    path = tmp_path / "plan.png"
    code = main(["plan", "tiny_cpu", "hardware=h100_80g", "--plot", str(path)])
    assert code == 0, capsys.readouterr()
    width, height, raw = read_png(path.read_bytes())
    assert 400 <= width <= 4000 and 300 <= height <= 4000
    assert len(raw) == height * (1 + 3 * width)
    rows = [raw[y * (1 + 3 * width) : (y + 1) * (1 + 3 * width)] for y in range(height)]
    assert all(r[0] == 0 for r in rows)  # filter type none
    pixels = {p for r in rows for p in zip(r[1::3], r[2::3], r[3::3], strict=True)}
    # tiny_cpu keeps every layer: forward and backward blocks, held activations, the keep bar
    for colour in (KIND_COLOURS["forward"], KIND_COLOURS["backward"], MODE_COLOURS["keep"]):
        assert colour in pixels


@pytest.mark.parametrize("where", ["missing/plan.png", "."])
def test_a_bad_plot_path_is_one_line_naming_plot(capsys, tmp_path, where):
    path = tmp_path / where
    code = main(["plan", "tiny_cpu", "hardware=h100_80g", "--plot", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--plot" in err[0], err
    assert not (tmp_path / "missing").exists()
