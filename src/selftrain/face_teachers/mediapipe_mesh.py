"""``mediapipe:facemesh``: MediaPipe 0.10.21's legacy face mesh (Kartynnik et al. 2019), 468 points.

MediaPipe runs its own face detector (BlazeFace), then the mesh model on the face it finds; its
legacy API takes no box, so ``face_box`` must be ``detect``. Its legacy API returns points in [0, 1] of the image's
width and height (``x * W`` is a selftrain coordinate: pixel ``j`` spans ``[j, j + 1)``) and no
score, so the confidence of a face it finds is 1. Its 468 points have left/right counterparts, but
MediaPipe publishes no pairing table, so the keypoints task gets no flip pairs: a student of this
teacher should not mirror its images (``augment: none``), or a left point would learn the right one.
"""

from __future__ import annotations

import torch

from selftrain.face_teachers import NO_FACE, FaceModel, require
from selftrain.face_teachers.dlib_models import to_uint8


class MediaPipeFaceMesh:
    """468 face-mesh points per image as ``{"keypoints": (468, 3)}``; None where MediaPipe finds no face."""

    def __init__(self, model: FaceModel, face_box: str) -> None:
        if face_box != "detect":
            raise ValueError(f"face_box: teacher {model.spec} finds faces itself (MediaPipe takes no box); use detect")
        require("mediapipe", model.spec)
        solutions = require("mediapipe.python.solutions.face_mesh", model.spec)
        self.model = model
        # static_image_mode: every image is detected afresh (no tracking across a batch).
        self.mesh = solutions.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=False,
                                       min_detection_confidence=0.5)  # fmt: skip

    def __call__(self, images: torch.Tensor):
        targets, confidence, reasons = [], [], []
        for image in to_uint8(images):
            rgb = image[..., None].repeat(3, axis=2) if image.ndim == 2 else image
            h, w = rgb.shape[:2]
            result = self.mesh.process(rgb)
            if not result.multi_face_landmarks:
                targets.append(None), confidence.append(0.0), reasons.append(NO_FACE)
                continue
            marks = result.multi_face_landmarks[0].landmark
            points = torch.tensor([[m.x * w, m.y * h, 1.0] for m in marks], dtype=torch.float32)
            targets.append({"keypoints": points}), confidence.append(1.0), reasons.append(None)
        return targets, confidence, reasons
