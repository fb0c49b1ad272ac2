"""``curate``: find near-duplicate images in an unlabeled pool, report its redundancy, write a de-duplicated pool.

Bulat et al. (2021) measure how the redundancy of a face pool (near-identical frames of one
video, re-uploads of one photo) changes what pre-training learns; this is the tool that measures
it and removes it. Two signatures:

- ``phash`` (default): the DCT perceptual hash (as in the ``imagehash`` library): the image in
  grayscale, resized to 32 x 32, its 2D DCT-II, the 8 x 8 lowest frequencies, one bit per
  coefficient above their median: 64 bits. Two images are near-duplicates when the Hamming
  distance of their hashes is ``<= threshold`` (default 10 of 64). It survives re-compression,
  resizing, small crops and brightness changes, and is blind to content: two different photos
  of one scene are not duplicates.
- ``embedding``: pooled backbone features, centred on the pool's mean feature and compared by
  cosine similarity (``>= threshold``, default 0.9). With ``weights`` (a selftrain
  ``model.safetensors``, e.g. ``OUT/teach/model.safetensors``) the features of a trained network
  find semantic near-duplicates (the same face in two frames) as well; without, a randomly
  initialised backbone is used, which only finds images that look alike pixel for pixel, like the
  hash. A trained backbone is the better choice when you have one.

Near-duplicate pairs are joined into groups, the connected components of the near-duplicate graph
(as union-find would; single linkage: A ~ B and B ~ C put A and C in one group), and the first image of each group in pool order is kept. All pairs are
compared exactly, in chunks (memory stays bounded; time grows with the square of the pool:
about 15 s for 10,000 small images on one CPU thread, ~15 min for 100,000).

Outputs in ``OUT``: ``curate.json`` (pool size, unreadable images, groups, redundancy
``1 - unique / total``, examples), ``duplicates.csv`` (each dropped image, the image kept for it
and their distance or similarity), ``kept.txt`` (the kept keys) and ``pool/``, an image folder of
the kept images (files linked or copied; in-memory pools written as PNG) that
``data.unlabeled: imagefolder:OUT/pool?labels=none`` reads.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from selftrain.atomic import atomic_write_text
from selftrain.data.images import resize_center_crop
from selftrain.data.sources import BadImageError, Source

logger = logging.getLogger("selftrain.curate")

METHODS = ("phash", "embedding")
DEFAULT_THRESHOLDS = {"phash": 10.0, "embedding": 0.9}
_HASH_SIDE, _HASH_BITS = 32, 8
_CHUNK = 2048
_EXAMPLES = 20


# ------------------------------------------------------------------------------------ signatures


def _dct_matrix(n: int) -> torch.Tensor:
    """Unnormalised DCT-II basis ``cos(pi (2j + 1) k / 2n)`` (rows k): scipy's ``dct`` up to a factor 2."""
    k, j = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64), indexing="ij")
    return torch.cos(torch.pi * (2 * j + 1) * k / (2 * n))


_DCT = _dct_matrix(_HASH_SIDE)


def phash_bits(image: torch.Tensor) -> np.ndarray:
    """The 64-bit DCT perceptual hash of a ``uint8`` ``(C, H, W)`` image, as 64 bools (row-major 8 x 8).

    Grayscale by ITU-R 601 luma (as Pillow's ``convert("L")``), antialiased bilinear resize to
    32 x 32, 2D DCT-II, the top-left 8 x 8 coefficients compared with their median.
    """
    x = image.double()
    if x.shape[0] == 3:
        x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
    x = F.interpolate(x[None], size=(_HASH_SIDE, _HASH_SIDE), mode="bilinear", align_corners=False, antialias=True)[0, 0]
    low = (_DCT @ x @ _DCT.T)[:_HASH_BITS, :_HASH_BITS]
    return (low > low.median()).flatten().numpy()


def hamming_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(n, m)`` Hamming distances between bit rows ``a`` ``(n, 64)`` and ``b`` ``(m, 64)``."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    return a @ (1 - b).T + (1 - a) @ b.T


def _as_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    if images.shape[1] == channels:
        return images
    return images.expand(-1, 3, -1, -1) if channels == 3 else images.float().mean(dim=1, keepdim=True).round().byte()


class _Embedder:
    """Pooled features of a trained selftrain network, or of a random-init backbone."""

    def __init__(self, weights: str | Path | None, backbone: str, channels: int, image_size: int) -> None:
        from selftrain.backbones import build_backbone

        torch.manual_seed(0)  # a random backbone must give the same features on every run
        if weights:
            from selftrain.network import load_network  # imports every task: only when needed

            net = load_network(weights)
            self.model, self.channels, self.image_size = net.features, net.spec.channels, net.spec.image_size
            self.module = net
        else:
            self.module = build_backbone(backbone, num_classes=0, in_chans=channels)
            self.channels, self.image_size = channels, image_size
            self.model = self._grid_features
        self.module.eval()

    def _grid_features(self, x: torch.Tensor) -> torch.Tensor:
        """Random-init features keep their layout: a 4 x 4 grid of the feature map, of a standardised image.

        Pooled features of untrained filters mostly encode colour and overall texture, so two
        different images of similar colours come out alike; the grid keeps where things are,
        and standardising each image ignores brightness and contrast changes.
        """
        x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) / x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
        return F.adaptive_avg_pool2d(self.module.forward_features(x), 4).flatten(1)  # (B, C * 16)

    @torch.no_grad()
    def __call__(self, images: list[torch.Tensor]) -> np.ndarray:
        batch = torch.stack([resize_center_crop(_as_channels(im[None], self.channels)[0], self.image_size) for im in images])
        return self.model(batch.float() / 255).double().numpy()  # (B, D)


# ------------------------------------------------------------------------------------- grouping


def _near_pairs(signatures: np.ndarray, method: str, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """``(i, j)`` index arrays, ``i < j``, of every pair that passes the threshold, computed in chunks."""
    rows, cols = [], []
    for start in range(0, len(signatures), _CHUNK):
        block = signatures[start : start + _CHUNK]
        if method == "phash":
            hits = hamming_distances(block, signatures) <= threshold
        else:
            hits = block @ signatures.T >= threshold
        r, c = np.nonzero(np.triu(hits, k=start + 1))  # each pair once: column after row
        rows.append(r + start)
        cols.append(c)
    return np.concatenate(rows), np.concatenate(cols)


def group_pairs(n: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``(n,)`` group of each item: the lowest index of its connected component (single linkage).

    Connected components of the near-duplicate graph (scipy's union-find equivalent), labelled by
    their first member so that the kept image of a group is the first one in pool order.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    first = np.full(labels.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(n))
    return first[labels]


# ---------------------------------------------------------------------------------------- curate


@dataclass
class CurateResult:
    """Outcome of :func:`find_duplicates`.

    Attributes:
        keys: Keys of the readable images, in pool order (indices below point here).
        indices: Their indices in the source.
        group: ``(N,)`` group id of each image: the position (in ``keys``) of its group's kept image.
        links: ``{dropped position: (kept position, distance or similarity to the kept image)}``.
        skipped: ``{"key", "path", "reason"}`` of each unreadable image.
    """

    method: str
    threshold: float
    total: int
    keys: list[str]
    indices: np.ndarray
    group: np.ndarray
    links: dict[int, tuple[int, float]] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def kept(self) -> np.ndarray:
        """Positions of the kept images (one per group), ascending."""
        return np.flatnonzero(self.group == np.arange(len(self.group)))

    def groups(self) -> list[list[int]]:
        """The near-duplicate groups (two images or more), each a list of positions, kept image first."""
        members: dict[int, list[int]] = {}
        for position, root in enumerate(self.group.tolist()):
            members.setdefault(root, []).append(position)
        return [m for m in members.values() if len(m) > 1]

    def report(self) -> dict[str, Any]:
        """The JSON summary written as ``curate.json``."""
        unique, readable = len(self.kept), len(self.keys)
        groups = sorted(self.groups(), key=len, reverse=True)
        return {
            "method": self.method, "threshold": self.threshold, "pool": self.total,
            "unreadable": len(self.skipped), "images": readable, "unique": unique,
            "duplicates": readable - unique, "groups": len(groups),
            "largest_group": max((len(g) for g in groups), default=1),
            "redundancy": 1.0 - unique / readable if readable else 0.0,
            "examples": [[self.keys[p] for p in g] for g in groups[:_EXAMPLES]],
            "skips": self.skipped,
        }  # fmt: skip


def _signatures(source: Source, method: str, embedder: _Embedder | None, batch: int, progress: bool, strict: bool):
    from tqdm.auto import tqdm

    keys, indices, rows, skipped, pending = [], [], [], [], []

    def flush() -> None:
        if pending:
            rows.extend(embedder([im for _, im in pending]) if embedder else [phash_bits(im) for _, im in pending])
            for i, _ in pending:
                keys.append(source.key(i))
                indices.append(i)
            pending.clear()

    for i in tqdm(range(len(source)), desc=f"curate ({method})", disable=not progress or len(source) < 1000, unit="img"):
        try:
            pending.append((i, source.load(i)))
        except BadImageError as exc:
            if strict:
                raise
            skipped.append({"key": source.key(i), "path": exc.path, "reason": exc.reason})
            logger.warning("skipping %s (%s): %s", source.key(i), exc.path, exc.reason)
        if len(pending) >= batch:
            flush()
    flush()
    return keys, np.asarray(indices, dtype=np.int64), np.asarray(rows), skipped


def find_duplicates(
    source: Source,
    *,
    method: str = "phash",
    threshold: float | None = None,
    weights: str | Path | None = None,
    backbone: str = "cnn-small",
    image_size: int = 32,
    batch_size: int = 256,
    progress: bool = True,
    strict: bool = False,
) -> CurateResult:
    """Groups the near-duplicate images of ``source`` (see the module docstring).

    Args:
        source: The pool. Unreadable images are left out and listed in ``skipped``.
        method: ``phash`` or ``embedding``.
        threshold: Max Hamming distance (``phash``) or min centred cosine similarity (``embedding``);
            default :data:`DEFAULT_THRESHOLDS`.
        weights: ``embedding`` only: a selftrain ``model.safetensors`` (its ``model.json`` beside it).
        backbone, image_size: ``embedding`` without ``weights``: the random-init backbone and input size.
        strict: Raise :class:`~selftrain.data.BadImageError` for the first unreadable image instead.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if weights and method != "embedding":
        raise ValueError("weights are for method=embedding")
    threshold = DEFAULT_THRESHOLDS[method] if threshold is None else float(threshold)
    embedder = _Embedder(weights, backbone, source.channels, image_size) if method == "embedding" else None
    keys, indices, signatures, skipped = _signatures(source, method, embedder, batch_size, progress, strict)
    if method == "embedding" and len(signatures):
        # Features of one network share a large common component (ReLU outputs are >= 0), so
        # raw cosines are all high; centring on the pool mean leaves what tells images apart.
        signatures = signatures - signatures.mean(axis=0)
        signatures /= np.linalg.norm(signatures, axis=1, keepdims=True).clip(1e-12)
    empty = np.zeros(0, dtype=np.int64)
    group = group_pairs(len(keys), *(_near_pairs(signatures, method, threshold) if len(keys) else (empty, empty)))
    links = {}
    for p, r in enumerate(group.tolist()):
        if r != p:  # measured against the kept image itself, which single linkage may have reached through others
            a, b = signatures[p], signatures[r]
            links[p] = (r, float((a != b).sum()) if method == "phash" else float(a @ b))
    return CurateResult(method, threshold, len(source), keys, indices, group, links, skipped)


def write_curated(result: CurateResult, source: Source, out: str | Path) -> dict[str, Any]:
    """Writes ``curate.json``, ``duplicates.csv``, ``kept.txt`` and the ``pool/`` image folder into ``out``.

    Raises:
        FileExistsError: ``out/pool`` exists already (a curated pool is never overwritten).
    """
    out = Path(out)
    pool = out / "pool"
    if pool.exists():
        raise FileExistsError(f"{pool} exists; choose another --out or remove it")
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f"pool.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    for position in result.kept.tolist():
        _write_image(source, int(result.indices[position]), result.keys[position], staging)
    staging.mkdir(exist_ok=True)
    os.replace(staging, pool)  # the folder appears complete or not at all
    atomic_write_text(out / "kept.txt", "".join(result.keys[p] + "\n" for p in result.kept.tolist()))
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["key", "kept_key", "distance" if result.method == "phash" else "similarity"])
    for position, (root, value) in sorted(result.links.items()):
        writer.writerow([result.keys[position], result.keys[root], f"{value:.4g}"])
    atomic_write_text(out / "duplicates.csv", table.getvalue())
    report = {**result.report(), "source": source.uri, "kept_pool": f"imagefolder:{pool}?labels=none"}
    atomic_write_text(out / "curate.json", json.dumps(report, indent=2) + "\n")
    return report


def _write_image(source: Source, index: int, key: str, root: Path) -> None:
    """Links (or copies) the image file of a file-backed source, or saves an in-memory image as PNG."""
    path = getattr(source, "path", None)
    if getattr(source, "fs", None) is not None and source.image_size is None:
        # An image folder on an fsspec URL: its bytes, unchanged.
        target = root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes(index))
        return
    original = Path(path(index)) if callable(path) and source.image_size is None else None
    target = root / (key if original is not None and Path(key).suffix == original.suffix else f"{key}.png")
    target.parent.mkdir(parents=True, exist_ok=True)
    if original is not None and original.is_file():
        try:
            os.link(original, target)
        except OSError:
            shutil.copyfile(original, target)
        return
    array = source.load(index).permute(1, 2, 0).numpy()
    Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(target)
