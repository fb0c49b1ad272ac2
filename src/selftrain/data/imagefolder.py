"""Image-folder source: every image file under a directory, decoded lazily.

``DIR/<class>/<file>`` with at least two class folders is read as a labeled
dataset (classes sorted by name); any other layout is unlabeled. Keys are the
relative POSIX paths, sorted, so they are stable across machines and runs and
can be stored in split files.

``DIR`` may also be an fsspec URL (``s3://bucket/pool``, ``gs://...``, ``memory://...``,
``file:///abs/path``, chained ones such as ``simplecache::s3://...``): the files are listed
with the URL's filesystem and each image's bytes are read with it when loaded, then decoded
exactly as a local file. The protocol's package (s3fs, gcsfs, adlfs...) is not a dependency
of selftrain; a missing one is an error naming it.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import torch

from selftrain.data.images import decode_image, resize_center_crop
from selftrain.data.sources import BadImageError, DataError, Source

logger = logging.getLogger("selftrain.data")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_LABEL_MODES = ("auto", "none")
# "s3://...", "memory://...", "file:///..." or a chained "simplecache::s3://...".
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*(://|::)")


class ImageFolderSource(Source):
    """Images under a directory; ``load`` decodes with :func:`decode_image`.

    With ``fs`` (an fsspec filesystem), ``root`` is the folder's URL as given (used in
    messages), ``fs_root`` its path on ``fs``, and every image is read with ``fs.cat_file``.
    """

    def __init__(
        self,
        uri: str,
        root: Path | str,
        rel_paths: list[str],
        labels: np.ndarray,
        *,
        classes: list[str] | None,
        channels: int | None,
        image_size: int | None,
        fs: Any = None,
        fs_root: str | None = None,
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
        self.fs = fs
        self.fs_root = fs_root
        self._rel_paths = rel_paths

    def key(self, i: int) -> str:
        return self._rel_paths[self._check_index(i)]

    def path(self, i: int) -> str:
        """Filesystem path of item ``i`` (its URL for a folder on an fsspec filesystem)."""
        rel = self._rel_paths[self._check_index(i)]
        if self.fs is not None:
            return f"{str(self.root).rstrip('/')}/{rel}"
        return str(self.root / rel)

    def load(self, i: int) -> torch.Tensor:
        if self.fs is None:
            image = decode_image(self.path(i), channels=self.channels)
        else:
            image = decode_image(self.path(i), channels=self.channels, data=self.read_bytes(i))
        if self.image_size is not None:
            image = resize_center_crop(image, self.image_size)
        return image

    def read_bytes(self, i: int) -> bytes:
        """The bytes of item ``i`` from the fsspec filesystem; a failed read is a bad image."""
        rel = self._rel_paths[self._check_index(i)]
        try:
            return self.fs.cat_file(f"{self.fs_root}/{rel}")
        except OSError as exc:  # FileNotFoundError, PermissionError, network errors...
            raise BadImageError(self.path(i), f"cannot read file ({exc.strerror or exc})") from exc


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
        DataError: Bad query, missing, unreadable or empty directory; for an fsspec URL
            also an unknown protocol or its package not installed.
    """
    directory, label_mode = _parse_query(uri, rest)
    fs = fs_root = None
    if _URL.match(directory):
        fs, fs_root = open_url(uri, directory)
        root: Path | str = directory.rstrip("/")
        rel_paths = list_url_images(uri, fs, fs_root)
    else:
        root = _local_root(uri, directory)
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
        uri, root, rel_paths, labels, classes=classes, channels=channels, image_size=image_size,
        fs=fs, fs_root=fs_root,
    )  # fmt: skip


def _parse_query(uri: str, rest: str) -> tuple[str, str]:
    """Split ``DIR[?labels=...]`` into the directory and the label mode."""
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
    return directory, label_mode


def _local_root(uri: str, directory: str) -> Path:
    """The local directory, checked to exist."""
    root = Path(directory).expanduser()
    if not root.exists():
        raise DataError(f"{uri}: directory not found: {root}")
    if not root.is_dir():
        raise DataError(f"{uri}: not a directory: {root}")
    return root


def open_url(uri: str, url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the folder's path on it, checked to be a folder.

    Raises:
        DataError: Unknown protocol, its package not installed, or no folder at ``url``.
    """
    import fsspec.core
    from fsspec.registry import known_implementations

    protocol = re.split(r"://|::", url, maxsplit=1)[0]
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as exc:
        # A chained URL may name several protocols; report the one whose package is missing.
        missing = [p for p in re.findall(r"([A-Za-z][A-Za-z0-9+.\-]*)(?:://|::)", url) if p in known_implementations]
        packages = sorted({known_implementations[p]["class"].split(".", 1)[0] for p in missing} - {"fsspec"})
        need = " or ".join(f"the {p} package (pip install {p})" for p in packages) or "its fsspec implementation"
        raise DataError(f"{uri}: reading {url} needs {need}; it is not installed ({exc})") from exc
    except ValueError as exc:
        raise DataError(f"{uri}: cannot open {url} with fsspec: {exc}") from exc
    path = path.rstrip("/") or path
    try:
        is_dir = fs.isdir(path)
        exists = is_dir or fs.exists(path)
    except OSError as exc:
        raise DataError(f"{uri}: cannot reach {url} ({protocol}): {exc}") from exc
    if not exists:
        raise DataError(f"{uri}: directory not found: {url}")
    if not is_dir:
        raise DataError(f"{uri}: not a directory: {url}")
    return fs, path


def list_url_images(uri: str, fs: Any, root: str) -> list[str]:
    """Relative POSIX paths of all image files under ``root`` on ``fs``, sorted.

    The same rules as :func:`list_images`: image extensions only, hidden files and
    anything under a hidden folder left out.

    Raises:
        DataError: The listing fails.
    """
    try:
        paths = fs.find(root, withdirs=False)
    except OSError as exc:
        raise DataError(f"{uri}: cannot list {root}: {exc}") from exc
    prefix = root.rstrip("/") + "/"
    found = []
    for full in paths:
        if not full.startswith(prefix):
            continue
        rel = full[len(prefix) :]
        parts = rel.split("/")
        if any(not part or part.startswith(".") for part in parts):
            continue
        if posixpath.splitext(parts[-1])[1].lower() in IMAGE_EXTENSIONS:
            found.append(rel)
    found.sort()
    return found


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
