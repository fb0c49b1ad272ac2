"""Multi-task self-training (selftrain.must): the multi-task store, teachers of every kind, joint
batches, loss weights, the student, the CLI and resume. Tiny scenes, a few steps: plumbing, not accuracy."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch
import yaml
from _must_teachers import CLASS, bright_mask, skips_odd
from typer.testing import CliRunner

from selftrain.augment import BatchAugment
from selftrain.cli import app
from selftrain.config import ConfigError, build_config
from selftrain.data import build_source
from selftrain.data.targets import IGNORE_INDEX
from selftrain.engine import build_runtime
from selftrain.must.data import MultiTaskRecords, TaskBatch, TaskSampler
from selftrain.must.label import HUMAN, MISSING, PSEUDO, must_label, uses_ground_truth
from selftrain.label import file_sha256
from selftrain.must.teachers import resize_target
from selftrain.must.network import HeadSpec, HeadView, MultiTaskNetwork, MultiTaskSpec, load_multitask_network
from selftrain.must.pipeline import run_must
from selftrain.must.student import TaskLossWeights, heuristic_weights, joint_augment, task_losses
from selftrain.outputs import RunFolder
from selftrain.store import PseudoLabelStore
from selftrain.tasks import build_task

runner = CliRunner()
POOL = "scenes:train?n=12&seed=3"
CLASSES = "[a, b, c, d, e, f, g, h, i, j, k]"


def base(*teachers: list[str]) -> list[str]:
    """Overrides of a run of a few seconds on 12 pool scenes, plus teachers given as lists of key=value."""
    out = [
        f"data.unlabeled={POOL}", "model.backbone=cnn-tiny", "teach.steps=2", "teach.batch_size=4",
        "label.shard_size=5", "label.batch_size=3", "engine.progress=false", "engine.threads=1",
        "engine.checkpoint_every=2", "engine.eval_batch_size=8", "must.student.steps=3", "must.student.batch_size=4",
    ]  # fmt: skip
    for i, teacher in enumerate(teachers):
        out += [f"must.teachers.{i}.{kv}" for kv in teacher]
    return out


BRIGHT = ["task=segmentation", "name=bright", "spec=callable:_must_teachers:bright_mask", f"classes={CLASSES}"]
DEPTH_HALF = ["task=depth", "spec=none", "human=pool", "human_fraction=0.5"]
CLASS_TWO = ["task=classification", "spec=callable:_must_teachers:always_class_two", f"classes={CLASSES}",
             "human=scenes:train?n=4&seed=3", "input_size=32"]  # fmt: skip


def label(tmp_path, overrides, name="run"):
    cfg = build_config({}, overrides)
    run = RunFolder(tmp_path / name)
    run.write_provenance(cfg)
    return cfg, run, PseudoLabelStore(must_label(cfg, run, build_runtime(cfg.engine)))


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    """A store of three tasks: a callable that skips images, ground truth only for half, a callable with ground truth."""
    return label(tmp_path_factory.mktemp("must"), base(BRIGHT, DEPTH_HALF, CLASS_TWO))


@pytest.fixture(scope="module")
def pool():
    return build_source(POOL)


# --------------------------------------------------------------------------- the multi-task store


def test_store_holds_every_task_with_missing_ones_null(labeled, pool):
    _, _, store = labeled
    table = store.read()
    assert table.column("key").to_pylist() == [pool.key(i) for i in range(len(pool))]
    assert store.header["tasks"] == ["bright", "depth", "classification"]
    images = pool.load_batch(np.arange(len(pool))).float() / 255
    expected, _ = bright_mask(images)
    sources = table.column("bright.source").to_pylist()
    masks = table.column("bright.mask").to_pylist()
    for i, (target, source, mask) in enumerate(zip(expected, sources, masks)):
        if skips_odd(images[i]):  # the teacher gave no label: missing, every value null
            assert source == MISSING and mask is None and table.column("bright.confidence")[i].as_py() is None
        else:
            assert source == PSEUDO
            stored = np.frombuffer(mask, np.uint8).reshape(64, 64)
            np.testing.assert_array_equal(stored, target["mask"].numpy())
    assert MISSING in sources and PSEUDO in sources  # the pool has both kinds (pixel sums of either parity)


def test_ground_truth_replaces_pseudo_labels_and_the_source_says_which(labeled, pool):
    _, _, store = labeled
    table = store.read()
    # classification: the human source holds the first 4 pool images (same keys); the rest keep the teacher's class.
    sources = table.column("classification.source").to_pylist()
    assert sources == [HUMAN] * 4 + [PSEUDO] * 8
    labels = table.column("classification.label").to_pylist()
    confidence = table.column("classification.confidence").to_pylist()
    assert labels[:4] == pool.labels[:4].tolist() and confidence[:4] == [1.0] * 4
    assert labels[4:] == [CLASS] * 8 and confidence[4:] == pytest.approx([0.8] * 8)
    # depth: no teacher; a seeded half of the images use their ground truth, the others miss the task.
    depth_sources = table.column("depth.source").to_pylist()
    chosen = [uses_ground_truth(0, "depth", pool.key(i), 0.5) for i in range(len(pool))]
    assert depth_sources == [HUMAN if c else MISSING for c in chosen] and 0 < sum(chosen) < len(pool)
    for i in np.flatnonzero(chosen):
        stored = np.frombuffer(table.column("depth.depth")[int(i)].as_py(), np.float16).reshape(64, 64)
        np.testing.assert_allclose(stored, pool.load_targets(int(i))["depth"].numpy(), rtol=1e-3)
    manifest = store.manifest
    assert manifest["stats"]["depth"]["human"] == sum(chosen) and manifest["stats"]["classification"]["human"] == 4
    assert manifest["processed"] == manifest["total"] == len(pool)


def test_human_fraction_is_a_seeded_choice_per_image():
    keys = [f"img/{i}" for i in range(2000)]
    chosen = [uses_ground_truth(0, "seg", k, 0.25) for k in keys]
    assert chosen == [uses_ground_truth(0, "seg", k, 0.25) for k in keys]  # no hidden state
    assert 0.2 < np.mean(chosen) < 0.3
    assert chosen != [uses_ground_truth(1, "seg", k, 0.25) for k in keys]  # the seed changes the choice
    assert all(uses_ground_truth(0, "seg", k, 1.0) for k in keys[:10])


def test_teacher_targets_come_back_in_pool_pixels():
    target = {"mask": torch.tensor([[1, 2], [3, 4]]), "boxes": torch.tensor([[0.0, 0.0, 1.0, 2.0]]),
              "keypoints": torch.tensor([[1.0, 1.5, 0.7]])}  # fmt: skip
    out = resize_target(target, (2, 2), (4, 6))
    assert out["mask"].tolist() == [[1, 1, 1, 2, 2, 2]] * 2 + [[3, 3, 3, 4, 4, 4]] * 2
    assert out["boxes"].tolist() == [[0.0, 0.0, 3.0, 4.0]]
    assert out["keypoints"].tolist() == [[3.0, 3.0, pytest.approx(0.7)]]


def test_interrupted_must_label_resumes_to_the_records_of_an_uninterrupted_run(tmp_path, monkeypatch):
    overrides = base(BRIGHT, DEPTH_HALF, CLASS_TWO)
    _, _, whole = label(tmp_path, overrides, "whole")
    real = PseudoLabelStore.write_shard
    written = []

    def dies_after_one_shard(self, shard_id, table):
        if written:
            (self.root / "shard-00002.parquet.tmp123").write_bytes(b"half a shard")  # what a kill leaves
            raise KeyboardInterrupt("killed")
        written.append(shard_id)
        real(self, shard_id, table)

    monkeypatch.setattr(PseudoLabelStore, "write_shard", dies_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        label(tmp_path, overrides, "killed")
    monkeypatch.setattr(PseudoLabelStore, "write_shard", real)
    assert not PseudoLabelStore(tmp_path / "killed/must/label").complete
    _, _, resumed = label(tmp_path, overrides, "killed")
    assert resumed.read().equals(whole.read())
    assert not list(resumed.root.glob("*.tmp*"))
    # A different teacher set is refused in the same folder rather than mixed into the store.
    with pytest.raises(ValueError, match="different config"):
        label(tmp_path, base(BRIGHT), "killed")


# --------------------------------------------------------------------------- joint batches and losses


def test_joint_batches_carry_only_the_tasks_each_image_has(labeled):
    cfg, run, store = labeled
    tasks = {"bright": build_task("segmentation", list("abcdefghijk")), "depth": build_task("depth", []),
             "classification": build_task("classification", list("abcdefghijk"))}  # fmt: skip
    records = MultiTaskRecords(store.root, tasks, {})
    table = store.read()
    assert len(records) == table.num_rows  # every image has the classification task
    batch = records.batch(np.arange(len(records)))
    for key in tasks:
        has = np.asarray(table.column(f"{key}.source").to_pylist()) != MISSING
        assert batch[key].rows.tolist() == np.flatnonzero(has).tolist()
        assert len(batch[key].targets) == has.sum()
    assert batch["depth"].human.all() and not batch["bright"].human.any()
    # A threshold drops pseudo records under it, never ground truth; a batch without a task leaves it out.
    strict = MultiTaskRecords(store.root, tasks, {"classification": 0.9, "bright": 1.1})
    assert strict.counts()["classification"] == 4 and strict.counts()["bright"] == 0
    assert "bright" not in strict.batch(np.arange(len(strict)))
    with pytest.raises(ValueError, match="no labels of"):
        MultiTaskRecords(store.root, {"normals": tasks["depth"]}, {})


def test_task_sampling_joint_or_one_task_per_step_is_seeded_and_covers_each_task(labeled):
    _, _, store = labeled
    tasks = {"bright": build_task("segmentation", list("abcdefghijk")), "depth": build_task("depth", []),
             "classification": build_task("classification", list("abcdefghijk"))}  # fmt: skip
    records = MultiTaskRecords(store.root, tasks, {})
    joint = TaskSampler(records, "joint", 5, seed=3)
    chosen, batch = joint(0)
    assert len(chosen) == 5 and set(batch) <= set(tasks) and len(batch["classification"].rows) == 5
    again = TaskSampler(records, "joint", 5, seed=3)(0)[0]
    assert chosen.tolist() == again.tolist()  # a pure function of (seed, step): resume draws the same batches
    robin = TaskSampler(records, "round-robin", 3, seed=3)
    seen = {k: set() for k in tasks}
    for step in range(3 * 12):
        chosen, batch = robin(step)
        key = list(tasks)[step % 3]
        assert list(batch) == [key] and len(chosen) == 3 and records.present[key][chosen].all()
        assert batch[key].rows.tolist() == [0, 1, 2]
        seen[key] |= set(chosen.tolist())
    # Over 12 steps of 3 images each task has gone through all the records it has.
    assert all(seen[k] == set(np.flatnonzero(records.present[k]).tolist()) for k in tasks)
    with pytest.raises(ValueError, match="unknown sampling"):
        TaskSampler(records, "random", 3, seed=0)


def _network(tasks: dict) -> MultiTaskNetwork:
    heads = [HeadSpec(k, t.name, int(t.num_classes)) for k, t in tasks.items()]
    spec = MultiTaskSpec("cnn-tiny", 1, 16, [0.5], [0.25], heads)
    torch.manual_seed(0)
    return MultiTaskNetwork(spec, tasks=tasks)


def test_a_task_missing_for_an_image_contributes_nothing():
    tasks = {"seg": build_task("segmentation", ["a", "b"]), "cls": build_task("classification", ["a", "b", "c"])}
    net = _network(tasks).eval()
    x = torch.rand(4, 1, 16, 16)
    seg_targets = [{"mask": torch.randint(0, 3, (16, 16))} for _ in range(2)]
    batch = {"seg": TaskBatch(np.array([1, 3]), seg_targets, np.array([False, True])),
             "cls": TaskBatch(np.arange(4), [{"probs": torch.eye(3)[i % 3]} for i in range(4)], np.zeros(4, bool))}  # fmt: skip
    runtime = build_runtime(build_config({}, ["engine.device=cpu"]).engine)
    losses = task_losses(net, x, batch, {k: v.targets for k, v in batch.items()}, tasks, runtime)
    alone = tasks["seg"].loss(net.head_outputs("seg", net.features(x[[1, 3]])), seg_targets).mean()
    torch.testing.assert_close(losses["seg"], alone)
    # Images 0 and 2 have no segmentation label: changing them leaves that loss alone (eval-mode batch norm).
    y = x.clone()
    y[[0, 2]] = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(task_losses(net, y, batch, {k: v.targets for k, v in batch.items()}, tasks, runtime)["seg"], losses["seg"])
    only_cls = {"cls": batch["cls"]}
    assert set(task_losses(net, x, only_cls, {"cls": batch["cls"].targets}, tasks, runtime)) == {"cls"}


def test_joint_augmentation_moves_the_dense_labels_of_every_task_together():
    tasks = {"seg": build_task("segmentation", ["a", "b"]), "depth": build_task("depth", []),
             "cls": build_task("classification", ["a", "b", "c"])}  # fmt: skip
    torch.manual_seed(0)
    masks = torch.randint(0, 3, (4, 32, 32))
    images = masks[:, None].float() / 2
    batch = {"seg": TaskBatch(np.arange(4), [{"mask": m} for m in masks], np.zeros(4, bool)),
             "depth": TaskBatch(np.array([0, 2, 3]), [{"depth": masks[i].float() + 1} for i in (0, 2, 3)], np.zeros(3, bool)),
             "cls": TaskBatch(np.arange(4), [{"probs": torch.eye(3)[0]}] * 4, np.zeros(4, bool))}  # fmt: skip
    out_images, targets = joint_augment(BatchAugment("S1", scale_range=(0.5, 1.5)), images, batch, tasks)
    assert not torch.equal(out_images, images)
    for n, row in enumerate((0, 2, 3)):
        mask, depth = targets["seg"][row]["mask"], targets["depth"][n]["depth"]
        inside = (mask != IGNORE_INDEX) & (depth > 0)
        assert inside.float().mean() > 0.3 and not torch.equal(mask, masks[row])
        assert torch.equal(depth[inside], mask[inside].float() + 1)  # one warp for both tasks
        assert ((mask == IGNORE_INDEX) == (depth == 0)).all()
    assert targets["cls"] is batch["cls"].targets  # image-level labels do not move


def test_heuristic_loss_weights_are_b_s_lr_i_over_b_i_lr_s():
    cfg = build_config({}, base(
        ["task=depth", "spec=none", "human=pool"],  # teach.batch_size 4, teach.optim.lr 0.05
        ["task=segmentation", "spec=none", "human=pool", "batch_size=16", "lr=0.2"],
    ) + ["must.student.batch_size=32", "must.student.optim.lr=0.1"])  # fmt: skip
    assert heuristic_weights(cfg) == pytest.approx({"depth": 32 * 0.05 / (4 * 0.1), "segmentation": 32 * 0.2 / (16 * 0.1)})


def test_loss_weights_user_sum_and_normalization_by_hand():
    user = TaskLossWeights(["a", "b"], "user", {"a": 2.0, "b": 0.5})
    assert user({"a": torch.tensor(1.5), "b": torch.tensor(4.0)}).item() == pytest.approx(2 * 1.5 + 0.5 * 4)
    assert user({"b": torch.tensor(4.0)}).item() == pytest.approx(2.0)  # a task absent from the step adds nothing
    norm = TaskLossWeights(["a", "b"], "normalized", decay=0.5)
    # Step 1: the averages are the losses (2, 8), mean 5: L = (5/2 * 2 + 5/8 * 8) / 2 = 5.
    assert norm({"a": torch.tensor(2.0), "b": torch.tensor(8.0)}).item() == pytest.approx(5.0)
    # Step 2: averages (0.5*2 + 0.5*4, 0.5*8 + 0.5*8) = (3, 8), mean 5.5: L = (5.5/3 * 4 + 5.5/8 * 8) / 2.
    assert norm({"a": torch.tensor(4.0), "b": torch.tensor(8.0)}).item() == pytest.approx((5.5 / 3 * 4 + 5.5) / 2)
    state = norm.state_dict()
    assert state["average"].tolist() == [3.0, 8.0] and state["count"].tolist() == [2, 2]  # checkpointed for resume
    with pytest.raises(ValueError, match="one weight per task"):
        TaskLossWeights(["a", "b"], "user", {"a": 1.0})


# --------------------------------------------------------------------------- end to end


def test_a_callable_teachers_labels_reach_the_student(tmp_path):
    teachers = [["task=classification", "spec=callable:_must_teachers:always_class_two", f"classes={CLASSES}",
                 "test=scenes:test?n=8"]]  # fmt: skip
    overrides = base(*teachers) + ["must.student.steps=25", "must.student.optim.optimizer=adamw", "must.student.optim.lr=0.01",
                                   "must.student.augment=none"]  # fmt: skip
    out = run_must(build_config({}, overrides), tmp_path / "run")
    store = PseudoLabelStore(out / "must/label")
    assert store.read().column("classification.label").to_pylist() == [CLASS] * 12
    student = load_multitask_network(out / "must/student/model.safetensors").eval()
    test = build_source("scenes:test?n=8")
    with torch.no_grad():
        logits = HeadView(student, "classification")(test.load_batch(np.arange(8)).float() / 255)
    assert (logits.argmax(1) == CLASS).all()  # the student learnt the only class its teacher ever gave
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    top1 = [r for r in rows if r["metric"] == "top1"]
    assert [(r["stage"], r["method"], r["init"], r["round"]) for r in top1] == [("must", "must", "must", "1")]
    assert float(top1[0]["value"]) == pytest.approx(100 * np.mean(test.labels[:8] == CLASS))


def test_cli_must_end_to_end_with_trained_checkpoint_and_ground_truth_teachers(tmp_path):
    out = tmp_path / "run"
    teachers = [["task=segmentation", "data=scenes:train?n=12&seed=1", "test=scenes:test?n=8"], BRIGHT,
                ["task=depth", "spec=none", "human=pool", "human_fraction=0.5", "test=scenes:test?n=8"],
                ["task=detection", "data=scenes:train?n=12&seed=2"]]  # fmt: skip
    sets = [a for o in base(*teachers) + ["must.student.augment=S4"] for a in ("--set", o)]
    result = runner.invoke(app, ["must", "--out", str(out), *sets], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for rel in ["config.yaml", "must/teach/segmentation/teach/model.safetensors", "must/label/manifest.json",
                "must/student/model.json", "must/student/backbone.safetensors", "must/student/done.json"]:  # fmt: skip
        assert (out / rel).exists(), rel
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    got = {(r["task"], r["method"], r["init"], r["metric"]) for r in rows}
    assert {("segmentation", "supervised", "random", "miou"), ("segmentation", "must", "must", "miou"),
            ("depth", "must", "must", "absrel")} <= got  # fmt: skip
    assert all(np.isfinite(float(r["value"])) for r in rows)
    stats = json.loads((out / "must/label/manifest.json").read_text())["stats"]
    # measured against the pool scenes' hidden targets (a 2-step teacher labels few pixels: mIoU needs one)
    assert "coverage" in stats["segmentation"]["quality"] and {"ap", "ap50"} <= set(stats["detection"]["quality"])
    assert "quality" not in stats["depth"]  # ground truth only: no pseudo label to measure
    done = json.loads((out / "must/student/done.json").read_text())
    assert set(done["records"]) == {"segmentation", "bright", "depth", "detection"} and done["records"]["depth"] < 12

    # The backbone loads as any run's model.weights; the trained teacher serves as a checkpoint teacher.
    from selftrain.backbones import build_feature_backbone

    build_feature_backbone("cnn-tiny", in_chans=1, weights=str(out / "must/student/backbone.safetensors"))
    from selftrain.must.transfer import transfer_backbones

    hooks = transfer_backbones(RunFolder(out), build_config({}, base(*teachers) + ["must.student.augment=S4"]))
    assert hooks == {"must": out / "must/student/backbone.safetensors",
                     "supervised:segmentation": out / "must/teach/segmentation/teach/model.safetensors",
                     "supervised:detection": out / "must/teach/detection/teach/model.safetensors"}  # fmt: skip
    before = (out / "must/student/model.safetensors").stat().st_mtime_ns
    result = runner.invoke(app, ["must-student", "--out", str(out), *sets], catch_exceptions=False)
    assert result.exit_code == 0 and (out / "must/student/model.safetensors").stat().st_mtime_ns == before
    ckpt = ["task=segmentation", f"spec=checkpoint:{out / 'must/teach/segmentation'}"]
    _, _, store = label(tmp_path, base(ckpt), "from-checkpoint")
    fingerprint = store.header["fingerprint"]["teachers"]["segmentation"]["model"]["weights"]
    assert fingerprint == file_sha256(out / "must/teach/segmentation/teach/model.safetensors")
    assert runner.invoke(app, ["report", str(out)], catch_exceptions=False).exit_code == 0


def _hub_model(spec: str) -> torch.nn.Module:
    """A 3-class model as timm or torchvision builds it, random weights (nothing downloaded)."""
    kind, name = spec.split(":")
    if kind == "timm":
        import timm

        return timm.create_model(name, pretrained=False, num_classes=3)
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=3)


@pytest.mark.parametrize("spec", ["timm:resnet10t", "torchvision:mobilenet_v3_small"])
def test_timm_and_torchvision_teachers_with_local_weights_label_the_pool(spec, tmp_path):
    from selftrain.checkpoint import save_weights

    save_weights(tmp_path / "w.safetensors", _hub_model(spec).state_dict())
    teacher = ["task=classification", f"spec={spec}", f"weights={tmp_path / 'w.safetensors'}", "classes=[x, y, z]", "input_size=32"]
    _, _, store = label(tmp_path, base(teacher))
    table = store.read()
    probs = np.asarray(table.column("classification.probs").to_pylist())
    assert probs.shape == (12, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert set(table.column("classification.source").to_pylist()) == {PSEUDO}
    assert store.header["fingerprint"]["teachers"]["classification"]["model"]["model"] == spec


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("teacher", "message"),
    [
        (["task=segmentation"], "must.teachers.0.data: a teacher with spec 'train' needs"),
        (["task=segmentation", "spec=onnx:x.onnx"], "must.teachers.0.spec: 'onnx:x.onnx' is not one of"),
        (["task=depth", "spec=callable:nomodule"], "must.teachers.0.spec: callable:pkg.module:function expected"),
        (["task=classification", "spec=timm:resnet18"], "must.teachers.0.weights: a timm teacher needs a local weights"),
        (["task=depth", "spec=none"], "must.teachers.0.human: a task without a teacher"),
        (["task=normals", "spec=none", "human=pool"], "must.teachers.0.task: unknown task 'normals'"),
        (["task=depth", "spec=none", "human=pool", "treshold=0.5"], "must.teachers.0.treshold: unknown key (did you mean 'threshold'?)"),
        (["task=depth", "spec=none", "human=pool", "name=a.b"], "must.teachers.0.name: 'a.b' must be"),
    ],
)  # fmt: skip
def test_config_errors_name_the_teacher_key(teacher, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config({}, base(teacher))


def test_config_refuses_two_teachers_with_one_name_and_bad_list_indices():
    with pytest.raises(ConfigError, match="teacher names must be unique.*repeated: depth"):
        build_config({}, base(["task=depth", "spec=none", "human=pool"], ["task=depth", "spec=none", "human=pool"]))
    with pytest.raises(ConfigError, match="must.teachers is a list of 0; use an index 0..0"):
        build_config({}, ["must.teachers.3.task=depth"])
    with pytest.raises(ConfigError, match="must.teachers: no teacher declared"):
        run_must(build_config({}, ["engine.progress=false"]), "unused")


def test_callable_teacher_that_cannot_be_imported_or_returns_bad_labels_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"must.teachers.0.spec: cannot import callable:_must_teachers:nothing"):
        label(tmp_path, base(["task=depth", "spec=callable:_must_teachers:nothing"]))
    with pytest.raises(ValueError, match=r"teacher 'seg' returned \['masks'\] for task segmentation, which needs a dict with mask"):
        label(tmp_path, base(["task=segmentation", "name=seg", "spec=callable:_must_teachers:wrong_keys", f"classes={CLASSES}"]), "bad")


def test_single_task_configs_are_saved_without_the_must_section():
    from selftrain.config import dump_config

    assert "must:" not in dump_config(build_config({}, []))  # run folders from before MuST still resume
    dumped = dump_config(build_config({}, ["must.loss_weights=user"]))
    assert "must:" in dumped and build_config(yaml.safe_load(dumped)).must.loss_weights == "user"


def test_an_interrupted_student_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from selftrain.must import student as must_student_module

    overrides = base(BRIGHT, DEPTH_HALF) + ["must.student.steps=4", "must.student.augment=S4",
                                            "must.loss_weights=normalized", "must.student.sampling=round-robin"]  # fmt: skip
    cfg = build_config({}, overrides)
    whole = run_must(cfg, tmp_path / "whole")
    calls = []
    real = must_student_module.TaskLossWeights.forward

    def dies_at_the_fourth_step(self, losses):
        calls.append(1)
        if len(calls) == 4:  # after the checkpoint of step 2 (engine.checkpoint_every=2), before step 4's update
            raise KeyboardInterrupt("killed")
        return real(self, losses)

    monkeypatch.setattr(must_student_module.TaskLossWeights, "forward", dies_at_the_fourth_step)
    with pytest.raises(KeyboardInterrupt):
        run_must(cfg, tmp_path / "killed")
    monkeypatch.setattr(must_student_module.TaskLossWeights, "forward", real)
    resumed = run_must(cfg, tmp_path / "killed")
    a = load_file(whole / "must/student/model.safetensors")
    b = load_file(resumed / "must/student/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_students_backbone_round_trips_as_weights_of_a_new_network(tmp_path):
    from selftrain.backbones import build_backbone
    from selftrain.checkpoint import save_weights
    from selftrain.must.network import backbone_state

    tasks = {"seg": build_task("segmentation", ["a", "b"]), "cls": build_task("classification", ["a", "b", "c"])}
    trained = _network(tasks)
    save_weights(tmp_path / "backbone.safetensors", backbone_state(trained))
    torch.manual_seed(1)  # other initial weights: what must.student.init replaces
    student = MultiTaskNetwork(trained.spec, weights=str(tmp_path / "backbone.safetensors"), tasks=tasks)
    for (name, a), (_, b) in zip(trained.backbone.state_dict().items(), student.backbone.state_dict().items()):
        assert torch.equal(a, b), name
    assert not torch.equal(trained.heads["cls"].fc.weight, student.heads["cls"].fc.weight)  # heads start afresh
    # The same file starts a single-task classification backbone (model.weights).
    cnn = build_backbone("cnn-tiny", num_classes=3, in_chans=1, weights=str(tmp_path / "backbone.safetensors"))
    assert torch.equal(cnn.features[0][0].weight, trained.backbone.features[0][0].weight)


def test_a_bad_pool_image_is_skipped_counted_and_named(tmp_path):
    from _formats import write_images

    root = write_images(tmp_path / "pool", [("s", build_source("scenes:train?n=4"))])
    (root / "broken.png").write_bytes(b"")  # zero bytes: not an image
    overrides = base(CLASS_TWO[:3]) + [f"data.unlabeled=imagefolder:{root}", "data.image_size=32"]
    _, _, store = label(tmp_path, overrides)
    manifest = store.manifest
    assert (manifest["total"], manifest["processed"], manifest["skipped"]) == (5, 4, 1)
    assert manifest["skips"][0]["key"].endswith("broken.png") and store.read().num_rows == 4


def test_set_reaches_teachers_of_a_shipped_config():
    from pathlib import Path

    from selftrain.config import load_config

    path = Path(__file__).parents[1] / "configs/must/example.yaml"
    cfg = load_config(path, ["must.teachers.1.spec=none", "must.teachers.1.human=pool", "must.teachers.4.task=keypoints",
                             "must.teachers.4.spec=none", "must.teachers.4.human=pool"])  # fmt: skip
    assert [t.key for t in cfg.must.teachers] == ["segmentation", "depth", "detection", "classification", "keypoints"]
    assert cfg.must.teachers[1].spec == "none" and cfg.must.teachers[1].data == "scenes:train?n=200&seed=2"
    with pytest.raises(ConfigError, match="must.teachers.1.spek: unknown key"):
        load_config(path, ["must.teachers.1.spek=none"])
