"""COCO instance annotations: ``coco:ANNOTATIONS.json[?images=DIR]``.

Boxes, labels, a per-pixel class mask and, when a category declares keypoints, ``(n, P, 3)``
keypoints aligned with the boxes. ``DIR`` defaults to the JSON file's folder. RLE segmentations
are parsed and checked here (:func:`rle_string_counts`) before anything reaches pycocotools.
The mask follows the run's convention (0 = background, ``c + 1`` = category ``c``), so the same
file serves detection and segmentation runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from selftrain.data.annotations.base import (
    AnnotatedSource,
    _as_int,
    _clean_points,
    _directory,
    _is_number,
    _Item,
    _read_json,
    _SkipLog,
    _split_uri,
)
from selftrain.data.images import DEFAULT_MAX_PIXELS
from selftrain.data.sources import DataError
from selftrain.data.targets import IGNORE_INDEX, clean_boxes


@dataclass
class _CocoCategories:
    names: list[str]
    label_of: dict[int, int]
    points_of: dict[int, int]  # category id -> number of keypoints it declares (0 = none)

    @property
    def num_points(self) -> int:
        return max(self.points_of.values(), default=0)


@dataclass
class _CocoObjects:
    """The usable annotations of one image, in file order."""

    width: int
    height: int
    boxes: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    keypoints: list[np.ndarray] = field(default_factory=list)
    segments: list[tuple[int, Any]] = field(default_factory=list)  # (mask value, polygons or RLE)


class CocoSource(AnnotatedSource):
    """COCO instance annotations: ``coco:ANNOTATIONS.json[?images=DIR]``.

    Category ids are mapped to labels ``0..K-1`` in order of id, and ``classes`` are the
    category names in that order: box label ``c`` is ``classes[c]``. When the file has
    segmentations, ``mask`` is a target in the run's convention: 0 for pixels no annotation
    covers (background), ``c + 1`` for category ``c``, :data:`IGNORE_INDEX` for crowd
    (``iscrowd``) regions, which are not boxes; ``mask_classes`` is ``["background", *classes]``.
    Later annotations are drawn over earlier ones. Keypoints are ``(n, P, 3)``, one row per box
    (P = the most any category declares; boxes of other categories get ``v = 0``), with ``v = 1``
    for COCO visibility 1 or 2.

    The image-level ``labels`` (for stratified label-fraction splits) are the category of each
    image's largest box by area, as scene sets use their largest item; ``-1`` for an image
    without a box. Box area rather than mask area, so that files without segmentations get the
    same labels and nothing is rasterized to build the source.
    """

    def __init__(
        self, uri: str, items: list[_Item], objects: list[_CocoObjects], *, num_points: int, **kwargs: Any
    ) -> None:
        super().__init__(uri, items, labels=[_largest_box_label(obj) for obj in objects], **kwargs)
        self._objects = objects
        self._num_points = num_points

    def _raw_targets(self, i: int) -> dict[str, np.ndarray]:
        obj = self._objects[i]
        out = {
            "boxes": np.asarray(obj.boxes, dtype=np.float32).reshape(-1, 4),
            "labels": np.asarray(obj.labels, dtype=np.int64),
        }
        if "keypoints" in self.target_keys:
            out["keypoints"] = np.asarray(obj.keypoints, dtype=np.float32).reshape(-1, self._num_points, 3)
        if "mask" in self.target_keys:
            out["mask"] = _coco_mask(obj)
        return out


def _largest_box_label(objects: _CocoObjects) -> int:
    """The label of the image's largest box (the first of equals), ``-1`` without a box."""
    if not objects.boxes:
        return -1
    boxes = np.asarray(objects.boxes, dtype=np.float64)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return int(objects.labels[int(np.argmax(areas))])


def build_coco(uri: str, rest: str, *, image_size: int | None, channels: int | None, strict: bool) -> CocoSource:
    """Builds the source for ``coco:ANNOTATIONS.json[?images=DIR]``.

    Raises:
        DataError: Bad URI, unreadable or invalid JSON, missing top-level keys or malformed
            categories (the label space cannot be trusted then), or no usable image.
        BadAnnotationError: With ``strict``, the first dropped image or annotation.
    """
    target, params = _split_uri(uri, rest, "coco", ("images",))
    path = Path(target).expanduser()
    doc = _read_json(path)
    required = ("images", "annotations", "categories")
    if not isinstance(doc, dict) or any(not isinstance(doc.get(k), list) for k in required):
        raise DataError(f"{path}: not a COCO annotation file (needs the lists 'images', 'annotations', 'categories')")
    images_dir = _directory(uri, Path(params["images"]).expanduser() if "images" in params else path.parent)
    cats = _coco_categories(path, doc["categories"])
    skips = _SkipLog(uri, strict)
    images, dropped = _coco_images(path, doc["images"], images_dir, skips)
    by_id = {image_id: objects for image_id, (_, objects) in images.items()}
    has_masks = False
    for j, ann in enumerate(doc["annotations"]):
        if not isinstance(ann, dict):
            skips.add(f"annotations[{j}]", path, f"annotations[{j}] is not a JSON object")
            continue
        aid, image_id = ann.get("id", f"#{j}"), _as_int(ann.get("image_id"))
        objects = by_id.get(image_id)
        if objects is None:
            if image_id not in dropped:
                where = f"image_id={ann.get('image_id')!r:.40}"
                skips.add(where, path, f"annotation {aid}: image_id is not among the images")
            continue
        key = images[image_id][0].key
        reason = _add_coco_annotation(ann, objects, cats)
        if reason:
            skips.add(key, path, f"annotation {aid}: {reason}")
        has_masks = has_masks or bool(ann.get("segmentation"))
    order = sorted(images.values(), key=lambda pair: pair[0].key)
    keys = ("boxes", "labels") + (("mask",) if has_masks else ()) + (("keypoints",) if cats.num_points else ())
    if has_masks and len(cats.names) >= IGNORE_INDEX:
        raise DataError(f"{path}: {len(cats.names)} categories + background collide with ignore index {IGNORE_INDEX}")
    mask_classes = ["background", *cats.names] if has_masks else None
    return CocoSource(
        uri,
        [item for item, _ in order],
        [objects for _, objects in order],
        num_points=cats.num_points,
        classes=cats.names,
        mask_classes=mask_classes,
        target_keys=keys,
        channels=channels,
        image_size=image_size,
        skips=skips.finish(len(order)),
    )


def _coco_categories(path: Path, raw: list[Any]) -> _CocoCategories:
    """Category ids sorted -> labels 0..K-1; any malformed category is a file-level error."""
    found: dict[int, tuple[str, int]] = {}
    for j, cat in enumerate(raw):
        cid = _as_int(cat.get("id")) if isinstance(cat, dict) else None
        if cid is None or not isinstance(cat.get("name"), str):
            raise DataError(f"{path}: categories[{j}] needs an integer 'id' and a string 'name', got {cat!r:.80}")
        if cid in found:
            raise DataError(f"{path}: category id {cid} appears twice")
        points = cat.get("keypoints", [])
        if not isinstance(points, list):
            raise DataError(f"{path}: category {cid} 'keypoints' must be a list of names")
        found[cid] = (cat["name"], len(points))
    if not found:
        raise DataError(f"{path}: no categories")
    ids = sorted(found)
    return _CocoCategories(
        names=[found[c][0] for c in ids],
        label_of={c: k for k, c in enumerate(ids)},
        points_of={c: found[c][1] for c in ids},
    )


def _coco_images(
    path: Path, raw: list[Any], images_dir: Path, skips: _SkipLog
) -> tuple[dict[int, tuple[_Item, _CocoObjects]], set[Any]]:
    """Valid image entries by id, and the ids of dropped ones (whose annotations go with them)."""
    images: dict[int, tuple[_Item, _CocoObjects]] = {}
    names: set[str] = set()
    dropped: set[Any] = set()
    for j, entry in enumerate(raw):
        entry = entry if isinstance(entry, dict) else {}
        image_id, name = _as_int(entry.get("id")), entry.get("file_name")
        width, height = _as_int(entry.get("width")), _as_int(entry.get("height"))
        key = name if isinstance(name, str) and name else f"images[{j}]"
        where: Path = path
        if not entry:
            reason = "not a JSON object with id, file_name, width and height"
        elif image_id is None:
            reason = f"needs an integer 'id', got {entry.get('id')!r}"
        elif not isinstance(name, str) or not name:
            reason = "needs a non-empty string 'file_name'"
        elif width is None or height is None or width < 1 or height < 1:
            reason = f"width and height must be positive integers, got {entry.get('width')!r}x{entry.get('height')!r}"
        elif width * height > DEFAULT_MAX_PIXELS:
            reason = f"declared size {width}x{height} exceeds the {DEFAULT_MAX_PIXELS}-pixel limit"
        elif image_id in images or image_id in dropped:
            reason = f"image id {image_id} appears twice"
        elif name in names:
            reason = "file_name appears twice"
        elif not (images_dir / name).is_file():
            where, reason = images_dir / name, f"image file not found (listed in {path.name})"
        else:
            names.add(name)
            images[image_id] = (_Item(name, images_dir / name, (width, height)), _CocoObjects(width, height))
            continue
        if image_id is not None and image_id not in images:
            dropped.add(image_id)
        skips.add(key, where, reason)
    return images, dropped


def _add_coco_annotation(ann: dict[str, Any], objects: _CocoObjects, cats: _CocoCategories) -> str:
    """Checks one annotation and adds it to its image; returns why it was dropped, or ``""``."""
    category = _as_int(ann.get("category_id"))
    if category not in cats.label_of:
        return f"category_id {ann.get('category_id')!r} is not among the categories"
    segmentation = ann.get("segmentation") or None
    if segmentation is not None:
        reason = _check_segmentation(segmentation, objects.width, objects.height)
        if reason:
            return reason
    label = cats.label_of[category]
    if ann.get("iscrowd"):
        # A crowd region is a mask to ignore, never an object box or a set of keypoints.
        if segmentation is not None:
            objects.segments.append((IGNORE_INDEX, segmentation))
        return ""
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        return f"bbox must be [x, y, width, height], got {bbox!r:.80}"
    x, y, w, h = (float(v) for v in bbox)
    box, _, reasons = clean_boxes(
        np.array([[x, y, x + w, y + h]]), np.array([label]),
        width=objects.width, height=objects.height, num_classes=len(cats.label_of),
    )  # fmt: skip
    if reasons:
        return reasons[0].removeprefix("box 0: ")
    points = None
    if cats.num_points:
        points, reason = _coco_keypoints(ann.get("keypoints"), cats.points_of[category], cats.num_points)
        if reason:
            return reason
    objects.boxes.append(box[0].tolist())
    objects.labels.append(label)
    if points is not None:
        objects.keypoints.append(points)
    if segmentation is not None:
        objects.segments.append((label + 1, segmentation))  # mask value 0 is the background
    return ""


def _coco_keypoints(raw: Any, declared: int, padded: int) -> tuple[np.ndarray | None, str]:
    """``[x, y, v, ...]`` -> ``(padded, 3)`` with ``v`` 1.0 (labeled) or 0.0, padded with missing points."""
    out = np.zeros((padded, 3), dtype=np.float32)
    if raw is None or declared == 0:
        return out, ""
    if not isinstance(raw, list) or not all(_is_number(v) for v in raw):
        return None, "keypoints must be a flat list of numbers"
    if len(raw) != 3 * declared:
        return None, f"{len(raw)} keypoint values, but its category declares {declared} points ({3 * declared} values)"
    points, reason = _clean_points(np.asarray(raw, dtype=np.float64).reshape(declared, 3), binary=True)
    if points is None:
        return None, reason
    out[:declared] = points
    return out, ""


def _check_segmentation(seg: Any, width: int, height: int) -> str:
    """Why a COCO segmentation cannot be rasterized safely, or ``""``.

    pycocotools' C code trusts its input: RLE runs that overrun the image write past the mask
    buffer, and huge polygon coordinates overflow its integer maths, so both are checked first.
    """
    if isinstance(seg, dict):
        return _check_rle(seg, width, height)
    if not isinstance(seg, list):
        return f"segmentation must be polygons or RLE, got {type(seg).__name__}"
    for polygon in seg:
        if not isinstance(polygon, list) or not all(_is_number(v) for v in polygon):
            return "segmentation polygons must be lists of numbers"
        if len(polygon) < 6 or len(polygon) % 2:
            return f"polygon with {len(polygon)} coordinates (needs an even number, at least 6)"
        xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
        if not np.isfinite(xy).all():
            return "polygon has a non-finite coordinate"
        # Beyond one image size outside the image a vertex is a unit or parsing error, not a shape.
        if (np.abs(xy - [width / 2, height / 2]) > [1.5 * width, 1.5 * height]).any():
            return f"polygon reaches far outside the {width}x{height} image"
    return ""


def _check_rle(seg: dict[str, Any], width: int, height: int) -> str:
    size, counts = seg.get("size"), seg.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(_as_int(s) is not None for s in size)):
        return f"RLE segmentation needs 'size': [height, width], got {size!r:.40}"
    if [_as_int(s) for s in size] != [height, width]:
        return f"RLE mask is {size[1]}x{size[0]} but its image is {width}x{height}"
    if isinstance(counts, str):
        runs = rle_string_counts(counts)
        if runs is None:
            return "RLE counts string is not valid COCO compressed RLE"
    elif isinstance(counts, list) and all(_as_int(c) is not None for c in counts):
        runs = [int(c) for c in counts]
    else:
        return "RLE counts must be a string or a list of integers"
    if any(r < 0 for r in runs):
        return "RLE has a negative run length"
    if sum(runs) != width * height:
        return f"RLE runs cover {sum(runs)} pixels, but its {width}x{height} image has {width * height}"
    return ""


def rle_string_counts(text: str) -> list[int] | None:
    """Decodes the run lengths of a COCO compressed RLE string; ``None`` if it is malformed.

    The format (pycocotools ``rleToString``): each run is a signed number written 5 bits per
    character, low bits first, as ``chr(48 + chunk)`` with bit 0x20 meaning "more chunks follow"
    and bit 0x10 of the last chunk the sign; from the third run on, the number is the difference
    to the run two places back.
    """
    runs: list[int] = []
    value = shift = 0
    for char in text:
        chunk = ord(char) - 48
        if not 0 <= chunk < 64:
            return None
        value |= (chunk & 0x1F) << shift
        shift += 5
        if chunk & 0x20:
            continue
        if chunk & 0x10:
            value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
        value = shift = 0
    return None if shift else runs


def _coco_mask(objects: _CocoObjects) -> np.ndarray:
    """Rasterizes the segments of one image in file order, later ones on top, over background 0.

    Polygons are rasterized by pycocotools (so masks match COCO's own evaluation); RLE is
    expanded here from run lengths checked at build time, which keeps malformed runs away from
    pycocotools' unchecked C decoder.
    """
    height, width = objects.height, objects.width
    mask = np.zeros((height, width), dtype=np.int64)
    for value, seg in objects.segments:
        if isinstance(seg, list):
            # Lazy: only polygons need the C extension.
            from pycocotools import mask as mask_utils

            rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
            runs = rle_string_counts(rle["counts"].decode("ascii"))
        elif isinstance(seg["counts"], list):
            runs = seg["counts"]
        else:
            runs = rle_string_counts(seg["counts"])
        mask[_runs_to_mask(runs, height, width)] = value
    return mask


def _runs_to_mask(runs: list[int] | None, height: int, width: int) -> np.ndarray:
    """COCO run lengths (column-major, starting with a run of zeros) -> ``(H, W)`` bool mask."""
    if runs is None or sum(runs) != height * width:
        raise DataError(f"RLE runs do not cover the {width}x{height} image")
    flat = np.repeat(np.arange(len(runs)) % 2 == 1, np.asarray(runs, dtype=np.int64))
    return flat.reshape(width, height).T
