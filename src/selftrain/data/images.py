"""Safe image decoding: one file in, one ``uint8`` ``(C, H, W)`` tensor out.

Real-world image folders contain empty files, HTML error pages saved as ``.jpg``,
half-downloaded JPEGs, CMYK scans, 16-bit PNGs and decompression bombs. Every
such failure is turned into a :class:`BadImageError` that names the file, so a
scan can skip it and report why, instead of crashing a long run or silently
feeding garbage to a model.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from selftrain.data.sources import BadImageError

#: Pillow's own default limit (~89.5 Mpx, a 9459x9459 RGB image).
DEFAULT_MAX_PIXELS = 89_478_485

# Exceptions Pillow raises for damaged pixel data. Pillow is not consistent about
# which one a given plugin uses, so all of them mean "corrupt" here.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)

_ALPHA_MODES = {"LA", "La", "RGBA", "RGBa", "PA", "P"}
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


def decode_image(
    path: str | Path,
    channels: int = 3,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    data: bytes | None = None,
) -> torch.Tensor:
    """Decode one image file fully and return it as a ``uint8`` ``(C, H, W)`` tensor.

    EXIF orientation is applied, animated images yield their first frame, and
    exotic modes are mapped to 8 bits: CMYK -> RGB, 16/32-bit and float images
    are rescaled (not clipped) to 0..255, palette and alpha images are
    composited on black, bilevel images become 0/255 grayscale.

    Args:
        path: Image file.
        channels: 1 for grayscale ("L"), 3 for RGB.
        max_pixels: Reject images whose header claims more than this many
            pixels, before any pixel data is decoded.
        data: The file's bytes, already read (e.g. from an object store); ``path``
            then only names the image in errors. Decoding is the same as for a file.

    Returns:
        ``uint8`` tensor of shape ``(channels, H, W)``.

    Raises:
        BadImageError: The file is empty, not an image, truncated/corrupt, or a
            decompression bomb. ``str(e)`` is ``"{path}: {reason}"``.
        ValueError: ``channels`` is not 1 or 3.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    path_str = str(path)
    if data is not None:
        size = len(data)
    else:
        try:
            size = Path(path).stat().st_size
        except OSError as exc:
            raise BadImageError(path_str, f"cannot read file ({exc.strerror or exc})") from exc
    if size == 0:
        raise BadImageError(path_str, "zero-byte file")

    # Pillow's bomb warning uses its global limit, not ours; silence it locally
    # (the global filter list is restored on exit) and enforce `max_pixels`
    # ourselves below with a precise message. Pillow's hard error (2x its
    # global limit) still fires inside Image.open and is converted too.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path if data is None else io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise BadImageError(path_str, f"decompression bomb: {exc}") from exc
        except UnidentifiedImageError as exc:
            reason = "not a recognized image (no decoder accepts its header)"
            raise BadImageError(path_str, reason) from exc
        except DECODE_ERRORS as exc:
            raise BadImageError(path_str, f"truncated or corrupt image data ({exc})") from exc
        with image:
            rgb_or_l = _decode_opened(image, path_str, channels, max_pixels)
    return _to_tensor(rgb_or_l)


def _decode_opened(image: Image.Image, path: str, channels: int, max_pixels: int) -> Image.Image:
    """Check the header size, force a full decode and normalize the mode."""
    width, height = image.size
    if width * height > max_pixels:
        raise BadImageError(
            path, f"decompression bomb: {width}×{height} pixels exceeds limit {max_pixels}"
        )
    try:
        # `load()` decodes every byte now, so a truncated file fails here
        # rather than later inside a data-loader worker. Animated images stay
        # on frame 0, which is what Image.open selects.
        image.load()
        image = _exif_transpose(image)
        return _normalize_mode(image, channels)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError(path, f"decompression bomb: {exc}") from exc
    except DECODE_ERRORS as exc:
        raise BadImageError(path, f"truncated or corrupt image data ({exc})") from exc


def _exif_transpose(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation; broken EXIF metadata leaves the pixels as stored.

    A mangled EXIF block says nothing about the pixel data, so it should not
    cost us an otherwise valid image.
    """
    try:
        transposed = ImageOps.exif_transpose(image)
    except (SyntaxError, ValueError, KeyError, TypeError, struct.error):
        return image
    return transposed if transposed is not None else image


def _normalize_mode(image: Image.Image, channels: int) -> Image.Image:
    """Map any Pillow mode to "L" (channels=1) or "RGB" (channels=3)."""
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or mode in ("I", "F"):
        image = _rescale_to_l(image)
    elif mode == "1":
        image = image.convert("L")
    elif mode in _ALPHA_MODES or "transparency" in image.info:
        image = _composite_on_black(image)
    elif mode not in ("L", "RGB"):
        # CMYK, YCbCr, LAB, HSV, RGBX, ...: Pillow's conversion handles the maths.
        image = image.convert("RGB")
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)


def _composite_on_black(image: Image.Image) -> Image.Image:
    """Flatten any alpha/transparency onto a black background, giving RGB."""
    rgba = image.convert("RGBA")
    black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, rgba).convert("RGB")


def _rescale_to_l(image: Image.Image) -> Image.Image:
    """Map a 16-bit, 32-bit integer or float image onto 8-bit grayscale.

    ``Image.convert("L")`` clips these to 255, which turns most 16-bit images
    white; rescaling keeps the contrast. 16-bit data (including "I" images
    whose values fit in 0..65535, which is how many decoders hand them over)
    is divided by 257 so the full 16-bit range maps exactly onto 0..255.
    Floats in 0..1 are multiplied by 255; anything else is min-max scaled.
    """
    values = np.asarray(image)
    if image.mode in SIXTEEN_BIT_MODES:
        scaled = _div257(values)
    else:
        values = values.astype(np.float64)
        finite = values[np.isfinite(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if image.mode == "I" and lo >= 0 and hi <= 65535:
            scaled = _div257(values)
        elif image.mode == "F" and lo >= 0 and hi <= 1:
            scaled = values * 255.0
        elif hi > lo:
            scaled = (values - lo) * (255.0 / (hi - lo))
        else:
            # A constant image has no range to stretch; keep it black.
            scaled = np.zeros_like(values)
        scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _div257(values: np.ndarray) -> np.ndarray:
    """65535 / 257 == 255 exactly, so this maps 16-bit onto 8-bit without clipping."""
    return values.astype(np.float64) / 257.0


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL "L"/"RGB" image -> contiguous ``uint8`` ``(C, H, W)`` tensor."""
    # np.array copies: np.asarray would share Pillow's read-only buffer.
    array = np.array(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so the shorter side is ``size`` (bilinear, antialiased), then center-crop.

    Args:
        images: ``uint8`` tensor ``(C, H, W)`` or ``(B, C, H, W)``.
        size: Output side length ``S``.

    Returns:
        ``uint8`` tensor ``(C, S, S)`` or ``(B, C, S, S)``; the input itself when
        it is already ``S x S``.
    """
    if size < 1:
        raise ValueError(f"image_size must be a positive integer, got {size!r}")
    height, width = images.shape[-2:]
    if height == size and width == size:
        return images
    batched = images if images.ndim == 4 else images.unsqueeze(0)
    if height <= width:
        new_h, new_w = size, max(size, round(width * size / height))
    else:
        new_h, new_w = max(size, round(height * size / width)), size
    if (new_h, new_w) != (height, width):
        # Interpolating in float and rounding keeps the result unbiased; casting
        # straight back to uint8 would truncate every value downwards.
        resized = F.interpolate(
            batched.float(),
            size=(new_h, new_w),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
        batched = resized.round_().clamp_(0, 255).to(torch.uint8)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    out = batched[..., top : top + size, left : left + size].contiguous()
    return out if images.ndim == 4 else out[0]
