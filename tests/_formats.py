"""Builders of small fixtures in the real annotation formats: COCO JSON, VOC palette PNGs, depth PNGs.

Shared by the reader tests (``test_data_annotations.py``) and the runs on real formats
(``test_pipeline_dense.py``). :func:`write_coco`, :func:`write_voc` and :func:`write_depth`
write a scene set (real Fashion-MNIST/MNIST items on a canvas, with exact boxes, masks and
depth) in a format, so that a run on the files has something to learn and a reader's output
can be compared with the scenes' own targets.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

# ------------------------------------------------------------------------------------ images


@functools.lru_cache(maxsize=1)
def _china() -> np.ndarray | None:
    """scikit-learn's sample photo (shipped in the wheel), found without importing sklearn."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "images" / "china.jpg"
    if not path.is_file():
        return None
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A crop of a real photo, or a drawn gradient where scikit-learn is absent."""
    source = _china()
    if source is None:
        yy, xx = np.mgrid[:height, :width]
        channels = [xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + yy + 37 * seed) % 256]
        return np.stack(channels, axis=-1).astype(np.uint8)
    rng = np.random.default_rng(seed)
    top = int(rng.integers(0, source.shape[0] - height))
    left = int(rng.integers(0, source.shape[1] - width))
    return source[top : top + height, left : left + width].copy()


def save_image(path: Path, array: np.ndarray) -> Path:
    """Writes ``array`` (uint8 gray/RGB, or uint16 for a 16-bit PNG) in the format of the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_json(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc))
    return path


# -------------------------------------------------------------------------------------- COCO


def column_major_runs(mask: np.ndarray) -> list[int]:
    """COCO uncompressed RLE counts, computed independently of pycocotools: column-major, zeros first."""
    flat = np.asfortranarray(mask).ravel(order="F").astype(np.int64)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return ([0] + runs) if flat[0] == 1 else runs


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


# --------------------------------------------------------------------------------------- VOC


def voc_palette() -> list[int]:
    """The standard VOC colour map (bit-interleaved class index)."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


def save_palette_png(path: Path, indices: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.frombytes("P", (indices.shape[1], indices.shape[0]), indices.astype(np.uint8).tobytes())
    image.putpalette(voc_palette())
    image.save(path)


# ------------------------------------------------------------------------ scenes in real formats

#: Three classes keep the fixtures small; category ids deliberately not in class order.
SCENE_CLASSES = ("trouser", "bag", "sneaker")
COCO_IDS = (7, 11, 30)  # category id of each scene class: sorted ids give the scenes' class order


def scene_set(split: str, n: int, size: int, seed: int = 0):
    """``n`` scenes of ``size`` px with 1-3 items of :data:`SCENE_CLASSES` (a SceneSource)."""
    from selftrain.data import build_source

    scale = f"0.6-{min(1.2, size / 28):g}"
    return build_source(f"scenes:{split}?n={n}&size={size}&seed={seed}&items=1-3&scale={scale}&classes={','.join(SCENE_CLASSES)}")


def _gray(scenes, i: int) -> np.ndarray:
    return scenes.load(i)[0].numpy()  # (S, S) uint8: scenes are gray


def write_coco(path: Path, parts: list[tuple[str, object]], images: Path | None = None) -> Path:
    """Writes the scenes of ``parts`` (``(name prefix, scene set)``) as PNGs and one COCO JSON.

    Every item becomes an annotation with its box and a compressed-RLE mask of its visible
    pixels; the categories are listed in reverse id order (the reader sorts them by id).
    """
    images = images or path.parent
    doc = {"images": [], "annotations": [],
           "categories": [{"id": cid, "name": name} for cid, name in reversed(list(zip(COCO_IDS, SCENE_CLASSES)))]}  # fmt: skip
    for prefix, scenes in parts:
        for i in range(len(scenes)):
            name, image_id, pixels = f"{prefix}{i:03d}.png", len(doc["images"]) + 1, _gray(scenes, i)
            save_image(images / name, pixels)
            doc["images"].append({"id": image_id, "file_name": name, "width": pixels.shape[1], "height": pixels.shape[0]})
            targets, instances = scenes.load_targets(i), scenes.load_instances(i).numpy()
            for k, (box, label) in enumerate(zip(targets["boxes"].tolist(), targets["labels"].tolist())):
                x1, y1, x2, y2 = box
                doc["annotations"].append({
                    "id": len(doc["annotations"]) + 1, "image_id": image_id, "category_id": COCO_IDS[label],
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0, "segmentation": compressed_rle(instances == k + 1),
                })  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json(path, doc)


def write_voc(root: Path, parts: list[tuple[str, object]]) -> Path:
    """Writes scenes as a VOC tree: ``JPEGImages/*.jpg`` and palette masks (0 = background, c + 1 = class c)."""
    for prefix, scenes in parts:
        for i in range(len(scenes)):
            save_image(root / "JPEGImages" / f"{prefix}{i:03d}.jpg", _gray(scenes, i))
            save_palette_png(root / "SegmentationClass" / f"{prefix}{i:03d}.png", scenes.load_targets(i)["mask"].numpy())
    return root


def write_depth(root: Path, parts: list[tuple[str, object]]) -> Path:
    """Writes scenes as ``images/*.png`` with 16-bit millimetre depth maps ``depth/*.png``."""
    for prefix, scenes in parts:
        for i in range(len(scenes)):
            save_image(root / "images" / f"{prefix}{i:03d}.png", _gray(scenes, i))
            millimetres = np.round(scenes.load_targets(i)["depth"].numpy() * 1000).astype(np.uint16)
            save_image(root / "depth" / f"{prefix}{i:03d}.png", millimetres)
    return root


def write_images(root: Path, parts: list[tuple[str, object]]) -> Path:
    """Writes scenes as a tree of plain images (some in a sub-folder): an unlabeled pool."""
    for prefix, scenes in parts:
        for i in range(len(scenes)):
            folder = root / "batch-2" if i % 2 else root
            save_image(folder / f"{prefix}{i:03d}.png", _gray(scenes, i))
    return root


# -------------------------------------------------------------------------------------- faces


def pts_text(points: np.ndarray) -> str:
    """An iBUG / 300W ``.pts`` file: version, n_points, then the points between braces."""
    body = "\n".join(f"{x:.3f} {y:.3f}" for x, y in points)
    return f"version: 1\nn_points:  {len(points)}\n{{\n{body}\n}}\n"


def wflw_line(points: np.ndarray, box: tuple[int, int, int, int], flags: tuple[int, ...], image: str) -> str:
    """One WFLW annotation line: 98 ``x y`` pairs, the box, 6 attribute flags and the image path."""
    coords = " ".join(f"{v:.6f}" for v in np.asarray(points).ravel())
    return f"{coords} {' '.join(map(str, box))} {' '.join(map(str, flags))} {image}"


def write_aflw_mat(path: Path, pt3d: np.ndarray) -> Path:
    """An AFLW2000-3D ``.mat`` file: ``pt3d_68`` (3 x 68) with the pose and 2D points the real files carry."""
    from scipy.io import savemat

    savemat(str(path), {"pt3d_68": pt3d, "pt2d": pt3d[:2, :21], "Pose_Para": np.zeros((1, 7)),
                        "roi": np.array([[0.0, 0.0, 100.0, 100.0]])})  # fmt: skip
    return path


def affectnet_row(name: str, expression: int, valence: float, arousal: float, points: np.ndarray,
                  box: tuple[int, int, int, int] = (2, 3, 40, 44)) -> list[str]:  # fmt: skip
    """One row of AffectNet's ``training.csv`` (landmarks as ``x1;y1;x2;y2;...``)."""
    landmarks = ";".join(f"{v:.2f}" for v in np.asarray(points).ravel())
    return [name, *map(str, box), landmarks, str(expression), str(valence), str(arousal)]


def sample_photos() -> list[np.ndarray]:
    """The real photos shipped inside installed packages: scikit-learn's two, matplotlib's Grace Hopper."""
    found = []
    for package, parts in (("sklearn", ("datasets", "images", "china.jpg")), ("sklearn", ("datasets", "images", "flower.jpg")),
                           ("matplotlib", ("mpl-data", "sample_data", "grace_hopper.jpg"))):  # fmt: skip
        spec = importlib.util.find_spec(package)
        path = Path(next(iter(spec.submodule_search_locations)), *parts) if spec and spec.submodule_search_locations else None
        if path is not None and path.is_file():
            with Image.open(path) as image:
                found.append(np.asarray(image.convert("RGB")))
    return found


def photo_tiles(side: int = 96, min_std: float = 20.0) -> list[np.ndarray]:
    """Non-overlapping ``side`` px tiles of :func:`sample_photos` with texture (luma std > ``min_std``).

    Flat tiles (sky, a plain backdrop) are left out: two of them are near-duplicates of each other
    for any method, so a pool of "distinct" images must not hold them.
    """
    tiles = []
    for array in sample_photos():
        for y in range(0, array.shape[0] - side + 1, side):
            for x in range(0, array.shape[1] - side + 1, side):
                tile = array[y : y + side, x : x + side]
                if tile.mean(axis=2).std() > min_std:
                    tiles.append(tile)
    return tiles
