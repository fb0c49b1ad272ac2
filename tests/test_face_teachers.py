"""Face teachers from real models shipped inside packages (selftrain.face_teachers, the ``faces`` extra).

Real faces only: scikit-image's astronaut photo and its ``lfw_subset`` (100 LFW face crops, then
100 non-face crops, 25x25, upscaled here). ``make test`` installs the extra (``make faces``); a
missing package fails these tests with the install command rather than skipping them.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from selftrain.config import ConfigError, build_config
from selftrain.engine import build_runtime
from selftrain.face_teachers import FACE_MODELS, NO_FACE, build_face_teacher
from selftrain.face_teachers.fer_model import EMOTIONS, _Same
from selftrain.metrics import KeypointNME
from selftrain.must.label import MISSING, PSEUDO, must_label
from selftrain.must.network import load_multitask_network
from selftrain.must.student import must_student
from selftrain.outputs import RunFolder
from selftrain.store import PseudoLabelStore

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image ships the test faces: install selftrain[faces]")


def astronaut() -> torch.Tensor:
    """(1, 3, 512, 512) in [0, 1]: one smiling face (Eileen Collins), about 90 px wide."""
    return torch.from_numpy(skimage_data.astronaut()).permute(2, 0, 1)[None].float() / 255


def lfw(size: int) -> torch.Tensor:
    """(200, 1, size, size) in [0, 1]: 100 LFW face crops, then 100 crops without a face."""
    faces = torch.from_numpy(skimage_data.lfw_subset()).float()[:, None]
    return F.interpolate(faces, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def no_face() -> torch.Tensor:
    """(1, 3, 400, 600) in [0, 1]: a cup of coffee."""
    return torch.from_numpy(skimage_data.coffee()).permute(2, 0, 1)[None].float() / 255


# --------------------------------------------------------------------------- the models themselves


def test_tf_same_padding_puts_the_extra_pixel_after_as_tensorflow_does():
    x = torch.arange(15 * 15, dtype=torch.float32).view(1, 1, 15, 15)
    out = _Same(torch.nn.MaxPool2d(3, stride=2), 3, 2, value=-math.inf)(x)
    # TensorFlow: out = ceil(15 / 2) = 8, total padding (8 - 1) * 2 + 3 - 15 = 2 -> 1 before, 1 after.
    naive = torch.tensor([[x[0, 0, max(2 * i - 1, 0) : 2 * i + 2, max(2 * j - 1, 0) : 2 * j + 2].max()
                           for j in range(8)] for i in range(8)])  # fmt: skip
    assert torch.equal(out[0, 0], naive)
    even = _Same(torch.nn.MaxPool2d(3, stride=2), 3, 2, value=-math.inf)(x[..., :14, :14])
    # 14: total padding 1, after: the first window is rows/columns 0-2 (PyTorch's symmetric rule: 0-1)
    assert even.shape[-2:] == (7, 7) and even[0, 0, 0, 0] == x[0, 0, :3, :3].max() and even[0, 0, -1, -1] == x[0, 0, 13, 13]


def test_fer_emotion_rebuilt_from_hdf5_finds_the_smiling_astronaut_happy():
    teacher = build_face_teacher("fer:emotion")
    targets, confidence, reasons = teacher(astronaut())
    probs = targets[0]["probs"]
    assert probs.shape == (7,) and probs.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert EMOTIONS[int(probs.argmax())] == "happy" and probs.max() > 0.9, dict(zip(EMOTIONS, probs.tolist()))
    assert reasons == [None] and 0.5 < confidence[0] <= 1.0
    # Faces of LFW: a probability vector each, not one class for every face.
    targets, _, _ = teacher(lfw(100)[:100])
    found = [t["probs"] for t in targets if t is not None]
    assert len(found) >= 80
    assert len({int(p.argmax()) for p in found}) >= 3
    assert all(p.sum().item() == pytest.approx(1.0, abs=1e-5) and (p >= 0).all() for p in found)


def test_dlib_landmarks_on_a_real_face_and_none_without_one():
    face, coffee = astronaut(), no_face()
    targets, confidence, reasons = build_face_teacher("dlib:landmarks68")(face)
    points = targets[0]["keypoints"]
    assert points.shape == (68, 3) and reasons == [None] and (points[:, 2] > 0).all()
    # The face is at x 175-265, y 76-166 (dlib's box); iBUG order: jaw 0-16, eyes 36-47 above the mouth 48-67.
    assert 150 < points[:, 0].min() and points[:, 0].max() < 290 and 70 < points[:, 1].min() and points[:, 1].max() < 200
    assert points[36:48, 1].mean() < points[30, 1] < points[48:68, 1].mean()  # eyes, nose tip, mouth from the top
    assert points[36, 0] < points[45, 0]  # the subject's right eye corner is on the image's left
    five, _, _ = build_face_teacher("dlib:landmarks5")(face)
    eyes = five[0]["keypoints"]
    # the 5-point model's eye corners agree with the 68-point model's (within 6 px on a 90 px face)
    assert torch.dist(eyes[0, :2], points[45, :2]) < 6 and torch.dist(eyes[2, :2], points[36, :2]) < 6
    targets, confidence, reasons = build_face_teacher("dlib:landmarks68")(coffee)
    assert targets == [None] and confidence == [0.0] and reasons == [NO_FACE]


def test_mediapipe_face_mesh_on_a_real_face_and_none_without_one():
    teacher = build_face_teacher("mediapipe:facemesh")
    targets, _, reasons = teacher(astronaut())
    points = targets[0]["keypoints"]
    assert points.shape == (468, 3) and reasons == [None]
    dlib_points = build_face_teacher("dlib:landmarks68")(astronaut())[0][0]["keypoints"]
    # mesh point 1 (nose tip) is dlib's nose tip (30) within 8 px on a 90 px face
    assert torch.dist(points[1, :2], dlib_points[30, :2]) < 8
    assert teacher(no_face())[2] == [NO_FACE]
    with pytest.raises(ValueError, match="MediaPipe takes no box"):
        build_face_teacher("mediapipe:facemesh", face_box="image")


def test_face_teacher_specs_are_validated_with_clear_errors():
    assert set(FACE_MODELS) == {"dlib:landmarks68", "dlib:landmarks5", "fer:emotion", "mediapipe:facemesh"}
    with pytest.raises(ConfigError, match=r"must.teachers.0.*dlib:landmarks99.*is not a face teacher"):
        build_config({}, ["must.teachers.0.task=keypoints", "must.teachers.0.spec=dlib:landmarks99"])
    with pytest.raises(ConfigError, match=r"teacher fer:emotion labels classification, not keypoints"):
        build_config({}, ["must.teachers.0.task=keypoints", "must.teachers.0.spec=fer:emotion"])
    with pytest.raises(ConfigError, match=r"label.*'dlib:eyes' is not a face teacher"):
        build_config({}, ["label.teacher=dlib:eyes"])


# --------------------------------------------------------------------------- Done-when: store -> student


def write_pool(folder, size: int) -> str:
    """The 200 lfw_subset crops as ``size`` px PNGs of a flat image folder (an unlabeled pool)."""
    folder.mkdir()
    for i, image in enumerate(lfw(size)):
        Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8)).save(folder / f"{i:03d}.png")
    return f"imagefolder:{folder}?labels=none"


def student_nme(net, images: torch.Tensor, teacher_points: torch.Tensor) -> float:
    """NME (% of the inter-ocular distance, eye corners 36/45) of the student's points to the teacher's."""
    from selftrain.tasks.keypoints import decode_heatmaps

    with torch.no_grad():
        points = decode_heatmaps(net.head_outputs("landmarks", net.features(images)))
    meter = KeypointNME()
    meter.update(points, teacher_points, torch.linalg.norm(teacher_points[:, 36, :2] - teacher_points[:, 45, :2], dim=1))
    return float(meter.compute()["nme"])


def test_a_face_teachers_landmarks_go_to_the_store_and_a_student_learns_them(tmp_path):
    pool = write_pool(tmp_path / "pool", 64)
    teacher = ["task=keypoints", "name=landmarks", "spec=dlib:landmarks68", "input_size=128"]
    cfg = build_config({}, [
        f"data.unlabeled={pool}", "data.image_size=64", "data.channels=1", "model.backbone=cnn-tiny", "engine.progress=false",
        "engine.threads=1", "label.shard_size=64", "label.batch_size=32", "must.student.steps=150",
        "must.student.batch_size=16", "must.student.augment=none", "must.student.optim.lr=0.003",
        *[f"must.teachers.0.{kv}" for kv in teacher],
    ])  # fmt: skip
    run = RunFolder(tmp_path / "run")
    run.write_provenance(cfg)
    runtime = build_runtime(cfg.engine)
    store = PseudoLabelStore(must_label(cfg, run, runtime))
    table = store.read()
    source = table.column("landmarks.source").to_pylist()
    index = table.column("index").to_numpy()
    faces = [i for i, s in zip(index, source) if s == PSEUDO]
    # lfw_subset: crops 0-99 are faces, 100-199 not. The detector finds most faces and few non-faces.
    assert sum(i < 100 for i in faces) >= 80 and sum(i >= 100 for i in faces) <= 15
    manifest = json.loads((store.root / "manifest.json").read_text())
    stats = manifest["stats"]["landmarks"]
    assert stats["pseudo"] == len(faces) and stats["missing"] == 200 - len(faces)
    assert stats["missing_reasons"] == {NO_FACE: 200 - len(faces)}
    reasons = table.column("landmarks.reason").to_pylist()
    assert all((r == NO_FACE) == (s == MISSING) for r, s in zip(reasons, source))
    conf = table.column("landmarks.confidence").to_pylist()
    assert all((c is None) == (s == MISSING) for c, s in zip(conf, source))
    assert all(0.5 < c <= 1 for c, s in zip(conf, source) if s == PSEUDO)

    # The teacher's points, in pool pixels, for the faces it found.
    rows = [n for n, s in enumerate(source) if s == PSEUDO]
    teacher_points = torch.tensor([table.column("landmarks.points")[n].as_py() for n in rows]).view(len(rows), 68, 3)
    images = lfw(64)[torch.as_tensor(index[rows])]

    weights = must_student(cfg, run, runtime)
    net = load_multitask_network(weights).eval()
    torch.manual_seed(0)
    untrained = load_multitask_network(weights)
    for p in untrained.parameters():  # the same architecture at its initial (random) weights
        if p.dim() > 1:
            torch.nn.init.kaiming_normal_(p)
    before, after = student_nme(untrained.eval(), images, teacher_points), student_nme(net, images, teacher_points)
    print(f"NME to the teacher's landmarks: untrained {before:.1f}%, student {after:.1f}%")
    assert after < 0.5 * before and after < 25.0
