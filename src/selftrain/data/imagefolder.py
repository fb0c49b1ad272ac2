"""Image-folder source: every image file under a directory, decoded lazily.

``DIR/<class>/<file>`` with at least two class folders is read as a labeled
dataset (classes sorted by name); any other layout is unlabeled. Keys are the
relative POSIX paths, sorted, so they are stable across machines and runs and
can be stored in split files.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import torch

from selftrain.data.images import decode_image, resize_center_crop
from selftrain.data.sources import DataError, Source

logger = logging.getLogger("selftrain.data")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_LABEL_MODES = ("auto", "none")


class ImageFolderSource(Source):
    """Images under a directory; ``load`` decodes with :func:`decode_image`."""

    def __init__(
        self,
        uri: str,
        root: Path,
        rel_paths: list[str],
        labels: np.ndarray,
        *,
        classes: list[str] | None,
        channels: int | None,
        image_size: int | None,
    ) -> None:
        super().__init__(
            uri,
            classes=classes,
            labels=labels,
            channels=channels or 3,
            image_size=image_size,
            in_memory=False,
        )
        self.root = root
        self._rel_paths = rel_paths

    def key(self, i: int) -> str:
        return self._rel_paths[self._check_index(i)]

    def path(self, i: int) -> str:
        """Filesystem path of item ``i``."""
        return str(self.root / self._rel_paths[self._check_index(i)])

    def load(self, i: int) -> torch.Tensor:
        image = decode_image(self.path(i), channels=self.channels)
        if self.image_size is not None:
            image = resize_center_crop(image, self.image_size)
        return image


def build_imagefolder(
    uri: str, rest: str, *, image_size: int | None, channels: int | None, strict: bool
) -> ImageFolderSource:
    """Build the source for ``imagefolder:DIR[?labels=none]``.

    Args:
        uri: The full URI (for messages and ``Source.uri``).
        rest: The part after ``imagefolder:``.
        image_size: Output side length, or ``None`` for native sizes.
        channels: 1 or 3, or ``None`` for 3.
        strict: Make an unlistable subdirectory an error instead of a
            warning (its images would silently be missing otherwise).

    Raises:
        DataError: Bad query, missing, unreadable or empty directory.
    """
    root, label_mode = _parse(uri, rest)
    rel_paths = list_images(root, strict=strict)
    if not rel_paths:
        exts = " ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
        raise DataError(f"{uri}: no image files ({exts}) found under {root}")
    classes, labels = None, np.full(len(rel_paths), -1, dtype=np.int64)
    if label_mode == "auto":
        inferred, why_not = infer_classes(rel_paths)
        if inferred is not None:
            classes = inferred
            index = {name: k for k, name in enumerate(classes)}
            labels = np.array([index[p.split("/", 1)[0]] for p in rel_paths], dtype=np.int64)
        else:
            logger.info(
                "%s: loading unlabeled (%s); labels need DIR/<class>/<image> with at least "
                "2 class folders",
                uri,
                why_not,
            )
    return ImageFolderSource(
        uri, root, rel_paths, labels, classes=classes, channels=channels, image_size=image_size
    )


def _parse(uri: str, rest: str) -> tuple[Path, str]:
    """Split ``DIR[?labels=...]`` and check the directory exists."""
    directory, _, query = rest.partition("?")
    if not directory:
        raise DataError(f"{uri}: expected imagefolder:DIR")
    label_mode = "auto"
    try:
        params = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise DataError(f"{uri}: malformed query {query!r} ({exc})") from exc
    for name, value in params:
        if name != "labels" or value not in _LABEL_MODES:
            raise DataError(
                f"{uri}: unsupported query parameter {name}={value!r}; "
                f"the only option is labels={'|'.join(_LABEL_MODES)}"
            )
        label_mode = value
    root = Path(directory).expanduser()
    if not root.exists():
        raise DataError(f"{uri}: directory not found: {root}")
    if not root.is_dir():
        raise DataError(f"{uri}: not a directory: {root}")
    return root, label_mode


def list_images(root: Path, *, strict: bool = False) -> list[str]:
    """Relative POSIX paths of all image files under ``root``, sorted.

    Hidden files and directories (name starts with ".") are skipped: they are
    editor/OS artifacts such as ``.ipynb_checkpoints`` or macOS ``._x.jpg``
    resource forks, and a hidden folder would otherwise turn into a class.
    Symlinked directories are followed, each real directory at most once.

    Args:
        root: Directory to list.
        strict: Raise on an unlistable subdirectory instead of logging a
            warning and leaving it out. ``root`` itself must always be listable.

    Raises:
        DataError: ``root`` (or, if strict, any subdirectory) cannot be listed.
    """

    def fail(exc: OSError) -> None:
        message = f"cannot list {exc.filename}: {exc.strerror or exc}"
        if strict or os.path.realpath(str(exc.filename)) == os.path.realpath(root):
            raise DataError(message) from exc
        logger.warning("%s; its images are left out", message)

    found: list[str] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, onerror=fail, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            # A symlink cycle or a second link to the same tree.
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append((rel_dir / name).as_posix())
    found.sort()
    return found


def infer_classes(rel_paths: list[str]) -> tuple[list[str] | None, str]:
    """Return ``(sorted class names, "")`` for a labeled layout, else ``(None, reason)``."""
    depths = {p.count("/") for p in rel_paths}
    if depths != {1}:
        where = "directly in DIR" if 0 in depths else "nested more than one level deep"
        return None, f"some images are {where}"
    classes = sorted({p.split("/", 1)[0] for p in rel_paths})
    if len(classes) < 2:
        return None, f"only one class folder ({classes[0]!r})"
    return classes, ""
