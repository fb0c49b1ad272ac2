"""Small face data sets in the benchmark's real formats, drawn from a parametric cartoon face,
plus real face crops from scikit-image's LFW subset.

Nothing here is real face annotation: it is what lets the face benchmark
(:mod:`selftrain.faces`) run every task end to end, offline, in minutes, through the same
readers a user's 300W, WFLW, DISFA, AffectNet, AFLW2000-3D and LFW files go through. Each image
is a face drawn from 3D curves (jaw, brows, nose, eyes, lips) under an identity (face shape,
eye spacing, skin tone), an expression (brow raise, smile, mouth opening) and a pose (yaw,
scale, shift); the same curves sampled at the iBUG 68 and WFLW 98 layouts give landmarks whose
left/right order matches :data:`FLIP_PAIRS_68` / :data:`FLIP_PAIRS_98`, so the labels are exact.

:func:`write_face_benchmark_data` writes, under one folder::

    landmarks68/{train,test}/NAME.png + NAME.pts     pts:   (iBUG .pts, 68 points)
    wflw/{train,test}.txt + images/                  wflw:  (98 points, box, 6 flags, path)
    au/{train,test}.csv + images/                    au:    (image,AU1,AU2,AU4,AU12,AU25,AU26; 0-5)
    affectnet/{train,test}.csv + images/             affectnet: (8 expressions, valence, arousal)
    aflw3d/{train,test}/NAME.jpg + NAME.mat          aflw3d: (pt3d_68, 3 x 68)
    identities/train/<person>/*.png                  imagefolder: (verification training identities)
    lfw/<person>/<person>_%04d.jpg + pairs.txt       lfw-pairs: (10 folds, unseen persons)
    pool/synthetic/*.png                             unlabeled faces (a self-supervised pre-training pool)
    pool/real/*.png                                  the 100 real LFW face crops of skimage.data.lfw_subset()
    real/identities/train/<photo>/*.png, real/lfw/   views of real photos: "same" = two views of one photo

The real crops are 25 x 25 px and carry no identity: the ``real`` verification set asks whether
two random crops/flips/brightness changes come from one photo, which is photo re-identification,
not person verification; it and the pool are all the real faces available offline here.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from selftrain.data.annotations.face_landmarks import FLIP_PAIRS_68

AU_NAMES = ("AU1", "AU2", "AU4", "AU12", "AU25", "AU26")
#: Expression -> (brow raise, smile, mouth opening, valence, arousal) of AffectNet's 8 codes.
EXPRESSION_PARAMS = {
    0: (0.0, 0.0, 0.0, 0.0, 0.0), 1: (0.2, 1.0, 0.3, 0.8, 0.4), 2: (-0.3, -0.8, 0.0, -0.7, -0.3),
    3: (1.0, 0.0, 1.0, 0.2, 0.8), 4: (0.8, -0.4, 0.6, -0.6, 0.7), 5: (-0.6, -0.5, 0.2, -0.7, 0.3),
    6: (-1.0, -0.3, 0.3, -0.6, 0.6), 7: (0.0, 0.5, 0.0, -0.3, 0.1),
}  # fmt: skip


def _arc(n: int, x0: float, x1: float, y: float, bend: float) -> np.ndarray:
    xs = np.linspace(x0, x1, n)
    mid = (x0 + x1) / 2
    ys = y - bend * (1 - ((xs - mid) / max(abs(x1 - mid), 1e-6)) ** 2)
    return np.stack([xs, ys], axis=1)


def _ring(n: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """``n`` points from the left corner, along the top to the right corner, back along the bottom."""
    angles = np.pi - 2 * np.pi * np.arange(n) / n  # 180 deg, then decreasing: top first (y up is -y)
    return np.stack([cx + rx * np.cos(angles), cy - ry * np.sin(angles)], axis=1)


def face_points(layout: int, shape: dict, brow: float, smile: float, mouth: float) -> np.ndarray:
    """The face's 3D points ``(P, 3)`` in a frame of about [-1, 1] (x right, y down, z towards the camera).

    ``layout`` 68 (iBUG) or 98 (WFLW); ``shape`` the identity (``width``, ``height``, ``eyes``).
    """
    w, h, e = shape["width"], shape["height"], shape["eyes"]
    n_jaw, n_brow, n_eye = (17, 5, 6) if layout == 68 else (33, 5, 8)
    angles = np.linspace(np.pi, 0, n_jaw)  # left to right along the lower half of an ellipse
    jaw = np.stack([w * np.cos(angles), h * 0.1 + h * 0.85 * np.sin(angles)], axis=1)
    by = -0.45 - 0.15 * brow
    spans = ((-e - 0.3, -e + 0.25), (e - 0.25, e + 0.3))
    brows = [_arc(n_brow, x0, x1, by, 0.08) for x0, x1 in spans]
    if layout == 98:  # WFLW brows: 5 points of the upper edge left to right, 4 of the lower edge right to left
        brows = [np.concatenate([b, _arc(4, x1 - 0.08, x0 + 0.08, by + 0.07, 0.06)]) for b, (x0, x1) in zip(brows, spans)]
    bridge = np.stack([np.zeros(4), np.linspace(-0.3, 0.05, 4)], axis=1)
    nostrils = _arc(5, -0.18, 0.18, 0.2, -0.05)
    eyes = [_ring(n_eye, -e, -0.25, 0.17, 0.08), _ring(n_eye, e, -0.25, 0.17, 0.08)]
    corner = 0.45 - 0.12 * smile
    n_outer, n_inner = 12, 8
    top = _arc(n_outer // 2 + 1, -0.35, 0.35, corner, 0.05)
    bottom = _arc(n_outer // 2 + 1, 0.35, -0.35, corner, -0.08 - 0.25 * mouth)
    bottom[:, 1] = np.maximum(bottom[:, 1], corner)
    outer = np.concatenate([top, bottom[1:-1]])
    inner = np.concatenate([_arc(5, -0.25, 0.25, corner, 0.02)[:-1], _arc(5, 0.25, -0.25, corner, -0.2 * mouth)[:-1]])
    parts = [jaw, *brows, bridge, nostrils, *eyes, outer, inner]
    if layout == 98:
        parts.append(np.array([[-e, -0.25], [e, -0.25]]))  # pupils
    xy = np.concatenate(parts)
    z = 0.5 * np.cos(np.clip(xy[:, 0] / (w + 0.1), -1, 1) * np.pi / 2) + np.where(np.abs(xy[:, 0]) < 0.2, 0.15, 0)
    return np.concatenate([xy, z[:, None]], axis=1).astype(np.float64)


def _pose(points: np.ndarray, yaw: float, scale: float, cx: float, cy: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    x, y, z = points[:, 0] * c + points[:, 2] * s, points[:, 1], -points[:, 0] * s + points[:, 2] * c
    return np.stack([cx + scale * x, cy + scale * y, scale * z], axis=1)


def _draw(size: int, p68: np.ndarray, skin: tuple, background: tuple, rng: np.random.Generator,
          scenery: list | None = None) -> Image.Image:  # fmt: skip
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for shape, box, colour in scenery or []:
        (draw.ellipse if shape == "ellipse" else draw.rectangle)([float(v) * size for v in box], fill=colour)
    jaw = p68[:17, :2]
    top = np.stack([jaw[::-1, 0], 2 * p68[27, 1] - jaw[::-1, 1] - (p68[8, 1] - p68[27, 1]) * 0.2], axis=1)
    draw.polygon([tuple(q) for q in np.concatenate([jaw, top])], fill=skin)
    dark = (40, 30, 30)
    for lo, hi in ((17, 22), (22, 27)):
        draw.line([tuple(q) for q in p68[lo:hi, :2]], fill=dark, width=max(1, size // 40))
    draw.line([tuple(q) for q in p68[27:31, :2]], fill=(120, 80, 70), width=1)
    for lo in (36, 42):
        draw.polygon([tuple(q) for q in p68[lo : lo + 6, :2]], fill=(250, 250, 250), outline=dark)
        centre = p68[lo : lo + 6, :2].mean(axis=0)
        r = size / 60
        draw.ellipse([centre[0] - r, centre[1] - r, centre[0] + r, centre[1] + r], fill=dark)
    draw.polygon([tuple(q) for q in p68[48:60, :2]], fill=(170, 50, 60))
    draw.polygon([tuple(q) for q in p68[60:68, :2]], fill=(60, 20, 25))
    pixels = np.asarray(image).astype(np.float32) + rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _identity(rng: np.random.Generator) -> dict:
    return {"width": rng.uniform(0.75, 0.95), "height": rng.uniform(0.85, 1.05), "eyes": rng.uniform(0.3, 0.42),
            "skin": tuple(int(v) for v in rng.uniform([150, 100, 80], [240, 200, 170])),
            "background": tuple(int(v) for v in rng.uniform(0, 255, 3))}  # fmt: skip


def render_face(rng: np.random.Generator, size: int, identity: dict | None = None, expression: int | None = None,
                brow: float | None = None, smile: float | None = None, mouth: float | None = None,
                pose: tuple | None = None, background: tuple | None = None, scenery: list | None = None) -> dict:  # fmt: skip
    """One face: ``image`` (PIL), ``p68`` / ``p98`` 3D points in pixels, the expression parameters,
    ``pose`` (yaw, scale, centre x, centre y) and ``background`` (RGB); both random unless given.
    ``scenery``: shapes drawn behind the face (:func:`_scenery`); none unless given."""
    identity = identity or _identity(rng)
    if expression is not None:
        b0, s0, m0, _, _ = EXPRESSION_PARAMS[expression]
        brow, smile, mouth = b0 + rng.normal(0, 0.1), s0 + rng.normal(0, 0.1), max(0.0, m0 + rng.normal(0, 0.1))
    brow = rng.uniform(-1, 1) if brow is None else brow
    smile = rng.uniform(-1, 1) if smile is None else smile
    mouth = rng.uniform(0, 1) if mouth is None else mouth
    if pose is None:
        pose = (rng.uniform(-0.5, 0.5), size * rng.uniform(0.3, 0.38), size * rng.uniform(0.45, 0.55), size * rng.uniform(0.42, 0.5))
    p68, p98 = (_pose(face_points(n, identity, brow, smile, mouth), *pose) for n in (68, 98))
    drawn = tuple(int(v) for v in rng.uniform(0, 255, 3))
    background = drawn if background is None else background
    image = _draw(size, p68, identity["skin"], background, rng, scenery)
    return {"image": image, "p68": p68, "p98": p98, "brow": brow, "smile": smile, "mouth": mouth, "pose": pose,
            "background": background}  # fmt: skip


def _pts_text(points: np.ndarray) -> str:
    body = "\n".join(f"{x:.3f} {y:.3f}" for x, y in points[:, :2])
    return f"version: 1\nn_points: {len(points)}\n{{\n{body}\n}}\n"


def _au_values(face: dict) -> list[int]:
    b, s, m = face["brow"], face["smile"], face["mouth"]
    raw = [5 * max(b, 0), 4 * max(b, 0), 5 * max(-b, 0), 5 * max(s, 0), 5 * min(1.0, 2 * m), 5 * m]
    return [int(round(min(5.0, v))) for v in raw]


def write_face_benchmark_data(root: str | Path, *, train: int = 240, test: int = 80, size: int = 48, seed: int = 0,
                              real: bool = True) -> Path:  # fmt: skip
    """Writes every face data set of the benchmark under ``root`` (see the module docstring); returns it.

    ``train``/``test`` images per task; a finished folder (``DONE`` marker) is left as it is.
    """
    root = Path(root)
    if (root / "DONE").exists():
        return root
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("test", test)):
        _write_landmarks(root, split, n, size, rng)
        _write_tables(root, split, n, size, rng)
        _write_aflw3d(root, split, n, size, rng)
    _write_identities(root, rng, size, persons=24, per_person=max(4, train // 24), test_persons=20)
    (root / "pool" / "synthetic").mkdir(parents=True, exist_ok=True)
    for i in range(train):
        render_face(rng, size)["image"].save(root / "pool" / "synthetic" / f"{i:04d}.png")
    if real:
        _write_real(root, rng)
    (root / "DONE").write_text("written by selftrain.data.face_fixtures\n")
    return root


def _write_landmarks(root: Path, split: str, n: int, size: int, rng: np.random.Generator) -> None:
    pts_dir, wflw_dir = root / "landmarks68" / split, root / "wflw" / "images"
    pts_dir.mkdir(parents=True, exist_ok=True)
    wflw_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        face = render_face(rng, size)
        face["image"].save(pts_dir / f"{split}_{i:04d}.png")
        (pts_dir / f"{split}_{i:04d}.pts").write_text(_pts_text(face["p68"]))
        other = render_face(rng, size)
        name = f"{split}_{i:04d}.png"
        other["image"].save(wflw_dir / name)
        p = other["p98"][:, :2]
        box = [p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()]
        flags = [int(abs(other["smile"]) > 0.5), 0, 0, 0, 0, 0]
        lines.append(" ".join([*(f"{v:.3f}" for v in p.reshape(-1)), *(f"{v:.1f}" for v in box), *map(str, flags), f"images/{name}"]))
    (root / "wflw" / f"{split}.txt").write_text("\n".join(lines) + "\n")


def _write_tables(root: Path, split: str, n: int, size: int, rng: np.random.Generator) -> None:
    for name in ("au", "affectnet"):
        (root / name / "images").mkdir(parents=True, exist_ok=True)
    au_rows, affect_rows = ["image," + ",".join(AU_NAMES)], ["subDirectory_filePath,face_x,face_y,face_width,face_height,"
                                                             "facial_landmarks,expression,valence,arousal"]  # fmt: skip
    for i in range(n):
        face = render_face(rng, size)
        file = f"{split}_{i:04d}.png"
        face["image"].save(root / "au" / "images" / file)
        au_rows.append(f"images/{file}," + ",".join(map(str, _au_values(face))))
        code = int(i % 8)
        face = render_face(rng, size, expression=code)
        face["image"].save(root / "affectnet" / "images" / file)
        p = face["p68"][:, :2]
        x0, y0 = p.min(axis=0)
        x1, y1 = p.max(axis=0)
        _, _, _, valence, arousal = EXPRESSION_PARAMS[code]
        va = np.clip([valence + rng.normal(0, 0.1), arousal + rng.normal(0, 0.1)], -1, 1)
        marks = ";".join(f"{v:.2f}" for v in p.reshape(-1))
        affect_rows.append(f"images/{file},{x0:.1f},{y0:.1f},{x1 - x0:.1f},{y1 - y0:.1f},{marks},{code},{va[0]:.3f},{va[1]:.3f}")
    (root / "au" / f"{split}.csv").write_text("\n".join(au_rows) + "\n")
    (root / "affectnet" / f"{split}.csv").write_text("\n".join(affect_rows) + "\n")


def _write_aflw3d(root: Path, split: str, n: int, size: int, rng: np.random.Generator) -> None:
    from scipy.io import savemat

    folder = root / "aflw3d" / split
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        face = render_face(rng, size)
        face["image"].save(folder / f"{split}_{i:04d}.jpg", quality=95)
        savemat(folder / f"{split}_{i:04d}.mat", {"pt3d_68": face["p68"].T.astype(np.float64)})


def _write_pairs(lfw: Path, persons: dict[str, int], rng: np.random.Generator, folds: int = 10, per_fold: int = 6) -> None:
    """An LFW ``pairs.txt``: per fold ``per_fold`` same-person then ``per_fold`` different-person lines."""
    names = sorted(persons)
    lines = [f"{folds} {per_fold}"]
    for _ in range(folds):
        for _ in range(per_fold):
            name = names[rng.integers(len(names))]
            a, b = rng.choice(persons[name], size=2, replace=False) + 1
            lines.append(f"{name} {a} {b}")
        for _ in range(per_fold):
            one, two = rng.choice(len(names), size=2, replace=False)
            lines.append(f"{names[one]} {rng.integers(persons[names[one]]) + 1} {names[two]} {rng.integers(persons[names[two]]) + 1}")
    (lfw / "pairs.txt").write_text("\n".join(lines) + "\n")


def _write_identities(root: Path, rng: np.random.Generator, size: int, *, persons: int, per_person: int, test_persons: int) -> None:
    for k in range(persons + test_persons):
        identity = _identity(rng)
        name = f"person_{k:03d}"
        folder = root / "identities" / "train" / name if k < persons else root / "lfw" / name
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_person):
            face = render_face(rng, size, identity=identity)
            face["image"].save(folder / (f"{j:02d}.png" if k < persons else f"{name}_{j + 1:04d}.jpg"), quality=95)
    _write_pairs(root / "lfw", {f"person_{k:03d}": per_person for k in range(persons, persons + test_persons)}, rng)


def _view(photo: np.ndarray, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """A random view of a real crop: resized, a crop of 85-100% of its side, maybe mirrored, brightness +-15%."""
    image = Image.fromarray((photo * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    side = int(size * rng.uniform(0.85, 1.0))
    x, y = rng.integers(0, size - side + 1, size=2)
    view = image.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
    if rng.random() < 0.5:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = np.asarray(view).astype(np.float32) * rng.uniform(0.85, 1.15)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write_real(root: Path, rng: np.random.Generator, train_photos: int = 60, views: int = 4) -> None:
    from skimage.data import lfw_subset

    faces = lfw_subset()[:100]  # the first 100 are faces, the other 100 background crops
    (root / "pool" / "real").mkdir(parents=True, exist_ok=True)
    for i, photo in enumerate(faces):
        Image.fromarray((photo * 255).astype(np.uint8)).resize((32, 32), Image.BICUBIC).save(root / "pool" / "real" / f"{i:03d}.png")
        name = f"photo_{i:03d}"
        folder = root / "real" / ("identities/train" if i < train_photos else "lfw") / name
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(views):
            _view(photo, rng).save(folder / (f"{j:02d}.png" if i < train_photos else f"{name}_{j + 1:04d}.jpg"), quality=95)
    persons = {f"photo_{i:03d}": views for i in range(train_photos, len(faces))}
    _write_pairs(root / "real" / "lfw", persons, rng, per_fold=4)


#: Near-duplicate kinds of :func:`write_uncurated_pool` (``planted.csv``, column ``kind``).
PLANTED_KINDS = ("original", "reencode", "shift", "brightness", "frame")


def _scenery(rng: np.random.Generator) -> list:
    """3-6 random ellipses and rectangles (boxes in fractions of the side): a cluttered scene behind the face.

    Plain backgrounds leave every cartoon face with the same low frequencies, so a perceptual hash
    would call distinct faces near-duplicates; photos scraped from the web differ in their scenes.
    """
    shapes = []
    for _ in range(int(rng.integers(3, 7))):
        x0, y0 = rng.uniform(-0.2, 0.9, size=2)
        w, h = rng.uniform(0.2, 0.8, size=2)
        colour = tuple(int(v) for v in rng.uniform(0, 255, 3))
        shapes.append((str(rng.choice(["ellipse", "rectangle"])), (x0, y0, x0 + w, y0 + h), colour))
    return shapes


def _near_copy(image: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """A re-upload of ``image``: JPEG re-encoded at a low quality, shifted by 1 px, or brightness +-20%."""
    if kind == "reencode":
        return image, "jpg"  # saved with a low JPEG quality by the caller
    if kind == "shift":
        dx, dy = (int(v) for v in rng.choice([-1, 1], size=2))
        pixels = np.asarray(image)
        padded = np.pad(pixels, ((1, 1), (1, 1), (0, 0)), mode="edge")
        shifted = padded[1 + dy : 1 + dy + image.height, 1 + dx : 1 + dx + image.width]
        return Image.fromarray(shifted), "png"
    scale = rng.choice([rng.uniform(0.8, 0.9), rng.uniform(1.1, 1.2)])
    return Image.fromarray(np.clip(np.asarray(image).astype(np.float32) * scale, 0, 255).astype(np.uint8)), "png"


def write_uncurated_pool(folder: str | Path, *, unique: int = 120, size: int = 48, seed: int = 1, copied: float = 0.5,
                         clips: int = 4, frames: int = 16) -> dict[str, int]:  # fmt: skip
    """An *uncurated* unlabeled face pool with planted redundancy, as scraped or video-sampled pools have.

    ``unique`` distinct faces (one identity each); ``copied`` of them get one to three re-uploads
    (re-encoded as JPEG at quality 30-60, shifted by 1 px, or brightness x0.8-0.9 / x1.1-1.2);
    ``clips`` identities are heavily repeated as ``frames`` consecutive video frames each (one
    background, pose and expression drifting a little from frame to frame). Files are named
    ``NNNN.png|jpg`` in a shuffled order, so duplicates are spread over the pool. ``planted.csv``
    beside the images (``file,origin,kind``: the original a copy or frame was made from, kinds
    :data:`PLANTED_KINDS`) is the ground truth of what curation should remove; it is not an image,
    so an image folder source does not read it. Returns the counts per kind.

    Args:
        folder: Where to write; an existing ``planted.csv`` leaves the folder as it is.
    """
    folder = Path(folder)
    if (folder / "planted.csv").exists():
        return _planted_counts(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items: list[tuple[Image.Image, str, int, str]] = []  # image, extension, origin, kind
    for k in range(unique):
        face = render_face(rng, size, scenery=_scenery(rng))
        items.append((face["image"], "png", k, "original"))
        if k < int(round(copied * unique)):
            for kind in rng.choice(["reencode", "shift", "brightness"], size=int(rng.integers(1, 4)), replace=False):
                image, ext = _near_copy(face["image"], str(kind), rng)
                items.append((image, ext, k, str(kind)))
    for c in range(clips):
        identity, background, scenery = _identity(rng), tuple(int(v) for v in rng.uniform(0, 255, 3)), _scenery(rng)
        yaw, scale, cx, cy = rng.uniform(-0.3, 0.3), size * rng.uniform(0.32, 0.36), size / 2, size * 0.46
        brow, smile, mouth = rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5), rng.uniform(0, 0.5)
        origin = unique + c
        for f in range(frames):
            face = render_face(rng, size, identity=identity, brow=brow, smile=smile, mouth=mouth,
                               pose=(yaw, scale, cx, cy), background=background, scenery=scenery)  # fmt: skip
            items.append((face["image"], "png", origin, "original" if f == 0 else "frame"))
            yaw, smile, mouth = yaw + rng.normal(0, 0.01), smile + rng.normal(0, 0.02), max(0.0, mouth + rng.normal(0, 0.01))
    lines = ["file,origin,kind"]
    for n, i in enumerate(rng.permutation(len(items)).tolist()):
        image, ext, origin, kind = items[i]
        name = f"{n:04d}.{ext}"
        image.save(folder / name, **({"quality": int(rng.integers(30, 61))} if ext == "jpg" else {}))
        lines.append(f"{name},{origin},{kind}")
    (folder / "planted.csv").write_text("\n".join(lines) + "\n")
    return _planted_counts(folder)


def read_planted(folder: str | Path) -> dict[str, tuple[int, str]]:
    """``planted.csv`` of :func:`write_uncurated_pool`: file -> (origin, kind)."""
    rows = (Path(folder) / "planted.csv").read_text().splitlines()[1:]
    return {name: (int(origin), kind) for name, origin, kind in (r.split(",") for r in rows)}


def _planted_counts(folder: Path) -> dict[str, int]:
    kinds = [kind for _, kind in read_planted(folder).values()]
    return {kind: kinds.count(kind) for kind in PLANTED_KINDS}


__all__ = ["write_face_benchmark_data", "write_uncurated_pool", "read_planted", "PLANTED_KINDS", "render_face",
           "face_points", "AU_NAMES", "FLIP_PAIRS_68"]
