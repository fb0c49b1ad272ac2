"""Per-image targets of the dense tasks, and the checks every reader applies to them.

A dense source returns, next to each image, a ``dict[str, Tensor]`` with some of these keys,
all in the pixel coordinates of the image exactly as :meth:`Source.load` returns it:

==============  =====================  ==============================================================
key             dtype, shape           meaning
==============  =====================  ==============================================================
``boxes``       float32 (n, 4)         XYXY corners in pixels, ``0 <= x1 < x2 <= W``
``labels``      int64 (n,)             class of each box, in ``[0, K)``
``scores``      float32 (n,)           confidence of each box (pseudo labels only)
``mask``        int64 (H, W)           class of each pixel; :data:`IGNORE_INDEX` = no label
``depth``       float32 (H, W)         depth of each pixel; ``0`` = no value
``keypoints``   float32 (P, 3)         ``x, y, v`` per point; ``v`` = visibility or confidence in
                                       ``[0, 1]``, ``0`` = missing (its x, y mean nothing)
==============  =====================  ==============================================================

Readers never let a malformed annotation reach training: :func:`clean_boxes` drops the bad
boxes of an image and says why, :func:`check_dense_map` refuses a map of the wrong size or
with values out of range. A reader records every drop as ``{"key", "path", "reason"}`` (the
same record :func:`selftrain.data.scan` uses for images), or raises in strict mode.
"""

from __future__ import annotations

import numpy as np
import torch

from selftrain.data.sources import BadFileError, DataError, Source

IGNORE_INDEX = 255
TARGET_KEYS = ("boxes", "labels", "scores", "mask", "depth", "keypoints")


class BadAnnotationError(BadFileError):
    """One annotation cannot be used (strict mode), naming the file and the problem."""


def clean_boxes(
    boxes: np.ndarray, labels: np.ndarray, *, width: int, height: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Keeps the usable boxes of one image.

    Boxes are XYXY pixels. A box with a NaN/inf coordinate, ``x2 <= x1`` or ``y2 <= y1``
    (zero or negative area), lying entirely outside the image, or with a label outside
    ``[0, num_classes)`` is dropped; a box partly outside is clipped to the image.

    Returns:
        The kept boxes (float32 (m, 4)), their labels (int64 (m,)) and one reason per dropped box.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(boxes):
        raise DataError(f"{len(boxes)} boxes but {len(labels)} labels")
    reasons: list[str] = []
    keep = np.ones(len(boxes), dtype=bool)
    for i, (box, label) in enumerate(zip(boxes, labels)):
        x1, y1, x2, y2 = box
        if not np.all(np.isfinite(box)):
            reasons.append(f"box {i}: non-finite coordinate {box.tolist()}")
        elif x2 <= x1 or y2 <= y1:
            reasons.append(f"box {i}: zero or negative area (x1={x1:g}, y1={y1:g}, x2={x2:g}, y2={y2:g})")
        elif x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
            reasons.append(f"box {i}: outside the {width}x{height} image {box.tolist()}")
        elif not (float(label).is_integer() and 0 <= int(label) < num_classes):
            reasons.append(f"box {i}: label {label} outside [0, {num_classes})")
        else:
            continue
        keep[i] = False
    kept = boxes[keep]
    kept[:, [0, 2]] = kept[:, [0, 2]].clip(0, width)
    kept[:, [1, 3]] = kept[:, [1, 3]].clip(0, height)
    return kept.astype(np.float32), labels[keep].astype(np.int64), reasons


def check_dense_map(values: np.ndarray, *, name: str, height: int, width: int, num_classes: int | None = None) -> None:
    """Raises ``DataError`` when a mask or depth map does not fit its image.

    ``num_classes`` (masks only): every value must be a class in ``[0, num_classes)`` or
    :data:`IGNORE_INDEX`. Depth maps must be finite and non-negative.
    """
    if values.shape != (height, width):
        raise DataError(f"{name} is {values.shape[1] if values.ndim > 1 else '?'}x{values.shape[0]} "
                        f"but its image is {width}x{height}")  # fmt: skip
    if num_classes is not None:
        bad = (values >= num_classes) & (values != IGNORE_INDEX) | (values < 0)
        if bad.any():
            found = np.unique(values[bad])[:5].tolist()
            raise DataError(f"{name}: class values {found} outside [0, {num_classes}) (ignore = {IGNORE_INDEX})")
    elif not np.all(np.isfinite(values)) or (values < 0).any():
        raise DataError(f"{name}: depth must be finite and >= 0 (0 = no value)")


class DenseSource(Source):
    """A :class:`Source` whose items also carry dense targets.

    Attributes:
        target_keys: The keys :meth:`load_targets` returns (see the module table).
        annotation_skips: One ``{"key", "path", "reason"}`` per annotation dropped while reading.
        mask_classes: With a ``mask`` target, the name of each mask value (index = value), else
            ``None``. Every reader follows the run's convention, ``["background", *classes]``:
            0 = background, ``c + 1`` = object class ``c`` (the box label ``c``), and
            :data:`IGNORE_INDEX` = no label; a segmentation run checks it.
        labels: One image-level class per image for stratified label-fraction splits, ``-1`` for
            an image without one (each reader says how it picks it).
    """

    target_keys: tuple[str, ...] = ()
    mask_classes: list[str] | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.annotation_skips: list[dict[str, str]] = []

    def load_targets(self, i: int) -> dict[str, torch.Tensor]:
        """Targets of item ``i`` (keys: :attr:`target_keys`)."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {**super().describe(), "targets": list(self.target_keys), "annotation_skips": len(self.annotation_skips)}


def oriented_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """``(W, H)`` of a ``W x H`` image after EXIF ``orientation`` is applied (5-8 swap the sides)."""
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def orient_targets(targets: dict[str, np.ndarray], orientation: int, size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Moves targets of a stored ``W x H`` image as ``PIL.ImageOps.exif_transpose`` moves its pixels.

    EXIF orientation ``k`` (2-8) says how the stored pixels must be flipped or rotated for display;
    decoding applies it, so targets annotated on the stored pixels must follow. Continuous
    coordinates map as (2) ``(W-x, y)``, (3) ``(W-x, H-y)``, (4) ``(x, H-y)``, (5) ``(y, x)``,
    (6, 90 degrees clockwise) ``(H-y, x)``, (7) ``(H-y, W-x)``, (8) ``(y, W-x)``; boxes take the
    min/max of their mapped corners, masks and depth maps are flipped/transposed exactly, and
    missing keypoints (v = 0) keep x = y = 0.
    """
    if orientation not in range(2, 9):
        return targets
    width, height = size
    out = {}
    for name, value in targets.items():
        if name == "boxes":
            x1, y1 = _orient_xy(value[:, 0], value[:, 1], orientation, width, height)
            x2, y2 = _orient_xy(value[:, 2], value[:, 3], orientation, width, height)
            value = np.stack([np.minimum(x1, x2), np.minimum(y1, y2), np.maximum(x1, x2), np.maximum(y1, y2)], axis=1)
        elif name == "keypoints":
            value = value.copy()
            x, y = _orient_xy(value[..., 0], value[..., 1], orientation, width, height)
            visible = value[..., 2] > 0
            value[..., 0], value[..., 1] = np.where(visible, x, 0.0), np.where(visible, y, 0.0)
        elif name in ("mask", "depth"):
            value = np.ascontiguousarray(_orient_map(value, orientation))
        out[name] = value
    return out


def _orient_xy(x: np.ndarray, y: np.ndarray, orientation: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    return {
        2: (width - x, y), 3: (width - x, height - y), 4: (x, height - y), 5: (y, x),
        6: (height - y, x), 7: (height - y, width - x), 8: (y, width - x),
    }[orientation]  # fmt: skip


def _orient_map(values: np.ndarray, orientation: int) -> np.ndarray:
    """``(H, W)`` map -> the map as Pillow's transpose for EXIF ``orientation`` lays it out."""
    return {
        2: values[:, ::-1], 3: values[::-1, ::-1], 4: values[::-1], 5: values.T,
        6: values[::-1].T, 7: values[::-1, ::-1].T, 8: values[:, ::-1].T,
    }[orientation]  # fmt: skip
