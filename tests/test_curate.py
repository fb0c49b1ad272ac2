"""``curate``: perceptual hashes, near-duplicate groups and the de-duplicated pool, on real photos."""

from __future__ import annotations

import csv
import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _formats import photo_tiles
from conftest import write_idx
from PIL import Image, ImageEnhance
from typer.testing import CliRunner

from selftrain.cli import app
from selftrain.curate import _dct_matrix, find_duplicates, group_pairs, hamming_distances, phash_bits, write_curated
from selftrain.data import BadImageError, build_source


def test_dct_matches_scipy_and_hamming_matches_a_loop():
    from scipy.fft import dct

    x = np.random.default_rng(0).normal(size=(32, 32))
    assert np.allclose(2 * _dct_matrix(32).numpy() @ x, dct(x, axis=0))  # scipy's unnormalised DCT-II is 2x
    bits = np.random.default_rng(1).integers(0, 2, size=(5, 64)).astype(bool)
    naive = [[int((a != b).sum()) for b in bits] for a in bits]
    assert hamming_distances(bits, bits).tolist() == naive


def test_groups_are_connected_components_labelled_by_their_first_image():
    # 1 ~ 3 and 3 ~ 5 chain into one group (single linkage); 2 ~ 4 is another; 0 stands alone.
    assert group_pairs(6, np.array([3, 1, 2]), np.array([5, 3, 4])).tolist() == [0, 1, 2, 1, 2, 1]
    assert group_pairs(0, np.zeros(0, dtype=int), np.zeros(0, dtype=int)).tolist() == []


def test_phash_ignores_small_changes_and_tells_photos_apart():
    tiles = photo_tiles()
    a, b = tiles[0], tiles[7]
    hash_a = phash_bits(torch.tensor(a).permute(2, 0, 1))
    brighter = np.clip(a.astype(int) + 20, 0, 255).astype(np.uint8)
    assert hash_a.shape == (64,) and hash_a.sum() == 32  # median split: half the bits
    assert (phash_bits(torch.tensor(brighter).permute(2, 0, 1)) != hash_a).sum() <= 4
    assert (phash_bits(torch.tensor(b).permute(2, 0, 1)) != hash_a).sum() > 16


# ---------------------------------------------------------------------------- planted near-duplicates


def _jpeg(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=40)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _crop(image: Image.Image) -> Image.Image:
    w, h = image.size
    return image.crop((2, 2, w - 2, h - 2)).resize((w, h), Image.BILINEAR)


def _noise(image: Image.Image) -> Image.Image:
    pixels = np.asarray(image).astype(float) + np.random.default_rng(0).normal(0, 4, size=np.asarray(image).shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


PLANTS = {
    "jpeg": _jpeg, "crop": _crop, "noise": _noise,
    "resize": lambda im: im.resize((im.width * 3 // 2, im.height * 3 // 2), Image.BICUBIC),
    "bright": lambda im: ImageEnhance.Brightness(im).enhance(1.2),
}  # fmt: skip


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """~54 distinct photo tiles and one planted near-duplicate for every second tile; key -> original."""
    root = tmp_path_factory.mktemp("pool")
    tiles = photo_tiles()
    # scikit-learn (test extra) and matplotlib (a dependency) ship these photos; make test installs both.
    assert len(tiles) >= 30, f"only {len(tiles)} photo tiles: the sample photos of scikit-learn / matplotlib are missing"
    truth = {}
    for k, tile in enumerate(tiles):
        Image.fromarray(tile).save(root / f"tile{k:03d}.png")
        truth[f"tile{k:03d}.png"] = k
    originals = np.random.default_rng(0).choice(len(tiles), len(tiles) // 2, replace=False)
    for j, k in enumerate(originals.tolist()):
        name, plant = list(PLANTS.items())[j % len(PLANTS)]
        key = f"copy{j:03d}-{name}.{'jpg' if name == 'jpeg' else 'png'}"
        plant(Image.fromarray(tiles[k])).save(root / key, quality=95)
        truth[key] = k
    return root, truth


def _precision_recall(groups: list[list[str]], truth: dict[str, int]) -> tuple[float, float]:
    """Over pairs: found pairs inside one group vs planted pairs (an original and its copy)."""
    found = {frozenset(p) for g in groups for p in itertools.combinations(g, 2)}
    planted = {frozenset((a, b)) for a, b in itertools.combinations(truth, 2) if truth[a] == truth[b]}
    hits = len(found & planted)
    return hits / max(len(found), 1), hits / len(planted)


@pytest.mark.parametrize("method", ["phash", "embedding"])
def test_curate_finds_planted_near_duplicates(planted, method: str) -> None:
    root, truth = planted
    result = find_duplicates(build_source(f"imagefolder:{root}"), method=method, progress=False)
    groups = [[result.keys[p] for p in g] for g in result.groups()]
    precision, recall = _precision_recall(groups, truth)
    assert precision >= 0.95 and recall >= 0.95, (method, precision, recall)
    # Each group keeps its first image in pool order: copies sort before tiles, so that may be the copy.
    kept = {result.keys[p] for p in result.kept}
    assert len(kept) == len(set(truth.values()))


def test_curate_command_writes_report_and_pool(planted, tmp_path: Path) -> None:
    root, truth = planted
    pool = tmp_path / "pool-with-a-bad-file"
    pool.mkdir()
    for path in root.iterdir():
        (pool / path.name).symlink_to(path)
    (pool / "broken.png").write_bytes(b"")
    out = tmp_path / "curated"
    result = CliRunner().invoke(app, ["curate", f"imagefolder:{pool}", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "curate.json").read_text())
    unique = len(set(truth.values()))
    assert report["pool"] == len(truth) + 1 and report["unreadable"] == 1 and report["images"] == len(truth)
    assert report["unique"] == unique and report["duplicates"] == len(truth) - unique
    assert report["redundancy"] == pytest.approx(1 - unique / len(truth))
    assert report["skips"][0]["key"] == "broken.png" and "zero-byte" in report["skips"][0]["reason"]
    kept = (out / "kept.txt").read_text().split()
    curated = build_source(report["kept_pool"])
    assert len(kept) == unique and sorted(curated.key(i) for i in range(len(curated))) == sorted(kept)
    with (out / "duplicates.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == report["duplicates"]
    assert all(truth[r["key"]] == truth[r["kept_key"]] and float(r["distance"]) <= 10 for r in rows)
    again = CliRunner().invoke(app, ["curate", f"imagefolder:{pool}", "--out", str(out)])
    assert again.exit_code != 0 and "exists" in str(again.exception)
    with pytest.raises(BadImageError, match="broken.png"):
        find_duplicates(build_source(f"imagefolder:{pool}"), strict=True, progress=False)


def test_curate_writes_in_memory_pools_as_png(tmp_path: Path) -> None:
    images = np.stack([np.asarray(Image.fromarray(t).convert("L").resize((28, 28))) for t in photo_tiles()[:5]])
    images = np.concatenate([images, images[[1]]])  # image 5 repeats image 1
    write_idx(tmp_path / "pool", images, None)
    source = build_source(f"idx:{tmp_path / 'pool'}")
    result = find_duplicates(source, progress=False)
    assert [[result.keys[p] for p in g] for g in result.groups()] == [[source.key(1), source.key(5)]]
    report = write_curated(result, source, tmp_path / "out")
    curated = build_source(report["kept_pool"], channels=1)
    assert len(curated) == 5
    assert torch.equal(curated.load(1), source.load(1))  # PNG is lossless


def test_curate_embedding_with_a_trained_network_file(tmp_path: Path) -> None:
    """``--weights`` loads a selftrain model file and feeds it the pool at its own size and channels."""
    from dataclasses import asdict

    from selftrain.engine import export_model
    from selftrain.network import Network, NetworkSpec

    spec = NetworkSpec(backbone="cnn-tiny", num_classes=4, channels=1, image_size=28, mean=[0.5], std=[0.25])
    torch.manual_seed(0)
    export_model(tmp_path / "model.safetensors", Network(spec), {"spec": asdict(spec)})
    pool = tmp_path / "pool"
    pool.mkdir()
    tiles = photo_tiles()[:6]
    for k, tile in enumerate(tiles):
        Image.fromarray(tile).save(pool / f"tile{k}.png")
    Image.fromarray(tiles[2]).save(pool / "tile2-again.png")  # an exact copy: similarity 1 whatever the network
    result = find_duplicates(build_source(f"imagefolder:{pool}"), method="embedding",
                             weights=tmp_path / "model.safetensors", threshold=0.999, progress=False)  # fmt: skip
    groups = [sorted(result.keys[p] for p in g) for g in result.groups()]
    assert ["tile2-again.png", "tile2.png"] in groups
    with pytest.raises(ValueError, match="weights are for method=embedding"):
        find_duplicates(build_source(f"imagefolder:{pool}"), weights=tmp_path / "model.safetensors")
