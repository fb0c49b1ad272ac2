"""Shared machinery of the annotation readers: :class:`AnnotatedSource`, checks, resizing, skips.

Every annotation is read and checked once, when the source is built, so a malformed one is
dropped (or, with ``strict=True``, raised as :class:`BadAnnotationError` naming the file) before
training starts rather than hours into it: a bad box or keypoint row loses only that row; an image
whose mask or depth map is unusable, or whose file is missing, leaves the source. Each drop is a
``{"key", "path", "reason"}`` record in ``source.annotation_skips`` and a warning on the
``selftrain.data`` logger. For VOC and depth this means decoding every map once at build time.
A file that cannot be parsed at all is always a :class:`DataError`. Images whose pixels cannot be
decoded stay in the source and raise :class:`BadImageError` from ``load``, exactly as in image
folders, so :func:`~selftrain.data.scan` counts them.

Geometry: targets are in the pixels of the image as ``load`` returns it (EXIF orientation
applied). Annotations are read as made on the stored pixels, so when decoding applies an EXIF
orientation (2-8) the boxes, keypoints and masks are flipped/rotated with the image
(:func:`~selftrain.data.targets.orient_targets`). Only annotations whose declared size is the
displayed size and not the stored one (orientations 5-8 of a non-square image) are taken as made
on the displayed image and left as they are; keypoint tables, which declare no size, are always
in displayed pixels.

With ``image_size=S`` the image is resized to exactly ``S x S`` -- no crop, so the aspect ratio
changes but no box, point or mask pixel is cut away -- x coordinates are multiplied by ``S / W``
and y by ``S / H``, and masks and depth maps are resized by nearest neighbour (pixel centres), so
a mask never gains in-between classes and depth never blends an object with the background
behind it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from selftrain.data.images import DECODE_ERRORS, DEFAULT_MAX_PIXELS, decode_image
from selftrain.data.sources import BadImageError, DataError
from selftrain.data.targets import BadAnnotationError, DenseSource, orient_targets, oriented_size

logger = logging.getLogger("selftrain.data")

_DTYPES = {
    "boxes": np.float32, "labels": np.int64, "scores": np.float32,
    "mask": np.int64, "depth": np.float32, "keypoints": np.float32,
    "points3d": np.float32, "au": np.float32, "valence_arousal": np.float32,
}  # fmt: skip
# One warning per drop floods the log for a big, slightly dirty dataset; the rest are only counted.
_LOGGED_SKIPS = 20
_PROGRESS_MIN_ITEMS = 1000
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class _Item:
    """One image of a source.

    Attributes:
        key: Stable unique key (split files, manifests, skip records).
        image: Image file.
        size: ``(W, H)`` of the image its annotations were made on -- the stored pixels, or the
            displayed ones (see the module docstring) -- or ``None`` when the annotations do not
            depend on it (keypoint tables).
    """

    key: str
    image: Path
    size: tuple[int, int] | None


class _SkipLog:
    """Collects the drops of one build, so none disappears; raises on the first in strict mode."""

    def __init__(self, uri: str, strict: bool) -> None:
        self.uri = uri
        self.strict = strict
        self.records: list[dict[str, str]] = []

    def add(self, key: str, path: Path | str, reason: str) -> None:
        if self.strict:
            raise BadAnnotationError(str(path), f"{key}: {reason}")
        self.records.append({"key": key, "path": str(path), "reason": reason})
        if len(self.records) <= _LOGGED_SKIPS:
            logger.warning("%s: dropping %s (%s): %s", self.uri, key, path, reason)

    def finish(self, kept: int) -> list[dict[str, str]]:
        """Logs the total and refuses a source that lost every image."""
        if len(self.records) > _LOGGED_SKIPS:
            logger.warning(
                "%s: %d annotation problems in all (first %d logged); see source.annotation_skips",
                self.uri, len(self.records), _LOGGED_SKIPS,
            )  # fmt: skip
        if kept == 0:
            first = "; ".join(f"{r['key']}: {r['reason']}" for r in self.records[:3])
            raise DataError(f"{self.uri}: no usable images ({len(self.records)} dropped{': ' if first else ''}{first})")
        return self.records


class AnnotatedSource(DenseSource):
    """Image files plus per-image targets read from annotation files.

    Subclasses supply the targets in original pixels (:meth:`_raw_targets`); this class decodes
    the images, checks that each has the size its annotations were made for, and applies the
    ``image_size`` resize to image and targets alike. ``labels`` (image-level, for stratified
    splits) and ``mask_classes`` follow :class:`~selftrain.data.targets.DenseSource`; without
    ``labels`` every image is ``-1`` and splits are drawn unstratified.
    """

    def __init__(
        self,
        uri: str,
        items: list[_Item],
        *,
        classes: list[str] | None,
        target_keys: tuple[str, ...],
        channels: int | None,
        image_size: int | None,
        skips: list[dict[str, str]],
        labels: np.ndarray | None = None,
        mask_classes: list[str] | None = None,
    ) -> None:
        super().__init__(
            uri,
            classes=classes,
            labels=np.full(len(items), -1, dtype=np.int64) if labels is None else labels,
            channels=channels or 3,
            image_size=image_size,
            in_memory=False,
        )
        self.target_keys = target_keys
        self.mask_classes = mask_classes
        self.annotation_skips = list(skips)
        self._items = items
        self._orientations: dict[int, int] = {}

    def key(self, i: int) -> str:
        return self._items[self._check_index(i)].key

    def path(self, i: int) -> str:
        """Image file of item ``i``."""
        return str(self._items[self._check_index(i)].image)

    def load(self, i: int) -> torch.Tensor:
        image = self._decode(i)
        return image if self.image_size is None else resize_exact(image, self.image_size)

    def load_targets(self, i: int) -> dict[str, torch.Tensor]:
        """Targets of item ``i`` in the pixels of :meth:`load`'s image (see the module docstring).

        Raises:
            BadAnnotationError: A mask or depth file changed since the source was built.
            BadImageError: Only for keypoint tables with ``image_size`` set, when the image
                header (needed for the scale) cannot be read.
        """
        i = self._check_index(i)
        size = self._original_size(i) if self.image_size is not None else None
        return self._finish(self._oriented_targets(i), size)

    def load_with_targets(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Image and targets of item ``i``, decoding the image only once."""
        image = self._decode(i)
        targets = self._finish(self._oriented_targets(i), (int(image.shape[2]), int(image.shape[1])))
        if self.image_size is not None:
            image = resize_exact(image, self.image_size)
        return image, targets

    def _raw_targets(self, i: int) -> dict[str, np.ndarray]:
        """Targets of item ``i`` in original pixels, as numpy arrays."""
        raise NotImplementedError

    def _oriented_targets(self, i: int) -> dict[str, np.ndarray]:
        """Targets of item ``i`` in original pixels, moved by the EXIF orientation decoding applies."""
        item = self._items[i]
        raw = self._raw_targets(i)
        return raw if item.size is None else orient_targets(raw, self._orientation(i), item.size)

    def _orientation(self, i: int) -> int:
        """The EXIF orientation to apply to item ``i``'s targets: 1 (none) unless they are in stored pixels."""
        if i not in self._orientations:
            item = self._items[i]
            geometry = _header_geometry(item.image) if item.size is not None else None
            orientation = 1
            if geometry is not None and geometry[1] in range(2, 9):
                stored, exif = geometry
                # Declared size == displayed size != stored size: annotated on the displayed image.
                on_display = item.size == oriented_size(stored, exif) != stored
                orientation = 1 if on_display else exif
            self._orientations[i] = orientation
        return self._orientations[i]

    def _decode(self, i: int) -> torch.Tensor:
        i = self._check_index(i)
        item = self._items[i]
        image = decode_image(item.image, channels=self.channels)
        height, width = image.shape[1:]
        if item.size is not None and (width, height) != oriented_size(item.size, self._orientation(i)):
            raise BadImageError(
                str(item.image), f"image is {width}x{height} but its annotations are for {item.size[0]}x{item.size[1]}"
            )
        return image

    def _original_size(self, i: int) -> tuple[int, int]:
        item = self._items[i]
        if item.size is not None:
            return oriented_size(item.size, self._orientation(i))
        size = _header_size(item.image)
        if size is None:
            raise BadImageError(str(item.image), "cannot read the image header to scale its targets")
        return size

    def _finish(self, raw: dict[str, np.ndarray], size: tuple[int, int] | None) -> dict[str, torch.Tensor]:
        if self.image_size is not None and size is not None:
            raw = resize_targets(raw, size, self.image_size)
        return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=_DTYPES[k])) for k, v in raw.items()}


def resize_exact(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resizes a ``uint8`` ``(C, H, W)`` image to exactly ``size x size`` (bilinear, antialiased).

    Dense sources do not crop (unlike :func:`~selftrain.data.images.resize_center_crop`) because a
    crop would cut boxes, points and mask regions, and dropping or clipping those silently changes
    the labels.
    """
    if tuple(image.shape[1:]) == (size, size):
        return image
    out = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


def resize_targets(targets: dict[str, np.ndarray], size: tuple[int, int], image_size: int) -> dict[str, np.ndarray]:
    """Moves targets from a ``W x H`` image to the ``S x S`` image of :func:`resize_exact`.

    Coordinates are scaled by ``S / W`` and ``S / H`` (the z of ``points3d`` by ``sqrt`` of their
    product); masks and depth maps take the value of the
    source pixel whose centre is nearest each output pixel's centre. Missing keypoints (v = 0)
    keep x = y = 0.
    """
    width, height = size
    sx, sy = image_size / width, image_size / height
    out = {}
    for name, value in targets.items():
        if name == "boxes":
            value = value * np.array([sx, sy, sx, sy], dtype=np.float64)
        elif name == "keypoints":
            value = value.astype(np.float64, copy=True)
            value[..., 0] *= sx
            value[..., 1] *= sy
        elif name == "points3d":
            # Depth has no axis of its own in the image; the geometric mean keeps sqrt(w * h) norms consistent.
            value = value * np.array([sx, sy, np.sqrt(sx * sy)])
        elif name in ("mask", "depth"):
            rows = np.minimum(((np.arange(image_size) + 0.5) * (height / image_size)).astype(np.int64), height - 1)
            cols = np.minimum(((np.arange(image_size) + 0.5) * (width / image_size)).astype(np.int64), width - 1)
            value = value[rows[:, None], cols[None, :]]
        out[name] = value
    return out


# -------------------------------------------------------------------------------------- helpers


def _split_uri(uri: str, rest: str, scheme: str, allowed: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """``PATH?a=1&b=2`` -> ``(PATH, {a: 1, b: 2})``; unknown or repeated parameters are errors."""
    target, _, query = rest.partition("?")
    if not target:
        raise DataError(f"{uri}: expected {scheme}:PATH")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise DataError(f"{uri}: malformed query {query!r} ({exc})") from exc
    params: dict[str, str] = {}
    for name, value in pairs:
        if name not in allowed:
            raise DataError(f"{uri}: unknown query parameter {name!r}; {scheme} accepts {', '.join(allowed)}")
        if name in params:
            raise DataError(f"{uri}: query parameter {name!r} given twice")
        params[name] = value
    return target, params


def _directory(uri: str, path: Path) -> Path:
    if not path.is_dir():
        raise DataError(f"{uri}: directory not found: {path}")
    return path


def _read_text(path: Path) -> str:
    try:
        # utf-8-sig: spreadsheet programs put a byte-order mark in front of the header.
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc


def _csv_rows(path: Path, skips: _SkipLog, *, key_column: str, expected: str) -> tuple[list[str], Iterator[tuple[str, list[str]]]]:
    """The header of a CSV file and a lazy iterator of its rows as ``("line N", stripped cells)``.

    Blank rows are passed over; a row the csv module cannot parse, or whose field count differs
    from the header's, goes to ``skips`` (keyed by its ``key_column`` cell where it has one).

    Raises:
        DataError: The file is unreadable or has no header (``expected`` says what it should be).
    """
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    header = [name.strip() for name in next(reader, None) or []]
    if not header:
        raise DataError(f"{path}: empty CSV file (expected a header {expected})")
    key = header.index(key_column) if key_column in header else None

    def rows() -> Iterator[tuple[str, list[str]]]:
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                skips.add(f"line {reader.line_num}", path, f"line {reader.line_num}: unparseable CSV ({exc})")
                continue
            where = f"line {reader.line_num}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                name = row[key].strip() if key is not None and len(row) > key else ""
                skips.add(name or where, path, f"{where}: {len(row)} fields, the header has {len(header)}")
                continue
            yield where, [cell.strip() for cell in row]

    return header, rows()


def _keep_rows(rows: list[tuple[str, str, Any]], images: Path, path: Path, skips: _SkipLog, *,
               twice: str) -> tuple[list[_Item], list[Any]]:  # fmt: skip
    """The ``(image name, "line N", value)`` rows of a table whose image exists, each image once.

    A repeated image (``twice`` says why) or a missing image file goes to ``skips``.
    """
    items, values, seen = [], [], set()
    for name, where, value in rows:
        if name in seen:
            skips.add(name, path, f"{where}: {twice}")
        elif not (images / name).is_file():
            skips.add(name, images / name, f"image file not found ({where} of {path.name})")
        else:
            items.append(_Item(name, images / name, None))
            values.append(value)
        seen.add(name)
    return items, values


def _read_json(path: Path) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from exc
    except RecursionError as exc:
        raise DataError(f"{path}: JSON nested too deeply") from exc


def _read_png(path: Path, what: str) -> tuple[np.ndarray, str]:
    """Decodes a mask or depth PNG with the same guards as images: size limit, corrupt data."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                width, height = image.size
                if width * height <= DEFAULT_MAX_PIXELS:
                    image.load()
                    return np.array(image), image.mode
        except (Image.DecompressionBombError, UnidentifiedImageError, *DECODE_ERRORS) as exc:
            raise DataError(f"{what} cannot be decoded ({exc})") from exc
    raise DataError(f"{what} is {width}x{height}, over the {DEFAULT_MAX_PIXELS}-pixel limit")


def _header_size(path: Path) -> tuple[int, int] | None:
    """``(W, H)`` of an image as :func:`decode_image` returns it, from the header alone.

    EXIF orientations 5-8 swap width and height, as decoding applies them. ``None`` when the
    header cannot be read: the image is then left for ``load``/``scan`` to report.
    """
    geometry = _header_geometry(path)
    return None if geometry is None else oriented_size(*geometry)


def _map_frame(geometry: tuple[tuple[int, int], int] | None, shape: tuple[int, ...]) -> tuple[int, int]:
    """``(W, H)`` a mask or depth map of ``shape`` must fit: the stored image's if it has that, else the displayed.

    A map the size of the stored pixels is taken as made on them and turns with the image; any
    other map must fit the displayed image (the size check then names that size). An unreadable
    header leaves the image to ``load``/``scan``, and the map is taken as it is.
    """
    if geometry is None:
        return (shape[1], shape[0]) if len(shape) > 1 else (0, 0)
    stored, orientation = geometry
    return stored if len(shape) > 1 and (shape[1], shape[0]) == stored else oriented_size(stored, orientation)


def _header_geometry(path: Path) -> tuple[tuple[int, int], int] | None:
    """``((W, H) of the stored pixels, EXIF orientation)`` from the header alone, or ``None``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                width, height = image.size
                try:
                    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
                except DECODE_ERRORS + (KeyError, TypeError):
                    orientation = 1
        except (Image.DecompressionBombError, UnidentifiedImageError, *DECODE_ERRORS):
            return None
    return (width, height), orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_int(value: Any) -> int | None:
    """An integer, or an integral float (some converters write ``640.0``); ``None`` otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _clean_points(points: np.ndarray, *, binary: bool) -> tuple[np.ndarray | None, str]:
    """Normalizes ``(P, 3)`` points; a visible point needs finite x, y and a missing one gets x = y = 0.

    Args:
        points: ``x, y, v`` rows.
        binary: Map ``v > 0`` to 1 (COCO visibility flags) instead of clipping ``v`` to ``[0, 1]``.
    """
    v = points[:, 2]
    if not np.isfinite(v).all():
        return None, f"point {int(np.flatnonzero(~np.isfinite(v))[0])}: non-finite visibility"
    v = (v > 0).astype(np.float64) if binary else np.clip(v, 0.0, 1.0)
    visible = v > 0
    bad = visible & ~np.isfinite(points[:, :2]).all(axis=1)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        return None, f"point {k}: non-finite coordinate ({points[k, 0]}, {points[k, 1]}) of a visible point"
    out = points.copy()
    out[:, 2] = v
    out[~visible, :2] = 0.0
    return out.astype(np.float32), ""
