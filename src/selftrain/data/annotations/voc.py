"""VOC-style semantic segmentation: ``voc:ROOT[?split=train][&classes=21]``.

``ROOT/JPEGImages/NAME.jpg`` with the palette-index mask ``ROOT/SegmentationClass/NAME.png``;
``split`` reads ``ROOT/ImageSets/Segmentation/SPLIT.txt``. VOC masks already follow the run's
convention: palette index 0 is the background, ``c + 1`` object class ``c``, 255 the void border.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from selftrain.data.annotations.base import (
    _PROGRESS_MIN_ITEMS,
    AnnotatedSource,
    _directory,
    _header_geometry,
    _Item,
    _map_frame,
    _read_png,
    _SkipLog,
    _split_uri,
)
from selftrain.data.sources import DataError
from selftrain.data.targets import IGNORE_INDEX, BadAnnotationError, check_dense_map

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class VocSource(AnnotatedSource):
    """VOC-style semantic segmentation: ``voc:ROOT[?split=NAME][&classes=N]``.

    The mask is the palette index of ``SegmentationClass/NAME.png`` (an 8-bit grayscale PNG of
    indices works too); 255, the VOC object border, is :data:`IGNORE_INDEX`. Items are the names
    in ``ImageSets/Segmentation/NAME.txt`` with ``split``, otherwise every mask, sorted.

    Index 0 is the background, so ``classes`` are the object classes (``VOC_CLASSES[1:]``, or
    ``class_1 .. class_{N-1}`` with ``classes=N``) and ``mask_classes`` is
    ``["background", *classes]``: mask value ``c + 1`` is ``classes[c]``, the run's convention.
    The image-level ``labels`` (for stratified label-fraction splits) are the object class
    covering the most pixels of each mask (the lowest of equals), ``-1`` for a mask of only
    background and void, as scene sets use their largest item.
    """

    def __init__(self, uri: str, items: list[_Item], masks: list[Path], **kwargs: Any) -> None:
        super().__init__(uri, items, **kwargs)
        self._masks = masks

    def _raw_targets(self, i: int) -> dict[str, np.ndarray]:
        item, path = self._items[i], self._masks[i]
        try:
            mask = _read_index_mask(path)
            width, height = item.size
            check_dense_map(mask, name="mask", height=height, width=width, num_classes=len(self.mask_classes))
        except DataError as exc:
            raise BadAnnotationError(str(path), f"changed since the source was built: {exc}") from exc
        return {"mask": mask.astype(np.int64)}


def build_voc(
    uri: str, rest: str, *, image_size: int | None, channels: int | None, strict: bool, progress: bool = True
) -> VocSource:
    """Builds the source for ``voc:ROOT[?split=NAME][&classes=N]``; decodes every mask once to check it.

    Raises:
        DataError: Bad URI or query, missing layout folders or split file, or no usable image.
        BadAnnotationError: With ``strict``, the first dropped image.
    """
    target, params = _split_uri(uri, rest, "voc", ("split", "classes"))
    root = _directory(uri, Path(target).expanduser())
    mask_classes = _voc_classes(uri, params.get("classes"))
    image_dir, mask_dir = root / "JPEGImages", root / "SegmentationClass"
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise DataError(f"{uri}: {folder} is not a directory (VOC layout: ROOT/JPEGImages, ROOT/SegmentationClass)")
    names, listing = _voc_names(uri, root, mask_dir, params.get("split"))
    skips = _SkipLog(uri, strict)
    items, masks, labels, seen = [], [], [], set()
    for name in tqdm(names, desc="check masks", unit="mask", disable=not progress or len(names) <= _PROGRESS_MIN_ITEMS):
        if name in seen:
            skips.add(name, listing, "listed twice")
            continue
        seen.add(name)
        found = _voc_item(name, image_dir, mask_dir, len(mask_classes), skips)
        if found is not None:
            items.append(found[0])
            masks.append(found[1])
            labels.append(found[2])
    return VocSource(
        uri, items, masks, classes=mask_classes[1:], mask_classes=mask_classes, labels=labels,
        target_keys=("mask",), channels=channels, image_size=image_size, skips=skips.finish(len(items)),
    )  # fmt: skip


def _voc_classes(uri: str, value: str | None) -> list[str]:
    """Names of the mask values 0..N-1: VOC's 21 (background first), or ``background, class_1, ...``."""
    if value is None:
        return list(VOC_CLASSES)
    try:
        count = int(value)
    except ValueError:
        count = 0
    if not 1 <= count < IGNORE_INDEX:
        raise DataError(f"{uri}: classes must be an integer in [1, {IGNORE_INDEX - 1}], got {value!r}")
    return list(VOC_CLASSES) if count == len(VOC_CLASSES) else ["background", *(f"class_{k}" for k in range(1, count))]


def _voc_names(uri: str, root: Path, mask_dir: Path, split: str | None) -> tuple[list[str], Path]:
    """Image names of the split (file order) or of every mask (sorted), and where they came from."""
    if split is None:
        names = sorted(p.stem for p in mask_dir.iterdir() if p.suffix == ".png" and not p.name.startswith("."))
        return names, mask_dir
    if not _SPLIT_NAME.match(split):
        raise DataError(f"{uri}: split must be a plain name such as train or val, got {split!r}")
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    try:
        text = listing.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        folder = listing.parent
        known = sorted(p.stem for p in folder.glob("*.txt")) if folder.is_dir() else []
        raise DataError(f"{uri}: cannot read split file {listing} ({exc}); available splits: {known}") from exc
    return [line.split()[0] for line in text.splitlines() if line.strip()], listing


def _voc_item(
    name: str, image_dir: Path, mask_dir: Path, num_classes: int, skips: _SkipLog
) -> tuple[_Item, Path, int] | None:
    """The item, mask file and image-level label of one VOC name, or ``None`` (recorded in ``skips``)."""
    image = next((image_dir / f"{name}{ext}" for ext in (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
                  if (image_dir / f"{name}{ext}").is_file()), None)  # fmt: skip
    if image is None:
        skips.add(name, image_dir / f"{name}.jpg", "image file not found")
        return None
    mask_path = mask_dir / f"{name}.png"
    if not mask_path.is_file():
        skips.add(name, mask_path, "mask file not found")
        return None
    try:
        mask = _read_index_mask(mask_path)
        # An unreadable image header leaves the image to scan(); its mask cannot be compared.
        width, height = _map_frame(_header_geometry(image), mask.shape)
        check_dense_map(mask, name="mask", height=height, width=width, num_classes=num_classes)
    except DataError as exc:
        skips.add(name, mask_path, str(exc))
        return None
    return _Item(name, image, (width, height)), mask_path, _largest_class(mask, num_classes)


def _largest_class(mask: np.ndarray, num_classes: int) -> int:
    """The object class (mask value - 1) with the most pixels, ``-1`` if there is none."""
    counts = np.bincount(mask[(mask > 0) & (mask < num_classes)].ravel(), minlength=num_classes)
    return int(np.argmax(counts)) - 1 if counts[1:].any() else -1


def _read_index_mask(path: Path) -> np.ndarray:
    mask, mode = _read_png(path, "mask")
    if mode not in ("P", "L"):
        raise DataError(f"mask has mode {mode}; expected palette (P) or 8-bit (L) class indices")
    return mask
