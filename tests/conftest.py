"""Shared fixtures: small real images written in the formats selftrain reads."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (make test-slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def write_idx(prefix: Path, images: np.ndarray, labels: np.ndarray | None) -> None:
    """Writes MNIST-format IDX files ``PREFIX-images-idx3-ubyte.gz`` (+ labels)."""
    n, h, w = images.shape
    with gzip.open(f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, n, h, w) + images.astype(np.uint8).tobytes())
    if labels is not None:
        with gzip.open(f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 0x801, n) + labels.astype(np.uint8).tobytes())


def _read_idx(path: Path) -> np.ndarray:
    data = gzip.open(path).read()
    dims = data[3]
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def _synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Four classes of bright blobs at class-specific places, when Fashion-MNIST is absent."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
        r, q = divmod(int(c), 2)
        images[i, 4 + 12 * r : 12 + 12 * r, 4 + 12 * q : 12 + 12 * q] = 220
    return images, labels


@pytest.fixture(scope="session")
def small_idx(tmp_path_factory) -> dict[str, str]:
    """A small Fashion-MNIST (real images: 1,200 train, 400 test) as IDX files -> URIs."""
    root = tmp_path_factory.mktemp("idx")
    if (FMNIST / "train-images-idx3-ubyte.gz").exists():
        xtr, ytr = _read_idx(FMNIST / "train-images-idx3-ubyte.gz")[:1200], _read_idx(FMNIST / "train-labels-idx1-ubyte.gz")[:1200]
        xte, yte = _read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")[:400], _read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")[:400]
    else:
        (xtr, ytr), (xte, yte) = _synthetic(1200, 0), _synthetic(400, 1)
    write_idx(root / "train", xtr, ytr)
    write_idx(root / "test", xte, yte)
    return {"train": f"idx:{root / 'train'}", "test": f"idx:{root / 'test'}"}


def tiny_overrides(idx: dict[str, str]) -> list[str]:
    """A run that finishes in seconds: tiny CNN, a few steps, small shards."""
    return [
        f"data.labeled={idx['train']}", f"data.unlabeled={idx['train']}", f"data.test={idx['test']}",
        "data.label_fraction=0.1", "model.backbone=cnn-tiny", "teach.steps=30", "teach.batch_size=32",
        "student.steps=30", "student.human_batch_size=16", "student.pseudo_batch_size=48",
        "label.shard_size=256", "label.batch_size=128", "engine.checkpoint_every=10", "engine.progress=false",
    ]  # fmt: skip


def check_cell_markers(folders: dict[str, Path], seen: dict[str, tuple[int, int]]) -> None:
    """Records each finished study cell's ``cell.json`` (mtime, inode) in ``seen``, by cell id; a
    marker recorded before must be unchanged: a study never reruns a finished cell."""
    for cell_id, folder in folders.items():
        marker = folder / "cell.json"
        if cell_id in seen:
            assert (marker.stat().st_mtime_ns, marker.stat().st_ino) == seen[cell_id], cell_id
        elif marker.exists():
            seen[cell_id] = (marker.stat().st_mtime_ns, marker.stat().st_ino)
