"""Keypoint tables: ``keypoints:FILE.csv[?images=DIR]`` / ``keypoints:FILE.json[?images=DIR]``.

One ``(P, 3)`` set of points per image; ``DIR`` defaults to the file's folder.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from selftrain.data.annotations.base import (
    AnnotatedSource,
    _clean_points,
    _csv_rows,
    _directory,
    _is_number,
    _Item,
    _keep_rows,
    _read_json,
    _SkipLog,
    _split_uri,
)
from selftrain.data.sources import DataError

_POINT_COLUMN = re.compile(r"^([xyv])(\d+)$")


class KeypointSource(AnnotatedSource):
    """One set of ``P`` points per image: ``keypoints:FILE.csv|FILE.json[?images=DIR]``.

    CSV: a header ``image,x0,y0,x1,y1,...`` with optional ``v0,v1,...`` (other columns are
    ignored); without ``v`` columns every point is visible. JSON:
    ``{"images": [{"file": NAME, "keypoints": [[x, y] or [x, y, v], ...]}]}``, where ``P`` is the
    most common point count in the file and ``null`` stands for an unknown coordinate.
    ``v`` is clipped to ``[0, 1]`` (so COCO's 2 becomes 1 and a confidence stays a confidence).
    Points outside the image are kept: face crops often cut off landmarks.
    """

    def __init__(self, uri: str, items: list[_Item], points: list[np.ndarray], **kwargs: Any) -> None:
        super().__init__(uri, items, **kwargs)
        self._points = points
        self.num_points = int(points[0].shape[0])

    def _raw_targets(self, i: int) -> dict[str, np.ndarray]:
        return {"keypoints": self._points[i].copy()}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "num_points": self.num_points}


def build_keypoints(
    uri: str, rest: str, *, image_size: int | None, channels: int | None, strict: bool
) -> KeypointSource:
    """Builds the source for ``keypoints:FILE.csv|FILE.json[?images=DIR]``.

    Raises:
        DataError: Bad URI, unreadable file, invalid JSON, a CSV header without ``image``/``xK``/
            ``yK`` columns, or no usable image.
        BadAnnotationError: With ``strict``, the first dropped row.
    """
    target, params = _split_uri(uri, rest, "keypoints", ("images",))
    path = Path(target).expanduser()
    if path.suffix.lower() not in (".csv", ".json"):
        raise DataError(f"{uri}: keypoint files must end in .csv or .json, got {path.name!r}")
    images_dir = _directory(uri, Path(params["images"]).expanduser() if "images" in params else path.parent)
    skips = _SkipLog(uri, strict)
    rows = _csv_points(path, skips) if path.suffix.lower() == ".csv" else _json_points(path, skips)
    items, points = _keep_rows(rows, images_dir, path, skips, twice="the image already has keypoints")
    return KeypointSource(
        uri, items, points, classes=None, target_keys=("keypoints",), channels=channels,
        image_size=image_size, skips=skips.finish(len(items)),
    )  # fmt: skip


def _csv_points(path: Path, skips: _SkipLog) -> list[tuple[str, str, np.ndarray]]:
    """Valid ``(image, "line N", (P, 3) points)`` rows of a CSV file; bad rows go to ``skips``."""
    header, rows_of_file = _csv_rows(path, skips, key_column="image", expected="image,x0,y0,...")
    columns = _point_columns(path, header)
    num_points = len(columns["x"])
    rows = []
    for where, row in rows_of_file:
        name = row[columns["image"]]
        if not name:
            skips.add(where, path, f"{where}: empty image name")
            continue
        values = np.ones((num_points, 3), dtype=np.float64)
        bad_cell = None
        for axis, letter in enumerate("xyv"):
            for k, col in enumerate(columns[letter]):
                try:
                    values[k, axis] = float(row[col]) if row[col] else math.nan
                except ValueError:
                    bad_cell = bad_cell or f"{where}: column {header[col]} is not a number: {row[col]!r:.40}"
        if bad_cell:
            skips.add(name, path, bad_cell)
            continue
        cleaned, reason = _clean_points(values, binary=False)
        if cleaned is None:
            skips.add(name, path, f"{where}: {reason}")
            continue
        rows.append((name, where, cleaned))
    return rows


def _point_columns(path: Path, header: list[str]) -> dict[str, Any]:
    """Column indices of ``image`` and of ``x0..``, ``y0..``, ``v0..`` in point order."""
    if len(set(header)) != len(header):
        raise DataError(f"{path}: repeated column names in the header {header}")
    if "image" not in header:
        raise DataError(f"{path}: the header needs an 'image' column, got {header[:6]}")
    found: dict[str, dict[int, int]] = {"x": {}, "y": {}, "v": {}}
    for col, name in enumerate(header):
        match = _POINT_COLUMN.match(name)
        if match:
            found[match.group(1)][int(match.group(2))] = col
    count = len(found["x"])
    expected = set(range(count))
    xs, ys, vs = (set(found[letter]) for letter in "xyv")
    if count == 0 or xs != expected or ys != expected or vs not in (set(), expected):
        raise DataError(f"{path}: point columns must be x0,y0,...,x{{P-1}},y{{P-1}} (and optionally v0..v{{P-1}}), "
                        f"got {[h for h in header if _POINT_COLUMN.match(h)][:8]}")  # fmt: skip
    return {
        "image": header.index("image"),
        **{letter: [found[letter][k] for k in range(count)] for letter in "xy"},
        "v": [found["v"][k] for k in range(count)] if found["v"] else [],
    }


def _json_points(path: Path, skips: _SkipLog) -> list[tuple[str, str, np.ndarray]]:
    """Valid ``(file, "images[j]", (P, 3) points)`` entries of a JSON file; bad ones go to ``skips``."""
    doc = _read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DataError(f"{path}: expected {{\"images\": [{{\"file\": ..., \"keypoints\": [[x, y, v], ...]}}, ...]}}")
    parsed: list[tuple[str, str, Any]] = []
    for j, entry in enumerate(doc["images"]):
        where = f"images[{j}]"
        name = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name:
            skips.add(where, path, f"{where}: needs a non-empty string 'file'")
            continue
        points = _json_point_array(entry.get("keypoints"))
        if isinstance(points, str):
            skips.add(name, path, f"{where}: {points}")
            continue
        parsed.append((name, where, points))
    counts = Counter(len(points) for _, _, points in parsed)
    num_points = counts.most_common(1)[0][0] if counts else 0
    rows = []
    for name, where, points in parsed:
        if len(points) != num_points:
            skips.add(name, path, f"{where}: {len(points)} keypoints, but the file's images have {num_points}")
            continue
        cleaned, reason = _clean_points(points, binary=False)
        if cleaned is None:
            skips.add(name, path, f"{where}: {reason}")
            continue
        rows.append((name, where, cleaned))
    return rows


def _json_point_array(raw: Any) -> np.ndarray | str:
    """``[[x, y(, v)], ...]`` -> ``(P, 3)`` float64 (``v`` defaults to 1, ``null`` -> NaN), or why not."""
    if not isinstance(raw, list) or not raw:
        return "'keypoints' must be a non-empty list of [x, y] or [x, y, v]"
    rows = []
    for point in raw:
        numbers = isinstance(point, list) and all(v is None or _is_number(v) for v in point)
        if not numbers or len(point) not in (2, 3):
            return f"keypoint {point!r:.40} is not [x, y] or [x, y, v] of numbers"
        rows.append([math.nan if v is None else float(v) for v in point] + [1.0] * (3 - len(point)))
    return np.asarray(rows, dtype=np.float64)
