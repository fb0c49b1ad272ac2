"""The bad-input corpus: malformed images, written at test time, each with its expected outcome.

Nothing binary is committed: every case is a small writer that produces the file in a real
format (Pillow encoders, or bytes laid out by hand where no encoder would write such a file).
``expected`` is ``"ok"`` (the image decodes; ``size`` is the ``(W, H)`` after EXIF orientation and
``check`` tests the pixels after the mode conversion) or ``"skip:<substring of the reason>"``.
The annotation and checkpoint faults are built next to their tests in ``test_bad_inputs.py``,
since each needs a whole annotation file or checkpoint around it.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

EXIF_ORIENTATION = 0x0112
#: Stored size of the EXIF cases: not square, so orientations 5-8 visibly swap the sides.
EXIF_STORED = (40, 24)


@dataclass(frozen=True)
class Case:
    """One file of the corpus.

    Attributes:
        name: File name (its suffix is what the image folder lists it by).
        write: Writes the file to the given path.
        expected: ``"ok"`` or ``"skip:<reason substring>"``.
        size: For ``ok``, the ``(W, H)`` the decoded image must have.
        check: For ``ok``, a test of the decoded ``uint8`` ``(3, H, W)`` tensor.
    """

    name: str
    write: Callable[[Path], None]
    expected: str
    size: tuple[int, int] | None = None
    check: Callable[[torch.Tensor], bool] | None = None


# ------------------------------------------------------------------------------ pixel sources


def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def gradient(width: int, height: int) -> np.ndarray:
    """Smooth RGB content: survives JPEG well enough to compare pixels with a tolerance."""
    yy, xx = np.mgrid[:height, :width]
    return np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + yy) % 256], -1).astype(np.uint8)


def jpeg_bytes(width: int = 64, height: int = 48, **save: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(noise(width, height)).save(buffer, format="JPEG", quality=90, **save)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose IHDR declares ``width x height`` 8-bit gray, with ``idat`` as its only pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunks = png_chunk(b"IHDR", ihdr) + (png_chunk(b"IDAT", idat) if idat else b"") + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


# ------------------------------------------------------------------------------------ writers


def _bytes(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def _save(image: Callable[[], Image.Image], fmt: str, **options: object) -> Callable[[Path], None]:
    return lambda path: image().save(path, format=fmt, **options)


def _cut(write: Callable[[Path], None], end: int) -> Callable[[Path], None]:
    """``write``, then keep only the bytes before ``end`` (negative: cut that many off the end)."""

    def cut(path: Path) -> None:
        write(path)
        path.write_bytes(path.read_bytes()[:end])

    return cut


def _truncated_jpeg(fraction: float) -> Callable[[Path], None]:
    data = jpeg_bytes()
    return _bytes(data[: int(len(data) * fraction)])


def _exif_jpeg(orientation: int) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        Image.fromarray(gradient(*EXIF_STORED)).save(path, format="JPEG", quality=95, exif=exif)

    return write


def _animated_gif(path: Path) -> None:
    frames = [Image.new("RGB", (16, 12), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _truncated_gif(path: Path) -> None:
    Image.fromarray(noise(32, 32)).convert("P").save(path, format="GIF")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _sixteen_bit(path: Path) -> None:
    values = np.array([[0, 257 * 100, 65535, 1000]] * 3, dtype=np.uint16)  # (3, 4)
    Image.fromarray(values).save(path, format="PNG")


def _rgba(path: Path) -> None:
    pixels = np.zeros((6, 8, 4), dtype=np.uint8)
    pixels[..., :3] = 200
    pixels[:, :4, 3] = 255  # left half opaque, right half fully transparent
    Image.fromarray(pixels, "RGBA").save(path, format="PNG")


def _palette_transparent(path: Path) -> None:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
    image.info["transparency"] = 1
    image.save(path, format="PNG", transparency=1)


def _float_tiff(path: Path) -> None:
    Image.fromarray(np.linspace(0.0, 1.0, 40, dtype=np.float32).reshape(5, 8), "F").save(path, format="TIFF")


def _corrupt_png_idat(path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(noise(32, 32)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"IDAT") + 4
    data[start + 10 : start + 60] = bytes(50)  # zeroed deflate stream; the CRC no longer matches either
    path.write_bytes(bytes(data))


def _bad_exif_jpeg(path: Path) -> None:
    # Orientation 9 does not exist: the pixels must come back as stored, not be refused.
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 9
    Image.fromarray(gradient(20, 10)).save(path, format="JPEG", exif=exif)


def _near(expected: tuple[int, ...], at: tuple[int, int] = (0, 0), tol: int = 12) -> Callable[[torch.Tensor], bool]:
    """The pixel at ``(y, x)`` is within ``tol`` of the RGB ``expected`` (JPEG is lossy)."""
    return lambda image: bool((image[:, at[0], at[1]].int() - torch.tensor(expected)).abs().max() <= tol)


# --------------------------------------------------------------------------------------- table

_GRAY16_ROW = [0, 100, 255, 4]  # 16-bit row 0, 25700, 65535, 1000 divided by 257, rounded


def _exif_case(orientation: int) -> Case:
    width, height = EXIF_STORED
    size = (height, width) if orientation >= 5 else (width, height)
    return Case(f"exif-orientation-{orientation}.jpg", _exif_jpeg(orientation), "ok", size)


def image_cases() -> list[Case]:
    """Every image case, in no particular order (the folder lists them sorted by name)."""
    whole = jpeg_bytes()
    cases = [
        Case("good.jpg", _bytes(whole), "ok", (64, 48)),
        *(Case(f"truncated-{int(f * 100):02d}pct.jpg", _truncated_jpeg(f), "skip:truncated or corrupt")
          for f in (0.25, 0.5, 0.75, 0.95)),
        Case("truncated-soi-only.jpg", _bytes(whole[:2]), "skip:not a recognized image"),
        Case("truncated-header.jpg", _bytes(whole[:300]), "skip:truncated or corrupt"),
        Case("zero-byte.jpg", _bytes(b""), "skip:zero-byte file"),
        Case("random-bytes.jpg", _bytes(np.random.default_rng(7).bytes(4096)), "skip:not a recognized image"),
        Case("html-error-page.jpg", _bytes(b"<!DOCTYPE html><html><body>403 Forbidden</body></html>"),
             "skip:not a recognized image"),
        Case("text.png", _bytes(b"just some text\n" * 20), "skip:not a recognized image"),
        Case("png-named.jpg", _save(lambda: Image.fromarray(noise(10, 7)), "PNG"), "ok", (10, 7)),
        Case("jpeg-named.png", _bytes(jpeg_bytes(12, 9)), "ok", (12, 9)),
        Case("cmyk.jpg", _save(lambda: Image.new("CMYK", (16, 8), (255, 0, 0, 0)), "JPEG", quality=95), "ok",
             (16, 8), _near((0, 255, 255))),
        Case("cmyk.tif", _save(lambda: Image.new("CMYK", (6, 4), (0, 0, 0, 255)), "TIFF"), "ok", (6, 4),
             _near((0, 0, 0), tol=0)),
        Case("gray16.png", _sixteen_bit, "ok", (4, 3),
             lambda image: image[0, 0].tolist() == _GRAY16_ROW and bool((image[0] == image[2]).all())),
        Case("float.tif", _float_tiff, "ok", (8, 5), lambda image: int(image[0, 0, 0]) == 0 and int(image[0, 4, 7]) == 255),
        Case("la.png", _save(lambda: Image.new("LA", (5, 5), (120, 255)), "PNG"), "ok", (5, 5), _near((120, 120, 120), tol=0)),
        Case("rgba.png", _rgba, "ok", (8, 6),
             lambda image: image[:, 0, 0].tolist() == [200] * 3 and image[:, 0, 7].tolist() == [0] * 3),
        Case("palette.png", _save(lambda: Image.fromarray(noise(9, 9)).convert("P"), "PNG"), "ok", (9, 9)),
        Case("palette-transparent.png", _palette_transparent, "ok", (8, 8), _near((0, 0, 0), tol=0)),
        Case("bilevel.png", _save(lambda: Image.new("1", (7, 3), 1), "PNG"), "ok", (7, 3), _near((255, 255, 255), tol=0)),
        Case("gray.jpg", _save(lambda: Image.new("L", (8, 8), 90), "JPEG"), "ok", (8, 8), _near((90, 90, 90), tol=2)),
        *(_exif_case(k) for k in range(2, 9)),
        Case("exif-orientation-invalid.jpg", _bad_exif_jpeg, "ok", (20, 10)),
        Case("animated.gif", _animated_gif, "ok", (16, 12), _near((255, 0, 0), tol=0)),
        Case("bomb-declared-10gpx.png", _bytes(png_header_only(100_000, 100_000)), "skip:decompression bomb"),
        # Over the 89.5 Mpx limit but under Pillow's own hard error: selftrain's check must catch it.
        # Its pixel data is garbage, so a decode attempt would say "corrupt", not "bomb".
        Case("bomb-declared-100mpx.png", _bytes(png_header_only(10_000, 10_000, b"junk")), "skip:decompression bomb"),
        Case("bomb-one-row.png", _bytes(png_header_only(100_000_000, 1)), "skip:decompression bomb"),
        Case("one-pixel.png", _save(lambda: Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), "ok", (1, 1),
             _near((1, 2, 3), tol=0)),
        Case("one-pixel.jpg", _save(lambda: Image.new("RGB", (1, 1), (200, 100, 50)), "JPEG", quality=100), "ok", (1, 1),
             _near((200, 100, 50))),
        Case("one-pixel.gif", _save(lambda: Image.new("P", (1, 1), 0), "GIF"), "ok", (1, 1)),
        Case("png-no-pixel-data.png", _bytes(png_header_only(8, 8)), "skip:truncated or corrupt"),
        Case("png-corrupt-idat.png", _corrupt_png_idat, "skip:truncated or corrupt"),
        Case("png-truncated.png", _cut(_save(lambda: Image.fromarray(noise(32, 32)), "PNG"), 400),
             "skip:truncated or corrupt"),
        Case("gif-truncated.gif", _truncated_gif, "skip:truncated or corrupt"),
        Case("gif-header-only.gif", _cut(_animated_gif, 40), "skip:not a recognized image"),
        # Frames 2 and 3 cut off: only frame 0 is read, and it is whole.
        Case("animated-cut-after-frame-0.gif", _cut(_animated_gif, -20), "ok", (16, 12), _near((255, 0, 0), tol=0)),
        Case("bmp.bmp", _save(lambda: Image.fromarray(noise(6, 5)), "BMP"), "ok", (6, 5)),
        Case("webp.webp", _save(lambda: Image.fromarray(gradient(10, 8)), "WEBP", lossless=True), "ok", (10, 8)),
    ]
    return cases


def write_cases(folder: Path, cases: list[Case]) -> dict[str, Case]:
    """Writes every case into ``folder``; returns them by file name."""
    folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        case.write(folder / case.name)
    return {case.name: case for case in cases}


class Payload:
    """A pickle payload: unpickling it calls ``open(marker, "w")``, creating the marker file.

    A loader that runs pickled code would leave the marker behind; a safe one never does.
    """

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))
