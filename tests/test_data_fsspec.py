"""``imagefolder:`` on fsspec URLs: an image tree in fsspec's ``memory://`` filesystem (per process,
so every test stays in-process) must read exactly as the same tree in a local folder."""

from __future__ import annotations

import importlib.util
import io
import json
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_overrides
from selftrain.data import BadImageError, DataError, build_source, scan


def _png(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(sum(color) + size[0])
    pixels = np.clip(rng.normal(color, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, "RGB").save(buf, "PNG")
    return buf.getvalue()


def _rotated_jpeg() -> bytes:
    """A 24x10 JPEG whose EXIF orientation (6: rotate 90 degrees) makes it 10 wide, 24 high."""
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (24, 10), (10, 200, 40)).save(buf, "JPEG", exif=exif)
    return buf.getvalue()


def _tree() -> dict[str, bytes]:
    """Relative path -> bytes: two classes of real images, a corrupt and an empty image, and
    files the listing must leave out (not an image, hidden file, hidden folder)."""
    good_png = _png((20, 12), (200, 30, 30))
    return {
        "cat/a.png": good_png,
        "cat/b.JPG": _rotated_jpeg(),
        "cat/broken.png": good_png[: len(good_png) // 2],  # truncated pixel data
        "dog/c.png": _png((16, 16), (30, 30, 200)),
        "dog/empty.jpg": b"",
        "dog/d.png": _png((30, 18), (90, 160, 20)),
        "dog/notes.txt": b"not an image",
        "dog/.hidden.png": good_png,
        ".cache/x.png": good_png,
    }


GOOD = ["cat/a.png", "cat/b.JPG", "dog/c.png", "dog/d.png"]
BAD = {"cat/broken.png": "truncated or corrupt image data", "dog/empty.jpg": "zero-byte file"}


@pytest.fixture()
def trees(tmp_path: Path):
    """The same tree in memory:// and in a local folder -> (memory URL, local folder)."""
    fs = fsspec.filesystem("memory")
    root = f"/selftrain-test-{uuid.uuid4().hex}/pool"
    local = tmp_path / "pool"
    for rel, data in _tree().items():
        fs.pipe(f"{root}/{rel}", data)
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(data)
    yield f"memory://{root}", local
    fs.rm(root.rsplit("/", 1)[0], recursive=True)


@pytest.mark.parametrize("options", [{}, {"image_size": 8, "channels": 1}])
def test_memory_url_reads_like_the_local_folder(trees, options: dict) -> None:
    url, local = trees
    remote, plain = build_source(f"imagefolder:{url}", **options), build_source(f"imagefolder:{local}", **options)
    keys = [remote.key(i) for i in range(len(remote))]
    assert keys == [plain.key(i) for i in range(len(plain))] == sorted(GOOD + list(BAD))
    assert remote.classes == plain.classes == ["cat", "dog"]
    assert remote.labels.tolist() == plain.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert remote.path(0) == f"{url}/cat/a.png" and remote.uri == f"imagefolder:{url}"
    for key in GOOD:
        i = keys.index(key)
        assert torch.equal(remote.load(i), plain.load(i)), key
    if not options:  # EXIF orientation applied from the bytes as from the file
        assert remote.load(keys.index("cat/b.JPG")).shape == (3, 24, 10)
    else:
        assert remote.load_batch([keys.index(k) for k in GOOD]).shape == (4, 1, 8, 8)


def test_memory_url_bad_images_are_skipped_with_file_and_reason(trees) -> None:
    url, local = trees
    remote, plain = build_source(f"imagefolder:{url}"), build_source(f"imagefolder:{local}")
    got, want = scan(remote), scan(plain)
    assert [remote.key(int(i)) for i in got.good] == GOOD
    assert got.good.tolist() == want.good.tolist()
    assert got.to_dict()["total"] == 6 and got.to_dict()["skipped"] == 2
    for skip, local_skip in zip(got.skipped, want.skipped):
        assert skip["path"] == f"{url}/{skip['key']}"
        assert skip["reason"] == local_skip["reason"] and skip["reason"].startswith(BAD[skip["key"]])
    with pytest.raises(BadImageError, match="broken.png") as err:
        scan(remote, strict=True)
    assert err.value.path == f"{url}/cat/broken.png"


def test_memory_url_labels_none_file_url_and_vanished_file(trees) -> None:
    url, local = trees
    forced = build_source(f"imagefolder:{url}/?labels=none")
    assert forced.classes is None and (forced.labels == -1).all() and len(forced) == 6
    as_file = build_source(f"imagefolder:file://{local}")
    assert [as_file.key(i) for i in range(6)] == [forced.key(i) for i in range(6)]
    assert torch.equal(as_file.load(0), forced.load(0))
    fsspec.filesystem("memory").rm(url.removeprefix("memory://") + "/dog/d.png")
    with pytest.raises(BadImageError, match="cannot read file") as err:
        forced.load([forced.key(i) for i in range(6)].index("dog/d.png"))
    assert err.value.path == f"{url}/dog/d.png"


def test_url_errors_name_the_url_and_the_problem(trees) -> None:
    url, _ = trees
    with pytest.raises(DataError, match=f"directory not found: {url}/nothing"):
        build_source(f"imagefolder:{url}/nothing")
    with pytest.raises(DataError, match=f"not a directory: {url}/cat/a.png"):
        build_source(f"imagefolder:{url}/cat/a.png")
    textonly = url.replace("/pool", "/text-only")
    fsspec.filesystem("memory").pipe(textonly.removeprefix("memory://") + "/cat/a.txt", b"not an image")
    with pytest.raises(DataError, match=f"no image files .* found under {textonly}"):
        build_source(f"imagefolder:{textonly}")
    with pytest.raises(DataError, match="cannot open nosuchproto://x with fsspec: Protocol not known"):
        build_source("imagefolder:nosuchproto://x")


@pytest.mark.parametrize(("url", "package"), [("s3://bucket/pool", "s3fs"), ("gs://bucket/pool", "gcsfs")])
def test_missing_protocol_package_is_named(url: str, package: str) -> None:
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    with pytest.raises(DataError, match=rf"imagefolder:{url}\?labels=none: reading {url} needs the {package} "
                                        rf"package \(pip install {package}\)"):  # fmt: skip
        build_source(f"imagefolder:{url}?labels=none")


def test_label_stage_reads_a_memory_pool(small_idx, tmp_path: Path) -> None:
    """teach on IDX, then label an unlabeled pool in memory://: one record per good image."""
    from selftrain.config import build_config
    from selftrain.pipeline import run_pipeline
    from selftrain.store import PseudoLabelStore

    fs = fsspec.filesystem("memory")
    root = f"/selftrain-test-{uuid.uuid4().hex}/pool"
    rng = np.random.default_rng(0)
    good = []
    for n in range(37):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(buf, "PNG")
        rel = f"part-{n % 3}/img{n:03d}.png"
        fs.pipe(f"{root}/{rel}", buf.getvalue())
        good.append(rel)
    fs.pipe(f"{root}/part-0/empty.png", b"")
    fs.pipe(f"{root}/part-1/garbage.jpg", b"<html>not found</html>")
    try:
        overrides = tiny_overrides(small_idx) + [
            f"data.unlabeled=imagefolder:memory://{root}?labels=none", "label.shard_size=16", "label.batch_size=8",
            "engine.threads=1",
        ]  # fmt: skip
        out = run_pipeline(build_config({}, overrides), tmp_path / "run", stages=["teach", "label"])
    finally:
        fs.rm(root.rsplit("/", 1)[0], recursive=True)
    store = PseudoLabelStore(out / "label" / "round-1")
    keys = store.read(columns=["key"]).column("key").to_pylist()
    assert sorted(keys) == sorted(good) and len(keys) == len(set(keys)) == 37
    manifest = store.manifest
    assert (manifest["total"], manifest["processed"], manifest["skipped"]) == (39, 37, 2)
    reasons = {s["key"]: s["reason"] for s in manifest["skips"]}
    assert reasons["part-0/empty.png"] == "zero-byte file"
    assert reasons["part-1/garbage.jpg"].startswith("not a recognized image")
    assert json.loads((out / "label" / "round-1" / "manifest.json").read_text())["total"] == 39


def test_curate_copies_the_bytes_of_a_memory_pool(trees, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from selftrain.cli import app

    url, _ = trees
    fs = fsspec.filesystem("memory")
    copy = url.removeprefix("memory://") + "/dog/d-copy.png"
    fs.pipe(copy, fs.cat_file(url.removeprefix("memory://") + "/dog/d.png"))  # an exact duplicate
    out = tmp_path / "curated"
    result = CliRunner().invoke(app, ["curate", f"imagefolder:{url}", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "curate.json").read_text())
    assert (report["pool"], report["unreadable"], report["duplicates"]) == (7, 2, 1)
    kept = sorted((out / "kept.txt").read_text().split())
    assert kept == ["cat/a.png", "cat/b.JPG", "dog/c.png", "dog/d-copy.png"]  # the first of a group in pool order
    for key in kept:  # the kept images are the pool's files, byte for byte (no re-encoding)
        assert (out / "pool" / key).read_bytes() == fs.cat_file(f"{url.removeprefix('memory://')}/{key}"), key
