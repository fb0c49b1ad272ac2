"""Tests for decode_image: every failure mode and mode conversion, built with PIL."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from selftrain.data import BadImageError, decode_image
from selftrain.data.images import resize_center_crop


def noise_rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit PNG of a huge blank canvas, a few kB on disk.

    Built by hand so the test never holds the full image in memory.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    path.write_bytes(png)
    return path


def test_zero_byte_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(BadImageError) as info:
        decode_image(p)
    assert info.value.path == str(p) and info.value.reason == "zero-byte file"
    assert str(info.value) == f"{p}: zero-byte file"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BadImageError, match="cannot read file"):
        decode_image(tmp_path / "nope.png")


def test_random_bytes_named_jpg(tmp_path: Path) -> None:
    p = tmp_path / "junk.jpg"
    p.write_bytes(np.random.default_rng(1).bytes(2000))
    with pytest.raises(BadImageError) as info:
        decode_image(p)
    assert info.value.reason.startswith("not a recognized image (")


def test_png_named_jpg_decodes(tmp_path: Path) -> None:
    p = tmp_path / "really_a_png.jpg"
    noise_rgb(10, 6).save(p, format="PNG")
    out = decode_image(p)
    assert out.shape == (3, 6, 10) and out.dtype == torch.uint8
    assert torch.equal(out, torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1))


def test_truncated_jpeg(tmp_path: Path) -> None:
    buf = io.BytesIO()
    noise_rgb(64, 64).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    p = tmp_path / "half.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError) as info:
        decode_image(p)
    assert info.value.reason.startswith("truncated or corrupt image data (")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(p, quality=95)  # pure cyan
    out = decode_image(p)
    assert out.shape == (3, 8, 8)
    r, g, b = (int(c) for c in out[:, 4, 4])
    assert r < 20 and g > 235 and b > 235


def test_16bit_png_is_rescaled_not_clipped(tmp_path: Path) -> None:
    values = np.linspace(0, 65535, 32 * 16).astype(np.uint16).reshape(16, 32)
    p = tmp_path / "deep.png"
    Image.fromarray(values).save(p)
    assert Image.open(p).mode in ("I;16", "I")
    out = decode_image(p, channels=1)
    assert out.shape == (1, 16, 32)
    assert int(out.min()) == 0 and int(out.max()) == 255
    assert abs(int(out[0, 8, 0]) - round(int(values[8, 0]) / 257)) <= 1
    assert len(torch.unique(out)) > 200  # a gradient, not a white clip


def test_32bit_and_float_images_are_rescaled(tmp_path: Path) -> None:
    p = tmp_path / "f.tif"
    Image.fromarray(np.linspace(-5.0, 5.0, 64, dtype=np.float32).reshape(8, 8), "F").save(p)
    out = decode_image(p, channels=1)
    assert int(out.min()) == 0 and int(out.max()) == 255


def test_palette_with_transparency(tmp_path: Path) -> None:
    im = Image.new("P", (4, 4), 1)
    im.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    im.putpixel((0, 0), 0)
    p = tmp_path / "pal.png"
    im.save(p, transparency=0)
    out = decode_image(p)
    assert out[:, 0, 0].tolist() == [0, 0, 0]  # transparent -> black
    assert out[:, 2, 2].tolist() == [200, 100, 50]


@pytest.mark.parametrize(
    ("mode", "color", "expected"),
    [("LA", (200, 128), [100, 100, 100]), ("RGBA", (200, 100, 50, 128), [100, 50, 25])],
)
def test_alpha_composited_on_black(tmp_path: Path, mode: str, color: tuple, expected: list) -> None:
    p = tmp_path / f"{mode}.png"
    Image.new(mode, (5, 3), color).save(p)
    out = decode_image(p)
    assert out.shape == (3, 3, 5)
    assert all(abs(a - b) <= 1 for a, b in zip(out[:, 1, 1].tolist(), expected))


def test_bilevel_and_grayscale(tmp_path: Path) -> None:
    bilevel = Image.new("1", (6, 4), 0)
    bilevel.putpixel((1, 1), 1)
    p1 = tmp_path / "bw.png"
    bilevel.save(p1)
    out = decode_image(p1, channels=1)
    assert out.shape == (1, 4, 6) and set(torch.unique(out).tolist()) == {0, 255}

    p2 = tmp_path / "gray.png"
    Image.new("L", (6, 4), 77).save(p2)
    assert decode_image(p2, channels=1).unique().tolist() == [77]
    rgb = decode_image(p2, channels=3)
    assert rgb.shape == (3, 4, 6) and rgb.unique().tolist() == [77]


def test_rgb_to_gray_uses_pil_luma(tmp_path: Path) -> None:
    p = tmp_path / "red.png"
    Image.new("RGB", (3, 3), (255, 0, 0)).save(p)
    assert decode_image(p, channels=1).unique().tolist() == [76]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored pixels must be rotated 90 degrees clockwise
    p = tmp_path / "rotated.jpg"
    noise_rgb(40, 20).save(p, exif=exif)
    assert Image.open(p).size == (40, 20)
    assert decode_image(p).shape == (3, 40, 20)


def test_animated_gif_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(p).n_frames == 3
    out = decode_image(p)
    assert out.shape == (3, 8, 8) and out[:, 3, 3].tolist() == [255, 0, 0]


def test_decompression_bomb_rejected_before_decoding(tmp_path: Path) -> None:
    filters = list(warnings.filters)
    max_pixels = Image.MAX_IMAGE_PIXELS
    # 144 Mpx: above our limits, below Pillow's hard limit (2 x MAX_IMAGE_PIXELS).
    p = bomb_png(tmp_path / "bomb.png", 12000, 12000)
    assert p.stat().st_size < 100_000
    with pytest.raises(BadImageError) as info:
        decode_image(p, max_pixels=10_000_000)
    assert info.value.reason == "decompression bomb: 12000×12000 pixels exceeds limit 10000000"
    with pytest.raises(BadImageError, match=f"12000×12000 pixels exceeds limit {max_pixels}"):
        decode_image(p)
    # 400 Mpx: Pillow itself refuses while reading the header; still a BadImageError.
    huge = bomb_png(tmp_path / "huge.png", 20000, 20000)
    with pytest.raises(BadImageError, match="decompression bomb"):
        decode_image(huge, max_pixels=10_000_000)
    assert warnings.filters == filters and Image.MAX_IMAGE_PIXELS == max_pixels


def test_max_pixels_applies_to_ordinary_images(tmp_path: Path) -> None:
    p = tmp_path / "small.png"
    noise_rgb(20, 20).save(p)
    with pytest.raises(BadImageError, match="20×20 pixels exceeds limit 100"):
        decode_image(p, max_pixels=100)


def test_invalid_channels(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="channels"):
        decode_image(tmp_path / "x.png", channels=4)


def test_resize_center_crop() -> None:
    wide = torch.zeros((3, 20, 40), dtype=torch.uint8)
    wide[:, :, 20:] = 255
    out = resize_center_crop(wide, 10)
    assert out.shape == (3, 10, 10)
    # The center crop keeps both halves, dark on the left, bright on the right.
    assert int(out[0, 5, 0]) == 0 and int(out[0, 5, 9]) == 255
    batch = torch.full((2, 1, 30, 10), 90, dtype=torch.uint8)
    assert resize_center_crop(batch, 5).shape == (2, 1, 5, 5)
    assert resize_center_crop(batch, 5).unique().tolist() == [90]
    square = torch.ones((1, 7, 7), dtype=torch.uint8)
    assert resize_center_crop(square, 7) is square
