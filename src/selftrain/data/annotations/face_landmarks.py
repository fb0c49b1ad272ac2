"""Face landmark formats: 300W ``.pts`` files, WFLW annotation lists and AFLW2000-3D ``.mat`` files.

URIs (each gives a :class:`~selftrain.data.annotations.keypoints.KeypointSource`, so the
``keypoints`` task and :func:`selftrain.metrics_faces.landmark_metrics` take it as it is):

- ``pts:DIR[?images=DIR2]`` -- iBUG / 300W: every ``NAME.pts`` under ``DIR`` (recursively) with
  the image of the same relative path and stem (``.png``, ``.jpg``, ...) under ``DIR2`` (default
  ``DIR``). A ``.pts`` file is ``version: 1``, ``n_points: 68``, then ``{``, one ``x y`` line per
  point, ``}``.
- ``wflw:FILE.txt[?images=DIR]`` -- WFLW (Wu et al. 2018): one face per line, 98 ``x y`` pairs
  (196 numbers), the face box ``x_min y_min x_max y_max``, six 0/1 attribute flags (pose,
  expression, illumination, make-up, occlusion, blur) and the image path relative to ``DIR``
  (default the file's folder). An image with several faces has one line per face; its faces are
  keyed ``NAME``, ``NAME#1``, ``NAME#2`` in file order. The boxes and flags are kept in
  ``source.boxes`` and ``source.attributes``.
- ``aflw3d:DIR`` -- AFLW2000-3D (Zhu et al. 2016): ``NAME.jpg`` next to ``NAME.mat`` whose
  ``pt3d_68`` is a ``3 x 68`` array of ``x, y, z``. Targets: ``keypoints`` (the ``x, y`` as
  ``(68, 3)`` with ``v = 1``) and ``points3d`` (``(68, 3)``: ``x, y, z``).

Coordinates are kept as stored (iBUG's ``.pts`` are 1-based MATLAB pixels, so they sit up to
one pixel right of and below the 0-based convention of :mod:`selftrain.data.targets`; metrics
compare predictions with targets in the same convention and are not affected). Points outside
the image are kept: face crops cut landmarks off. A malformed file or line is dropped with its
line number and reason in ``source.annotation_skips`` (an error in strict mode).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from selftrain.data.annotations.base import _directory, _Item, _read_text, _SkipLog, _split_uri
from selftrain.data.annotations.keypoints import KeypointSource
from selftrain.data.imagefolder import IMAGE_EXTENSIONS
from selftrain.data.sources import DataError

#: ``(left, right)`` pairs of the 68-point iBUG scheme (0-based) that a horizontal flip swaps.
FLIP_PAIRS_68 = (
    *((k, 16 - k) for k in range(8)),  # jaw
    (17, 26), (18, 25), (19, 24), (20, 23), (21, 22),  # brows
    (31, 35), (32, 34),  # nostrils
    (36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46),  # eyes
    (48, 54), (49, 53), (50, 52), (55, 59), (56, 58), (60, 64), (61, 63), (65, 67),  # mouth
)  # fmt: skip
#: ``(left, right)`` pairs of WFLW's 98-point scheme (0-based), as in the WFLW evaluation code of HRNet
#: (Wang et al. 2020): contour, brows, eyes, nostrils, mouth and pupils.
FLIP_PAIRS_98 = (
    *((k, 32 - k) for k in range(16)),  # contour
    (33, 46), (34, 45), (35, 44), (36, 43), (37, 42), (38, 50), (39, 49), (40, 48), (41, 47),  # brows
    (60, 72), (61, 71), (62, 70), (63, 69), (64, 68), (65, 75), (66, 74), (67, 73),  # eyes
    (55, 59), (56, 58),  # nostrils
    (76, 82), (77, 81), (78, 80), (87, 83), (86, 84), (88, 92), (89, 91), (95, 93),  # mouth
    (96, 97),  # pupils
)  # fmt: skip
WFLW_ATTRIBUTES = ("pose", "expression", "illumination", "make-up", "occlusion", "blur")
_WFLW_POINTS = 98


class FaceLandmarkSource(KeypointSource):
    """A :class:`KeypointSource` of face landmarks that knows its eye corners (and, for WFLW, boxes).

    Attributes:
        interocular: The outer eye corner indices (68 points: 36, 45; 98 points: 60, 72).
        keypoint_flip_pairs: Point pairs a horizontal flip swaps (68- and 98-point sources).
        boxes, attributes: WFLW only: ``(N, 4)`` face boxes and ``(N, 6)`` 0/1 attribute flags.
        points3d: AFLW2000-3D only: the ``(68, 3)`` 3D points of each image.
    """

    def __init__(self, uri: str, items: list[_Item], points: list[np.ndarray], **kwargs: Any) -> None:
        extra = {name: kwargs.pop(name, None) for name in ("boxes", "attributes", "points3d")}
        super().__init__(uri, items, points, **kwargs)
        self.boxes, self.attributes, self._points3d = extra["boxes"], extra["attributes"], extra["points3d"]
        self.interocular = {68: (36, 45), 98: (60, 72)}.get(self.num_points)
        if self.num_points in (68, 98):
            self.keypoint_flip_pairs = FLIP_PAIRS_68 if self.num_points == 68 else FLIP_PAIRS_98

    def _raw_targets(self, i: int) -> dict[str, np.ndarray]:
        targets = super()._raw_targets(i)
        if self._points3d is not None:
            targets["points3d"] = self._points3d[i].copy()
        return targets


def _points_with_v(xy: np.ndarray) -> np.ndarray:
    return np.concatenate([xy, np.ones((len(xy), 1))], axis=1).astype(np.float32)


def _build(uri: str, found: list[tuple[str, Path, np.ndarray, Path]], skips: _SkipLog, **kwargs: Any) -> FaceLandmarkSource:
    """Keeps the entries (key, image, points, annotation file) with the most common point count and an image."""
    counts = Counter(len(points) for _, _, points, _ in found)
    num_points = counts.most_common(1)[0][0] if counts else 0
    items, points, keep = [], [], []
    for j, (key, image, value, annotation) in enumerate(found):
        if len(value) != num_points:
            skips.add(key, annotation, f"{len(value)} points, but the other faces have {num_points}")
        elif not image.is_file():
            skips.add(key, image, "image file not found")
        else:
            items.append(_Item(key, image, None))
            points.append(_points_with_v(value[:, :2]))
            keep.append(j)
    extra = {name: (value[keep] if name != "points3d" else [value[j] for j in keep])
             for name, value in kwargs.pop("extra", {}).items()}  # fmt: skip
    return FaceLandmarkSource(uri, items, points, classes=None, target_keys=kwargs.pop("target_keys", ("keypoints",)),
                              skips=skips.finish(len(items)), **extra, **kwargs)  # fmt: skip


# ---------------------------------------------------------------------------------------- 300W


def parse_pts(text: str) -> np.ndarray:
    """The ``(P, 2)`` points of an iBUG ``.pts`` file's text.

    Raises:
        ValueError: The text is not ``version``/``n_points``/``{ x y ... }``; the message names the line.
    """
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    header: dict[str, str] = {}
    body = None
    for j, (n, line) in enumerate(lines):
        if line == "{":
            body = lines[j + 1 :]
            break
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"line {n}: expected 'version: 1', 'n_points: P' or '{{', got {line!r:.40}")
        header[name.strip()] = value.strip()
    if body is None:
        raise ValueError("no '{' opening the points")
    if not header.get("n_points", "").isdigit():
        raise ValueError(f"header needs 'n_points: P', got {header}")
    if not body or body[-1][1] != "}":
        raise ValueError("no '}' closing the points")
    points = []
    for n, line in body[:-1]:
        fields = line.split()
        try:
            x, y = (float(v) for v in fields)
        except ValueError:
            raise ValueError(f"line {n}: expected 'x y', got {line!r:.40}") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError(f"line {n}: non-finite point {line!r:.40}")
        points.append((x, y))
    if len(points) != int(header["n_points"]):
        raise ValueError(f"n_points says {header['n_points']} but the file has {len(points)} points")
    return np.asarray(points, dtype=np.float64).reshape(-1, 2)


def _image_for(stem: Path) -> Path:
    """The existing image ``stem.EXT`` (any image extension), or ``stem.jpg`` to report as missing."""
    for ext in sorted(IMAGE_EXTENSIONS):
        for candidate in (stem.with_suffix(ext), stem.with_suffix(ext.upper())):
            if candidate.is_file():
                return candidate
    return stem.with_suffix(".jpg")


def build_pts(uri: str, rest: str, *, image_size: int | None, channels: int | None, strict: bool) -> FaceLandmarkSource:
    """Builds the source for ``pts:DIR[?images=DIR2]`` (300W / iBUG ``.pts`` files)."""
    target, params = _split_uri(uri, rest, "pts", ("images",))
    root = _directory(uri, Path(target).expanduser())
    images = _directory(uri, Path(params["images"]).expanduser()) if "images" in params else root
    skips = _SkipLog(uri, strict)
    found = []
    for path in sorted(root.rglob("*.pts")):
        image = _image_for(images / path.relative_to(root).with_suffix(""))
        key = image.relative_to(images).as_posix()
        try:
            found.append((key, image, parse_pts(_read_text(path)), path))
        except (ValueError, DataError) as exc:
            skips.add(key, path, str(exc))
    if not found and not skips.records:
        raise DataError(f"{uri}: no .pts files under {root}")
    return _build(uri, found, skips, channels=channels, image_size=image_size)


# ---------------------------------------------------------------------------------------- WFLW


def parse_wflw_line(line: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """``(98, 2)`` points, ``(4,)`` box, ``(6,)`` flags and the image path of one WFLW line.

    Raises:
        ValueError: Wrong field count, a non-number, a flag other than 0/1, or a degenerate box.
    """
    fields = line.split()
    expected = 2 * _WFLW_POINTS + 4 + len(WFLW_ATTRIBUTES) + 1
    if len(fields) != expected:
        raise ValueError(f"{len(fields)} fields, expected {expected} (196 coordinates, 4 box, 6 flags, image)")
    try:
        numbers = np.array([float(v) for v in fields[:-1]])
    except ValueError as exc:
        raise ValueError(f"not a number ({exc})") from None
    if not np.isfinite(numbers).all():
        raise ValueError("non-finite coordinate or box value")
    points, box, flags = numbers[:196].reshape(-1, 2), numbers[196:200], numbers[200:]
    if not np.isin(flags, (0.0, 1.0)).all():
        raise ValueError(f"attribute flags must be 0 or 1, got {flags.tolist()}")
    if box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"degenerate face box {box.tolist()}")
    return points, box, flags.astype(np.int64), fields[-1]


def build_wflw(uri: str, rest: str, *, image_size: int | None, channels: int | None, strict: bool) -> FaceLandmarkSource:
    """Builds the source for ``wflw:FILE.txt[?images=DIR]`` (one face per line)."""
    target, params = _split_uri(uri, rest, "wflw", ("images",))
    path = Path(target).expanduser()
    images = _directory(uri, Path(params["images"]).expanduser() if "images" in params else path.parent)
    skips = _SkipLog(uri, strict)
    found, boxes, flags, faces = [], [], [], Counter()
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            points, box, attributes, name = parse_wflw_line(line)
        except ValueError as exc:
            skips.add(f"line {n}", path, f"line {n}: {exc}")
            continue
        key = name if faces[name] == 0 else f"{name}#{faces[name]}"
        faces[name] += 1
        found.append((key, images / name, points, path))
        boxes.append(box)
        flags.append(attributes)
    extra = {"boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
             "attributes": np.asarray(flags, dtype=np.int64).reshape(-1, len(WFLW_ATTRIBUTES))}  # fmt: skip
    return _build(uri, found, skips, channels=channels, image_size=image_size, extra=extra)


# --------------------------------------------------------------------------------- AFLW2000-3D


def read_pt3d(path: Path) -> np.ndarray:
    """The ``(68, 3)`` ``x, y, z`` points of an AFLW2000-3D ``.mat`` file (its ``pt3d_68``, 3 x 68).

    Raises:
        ValueError: Not a MATLAB file, no ``pt3d_68``, wrong shape or non-finite values.
    """
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path), variable_names=["pt3d_68"])
    except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError, ... for damaged files
        raise ValueError(f"not a readable MATLAB file ({type(exc).__name__}: {exc})") from None
    if "pt3d_68" not in mat:
        raise ValueError("no 'pt3d_68' variable")
    points = np.asarray(mat["pt3d_68"])
    if points.shape != (3, 68) or not np.issubdtype(points.dtype, np.number):
        raise ValueError(f"'pt3d_68' must be a 3 x 68 numeric array, got {points.shape} {points.dtype}")
    if not np.isfinite(points).all():
        raise ValueError("'pt3d_68' has NaN or infinite values")
    return points.T.astype(np.float64)


def build_aflw3d(uri: str, rest: str, *, image_size: int | None, channels: int | None, strict: bool) -> FaceLandmarkSource:
    """Builds the source for ``aflw3d:DIR`` (AFLW2000-3D: ``NAME.jpg`` + ``NAME.mat``)."""
    target, _ = _split_uri(uri, rest, "aflw3d", ())
    root = _directory(uri, Path(target).expanduser())
    skips = _SkipLog(uri, strict)
    found, points3d = [], []
    for path in sorted(root.glob("*.mat")):
        image = _image_for(path.with_suffix(""))
        try:
            points = read_pt3d(path)
        except ValueError as exc:
            skips.add(image.name, path, str(exc))
            continue
        found.append((image.name, image, points, path))
        points3d.append(points.astype(np.float32))
    if not found and not skips.records:
        raise DataError(f"{uri}: no .mat files in {root}")
    return _build(uri, found, skips, channels=channels, image_size=image_size,
                  target_keys=("keypoints", "points3d"), extra={"points3d": points3d})  # fmt: skip
