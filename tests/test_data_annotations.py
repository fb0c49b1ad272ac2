"""Dense annotation readers (COCO, VOC, depth, keypoints) on small fixtures in the real formats."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from _formats import (
    column_major_runs,
    compressed_rle,
    photo,
    save_image,
    save_palette_png,
    write_json,
)
from PIL import Image

from selftrain.data import (
    CocoSource,
    DepthSource,
    KeypointSource,
    VocSource,
    build_source,
    scan,
)
from selftrain.data.annotations import VOC_CLASSES, rle_string_counts
from selftrain.data.sources import KNOWN_SCHEMES, BadImageError, DataError
from selftrain.data.targets import IGNORE_INDEX, BadAnnotationError

# ------------------------------------------------------------------------------ fixture helpers


def square_photo(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """A darkened photo with a white square at XYXY ``box``: the only pixels brighter than 200."""
    image = photo(height, width) // 2
    x1, y1, x2, y2 = box
    image[y1:y2, x1:x2] = 255
    return image


def rect(height: int, width: int, x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y1:y2, x1:x2] = 1
    return mask


def has_skip(source, key: str, text: str) -> bool:
    return any(s["key"] == key and text in s["reason"] for s in source.annotation_skips)


# ------------------------------------------------------------------------------------------ COCO

CATEGORIES = [  # deliberately not sorted by id: labels must follow the ids, not the file order
    {"id": 12, "name": "person", "keypoints": ["nose", "left_eye", "right_eye"]},
    {"id": 3, "name": "car"},
    {"id": 7, "name": "dog"},
]


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    """Two images; polygon, compressed RLE, uncompressed RLE with keypoints, and a crowd region."""
    save_image(tmp_path / "img" / "a.png", photo(48, 64, seed=1))
    save_image(tmp_path / "img" / "b.png", photo(32, 32, seed=2))
    person = rect(48, 64, 40, 2, 60, 8)
    crowd = rect(48, 64, 0, 40, 16, 48)
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 20], "iscrowd": 0,
         "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]]},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [25, 20, 25, 20], "iscrowd": 0,
         "segmentation": compressed_rle(rect(48, 64, 25, 20, 50, 40))},
        {"id": 3, "image_id": 1, "category_id": 12, "bbox": [40, 2, 20, 6], "iscrowd": 0,
         "segmentation": {"size": [48, 64], "counts": column_major_runs(person)},
         "keypoints": [45, 4, 2, 50, 5, 1, 7, 7, 0], "num_keypoints": 2},
        {"id": 4, "image_id": 1, "category_id": 12, "bbox": [0, 40, 16, 8], "iscrowd": 1,
         "segmentation": {"size": [48, 64], "counts": column_major_runs(crowd)}},
    ]  # fmt: skip
    doc = {
        "images": [
            {"id": 2, "file_name": "b.png", "width": 32, "height": 32},
            {"id": 1, "file_name": "a.png", "width": 64, "height": 48},
        ],
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    return write_json(tmp_path / "instances.json", doc)


def test_coco_reads_boxes_masks_keypoints_and_remaps_category_ids(coco: Path) -> None:
    source = build_source(f"coco:{coco}?images={coco.parent / 'img'}")
    assert isinstance(source, CocoSource)
    assert source.classes == ["car", "dog", "person"]  # detection classes: the categories by id
    assert source.mask_classes == ["background", "car", "dog", "person"]  # the run's mask convention
    assert source.target_keys == ("boxes", "labels", "mask", "keypoints")
    assert [source.key(i) for i in range(len(source))] == ["a.png", "b.png"]
    assert source.annotation_skips == []
    t = source.load_targets(0)
    assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
    # File order without the crowd annotation; category ids 7, 3, 12 -> labels 1, 0, 2.
    assert t["labels"].tolist() == [1, 0, 2]
    assert t["boxes"].tolist() == [[10, 10, 30, 30], [25, 20, 50, 40], [40, 2, 60, 8]]
    assert t["keypoints"].shape == (3, 3, 3)
    assert t["keypoints"][2].tolist() == [[45, 4, 1], [50, 5, 1], [0, 0, 0]]  # v 2 and 1 -> 1; v 0 -> missing
    assert not t["keypoints"][:2].any()  # categories without keypoints
    mask = t["mask"]  # 0 = background, label + 1 = its category, 255 = crowd
    assert mask.shape == (48, 64) and mask.dtype == torch.int64
    assert mask[15, 15] == 2  # dog polygon
    assert mask[25, 27] == 1  # the car RLE is drawn over the dog
    assert mask[5, 50] == 3  # person, uncompressed RLE
    assert (mask[40:48, 0:16] == IGNORE_INDEX).all()  # crowd
    assert mask[0, 0] == 0
    empty = source.load_targets(1)
    assert empty["boxes"].shape == (0, 4) and empty["keypoints"].shape == (0, 3, 3)
    assert (empty["mask"] == 0).all()
    # Image-level labels for the split: the largest box (car, 25x20) of a.png; none in b.png.
    assert source.labels.tolist() == [0, -1]
    assert source.load(0).shape == (3, 48, 64)


def test_coco_rle_string_parser_matches_pycocotools() -> None:
    rng = np.random.default_rng(0)
    for _ in range(100):
        height, width = (int(v) for v in rng.integers(1, 30, 2))
        mask = (rng.random((height, width)) < rng.random()).astype(np.uint8)
        runs = rle_string_counts(compressed_rle(mask)["counts"])
        assert runs == column_major_runs(mask)
    assert rle_string_counts("z") is None  # outside the alphabet
    assert rle_string_counts("P") is None  # continuation bit on the last character


def test_coco_malformed_annotations_are_dropped_and_counted(tmp_path: Path, caplog) -> None:
    save_image(tmp_path / "a.png", photo(48, 64))
    good = {"image_id": 1, "category_id": 7, "bbox": [1, 1, 10, 10]}
    anns = [
        {**good, "id": 10, "bbox": [100, 100, 5, 5]},
        {**good, "id": 11, "bbox": [10, 10, -5, 5]},
        {**good, "id": 12, "bbox": [10, 10, 0, 5]},
        {**good, "id": 13, "bbox": [float("nan"), 1, 2, 2]},
        {**good, "id": 14, "segmentation": compressed_rle(np.ones((10, 10), np.uint8))},
        {**good, "id": 15, "category_id": 99},
        {**good, "id": 16, "image_id": 777},
        {**good, "id": 17, "category_id": 12, "keypoints": [1, 1, 2, 3, 3, 2]},
        {**good, "id": 18, "segmentation": {"size": [48, 64], "counts": [5, 10]}},
        {**good, "id": 19, "segmentation": {"size": [48, 64], "counts": "zz"}},
        {**good, "id": 20, "category_id": 12, "keypoints": [1, 1, 2, float("nan"), 3, 2, 0, 0, 0]},
        {**good, "id": 21, "segmentation": [[1, 1, 2, 2]]},
        {**good, "id": 22},
        "not an object",
    ]
    doc = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 64, "height": 48},
            {"id": 2, "file_name": "missing.png", "width": 64, "height": 48},
            {"id": 3, "file_name": "a.png", "width": 64, "height": 48},
            {"id": 4, "file_name": "c.png"},
        ],
        "annotations": anns + [{**good, "id": 23, "image_id": 2}],  # follows its dropped image silently
        "categories": CATEGORIES,
    }
    path = write_json(tmp_path / "bad.json", doc)
    with caplog.at_level(logging.WARNING, logger="selftrain.data"):
        source = build_source(f"coco:{path}")
    assert len(source) == 1
    assert source.load_targets(0)["boxes"].tolist() == [[1, 1, 11, 11]]  # only annotation 22
    expected = [
        ("a.png", "annotation 10: outside"),
        ("a.png", "annotation 11: zero or negative area"),
        ("a.png", "annotation 12: zero or negative area"),
        ("a.png", "annotation 13: non-finite"),
        ("a.png", "annotation 14: RLE mask is 10x10 but its image is 64x48"),
        ("a.png", "annotation 15: category_id 99"),
        ("image_id=777", "annotation 16: image_id is not among"),
        ("a.png", "annotation 17: 6 keypoint values, but its category declares 3"),
        ("a.png", "annotation 18: RLE runs cover 15 pixels"),
        ("a.png", "annotation 19: RLE counts string is not valid"),
        ("a.png", "annotation 20: point 1: non-finite coordinate"),
        ("a.png", "annotation 21: polygon with 4 coordinates"),
        ("annotations[13]", "not a JSON object"),
        ("missing.png", "image file not found"),
        ("a.png", "file_name appears twice"),
        ("c.png", "width and height must be positive integers"),
    ]
    for key, text in expected:
        assert has_skip(source, key, text), (key, text, source.annotation_skips)
    assert len(source.annotation_skips) == len(expected)
    missing = next(s for s in source.annotation_skips if s["key"] == "missing.png")
    assert missing["path"] == str(tmp_path / "missing.png")
    assert next(s for s in source.annotation_skips if s["key"] == "image_id=777")["path"] == str(path)
    assert source.describe()["annotation_skips"] == len(expected)
    assert sum("dropping" in r.getMessage() for r in caplog.records) == len(expected)


def test_coco_strict_raises_naming_the_file(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png", photo(48, 64))
    doc = {
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}],
        "annotations": [{"id": 5, "image_id": 1, "category_id": 3, "bbox": [10, 10, 0, 5]}],
        "categories": CATEGORIES,
    }
    path = write_json(tmp_path / "ann.json", doc)
    with pytest.raises(BadAnnotationError, match=r"ann\.json: a\.png: annotation 5: zero or negative area"):
        build_source(f"coco:{path}", strict=True)
    doc["images"].append({"id": 2, "file_name": "gone.png", "width": 4, "height": 4})
    doc["annotations"] = []
    write_json(path, doc)
    with pytest.raises(BadAnnotationError, match=r"gone\.png: gone\.png: image file not found"):
        build_source(f"coco:{path}", strict=True)


def test_coco_unparseable_files_are_data_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON"):
        build_source(f"coco:{broken}")
    no_categories = write_json(tmp_path / "nocat.json", {"images": [], "annotations": []})
    with pytest.raises(DataError, match=r"nocat\.json: not a COCO annotation file"):
        build_source(f"coco:{no_categories}")
    dup = write_json(tmp_path / "dup.json", {"images": [], "annotations": [], "categories": [CATEGORIES[1]] * 2})
    with pytest.raises(DataError, match=r"dup\.json: category id 3 appears twice"):
        build_source(f"coco:{dup}")
    with pytest.raises(DataError, match="file not found"):
        build_source(f"coco:{tmp_path / 'absent.json'}")
    with pytest.raises(DataError, match="unknown query parameter 'split'"):
        build_source(f"coco:{broken}?split=train")


def test_coco_undecodable_images_are_left_to_scan(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png", photo(48, 64))
    save_image(tmp_path / "small.png", photo(16, 16))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "cut.png").write_bytes((tmp_path / "a.png").read_bytes()[:200])
    images = [
        {"id": k, "file_name": name, "width": 64, "height": 48}
        for k, name in enumerate(["a.png", "empty.png", "cut.png", "small.png"])
    ]
    path = write_json(tmp_path / "ann.json", {"images": images, "annotations": [], "categories": CATEGORIES})
    source = build_source(f"coco:{path}")
    assert len(source) == 4 and source.annotation_skips == []
    result = scan(source)
    assert result.processed + len(result.skipped) == result.total == 4
    reasons = {s["key"]: s["reason"] for s in result.skipped}
    assert set(reasons) == {"cut.png", "empty.png", "small.png"}
    assert "zero-byte" in reasons["empty.png"]
    assert "image is 16x16 but its annotations are for 64x48" in reasons["small.png"]
    keys = [source.key(i) for i in range(len(source))]
    with pytest.raises(BadImageError, match=r"empty\.png: zero-byte file"):
        source.load(keys.index("empty.png"))


def test_coco_resize_keeps_boxes_and_masks_on_the_object(tmp_path: Path) -> None:
    square = (20, 10, 40, 30)  # XYXY in an 80x40 image
    save_image(tmp_path / "sq.png", square_photo(40, 80, square))
    x1, y1, x2, y2 = square
    doc = {
        "images": [{"id": 1, "file_name": "sq.png", "width": 80, "height": 40}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]], "keypoints": []}],
        "categories": CATEGORIES,
    }  # fmt: skip
    path = write_json(tmp_path / "ann.json", doc)
    source = build_source(f"coco:{path}", image_size=32)
    image, targets = source.load_with_targets(0)
    assert image.shape == (3, 32, 32) and targets["mask"].shape == (32, 32)
    assert torch.equal(image, source.load(0))
    assert all(torch.equal(v, source.load_targets(0)[k]) for k, v in targets.items())
    box = targets["boxes"][0]
    assert box.tolist() == pytest.approx([20 * 0.4, 10 * 0.8, 40 * 0.4, 30 * 0.8])
    bright = image.min(dim=0).values > 200
    ys, xs = torch.nonzero(bright, as_tuple=True)
    assert len(ys) > 0
    # Every bright pixel lies inside the scaled box (pixel i covers [i, i + 1)).
    assert xs.min() >= box[0] - 1 and xs.max() + 1 <= box[2] + 1
    assert ys.min() >= box[1] - 1 and ys.max() + 1 <= box[3] + 1
    on_object = targets["mask"] == 2  # the dog, label 1
    assert on_object[bright].all()  # the mask covers the square ...
    assert (image.float().mean(dim=0)[on_object] > 150).all()  # ... and no dark photo pixel


# ------------------------------------------------------------------------------------------- VOC


def voc_mask(height: int, width: int, cls: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Background, one object of class ``cls`` and the VOC 255 border around it."""
    x1, y1, x2, y2 = box
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y1 - 1 : y2 + 1, x1 - 1 : x2 + 1] = 255
    mask[y1:y2, x1:x2] = cls
    return mask


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    root = tmp_path / "VOC"
    for k, name in enumerate(["2007_000001", "2007_000002", "2007_000003"]):
        save_image(root / "JPEGImages" / f"{name}.jpg", photo(30, 40, seed=k))
        save_palette_png(root / "SegmentationClass" / f"{name}.png", voc_mask(30, 40, 15 - k, (10, 5, 30, 25)))
    splits = root / "ImageSets" / "Segmentation"
    splits.mkdir(parents=True)
    (splits / "train.txt").write_text("2007_000001\n2007_000002\n")
    (splits / "val.txt").write_text("2007_000003\n")
    return root


def test_voc_reads_palette_masks_and_splits(voc: Path) -> None:
    source = build_source(f"voc:{voc}")
    assert isinstance(source, VocSource)
    assert source.mask_classes == VOC_CLASSES and len(VOC_CLASSES) == 21 and VOC_CLASSES[15] == "person"
    assert source.classes == VOC_CLASSES[1:]  # object classes: mask value c + 1 is classes[c]
    assert source.labels.tolist() == [14, 13, 12]  # the class with the most pixels (person = 15 -> 14, ...)
    assert [source.key(i) for i in range(len(source))] == ["2007_000001", "2007_000002", "2007_000003"]
    mask = source.load_targets(0)["mask"]
    assert mask.dtype == torch.int64 and mask.shape == (30, 40)
    assert set(mask.unique().tolist()) == {0, 15, IGNORE_INDEX}
    assert mask[15, 20] == 15 and mask[0, 0] == 0 and mask[4, 20] == IGNORE_INDEX
    assert source.load(0).shape == (3, 30, 40)
    train = build_source(f"voc:{voc}?split=train")
    assert [train.key(i) for i in range(len(train))] == ["2007_000001", "2007_000002"]
    assert build_source(f"voc:{voc}?split=val").load_targets(0)["mask"][15, 20] == 13
    with pytest.raises(DataError, match=r"available splits: \['train', 'val'\]"):
        build_source(f"voc:{voc}?split=test")


def test_voc_unusable_masks_drop_their_images(voc: Path) -> None:
    image = photo(30, 40)
    save_image(voc / "JPEGImages" / "bad_size.jpg", image)
    save_palette_png(voc / "SegmentationClass" / "bad_size.png", np.zeros((20, 20), np.uint8))
    save_image(voc / "JPEGImages" / "bad_value.jpg", image)
    save_palette_png(voc / "SegmentationClass" / "bad_value.png", voc_mask(30, 40, 30, (5, 5, 10, 10)))
    save_image(voc / "JPEGImages" / "rgb.jpg", image)
    save_image(voc / "SegmentationClass" / "rgb.png", image)
    save_palette_png(voc / "SegmentationClass" / "no_image.png", np.zeros((30, 40), np.uint8))
    save_image(voc / "JPEGImages" / "no_mask.jpg", image)
    source = build_source(f"voc:{voc}")
    assert len(source) == 3
    assert has_skip(source, "bad_size", "mask is 20x20 but its image is 40x30")
    assert has_skip(source, "bad_value", "class values [30] outside [0, 21)")
    assert has_skip(source, "rgb", "mask has mode RGB")
    assert has_skip(source, "no_image", "image file not found")
    assert len(source.annotation_skips) == 4  # no_mask has no mask, so it is not a VOC item
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000001\nno_mask\n2007_000001\n")
    train = build_source(f"voc:{voc}?split=train")
    assert len(train) == 1
    assert has_skip(train, "no_mask", "mask file not found") and has_skip(train, "2007_000001", "listed twice")
    wide = build_source(f"voc:{voc}?classes=40")
    assert len(wide) == 4 and wide.mask_classes[30] == "class_30" == wide.classes[29]
    assert wide.mask_classes[0] == "background" and len(wide.classes) == 39
    with pytest.raises(BadAnnotationError, match=r"bad_size\.png: bad_size: mask is 20x20"):
        build_source(f"voc:{voc}", strict=True)
    with pytest.raises(DataError, match="classes must be an integer"):
        build_source(f"voc:{voc}?classes=255")


def test_voc_exif_rotated_image_matches_a_mask_in_display_orientation(voc: Path) -> None:
    stored = Image.fromarray(photo(20, 40))  # stored 40x20, displayed 20x40 after EXIF orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(voc / "JPEGImages" / "rotated.jpg", exif=exif)
    save_palette_png(voc / "SegmentationClass" / "rotated.png", voc_mask(40, 20, 15, (5, 5, 15, 30)))
    source = build_source(f"voc:{voc}", channels=1)
    i = [source.key(k) for k in range(len(source))].index("rotated")
    image, targets = source.load_with_targets(i)
    assert image.shape == (1, 40, 20) and targets["mask"].shape == (40, 20)
    assert source.annotation_skips == []


def test_voc_resize_uses_nearest_labels(voc: Path) -> None:
    source = build_source(f"voc:{voc}", image_size=16)
    image, targets = source.load_with_targets(0)
    assert image.shape == (3, 16, 16)
    mask = targets["mask"]
    assert mask.shape == (16, 16)
    assert set(mask.unique().tolist()) <= {0, 15, IGNORE_INDEX}  # no interpolated classes
    # Object x 10..30 of 40, y 5..25 of 30 -> x 4..12, y 2.7..13.3 of 16.
    assert (mask[4:13, 5:11] == 15).all()


# ----------------------------------------------------------------------------------------- depth


@pytest.fixture
def depth_root(tmp_path: Path) -> Path:
    root = tmp_path / "depth_set"
    millimetres = np.zeros((24, 32), dtype=np.uint16)
    millimetres[:, 16:] = 1500  # right half at 1.5 m, left half no value
    millimetres[:12, :8] = 65535
    save_image(root / "images" / "a.png", photo(24, 32, seed=3))
    save_image(root / "depth" / "a.png", millimetres)
    save_image(root / "images" / "b.jpg", photo(24, 32, seed=4))
    metres = np.linspace(0.5, 10, 24 * 32, dtype=np.float32).reshape(24, 32)
    np.save(root / "depth" / "b.npy", metres)
    return root


def test_depth_reads_16bit_png_and_npy(depth_root: Path) -> None:
    source = build_source(f"depth:{depth_root}")
    assert isinstance(source, DepthSource) and source.classes is None
    assert [source.key(i) for i in range(len(source))] == ["a.png", "b.jpg"]
    depth = source.load_targets(0)["depth"]
    assert depth.dtype == torch.float32 and depth.shape == (24, 32)
    assert depth[0, 20] == pytest.approx(1.5) and depth[20, 0] == 0 and depth[0, 0] == pytest.approx(65.535)
    kitti = build_source(f"depth:{depth_root}?scale=256").load_targets(0)["depth"]
    assert kitti[0, 20] == pytest.approx(1500 / 256)
    npy = source.load_targets(1)["depth"]
    assert torch.equal(npy, torch.from_numpy(np.load(depth_root / "depth" / "b.npy")))
    with pytest.raises(DataError, match="scale must be a positive number"):
        build_source(f"depth:{depth_root}?scale=0")


def test_depth_unusable_maps_drop_their_images(depth_root: Path) -> None:
    image = photo(24, 32)
    for name in ("wrong_size", "missing", "nan", "eight_bit", "both", "twin"):
        save_image(depth_root / "images" / f"{name}.png", image)
    save_image(depth_root / "images" / "twin.jpg", image)
    save_image(depth_root / "depth" / "twin.png", np.ones((24, 32), np.uint16))
    save_image(depth_root / "depth" / "wrong_size.png", np.ones((12, 16), np.uint16))
    bad = np.ones((24, 32), np.float32)
    bad[3, 3] = np.nan
    np.save(depth_root / "depth" / "nan.npy", bad)
    save_image(depth_root / "depth" / "eight_bit.png", np.ones((24, 32), np.uint8))
    save_image(depth_root / "depth" / "both.png", np.ones((24, 32), np.uint16))
    np.save(depth_root / "depth" / "both.npy", np.ones((24, 32), np.float32))
    source = build_source(f"depth:{depth_root}")
    assert len(source) == 2
    assert has_skip(source, "wrong_size.png", "depth is 16x12 but its image is 32x24")
    assert has_skip(source, "missing.png", "no depth map")
    assert has_skip(source, "nan.png", "depth must be finite")
    assert has_skip(source, "eight_bit.png", "depth PNG has mode L")
    assert has_skip(source, "both.png", "both a .png and a .npy")
    assert has_skip(source, "twin.png", "several images") and has_skip(source, "twin.jpg", "several images")
    assert len(source.annotation_skips) == 7
    with pytest.raises(BadAnnotationError, match=r"both: both\.png: both a \.png and a \.npy"):
        build_source(f"depth:{depth_root}", strict=True)


def test_depth_resize_is_nearest(depth_root: Path) -> None:
    full = build_source(f"depth:{depth_root}").load_targets(0)["depth"]
    source = build_source(f"depth:{depth_root}", image_size=8)
    depth = source.load_targets(0)["depth"]
    assert depth.shape == (8, 8)
    assert set(depth.unique().tolist()) <= set(full.unique().tolist())  # copied values, none blended
    assert (depth[:, 4:] == 1.5).all() and (depth[4:, :4] == 0).all()


# ------------------------------------------------------------------------------------- keypoints


@pytest.fixture
def faces(tmp_path: Path) -> Path:
    for k, name in enumerate(["a.png", "b.png", "c.png"]):
        save_image(tmp_path / "faces" / name, photo(20, 40, seed=k))
    return tmp_path / "faces"


def write_csv(path: Path, rows: list[list[object]]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def test_keypoints_csv_with_and_without_visibility(faces: Path, tmp_path: Path) -> None:
    rows = [["image", "x0", "y0", "x1", "y1"], ["a.png", 1, 2, 3.5, 4], ["b.png", 5, 6, 7, 8]]
    plain = write_csv(tmp_path / "plain.csv", rows)
    source = build_source(f"keypoints:{plain}?images={faces}")
    assert isinstance(source, KeypointSource) and source.num_points == 2 and len(source) == 2
    kp = source.load_targets(0)["keypoints"]
    assert kp.dtype == torch.float32 and kp.tolist() == [[1, 2, 1], [3.5, 4, 1]]
    rows = [["image", "x0", "y0", "v0", "x1", "y1", "v1", "note"], ["c.png", 1, 2, 2, "", "", 0, "chin cut off"]]
    visible = write_csv(faces / "v.csv", rows)
    kp = build_source(f"keypoints:{visible}").load_targets(0)["keypoints"]  # images default to the CSV's folder
    assert kp.tolist() == [[1, 2, 1], [0, 0, 0]]


def test_keypoints_csv_bad_rows_are_dropped(faces: Path, tmp_path: Path, caplog) -> None:
    rows = [
        ["image", "x0", "y0", "x1", "y1"],
        ["a.png", 1, 2, 3, 4],
        ["b.png", 1, 2, 3],  # wrong number of keypoint values
        ["c.png", 1, "abc", 3, 4],
        ["c.png", 1, "nan", 3, 4],
        ["gone.png", 1, 2, 3, 4],
        ["a.png", 9, 9, 9, 9],
        [],
        ["c.png", 0, 0, 5, 5],
    ]
    path = write_csv(tmp_path / "pts.csv", rows)
    with caplog.at_level(logging.WARNING, logger="selftrain.data"):
        source = build_source(f"keypoints:{path}?images={faces}")
    assert [source.key(i) for i in range(len(source))] == ["a.png", "c.png"]
    assert source.load_targets(0)["keypoints"][:, :2].tolist() == [[1, 2], [3, 4]]
    assert has_skip(source, "b.png", "line 3: 4 fields, the header has 5")
    assert has_skip(source, "c.png", "line 4: column y0 is not a number")
    assert has_skip(source, "c.png", "line 5: point 0: non-finite coordinate")
    assert has_skip(source, "gone.png", "image file not found (line 6 of pts.csv)")
    assert has_skip(source, "a.png", "line 7: the image already has keypoints")
    assert len(source.annotation_skips) == 5 and len(caplog.records) == 5
    with pytest.raises(BadAnnotationError, match=r"pts\.csv: b\.png: line 3: 4 fields"):
        build_source(f"keypoints:{path}?images={faces}", strict=True)
    bad_header = write_csv(tmp_path / "h.csv", [["image", "x0", "y0", "x1"], ["a.png", 1, 2, 3]])
    with pytest.raises(DataError, match=r"h\.csv: point columns must be"):
        build_source(f"keypoints:{bad_header}?images={faces}")


def test_keypoints_json(faces: Path, tmp_path: Path) -> None:
    doc = {"images": [
        {"file": "a.png", "keypoints": [[1, 2, 1], [3, 4, 0], [5, 6]]},
        {"file": "b.png", "keypoints": [[1, 2], [3, 4]]},
        {"file": "c.png", "keypoints": [[None, 2, 1], [3, 4], [5, 6]]},
        {"file": "gone.png", "keypoints": [[1, 2], [3, 4], [5, 6]]},
        {"keypoints": [[1, 2], [3, 4], [5, 6]]},
        {"file": "c.png", "keypoints": "12"},
        {"file": "c.png", "keypoints": [[None, None, 0], [3, 4, 0.5], [5, 6, 2]]},
    ]}  # fmt: skip
    path = write_json(tmp_path / "pts.json", doc)
    source = build_source(f"keypoints:{path}?images={faces}")
    assert [source.key(i) for i in range(len(source))] == ["a.png", "c.png"]
    assert source.load_targets(0)["keypoints"].tolist() == [[1, 2, 1], [0, 0, 0], [5, 6, 1]]
    assert source.load_targets(1)["keypoints"].tolist() == [[0, 0, 0], [3, 4, 0.5], [5, 6, 1]]
    assert has_skip(source, "b.png", "images[1]: 2 keypoints, but the file's images have 3")
    assert has_skip(source, "c.png", "images[2]: point 0: non-finite coordinate")
    assert has_skip(source, "gone.png", "image file not found")
    assert has_skip(source, "images[4]", "needs a non-empty string 'file'")
    assert has_skip(source, "c.png", "images[5]: 'keypoints' must be")
    assert len(source.annotation_skips) == 5
    broken = tmp_path / "broken.json"
    broken.write_text("{'images': []}")
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON"):
        build_source(f"keypoints:{broken}?images={faces}")
    wrong = write_json(tmp_path / "wrong.json", {"files": []})
    with pytest.raises(DataError, match=r"wrong\.json: expected"):
        build_source(f"keypoints:{wrong}?images={faces}")


def test_keypoints_follow_the_resize(tmp_path: Path) -> None:
    save_image(tmp_path / "sq.png", square_photo(20, 40, (24, 2, 36, 10)))  # square centred at (30, 6)
    path = write_json(tmp_path / "pts.json", {"images": [{"file": "sq.png", "keypoints": [[30, 6, 1]]}]})
    source = build_source(f"keypoints:{path}", image_size=10)
    image, targets = source.load_with_targets(0)
    x, y, v = targets["keypoints"][0].tolist()
    assert (x, y, v) == pytest.approx((7.5, 3.0, 1.0))
    assert image[:, int(y), int(x)].min() > 200  # the point is still on the bright square
    assert torch.equal(source.load_targets(0)["keypoints"], targets["keypoints"])


def test_schemes_are_registered(coco: Path) -> None:
    assert {"coco", "voc", "depth", "keypoints"} <= set(KNOWN_SCHEMES)
    with pytest.raises(DataError, match="must end in .csv or .json"):
        build_source(f"keypoints:{coco.parent / 'x.txt'}")
    with pytest.raises(DataError, match="directory not found"):
        build_source(f"voc:{coco.parent / 'nowhere'}")
