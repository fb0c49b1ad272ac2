"""Face label formats: LFW verification pairs, action-unit intensity CSVs and AffectNet CSVs.

- :func:`read_pairs` -- LFW's ``pairs.txt`` (Huang et al. 2007): a header ``FOLDS PAIRS`` (or one
  number ``PAIRS`` for ``pairsDevTrain.txt``: one fold), then per fold ``PAIRS`` same-person lines
  ``name n1 n2`` followed by ``PAIRS`` different-person lines ``name1 n1 name2 n2``; image ``n``
  of ``name`` is ``DIR/name/name_%04d.jpg``. Not an image source: verification scores pairs of
  embeddings, computed once per distinct image (:attr:`PairSet.images`).
- ``au:FILE.csv[?images=DIR]`` -- DISFA / BP4D-style action-unit intensities: a header
  ``image,AU1,AU2,AU4,...`` (any ``AU<number>`` columns, other columns ignored), one row per
  image, every intensity a number in ``[0, 5]``. Target ``au``: float32 ``(K,)``;
  ``source.au_names`` names them.
- ``affectnet:FILE.csv[?images=DIR]`` -- AffectNet's manual annotations: ``subDirectory_filePath,
  face_x, face_y, face_width, face_height, facial_landmarks, expression, valence, arousal``.
  Expressions 0-7 (:data:`~selftrain.metrics_faces.EXPRESSIONS`) are the image labels (classes,
  stratified splits); rows coded 8 (none), 9 (uncertain) and 10 (no face) have no expression and
  are dropped with that reason. Targets: ``boxes`` (the face, ``(1, 4)`` XYXY), ``labels`` (its
  expression), ``keypoints`` (``(68, 3)`` from the ``x1;y1;x2;y2;...`` landmarks, iBUG's 68-point
  scheme, so ``num_points`` and ``keypoint_flip_pairs`` are set for the ``keypoints`` task) and
  ``valence_arousal`` (``(2,)``, each in ``[-1, 1]``).
- ``lfw-pairs:PAIRS.txt[?images=DIR]`` -- the distinct images of a pairs file as a test source
  (:class:`PairSource`, ``source.pairs``), what a ``verification`` run is measured on.

``DIR`` defaults to the file's folder. Malformed lines are dropped and counted with their line
number and reason in ``annotation_skips`` (``read_pairs``: ``PairSet.skips``), or raised naming the
file and line in strict mode.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from selftrain.data.annotations.base import (
    AnnotatedSource,
    _csv_rows,
    _directory,
    _Item,
    _keep_rows,
    _read_text,
    _SkipLog,
    _split_uri,
)
from selftrain.data.annotations.face_landmarks import FLIP_PAIRS_68
from selftrain.data.imagefolder import ImageFolderSource
from selftrain.data.sources import DataError
from selftrain.metrics_faces import EXPRESSIONS

AU_INTENSITY_MAX = 5.0
_AU_COLUMN = re.compile(r"^AU\s*0*(\d+)$", re.IGNORECASE)
_NO_EXPRESSION = {8: "none", 9: "uncertain", 10: "no face"}
AFFECTNET_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                     "facial_landmarks", "expression", "valence", "arousal")  # fmt: skip

# -------------------------------------------------------------------------------------- LFW pairs


@dataclass
class PairSet:
    """Verification pairs: indices into :attr:`images`, whether each shows one person, and its fold.

    Attributes:
        images: Distinct image files, in first-seen order.
        a, b: ``(N,)`` int64 indices of each pair's images.
        same: ``(N,)`` bool.
        fold: ``(N,)`` int64 fold of each pair (from its line's position, so a dropped line never
            moves the others to another fold).
        skips: ``{"key", "path", "reason"}`` of each dropped line.
    """

    images: list[Path]
    a: np.ndarray
    b: np.ndarray
    same: np.ndarray
    fold: np.ndarray
    skips: list[dict[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.same)


def lfw_image(root: Path, name: str, number: int) -> Path:
    """``root/name/name_%04d.jpg``, LFW's layout."""
    return root / name / f"{name}_{number:04d}.jpg"


def _pair_line(fields: list[str]) -> tuple[str, int, str, int]:
    """``name n1 n2`` or ``name1 n1 name2 n2`` -> ``(name1, n1, name2, n2)``."""
    if len(fields) not in (3, 4):
        raise ValueError(f"{len(fields)} fields; expected 'name n1 n2' or 'name1 n1 name2 n2'")
    names = (fields[0], fields[0]) if len(fields) == 3 else (fields[0], fields[2])
    numbers = (fields[1], fields[2]) if len(fields) == 3 else (fields[1], fields[3])
    if not all(n.isdigit() and int(n) > 0 for n in numbers):
        raise ValueError(f"image numbers must be positive integers, got {list(numbers)}")
    return names[0], int(numbers[0]), names[1], int(numbers[1])


def read_pairs(path: str | Path, images: str | Path | None = None, *, strict: bool = False) -> PairSet:
    """Reads an LFW ``pairs.txt`` (see the module docstring); images default to the file's folder.

    A line that is not a pair, whose kind (same / different) does not match its place in the fold,
    or whose image is missing is dropped and recorded.

    Raises:
        DataError: Unreadable file, bad header, a body whose line count differs from the header's,
            or no usable pair.
        BadAnnotationError: With ``strict``, the first dropped line.
    """
    path = Path(path).expanduser()
    root = Path(images).expanduser() if images is not None else path.parent
    lines = _read_text(path).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    header = lines[0].split() if lines else []
    if len(header) not in (1, 2) or not all(v.isdigit() and int(v) > 0 for v in header):
        raise DataError(f"{path}: line 1 must be 'FOLDS PAIRS' or 'PAIRS', got {lines[0] if lines else ''!r:.40}")
    folds, per_class = (1, int(header[0])) if len(header) == 1 else (int(header[0]), int(header[1]))
    if len(lines) - 1 != 2 * folds * per_class:
        raise DataError(f"{path}: the header promises {folds} x 2 x {per_class} = {2 * folds * per_class} pairs, "
                        f"the file has {len(lines) - 1} lines")  # fmt: skip
    skips = _SkipLog(str(path), strict)
    index: dict[Path, int] = {}
    rows = []
    for j, line in enumerate(lines[1:]):
        where, fold, same = f"line {j + 2}", j // (2 * per_class), j % (2 * per_class) < per_class
        try:
            name1, n1, name2, n2 = _pair_line(line.split())
        except ValueError as exc:
            skips.add(where, path, f"{where}: {exc}")
            continue
        if (name1 == name2 and len(line.split()) == 3) != same:
            skips.add(where, path, f"{where}: a {'different' if same else 'same'}-person pair among the "
                                   f"{'same' if same else 'different'}-person pairs of fold {fold}")  # fmt: skip
            continue
        files = (lfw_image(root, name1, n1), lfw_image(root, name2, n2))
        missing = [f for f in files if not f.is_file()]
        if missing:
            skips.add(where, missing[0], f"{where}: image file not found")
            continue
        rows.append((*(index.setdefault(f, len(index)) for f in files), same, fold))
    records = skips.finish(len(rows))
    a, b, same, fold = (np.array(column) for column in zip(*rows))
    return PairSet(list(index), a.astype(np.int64), b.astype(np.int64), same.astype(bool), fold.astype(np.int64), records)


# ------------------------------------------------------------------------------------ CSV tables


def _number(text: str, column: str, low: float = -math.inf, high: float = math.inf) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{column} is not a number: {text!r:.40}") from None
    if not low <= value <= high:  # NaN fails too
        raise ValueError(f"{column} = {text} outside [{low:g}, {high:g}]")
    return value


class FaceTableSource(AnnotatedSource):
    """Images with per-image target arrays read from a CSV table (AU intensities, AffectNet)."""

    def __init__(self, uri: str, items: list[_Item], targets: list[dict[str, np.ndarray]], **kwargs: Any) -> None:
        extra = {name: kwargs.pop(name) for name in ("au_names", "num_points", "keypoint_flip_pairs") if name in kwargs}
        super().__init__(uri, items, **kwargs)
        self._targets = targets
        for name, value in extra.items():
            setattr(self, name, value)

    def _raw_targets(self, i: int) -> dict[str, np.ndarray]:
        return {name: value.copy() for name, value in self._targets[i].items()}

    def describe(self) -> dict[str, Any]:
        extra = {"au_names": self.au_names} if hasattr(self, "au_names") else {}
        return {**super().describe(), **extra}


def _table_paths(uri: str, rest: str, scheme: str) -> tuple[Path, Path]:
    target, params = _split_uri(uri, rest, scheme, ("images",))
    path = Path(target).expanduser()
    return path, _directory(uri, Path(params["images"]).expanduser() if "images" in params else path.parent)


def build_au(uri: str, rest: str, *, image_size: int | None, channels: int | None, strict: bool) -> FaceTableSource:
    """Builds the source for ``au:FILE.csv[?images=DIR]`` (per-image AU intensities 0-5)."""
    path, images = _table_paths(uri, rest, "au")
    skips = _SkipLog(uri, strict)
    header, rows = _csv_rows(path, skips, key_column="image", expected="image,AU1,AU2,...")
    if "image" not in header:
        raise DataError(f"{path}: the header needs an 'image' column, got {header[:10]}")
    columns = [(k, f"AU{int(m.group(1))}") for k, m in ((k, _AU_COLUMN.match(h)) for k, h in enumerate(header)) if m]
    if not columns or len({name for _, name in columns}) != len(columns):
        raise DataError(f"{path}: the header needs distinct AU<number> columns, got {header[:10]}")
    image_col, parsed = header.index("image"), []
    for where, row in rows:
        name = row[image_col]
        try:
            if not name:
                raise ValueError("empty image name")
            values = [_number(row[k], au, 0.0, AU_INTENSITY_MAX) for k, au in columns]
        except ValueError as exc:
            skips.add(name or where, path, f"{where}: {exc}")
            continue
        parsed.append((name, where, {"au": np.asarray(values, dtype=np.float32)}))
    items, targets = _keep_rows(parsed, images, path, skips, twice="the image is already annotated")
    return FaceTableSource(uri, items, targets, classes=None, target_keys=("au",), channels=channels,
                           image_size=image_size, skips=skips.finish(len(items)),
                           au_names=[name for _, name in columns])  # fmt: skip


def _affectnet_row(row: dict[str, str]) -> dict[str, np.ndarray]:
    """Targets of one AffectNet row, or ValueError saying why it cannot be used."""
    code = row["expression"]
    if not code.lstrip("-").isdigit():
        raise ValueError(f"expression is not an integer: {code!r:.20}")
    if int(code) in _NO_EXPRESSION:
        raise ValueError(f"expression {code} ({_NO_EXPRESSION[int(code)]}): no expression label")
    if not 0 <= int(code) < len(EXPRESSIONS):
        raise ValueError(f"expression {code} outside 0-10")
    x, y = (_number(row[c], c, 0.0) for c in ("face_x", "face_y"))
    w, h = (_number(row[c], c, 0.0) for c in ("face_width", "face_height"))
    if w <= 0 or h <= 0:
        raise ValueError(f"empty face box {w:g} x {h:g}")
    landmarks = [_number(v, "facial_landmarks") for v in row["facial_landmarks"].split(";") if v.strip()]
    if len(landmarks) != 136:
        raise ValueError(f"facial_landmarks has {len(landmarks)} values, expected 68 x 2 = 136")
    points = np.concatenate([np.asarray(landmarks).reshape(68, 2), np.ones((68, 1))], axis=1)
    valence_arousal = [_number(row[c], c, -1.0, 1.0) for c in ("valence", "arousal")]
    return {"boxes": np.array([[x, y, x + w, y + h]], dtype=np.float32), "labels": np.array([int(code)]),
            "keypoints": points.astype(np.float32),
            "valence_arousal": np.asarray(valence_arousal, dtype=np.float32)}  # fmt: skip


def build_affectnet(uri: str, rest: str, *, image_size: int | None, channels: int | None, strict: bool) -> FaceTableSource:
    """Builds the source for ``affectnet:FILE.csv[?images=DIR]`` (expression, valence, arousal)."""
    path, images = _table_paths(uri, rest, "affectnet")
    skips = _SkipLog(uri, strict)
    header, rows = _csv_rows(path, skips, key_column=AFFECTNET_COLUMNS[0], expected=",".join(AFFECTNET_COLUMNS))
    missing = [name for name in AFFECTNET_COLUMNS if name not in header]
    if missing:
        raise DataError(f"{path}: the header needs the columns {missing}, got {header[:10]}")
    parsed = []
    for where, row in rows:
        record = dict(zip(header, row))
        name = record["subDirectory_filePath"]
        try:
            if not name:
                raise ValueError("empty subDirectory_filePath")
            parsed.append((name, where, _affectnet_row(record)))
        except ValueError as exc:
            skips.add(name or where, path, f"{where}: {exc}")
    items, targets = _keep_rows(parsed, images, path, skips, twice="the image is already annotated")
    labels = np.array([int(t["labels"][0]) for t in targets], dtype=np.int64)
    return FaceTableSource(uri, items, targets, classes=list(EXPRESSIONS), labels=labels,
                           target_keys=("boxes", "labels", "keypoints", "valence_arousal"), channels=channels,
                           image_size=image_size, skips=skips.finish(len(items)), num_points=68,
                           keypoint_flip_pairs=FLIP_PAIRS_68)  # fmt: skip


# ------------------------------------------------------------------------------ a pairs test set


class PairSource(ImageFolderSource):
    """The distinct images of an LFW pairs file as an image source, with the pairs beside them.

    ``lfw-pairs:PAIRS.txt[?images=DIR]`` is what a ``verification`` run measures on
    (``data.test``): the network embeds every image once and :attr:`pairs` says which two images
    each pair compares. Unlabeled (no classes): the identities of a test set are never learned.
    """

    target_keys = ("pairs",)

    def __init__(self, uri: str, root: Path, pairs: PairSet, *, channels: int | None, image_size: int | None) -> None:
        rel = [p.relative_to(root).as_posix() for p in pairs.images]
        super().__init__(uri, root, rel, np.full(len(rel), -1, dtype=np.int64), classes=None, channels=channels,
                         image_size=image_size)  # fmt: skip
        self.pairs = pairs
        self.annotation_skips = pairs.skips

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "pairs": len(self.pairs), "same": int(self.pairs.same.sum()),
                "folds": int(len(np.unique(self.pairs.fold)))}  # fmt: skip


def build_lfw_pairs(uri: str, rest: str, *, image_size: int | None, channels: int | None, strict: bool) -> PairSource:
    """Builds the source for ``lfw-pairs:PAIRS.txt[?images=DIR]`` (see :func:`read_pairs`)."""
    target, params = _split_uri(uri, rest, "lfw-pairs", ("images",))
    path = Path(target).expanduser()
    root = _directory(uri, Path(params["images"]).expanduser() if "images" in params else path.parent)
    return PairSource(uri, root, read_pairs(path, root, strict=strict), channels=channels, image_size=image_size)
