"""``dlib:embedding``: dlib's 128-d face embeddings as the teacher of the verification task.

The distillation loss and the store encoding need nothing but torch; the tests that run dlib are
skipped when dlib or the ``face_recognition_models`` package (which carries the model files) is
not installed (``make faces``). The package is located, not imported: its ``__init__`` needs the
``pkg_resources`` module that recent setuptools no longer ship.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from selftrain.config import ConfigError, build_config
from selftrain.face_teachers import FACE_MODELS, NO_FACE, build_face_teacher
from selftrain.metrics_faces import verification_metrics
from selftrain.tasks import TASKS
from selftrain.tasks.verification import EMBEDDING_DIM, embedding_distillation_loss


def _dlib_installed() -> bool:
    try:
        import dlib  # noqa: F401
    except ImportError:
        return False
    return importlib.util.find_spec("face_recognition_models") is not None


needs_dlib = pytest.mark.skipif(not _dlib_installed(), reason="dlib:embedding needs dlib-bin and face_recognition_models: make faces")


# --------------------------------------------------------------------------- the loss and the store (no dlib)


def test_distillation_loss_against_a_hand_computed_value():
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # 2-d
    teacher = torch.tensor([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 2.0]])  # 3-d: widths may differ
    # Student cosines: (0,1) 0, (0,2) 1/sqrt2, (1,2) 1/sqrt2. Teacher cosines: (0,1) 1, (0,2) 0, (1,2) 0.
    # Squared gaps: (0,1) 1, (0,2) 1/2, (1,2) 1/2; each image's mean over its two pairs:
    expected = torch.tensor([(1 + 0.5) / 2, (1 + 0.5) / 2, (0.5 + 0.5) / 2])
    loss = embedding_distillation_loss(student, teacher)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert loss.mean().item() == pytest.approx(2 / 3)
    # Scale does not matter (cosines); the same geometry costs nothing.
    assert torch.allclose(embedding_distillation_loss(5 * teacher, teacher), torch.zeros(3), atol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        embedding_distillation_loss(student[:1], teacher[:1])


def test_verification_loss_mixes_cosface_for_identities_and_distillation_for_embeddings():
    torch.manual_seed(0)
    task = TASKS.get("verification")(3)
    embedding = F.normalize(torch.randn(5, task.dim), dim=1)
    outputs = torch.cat([embedding, torch.rand(5, 3) * 2 - 1], dim=1).requires_grad_()
    teacher = torch.randn(3, 128)
    targets = [{"labels": torch.tensor(0)}, {"labels": torch.tensor(2)}] + [{"embedding": e} for e in teacher]
    loss = task.loss(outputs, targets)
    human = task.loss(outputs[:2], targets[:2])  # CosFace alone, as the teach stage computes it
    assert torch.allclose(loss[:2], human)
    assert torch.allclose(loss[2:], embedding_distillation_loss(outputs[2:, : task.dim], teacher))
    loss.sum().backward()
    assert outputs.grad is not None and outputs.grad[:, : task.dim].abs().sum() > 0
    with pytest.raises(ValueError, match="an identity .labels. or a teacher's embedding"):
        task.loss(outputs[:1], [{"points": torch.zeros(2)}])


def test_embedding_store_round_trip():
    task = TASKS.get("verification")(4)
    targets = [{"embedding": torch.tensor([1.0, 2.0, 0.5])}, {"embedding": torch.tensor([3.0, 4.0, 0.5])}]
    columns = task.record_columns(targets)
    columns["verification.confidence"] = [0.9, 0.8]
    table = pa.table({k: pa.array(v, type=task.pseudo_schema()[k]) for k, v in columns.items()})
    assert all(torch.equal(a["embedding"], b["embedding"]) for a, b in zip(task.decode_rows(table), targets))
    batch = task.decode_pseudo(table)[[1, 1, 0]]  # what the student indexes with a batch's positions
    assert [b["embedding"].tolist() for b in batch] == [[3.0, 4.0, 0.5], [3.0, 4.0, 0.5], [1.0, 2.0, 0.5]]
    mixed = pa.table({"verification.embedding": pa.array([[1.0, 2.0], [1.0]], pa.list_(pa.float32()))})
    with pytest.raises(ValueError, match=r"mixes embeddings of widths \[1, 2\]"):
        task.decode_rows(mixed)
    with pytest.raises(ValueError, match="embedding teacher only"):
        task.encode_records(torch.zeros(2, 4 + task.dim), None)  # a trained verification network is no teacher


def test_config_takes_dlib_embedding_for_verification_only_with_clear_errors():
    assert FACE_MODELS["dlib:embedding"].task == "verification" and FACE_MODELS["dlib:embedding"].outputs == 128
    cfg = build_config({}, ["task=verification", "label.teacher=dlib:embedding"])
    assert cfg.stages == ["teach", "label", "student", "transfer"]
    with pytest.raises(ConfigError, match="set label.teacher: dlib:embedding"):
        build_config({}, ["task=verification", "stages=[label, student]"])
    with pytest.raises(ConfigError, match="teacher dlib:embedding labels verification, not classification"):
        build_config({}, ["label.teacher=dlib:embedding"])
    with pytest.raises(ConfigError, match="teacher fer:emotion labels classification, not verification"):
        build_config({}, ["task=verification", "label.teacher=fer:emotion"])
    with pytest.raises(ConfigError, match="student.rounds: the embedding teacher labels round 1"):
        build_config({}, ["task=verification", "label.teacher=dlib:embedding", "student.rounds=2"])
    with pytest.raises(ConfigError, match="student.pseudo_batch_size: embedding distillation compares pairs"):
        build_config({}, ["task=verification", "label.teacher=dlib:embedding", "student.pseudo_batch_size=1"])
    with pytest.raises(ConfigError, match="teacher dlib:embedding labels verification, not keypoints"):
        build_config({}, ["must.teachers.0.task=keypoints", "must.teachers.0.spec=dlib:embedding"])


def test_a_missing_extra_names_make_faces(monkeypatch):
    """Without dlib, or without the package of model files, the teacher says how to install them."""
    monkeypatch.setitem(sys.modules, "dlib", None)  # import dlib -> ImportError
    with pytest.raises(ModuleNotFoundError, match=r"dlib:embedding needs 'dlib'.*selftrain\[faces\].*make faces"):
        build_face_teacher("dlib:embedding")
    monkeypatch.undo()
    if not _dlib_installed():
        return
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "face_recognition_models" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"'face_recognition_models', which is not installed.*make faces"):
        build_face_teacher("dlib:embedding")


def test_the_face_benchmark_self_trains_verification_only_with_an_embedding_teacher():
    from selftrain.faces import FaceBenchmarkConfig, plan

    tasks = [{"name": "plain", "task": "verification", "labeled": "imagefolder:x", "test": "lfw-pairs:y"},
             {"name": "dlib", "task": "verification", "labeled": "imagefolder:x", "test": "lfw-pairs:y",
              "set": ["label.teacher=dlib:embedding"]}]  # fmt: skip
    bench = FaceBenchmarkConfig.model_validate({"tasks": tasks, "label_fractions": [0.5], "self_training": [0.5]})
    assert {(c.task, c.protocol) for c in plan(bench)} == {("plain", "finetune"), ("dlib", "finetune"), ("dlib", "self-training")}


# --------------------------------------------------------------------------- the model on real faces


def _lfw(n: int, size: int) -> torch.Tensor:
    """(n, 1, size, size) in [0, 1]: the first n of scikit-image's 100 LFW face crops (25 px), resized."""
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image ships the test faces: make faces")
    faces = torch.from_numpy(skimage_data.lfw_subset()[:n]).float()[:, None]
    return F.interpolate(faces, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@needs_dlib
def test_dlib_embedding_on_real_faces_and_none_without_one():
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image ships the test faces: make faces")
    astronaut = torch.from_numpy(skimage_data.astronaut()).permute(2, 0, 1)[None].float() / 255
    coffee = torch.from_numpy(skimage_data.coffee()).permute(2, 0, 1)[None].float() / 255
    teacher = build_face_teacher("dlib:embedding")
    targets, confidence, reasons = teacher(torch.cat([astronaut, astronaut.flip(-1)]))
    one, mirrored = targets[0]["embedding"], targets[1]["embedding"]
    assert one.shape == (128,) and reasons == [None, None] and all(0.5 < c <= 1 for c in confidence)
    assert teacher(coffee) == ([None], [0.0], [NO_FACE])
    # dlib's rule: one person under a Euclidean distance of 0.6. The mirrored face is (measured 0.19);
    # the LFW crops (other people, 25 px upscaled, face_box image, gray) are not (measured 0.76-0.92).
    others = build_face_teacher("dlib:embedding", face_box="image")(_lfw(6, 128))[0]
    distances = torch.stack([torch.dist(one, t["embedding"]) for t in others])
    assert torch.dist(one, mirrored) < 0.6 < distances.min(), (torch.dist(one, mirrored), distances)


# --------------------------------------------------------------------------- label -> student -> verification


def _view(face: np.ndarray, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """Another photo of the same face: a random 85-100% crop, maybe mirrored, brightness +-15%."""
    image = Image.fromarray((face * 255).round().astype(np.uint8)).resize((size, size), Image.BICUBIC)
    side = int(size * rng.uniform(0.85, 1.0))
    x, y = rng.integers(0, size - side + 1, size=2)
    image = image.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return Image.fromarray(np.clip(np.asarray(image) * rng.uniform(0.85, 1.15), 0, 255).astype(np.uint8))


def write_photo_faces(root, *, train: int = 6, pool: int = 24, test: int = 20, seed: int = 0) -> dict[str, str]:
    """URIs of three disjoint sets of scikit-image's real LFW faces (a face's photos are its identity):
    ``train`` identities of 2 views each, a flat ``pool`` of single crops, and an LFW-style test set of
    ``test`` faces with 2 views each and a ``pairs.txt`` of 10 folds (2 same and 2 different pairs each)."""
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image ships the test faces: make faces")
    faces = skimage_data.lfw_subset()[: train + pool + test]
    rng = np.random.default_rng(seed)
    for i in range(train):
        (root / "labeled" / f"face_{i:03d}").mkdir(parents=True)
        for j in range(2):
            _view(faces[i], rng).save(root / "labeled" / f"face_{i:03d}" / f"{j}.png")
    (root / "pool").mkdir()
    for i in range(train, train + pool):
        Image.fromarray((faces[i] * 255).round().astype(np.uint8)).resize((32, 32), Image.BICUBIC).save(root / "pool" / f"{i:03d}.png")
    names = [f"face_{i:03d}" for i in range(train + pool, train + pool + test)]
    for i, name in zip(range(train + pool, train + pool + test), names):
        (root / "lfw" / name).mkdir(parents=True)
        for j in range(2):
            _view(faces[i], rng).save(root / "lfw" / name / f"{name}_{j + 1:04d}.jpg", quality=95)
    lines = ["10 2"]
    for fold in range(10):
        a, b = names[2 * fold], names[2 * fold + 1]  # each fold its own two faces: same, same, then different
        lines += [f"{a} 1 2", f"{b} 1 2", f"{a} 1 {b} 2", f"{b} 1 {names[(2 * fold + 2) % test]} 2"]
    (root / "lfw" / "pairs.txt").write_text("\n".join(lines) + "\n")
    return {"labeled": f"imagefolder:{root / 'labeled'}", "pool": f"imagefolder:{root / 'pool'}?labels=none",
            "test": f"lfw-pairs:{root / 'lfw' / 'pairs.txt'}"}  # fmt: skip


@needs_dlib
def test_dlib_embeddings_label_a_pool_and_a_student_learns_them_measured_by_verification(tmp_path):
    """Teach-free: label (dlib:embedding) -> student (CosFace on the identities + distillation on the pool)
    -> transfer (verification accuracy on the pairs), on real faces."""
    from selftrain.data.annotations.faces import read_pairs
    from selftrain.network import Network, load_network
    from selftrain.pipeline import run_pipeline
    from selftrain.results import read_results
    from selftrain.store import PseudoLabelStore

    uris = write_photo_faces(tmp_path / "data")
    cfg = build_config({}, [
        "task=verification", f"data.labeled={uris['labeled']}", f"data.unlabeled={uris['pool']}", f"data.test={uris['test']}",
        "data.image_size=32", "data.channels=3", "stages=[label, student, transfer]", "label.teacher=dlib:embedding",
        "label.face_box=image", "label.teacher_input_size=128", "model.backbone=cnn-tiny", "student.steps=40",
        "student.human_batch_size=8", "student.pseudo_batch_size=8", "student.augment=S1", "student.optim.optimizer=adamw",
        "student.optim.lr=0.003", "student.optim.weight_decay=0", "engine.progress=false", "engine.threads=1",
        "engine.checkpoint_every=1000",
    ])  # fmt: skip
    run = run_pipeline(cfg, tmp_path / "run")

    store = PseudoLabelStore(run / "label" / "round-1")
    table, manifest = store.read(), store.manifest
    assert manifest["labelled"] == 24 and manifest["missing"] == 0 and manifest["teacher"]["model"] == "dlib:embedding"
    teacher = torch.tensor(table.column("verification.embedding").to_pylist())
    assert teacher.shape == (24, 128) and table.column("verification.confidence").to_pylist() == [1.0] * 24

    # The student learnt the teacher's geometry: on the pool, its pairwise cosines are nearer the
    # teacher's than those of the same network at its initial weights.
    student = load_network(run / "student" / "round-1" / "model.safetensors").eval()
    torch.manual_seed(cfg.seed * 100 + 1)
    initial = Network(student.spec).eval()
    pool = torch.stack([torch.from_numpy(np.array(Image.open(tmp_path / "data" / "pool" / k).convert("RGB"))).permute(2, 0, 1)
                        for k in table.column("key").to_pylist()]).float() / 255  # fmt: skip
    with torch.no_grad():
        before, after = (embedding_distillation_loss(net(pool)[:, :EMBEDDING_DIM], teacher).mean().item() for net in (initial, student))

    rows = {r.metric: r.value for r in read_results(run / "results.csv") if r.method == "self-training"}
    pairs = read_pairs(tmp_path / "data" / "lfw" / "pairs.txt")
    images = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((128, 128), Image.BICUBIC)))
                          .permute(2, 0, 1) for p in pairs.images]).float() / 255  # fmt: skip
    dlib_embeddings = torch.stack([t["embedding"] for t in build_face_teacher("dlib:embedding", face_box="image")(images)[0]])
    dlib = verification_metrics(dlib_embeddings, pairs.a, pairs.b, pairs.same, pairs.fold)["accuracy"]
    print(f"distillation loss on the pool: initial weights {before:.4f}, student {after:.4f}; verification accuracy: "
          f"student {rows['accuracy']:.1f} +- {rows['accuracy_std']:.1f}, dlib {dlib:.1f} (40 pairs, 10 folds)")
    assert after < 0.5 * before  # measured 0.0200 -> 0.0066 (seed 0)
    assert 0.0 <= rows["accuracy"] <= 100.0 and math.isfinite(rows["accuracy_std"])
    assert dlib >= 90.0  # two photos of one face: dlib tells them from other faces
    done = json.loads((run / "student" / "round-1" / "done.json").read_text())
    assert done["pseudo_records"] == 24
