"""The bad-input corpus (DESIGN §7) run through the real readers.

Every case has an expected outcome: decoded (with its mode and size after conversion) or skipped
with a reason naming the file; in strict mode the first bad file is an error naming it. The
images are in :mod:`_bad_inputs`; annotation faults (COCO, VOC, depth, keypoints) and checkpoint
files carrying a pickle payload are built here, one table per reader.
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from _bad_inputs import EXIF_ORIENTATION, Payload, image_cases, write_cases
from _formats import compressed_rle, save_image, save_palette_png, write_json
from PIL import Image, ImageOps

from selftrain.checkpoint import CheckpointDir, read_state_dict, save_weights
from selftrain.data import build_source, scan
from selftrain.data.sources import BadImageError
from selftrain.data.targets import BadAnnotationError

# ------------------------------------------------------------------------------------ images


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("corpus") / "pool"
    return folder, write_cases(folder, image_cases())


def test_every_image_case_through_imagefolder_and_scan(corpus) -> None:
    folder, cases = corpus
    source = build_source(f"imagefolder:{folder}")
    result = scan(source, progress=False)
    summary = result.to_dict()
    assert summary["total"] == len(source) == len(cases)
    assert summary["processed"] + summary["skipped"] == summary["total"]
    skips = {record["key"]: record for record in result.skipped}
    assert len(skips) == len(result.skipped)  # one record per file, none twice
    index = {source.key(i): i for i in range(len(source))}
    good = {source.key(int(i)) for i in result.good}
    assert good.isdisjoint(skips) and good | set(skips) == set(cases)
    for name, case in cases.items():
        if case.expected == "ok":
            assert name in good, f"{name}: expected to decode, skipped: {skips.get(name)}"
            image = source.load(index[name])
            assert image.dtype == torch.uint8 and image.shape == (3, case.size[1], case.size[0]), name
            assert case.check is None or case.check(image), f"{name}: wrong pixels after conversion"
        else:
            reason = case.expected.removeprefix("skip:")
            assert name in skips, f"{name}: expected a skip ({reason}), but it decoded"
            assert skips[name]["path"] == str(folder / name)
            assert reason in skips[name]["reason"], f"{name}: {skips[name]['reason']!r}"
    expected_skips = sum(case.expected != "ok" for case in cases.values())
    assert summary["skipped"] == expected_skips and summary["processed"] == len(cases) - expected_skips


def test_gray_sources_read_the_same_corpus(corpus) -> None:
    folder, cases = corpus
    source = build_source(f"imagefolder:{folder}", channels=1, image_size=8)
    result = scan(source, progress=False)
    assert result.processed == sum(case.expected == "ok" for case in cases.values())
    assert source.load_batch(result.good).shape == (result.processed, 1, 8, 8)


def test_strict_scan_stops_at_the_first_bad_file_naming_it(corpus) -> None:
    folder, cases = corpus
    source = build_source(f"imagefolder:{folder}")
    first_bad = next(key for key in map(source.key, range(len(source))) if cases[key].expected != "ok")
    with pytest.raises(BadImageError) as info:
        scan(source, strict=True, progress=False)
    assert info.value.path == str(folder / first_bad)
    assert str(info.value).startswith(f"{folder / first_bad}: ")
    assert cases[first_bad].expected.removeprefix("skip:") in info.value.reason


def test_bombs_are_refused_from_the_header_without_decoding(corpus, monkeypatch) -> None:
    folder, cases = corpus
    calls = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: calls.append(self.size) or real_load(self))
    from selftrain.data import decode_image

    bombs = [name for name in cases if name.startswith("bomb-")]
    assert len(bombs) == 3
    for name in bombs:
        with pytest.raises(BadImageError, match="decompression bomb"):
            decode_image(folder / name)
    assert calls == []  # not one pixel of a bomb was decoded


# ------------------------------------------------------------------- EXIF: targets turn along


STORED_W, STORED_H = 40, 24
STORED_BOX = (4, 3, 15, 10)  # XYXY in stored pixels: the only bright pixels


def _stored_pixels() -> np.ndarray:
    pixels = np.full((STORED_H, STORED_W, 3), 30, dtype=np.uint8)
    x1, y1, x2, y2 = STORED_BOX
    pixels[y1:y2, x1:x2] = 240
    return pixels


def _save_with_orientation(path: Path, pixels: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    Image.fromarray(pixels).save(path, exif=exif)  # PNG: lossless, carries EXIF in its eXIf chunk


def _bright_box(image: torch.Tensor) -> list[float]:
    ys, xs = np.nonzero(image[0].numpy() > 200)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_coco_box_keypoints_and_mask_turn_with_the_exif_orientation(tmp_path: Path, orientation: int) -> None:
    _save_with_orientation(tmp_path / "photo.png", _stored_pixels(), orientation)
    x1, y1, x2, y2 = STORED_BOX
    mask = np.zeros((STORED_H, STORED_W), dtype=np.uint8)
    mask[y1:y2, x1:x2] = 1
    write_json(tmp_path / "ann.json", {
        "images": [{"id": 1, "file_name": "photo.png", "width": STORED_W, "height": STORED_H}],
        "categories": [{"id": 1, "name": "thing", "keypoints": ["corner"]}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "segmentation": compressed_rle(mask), "keypoints": [x1, y1, 2]}],
    })  # fmt: skip
    source = build_source(f"coco:{tmp_path / 'ann.json'}")
    image, targets = source.load_with_targets(0)
    expected = ImageOps.exif_transpose(Image.open(tmp_path / "photo.png"))
    assert image.shape[1:] == (expected.height, expected.width)
    assert targets["boxes"].tolist() == [_bright_box(image)]
    assert torch.equal(targets["mask"] == 1, image[0] > 200)
    # The box's stored top-left corner lands on a corner of the turned box.
    x, y, v = targets["keypoints"][0, 0].tolist()
    bx1, by1, bx2, by2 = targets["boxes"][0].tolist()
    assert v == 1.0 and x in (bx1, bx2) and y in (by1, by2)
    assert torch.equal(source.load_targets(0)["boxes"], targets["boxes"])  # without decoding, the same
    small = build_source(f"coco:{tmp_path / 'ann.json'}", image_size=16)
    box = small.load_targets(0)["boxes"][0]
    scale = torch.tensor([16 / image.shape[2], 16 / image.shape[1]] * 2)
    assert torch.allclose(box, targets["boxes"][0] * scale)


def test_coco_annotations_on_the_displayed_image_stay_as_they_are(tmp_path: Path) -> None:
    # Orientation 6 with the displayed size (24x40) declared: annotated after rotation.
    _save_with_orientation(tmp_path / "photo.png", _stored_pixels(), 6)
    displayed = ImageOps.exif_transpose(Image.open(tmp_path / "photo.png"))
    box = _bright_box(torch.from_numpy(np.array(displayed)).permute(2, 0, 1))
    write_json(tmp_path / "ann.json", {
        "images": [{"id": 1, "file_name": "photo.png", "width": displayed.width, "height": displayed.height}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]}],
    })  # fmt: skip
    image, targets = build_source(f"coco:{tmp_path / 'ann.json'}").load_with_targets(0)
    assert targets["boxes"].tolist() == [box] == [_bright_box(image)]


@pytest.mark.parametrize("orientation", [3, 6])
def test_voc_mask_of_the_stored_size_turns_with_the_image(tmp_path: Path, orientation: int) -> None:
    (tmp_path / "JPEGImages").mkdir()
    _save_with_orientation(tmp_path / "JPEGImages" / "a.png", _stored_pixels(), orientation)
    x1, y1, x2, y2 = STORED_BOX
    mask = np.zeros((STORED_H, STORED_W), dtype=np.uint8)
    mask[y1:y2, x1:x2] = 15
    save_palette_png(tmp_path / "SegmentationClass" / "a.png", mask)
    source = build_source(f"voc:{tmp_path}")
    assert source.annotation_skips == []
    image, targets = source.load_with_targets(0)
    assert torch.equal(targets["mask"] == 15, image[0] > 200)


# ------------------------------------------------------------------------- annotation faults

#: COCO annotation faults: (name, bbox or a whole annotation patch, expected). Each is one annotation
#: on image 1 (40x30), except where the patch moves it.
COCO_CASES = [
    ("good", [5, 5, 10, 10], "ok"),
    ("partly-outside", [30, 20, 20, 20], "ok"),  # clipped to the image
    ("zero-width", [5, 5, 0, 10], "skip:zero or negative area"),
    ("zero-height", [5, 5, 10, 0], "skip:zero or negative area"),
    ("inverted", [20, 20, -10, -5], "skip:zero or negative area"),
    ("outside-right", [45, 5, 10, 10], "skip:outside the 40x30 image"),
    ("outside-above", [5, -20, 10, 10], "skip:outside the 40x30 image"),
    ("nan", [float("nan"), 5, 10, 10], "skip:non-finite coordinate"),
    ("infinite", [5, 5, float("inf"), 10], "skip:non-finite coordinate"),
    ("three-numbers", [5, 5, 10], "skip:bbox must be [x, y, width, height]"),
    ("string-coordinate", [5, "5", 10, 10], "skip:bbox must be [x, y, width, height]"),
    ("label-out-of-range", {"category_id": 99}, "skip:category_id 99 is not among the categories"),
    ("unknown-image", {"image_id": 42}, "skip:image_id is not among the images"),
    ("mask-wrong-size", {"segmentation": compressed_rle(np.ones((10, 10), np.uint8))}, "skip:RLE mask is 10x10"),
    ("rle-overrun", {"segmentation": {"size": [30, 40], "counts": [0, 5000]}}, "skip:RLE runs cover 5000 pixels"),
    ("polygon-odd", {"segmentation": [[1, 2, 3, 4, 5]]}, "skip:polygon with 5 coordinates"),
    ("polygon-nan", {"segmentation": [[1, 2, 3, float("nan"), 5, 6]]}, "skip:non-finite coordinate"),
]
#: COCO image-entry faults: (file_name, entry patch, file to write or None, expected).
COCO_IMAGE_CASES = [
    ("empty.png", {}, (40, 30), "ok"),  # an image without annotations: kept, zero boxes
    ("missing.png", {}, None, "skip:image file not found"),
    ("zero-width.png", {"width": 0}, (40, 30), "skip:width and height must be positive"),
    ("bomb.png", {"width": 100_000, "height": 100_000}, (40, 30), "skip:exceeds the 89478485-pixel limit"),
    ("wrong-size.png", {}, (20, 20), "load:annotations are for 40x30"),  # decoded size differs
]


def _coco_corpus(root: Path) -> Path:
    save_image(root / "one.png", np.zeros((30, 40, 3), np.uint8))
    images = [{"id": 1, "file_name": "one.png", "width": 40, "height": 30}]
    for j, (name, patch, size, _) in enumerate(COCO_IMAGE_CASES):
        if size is not None:
            save_image(root / name, np.zeros((size[1], size[0], 3), np.uint8))
        images.append({"id": 10 + j, "file_name": name, "width": 40, "height": 30, **patch})
    annotations = []
    for k, (_, fault, _) in enumerate(COCO_CASES):
        ann = {"id": k + 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10], "iscrowd": 0}
        ann.update({"bbox": fault} if isinstance(fault, list) else fault)
        annotations.append(ann)
    path = root / "ann.json"
    # allow_nan: the json module writes NaN/Infinity, as many converters do.
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}, allow_nan=True))  # fmt: skip
    return path


def test_coco_faults_are_dropped_counted_and_named(tmp_path: Path) -> None:
    path = _coco_corpus(tmp_path)
    source = build_source(f"coco:{path}")
    skips = source.annotation_skips
    for k, (name, _, expected) in enumerate(COCO_CASES):
        mine = [s for s in skips if s["reason"].startswith(f"annotation {k + 1}: ")]
        if expected == "ok":
            assert mine == [], name
        else:
            assert len(mine) == 1 and expected.removeprefix("skip:") in mine[0]["reason"], (name, mine)
            assert mine[0]["path"] == str(path)
    for name, _, _, expected in COCO_IMAGE_CASES:
        mine = [s for s in skips if s["key"] == name]
        if expected.startswith("skip:"):
            assert len(mine) == 1 and expected.removeprefix("skip:") in mine[0]["reason"], (name, mine)
        else:
            assert mine == [] and name in [source.key(i) for i in range(len(source))], name
    annotation_skips = sum(e != "ok" for _, _, e in COCO_CASES)
    image_skips = sum(e.startswith("skip:") for *_, e in COCO_IMAGE_CASES)
    assert len(skips) == annotation_skips + image_skips
    keys = [source.key(i) for i in range(len(source))]
    assert len(keys) + image_skips == 1 + len(COCO_IMAGE_CASES)  # kept + skipped images = images listed
    kept = source.load_targets(keys.index("one.png"))
    assert len(kept["boxes"]) + annotation_skips == len(COCO_CASES)
    assert kept["boxes"].tolist() == [[5, 5, 15, 15], [30, 20, 40, 30]]  # the second clipped
    assert source.load_targets(keys.index("empty.png"))["boxes"].shape == (0, 4)
    # A decoded size that contradicts the file is left to scan, which counts it.
    result = scan(source, progress=False)
    assert result.processed + len(result.skipped) == len(source)
    assert [(s["key"], "annotations are for 40x30" in s["reason"]) for s in result.skipped] == [("wrong-size.png", True)]
    with pytest.raises(BadAnnotationError) as info:
        build_source(f"coco:{path}", strict=True)
    assert info.value.path == skips[0]["path"] == str(tmp_path / "missing.png")  # the first problem, by its file


def _voc_corpus(root: Path) -> list[tuple[str, str]]:
    """VOC faults: (name, expected); writes images and masks under ``root``."""
    cases = [
        ("good", np.zeros((30, 40), np.uint8), "ok"),
        ("mask-wrong-size", np.zeros((20, 20), np.uint8), "skip:mask is 20x20 but its image is 40x30"),
        ("label-out-of-range", np.full((30, 40), 30, np.uint8), "skip:class values [30] outside [0, 21)"),
        ("mask-rgb", None, "skip:mask has mode RGB"),
        ("image-missing", np.zeros((30, 40), np.uint8), "skip:image file not found"),
        ("mask-truncated", None, "skip:mask cannot be decoded"),
    ]
    for name, mask, _ in cases:
        if name != "image-missing":
            save_image(root / "JPEGImages" / f"{name}.jpg", np.zeros((30, 40, 3), np.uint8))
        target = root / "SegmentationClass" / f"{name}.png"
        if mask is not None:
            save_palette_png(target, mask)
        elif name == "mask-rgb":
            save_image(target, np.zeros((30, 40, 3), np.uint8))
        else:
            save_palette_png(target, np.random.default_rng(0).integers(0, 21, (30, 40)))
            target.write_bytes(target.read_bytes()[:60])
    return [(name, expected) for name, _, expected in cases]


def _depth_corpus(root: Path) -> list[tuple[str, str]]:
    good = np.full((30, 40), 1.5, np.float32)
    nan, negative = good.copy(), good.copy()
    nan[3, 4], negative[5, 6] = np.nan, -1.0
    maps = [("good", good, "ok"), ("wrong-size", np.ones((8, 8), np.float32), "skip:depth is 8x8 but its image is 40x30"),
            ("nan", nan, "skip:depth must be finite"), ("negative", negative, "skip:depth must be finite and >= 0"),
            ("eight-bit", np.zeros((30, 40), np.uint8), "skip:depth PNG has mode L"),
            ("no-depth", None, "skip:no depth map")]  # fmt: skip
    for name, values, _ in maps:
        save_image(root / "images" / f"{name}.png", np.zeros((30, 40, 3), np.uint8))
        if values is not None and values.dtype == np.uint8:
            save_image(root / "depth" / f"{name}.png", values)
        elif values is not None:
            (root / "depth").mkdir(exist_ok=True)
            np.save(root / "depth" / f"{name}.npy", values)
    return [(name, expected) for name, _, expected in maps]


def _keypoint_corpus(root: Path) -> list[tuple[str, str]]:
    rows = [("good.png", "1,2,3,4", "ok"), ("nan.png", "nan,2,3,4", "skip:non-finite coordinate"),
            ("text.png", "a,2,3,4", "skip:column x0 is not a number"), ("missing.png", "1,2,3,4", "skip:image file not found"),
            ("short.png", "1,2,3", "skip:4 fields, the header has 5")]  # fmt: skip
    for name, _, _ in rows:
        if name != "missing.png":
            save_image(root / name, np.zeros((10, 10, 3), np.uint8))
    (root / "points.csv").write_text("image,x0,y0,x1,y1\n" + "".join(f"{n},{v}\n" for n, v, _ in rows))
    return [(name, expected) for name, _, expected in rows]


@pytest.mark.parametrize(
    ("scheme", "writer", "target"),
    [("voc", _voc_corpus, ""), ("depth", _depth_corpus, ""), ("keypoints", _keypoint_corpus, "points.csv")],
)
def test_dense_reader_faults_are_dropped_counted_and_named(tmp_path: Path, scheme: str, writer, target: str) -> None:
    cases = writer(tmp_path)
    uri = f"{scheme}:{tmp_path / target if target else tmp_path}"
    source = build_source(uri, progress=False) if scheme != "keypoints" else build_source(uri)
    keys = [source.key(i) for i in range(len(source))]
    skips = source.annotation_skips
    assert len(keys) + len(skips) == len(cases)  # processed + skipped = total
    for name, expected in cases:
        mine = [s for s in skips if s["key"].split(".")[0] == name.split(".")[0]]
        if expected == "ok":
            assert mine == [] and any(k.split(".")[0] == name.split(".")[0] for k in keys), name
            source.load_with_targets(next(i for i, k in enumerate(keys) if k.split(".")[0] == name.split(".")[0]))
        else:
            assert len(mine) == 1 and expected.removeprefix("skip:") in mine[0]["reason"], (name, mine)
            assert Path(mine[0]["path"]).exists() or "not found" in mine[0]["reason"] or "no depth" in mine[0]["reason"]
    with pytest.raises(BadAnnotationError) as info:
        build_source(uri, strict=True)
    assert info.value.path == next(s["path"] for s in skips)  # the first problem, naming its file


# ------------------------------------------------------------------------------- checkpoints


def _payload_bytes(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


def test_the_payload_is_live_when_unpickled(tmp_path: Path) -> None:
    # Guards the checkpoint tests below: this payload really would run if a loader unpickled it.
    control = tmp_path / "control-marker"
    pickle.loads(_payload_bytes(control))
    assert control.exists()


SAFETENSORS_FAULTS = [
    ("empty", b"", "header too small"),
    ("header-length-huge", struct.pack("<Q", 2**60) + b"{}", "header too large"),
    ("header-not-json", struct.pack("<Q", 8) + b"notjson!", "invalid JSON"),
    ("offsets-past-the-end", (lambda h: struct.pack("<Q", len(h)) + h)(
        b'{"w":{"dtype":"F32","shape":[1000],"data_offsets":[0,4000]}}') + bytes(8), "not fully covered"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "data", "reason"), SAFETENSORS_FAULTS, ids=[c[0] for c in SAFETENSORS_FAULTS])
def test_broken_safetensors_are_refused_naming_the_file(tmp_path: Path, name: str, data: bytes, reason: str) -> None:
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=reason) as info:
        read_state_dict(path)
    assert str(info.value).startswith(f"{path}: not a valid safetensors file")


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".safetensors"])
def test_weights_with_a_pickle_payload_are_refused_and_never_run(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / f"weights{suffix}"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": Payload(marker)}, path)
    with pytest.raises(ValueError, match=str(path)):
        read_state_dict(path)
    assert not marker.exists()


def test_checkpoint_state_with_a_pickle_payload_falls_back_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    checkpoints = CheckpointDir(tmp_path / "checkpoints", keep=3)
    checkpoints.save(10, {"w": torch.ones(2)}, {"step": 10})
    newest = checkpoints.save(20, {"w": torch.full((2,), 2.0)}, {"step": 20})
    torch.save({"step": 20, "hook": Payload(marker)}, newest / "state.pt")
    step, weights, state = checkpoints.load_latest()
    assert (step, state) == (10, {"step": 10}) and torch.equal(weights["w"], torch.ones(2))
    (newest / "model.safetensors").write_bytes(_payload_bytes(marker))  # weights swapped for a pickle too
    assert checkpoints.load_latest()[0] == 10
    assert not marker.exists()
    save_weights(tmp_path / "ok.safetensors", {"w": torch.ones(3)})
    assert torch.equal(read_state_dict(tmp_path / "ok.safetensors")["w"], torch.ones(3))


# ------------------------------------------------------------------------------------- count


def test_the_corpus_has_at_least_40_cases(tmp_path: Path) -> None:
    images = len(image_cases())
    tables = [writer(tmp_path / writer.__name__) for writer in (_voc_corpus, _depth_corpus, _keypoint_corpus)]
    annotations = len(COCO_CASES) + len(COCO_IMAGE_CASES) + sum(map(len, tables))
    checkpoints = len(SAFETENSORS_FAULTS) + 4 + 2  # payload weights (4 suffixes), payload in a checkpoint
    assert images >= 40 and images + annotations + checkpoints >= 80
