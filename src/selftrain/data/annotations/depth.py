"""Per-pixel depth maps: ``depth:ROOT[?scale=1000]``.

``ROOT/images/NAME.*`` with ``ROOT/depth/NAME.png`` (16-bit, divided by ``scale``: 1000 for
millimetres, 256 for KITTI) or ``ROOT/depth/NAME.npy`` (metres).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from selftrain.data.annotations.base import (
    _PROGRESS_MIN_ITEMS,
    AnnotatedSource,
    _directory,
    _header_geometry,
    _Item,
    _map_frame,
    _read_png,
    _SkipLog,
    _split_uri,
)
from selftrain.data.imagefolder import list_images
from selftrain.data.images import DEFAULT_MAX_PIXELS, SIXTEEN_BIT_MODES
from selftrain.data.sources import DataError
from selftrain.data.targets import BadAnnotationError, check_dense_map


class DepthSource(AnnotatedSource):
    """Per-pixel depth in metres: ``depth:ROOT[?scale=1000]``; ``0`` = no value.

    ``ROOT/depth/NAME.png`` must be 16-bit and is divided by ``scale``; ``ROOT/depth/NAME.npy`` is
    read as metres (any numeric dtype). Either must match its image's size and be finite and
    non-negative: datasets that mark missing depth with NaN must write 0 instead.
    """

    def __init__(self, uri: str, items: list[_Item], maps: list[Path], *, scale: float, **kwargs: Any) -> None:
        super().__init__(uri, items, **kwargs)
        self._maps = maps
        self.scale = scale

    def _raw_targets(self, i: int) -> dict[str, np.ndarray]:
        item, path = self._items[i], self._maps[i]
        try:
            depth = _read_depth(path, self.scale)
            check_dense_map(depth, name="depth", height=item.size[1], width=item.size[0])
        except DataError as exc:
            raise BadAnnotationError(str(path), f"changed since the source was built: {exc}") from exc
        return {"depth": depth}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "scale": self.scale}


def build_depth(
    uri: str, rest: str, *, image_size: int | None, channels: int | None, strict: bool, progress: bool = True
) -> DepthSource:
    """Builds the source for ``depth:ROOT[?scale=S]``; decodes every depth map once to check it.

    Raises:
        DataError: Bad URI or scale, missing ``images``/``depth`` folders, or no usable image.
        BadAnnotationError: With ``strict``, the first dropped image.
    """
    target, params = _split_uri(uri, rest, "depth", ("scale",))
    root = _directory(uri, Path(target).expanduser())
    try:
        scale = float(params.get("scale", "1000"))
    except ValueError:
        scale = math.nan
    if not math.isfinite(scale) or scale <= 0:
        raise DataError(f"{uri}: scale must be a positive number, got {params.get('scale')!r}")
    image_dir, depth_dir = root / "images", root / "depth"
    for folder in (image_dir, depth_dir):
        if not folder.is_dir():
            raise DataError(f"{uri}: {folder} is not a directory (layout: ROOT/images/NAME.*, ROOT/depth/NAME.png|npy)")
    rel_paths = list_images(image_dir)
    stems = Counter(_stem(p) for p in rel_paths)
    skips = _SkipLog(uri, strict)
    items, maps = [], []
    for rel in tqdm(rel_paths, desc="check depth", unit="map", disable=not progress or len(rel_paths) <= _PROGRESS_MIN_ITEMS):
        if stems[_stem(rel)] > 1:
            why = f"several images are named {_stem(rel)}.*, so which one its depth map belongs to is unclear"
            skips.add(rel, image_dir / rel, why)
            continue
        found = _depth_item(rel, image_dir, depth_dir, scale, skips)
        if found is not None:
            items.append(found[0])
            maps.append(found[1])
    return DepthSource(
        uri, items, maps, scale=scale, classes=None, target_keys=("depth",), channels=channels,
        image_size=image_size, skips=skips.finish(len(items)),
    )  # fmt: skip


def _depth_item(
    rel: str, image_dir: Path, depth_dir: Path, scale: float, skips: _SkipLog
) -> tuple[_Item, Path] | None:
    """The item and depth file of one image, or ``None`` (recorded in ``skips``) if unusable."""
    candidates = [p for p in (depth_dir / f"{_stem(rel)}.png", depth_dir / f"{_stem(rel)}.npy") if p.is_file()]
    if len(candidates) != 1:
        why = "no depth map (.png or .npy)" if not candidates else "both a .png and a .npy depth map"
        skips.add(rel, depth_dir / _stem(rel), why)
        return None
    try:
        depth = _read_depth(candidates[0], scale)
        width, height = _map_frame(_header_geometry(image_dir / rel), depth.shape)
        check_dense_map(depth, name="depth", height=height, width=width)
    except DataError as exc:
        skips.add(rel, candidates[0], str(exc))
        return None
    return _Item(rel, image_dir / rel, (width, height)), candidates[0]


def _read_depth(path: Path, scale: float) -> np.ndarray:
    """A depth file as float32 metres; ``DataError`` says why it is unusable."""
    if path.suffix == ".npy":
        try:
            # mmap reads only the header until the pixels are needed, so the shape check is cheap.
            values = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"depth array cannot be read ({exc})") from exc
        if values.ndim == 3 and 1 in (values.shape[0], values.shape[-1]):
            values = values.reshape(values.shape[1:] if values.shape[0] == 1 else values.shape[:-1])
        if values.ndim != 2 or values.dtype.kind not in "fiu":
            raise DataError(f"depth array has shape {values.shape} and dtype {values.dtype}; expected numeric (H, W)")
        if values.size > DEFAULT_MAX_PIXELS:
            raise DataError(f"depth array has {values.size} pixels, over the {DEFAULT_MAX_PIXELS}-pixel limit")
        with np.errstate(over="ignore"):  # float64 beyond float32 becomes inf and is refused by the check
            # A copy, never a view of the read-only memory map (which would also keep the file open).
            return np.array(values, dtype=np.float32)
    values, mode = _read_png(path, "depth map")
    if mode not in SIXTEEN_BIT_MODES and mode != "I":
        raise DataError(f"depth PNG has mode {mode}; expected a 16-bit PNG (scaled by {scale:g} to metres)")
    return (values.astype(np.float64) / scale).astype(np.float32)


def _stem(rel: str) -> str:
    return rel.rsplit(".", 1)[0]
