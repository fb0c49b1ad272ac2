"""The whole pipeline on a tiny real run, through the CLI and the Python API (SIGKILL resume: test_faults.py)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from _resume import resumed_student_weights, same_weights
from conftest import tiny_overrides
from selftrain.cli import app
from selftrain.config import build_config
from selftrain.pipeline import run_pipeline
from selftrain.results import COLUMNS

runner = CliRunner()


def _cli(*args: str):
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_cli_end_to_end_and_resume_is_a_no_op(small_idx, tmp_path):
    out = tmp_path / "run"
    sets = [a for o in tiny_overrides(small_idx) + ["transfer.protocols=[evaluate, linear]"] for a in ("--set", o)]
    _cli("run", "--out", str(out), *sets)
    for rel in ["config.yaml", "run.json", "data.json", "teach/model.safetensors", "teach/model.json",
                "label/round-1/manifest.json", "label/round-1/selection.parquet", "student/round-1/model.safetensors",
                "student/round-1/metrics.jsonl", "results.csv"]:  # fmt: skip
        assert (out / rel).exists(), rel
    split = json.loads((out / "splits" / "labeled-0.1-seed0.json").read_text())
    n_labeled = len(split["keys"])
    assert 100 <= n_labeled <= 140
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["selftrain"] and "git_commit" in run_info
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert tuple(rows[0].keys()) == COLUMNS
    methods = {(r["method"], r["round"], r["metric"]) for r in rows}
    assert {("supervised", "0", "top1"), ("self-training", "1", "top1"), ("self-training", "1", "linear.top1")} <= methods
    manifest = json.loads((out / "label/round-1/manifest.json").read_text())
    stats = manifest["stats"]["classification"]
    assert manifest["processed"] + manifest["skipped"] == manifest["total"] == 1200 - n_labeled
    assert 0 <= stats["accuracy_all"] <= 1 and sum(stats["per_class"]) == stats["kept"]

    before = (out / "student/round-1/model.safetensors").stat().st_mtime_ns
    _cli("run", "--out", str(out), *sets)  # everything done: nothing retrained
    assert (out / "student/round-1/model.safetensors").stat().st_mtime_ns == before
    _cli("report", str(out))
    assert (out / "report.html").exists() and (out / "report.md").exists()


def test_a_different_config_in_the_same_folder_is_refused(small_idx, tmp_path):
    cfg = build_config({}, tiny_overrides(small_idx) + ["stages=[teach]"])
    run_pipeline(cfg, tmp_path)
    other = build_config({}, tiny_overrides(small_idx) + ["stages=[teach]", "teach.steps=31"])
    with pytest.raises(ValueError, match="different config"):
        run_pipeline(other, tmp_path)


def test_config_errors_exit_with_a_clear_message(tmp_path):
    result = runner.invoke(app, ["config", "--set", "student.stepz=3"])
    assert result.exit_code != 0

    proc = subprocess.run([sys.executable, "-c", "from selftrain.cli import main; main()", "config", "--set", "student.stepz=3"], capture_output=True, text=True)
    assert proc.returncode == 2 and "student.stepz: unknown key" in proc.stderr


def test_rounds_and_hard_balanced_labels(small_idx, tmp_path):
    cfg = build_config({}, tiny_overrides(small_idx) + ["student.rounds=2", "label.hard=true", "label.balance=true", "label.threshold=0.3", "student.init=teacher"])
    run_pipeline(cfg, tmp_path)
    m2 = json.loads((tmp_path / "label/round-2/manifest.json").read_text())
    assert m2["round"] == 2 and m2["filter"]["balance"] is True
    per_class = m2["stats"]["classification"]["per_class"]
    assert len({c for c in per_class if c > 0}) == 1  # balanced: every present class has K records
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert {r["round"] for r in rows if r["method"] == "self-training"} == {"1", "2"}


def test_a_larger_student_backbone_is_trained_exported_and_measured(small_idx, tmp_path):
    cfg = build_config({}, tiny_overrides(small_idx) + ["student.backbone=cnn-small"])
    run_pipeline(cfg, tmp_path)
    teacher = json.loads((tmp_path / "teach/model.json").read_text())["spec"]["backbone"]
    student = json.loads((tmp_path / "student/round-1/model.json").read_text())["spec"]["backbone"]
    assert (teacher, student) == ("cnn-tiny", "cnn-small")
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert any(r["method"] == "self-training" and r["metric"] == "top1" for r in rows)
    with pytest.raises(ValueError, match="student.init=teacher needs the teacher's backbone"):
        run_pipeline(build_config({}, tiny_overrides(small_idx) + ["student.backbone=cnn-small", "student.init=teacher"]), tmp_path / "b")


@pytest.mark.parametrize(
    "view",
    [
        ["student.consistency_augment=S2", "student.erase=0.5"],
        ["student.pool_augment=S2", "student.ema=0.9", "student.erase=0.5", "student.consistency_align=true"],
        ["student.consistency_threshold=adaptive", "student.consistency_balance=true"],
    ],
    ids=["second-view", "shared-pool-view-ema", "adaptive-threshold-balance"],
)
def test_consistency_student_logs_its_self_labels_and_resumes_to_the_same_weights(small_idx, tmp_path, view):
    from safetensors.torch import load_file

    threshold = [] if "student.consistency_threshold=adaptive" in view else ["student.consistency_threshold=0.3"]
    extra = ["student.consistency=1", *threshold, *view,
             "student.alpha_final=0", "student.loss=sum", "engine.threads=1"]  # fmt: skip
    cfg = build_config({}, tiny_overrides(small_idx) + extra)
    run_pipeline(cfg, tmp_path / "a")
    rows = [json.loads(line) for line in open(tmp_path / "a/student/round-1/metrics.jsonl")]
    assert all(0 <= r["self_labeled"] <= 1 and r["loss_consistency"] >= 0 for r in rows)
    assert rows[-1]["self_labeled"] > 0  # a threshold of 0.3 over 10 classes keeps some self-labels by step 30
    assert any(r["method"] == "self-training" for r in csv.DictReader(open(tmp_path / "a/results.csv")))
    # Interrupted after the step-20 checkpoint: the resumed student ends with the same weights.
    b = resumed_student_weights(cfg, tmp_path / "b", last_step=30)
    a = load_file(tmp_path / "a/student/round-1/model.safetensors")
    assert same_weights(a, b)
    last = load_file(tmp_path / "b/student/round-1/checkpoints/step-0000030/model.safetensors")  # the last step's own weights
    assert last.keys() == a.keys()
    averaged = any(not torch.equal(a[k], last[k]) for k in a if a[k].is_floating_point())
    assert averaged == ("student.ema=0.9" in view)  # with ema the export is the average, not the last step


def test_random_erasing_blanks_one_patch_of_each_pool_image():
    from selftrain.student import _eraser

    assert _eraser(0.0) is None
    torch.manual_seed(0)
    images = torch.ones(16, 1, 28, 28)
    erased = _eraser(1.0)(images)
    blank = (erased == 0).flatten(1).float().mean(1)  # the share of each image that was erased
    assert erased.shape == images.shape and torch.all(blank >= 0.015) and torch.all(blank <= 0.34)
    assert torch.all((erased == 0) | (erased == 1))  # the rest is untouched
    with pytest.raises(ValueError, match="student.erase"):
        build_config({}, ["student.erase=1.5"])


def test_the_exported_average_is_torchs_ema_of_the_steps_weights():
    from selftrain.student import _weight_average

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = _weight_average(net, 0.5)
    assert _weight_average(net, None) is None
    for value in (1.0, 3.0, 5.0):
        with torch.no_grad():
            net[0].weight.fill_(value)
            net[1].running_mean.fill_(value)
        ema.update_parameters(net)
    # first update copies, then w <- 0.5 w + 0.5 new: 1 -> 2 -> 3.5; buffers are averaged the same way
    assert torch.allclose(ema.module[0].weight, torch.full((2, 2), 3.5))
    assert torch.allclose(ema.module[1].running_mean, torch.full((2,), 3.5))


def test_consistency_options_without_the_term_or_on_a_dense_task_are_errors(small_idx):
    with pytest.raises(ValueError, match="student.consistency_augment: options of the consistency term, which is off"):
        build_config({}, tiny_overrides(small_idx) + ["student.consistency_augment=S2"])
    with pytest.raises(ValueError, match="student.consistency_align: options of the consistency term, which is off"):
        build_config({}, tiny_overrides(small_idx) + ["student.consistency_align=true"])
    with pytest.raises(ValueError, match="student.consistency_balance: options of the consistency term, which is off"):
        build_config({}, tiny_overrides(small_idx) + ["student.consistency_balance=true"])
    with pytest.raises(ValueError, match="student.consistency_threshold: options of the consistency term, which is off"):
        build_config({}, tiny_overrides(small_idx) + ["student.consistency_threshold=adaptive"])
    with pytest.raises(ValueError, match=r"student.consistency_threshold: 1.5 is not in \(0, 1\]"):
        build_config({}, tiny_overrides(small_idx) + ["student.consistency=1", "student.consistency_threshold=1.5"])
    with pytest.raises(ValueError, match="student.consistency_threshold"):
        build_config({}, tiny_overrides(small_idx) + ["student.consistency=1", "student.consistency_threshold=sometimes"])
    with pytest.raises(ValueError, match="student.consistency: the self-label term is for classification and segmentation, not depth"):
        build_config({}, ["task=depth", "student.consistency=1"])
    build_config({}, ["task=segmentation", "student.consistency=1", "student.consistency_threshold=0.9"])
    for option in ("student.consistency_align=true", "student.consistency_balance=true"):
        with pytest.raises(ValueError, match="class-frequency options of the image-level self-labels"):
            build_config({}, ["task=segmentation", "student.consistency=1", option])


def test_alignment_prior_is_the_labeled_splits_class_frequencies():
    from types import SimpleNamespace

    from selftrain.student import _alignment
    from selftrain.tasks.classification import Classification

    labels = np.array([0, 0, 1, 2, 2, 2, 1, -1])
    data = SimpleNamespace(labeled=SimpleNamespace(labels=labels), labeled_idx=np.array([0, 1, 2, 3, 4, 5, 7]))
    align = _alignment(data, Classification(3))  # image 7 is unlabeled (-1), image 6 outside the split
    assert torch.allclose(align.prior, torch.tensor([2 / 6, 1 / 6, 3 / 6], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"classes \[3\] have no labeled image"):
        _alignment(data, Classification(4))


def _write_folder(root: Path, images: np.ndarray, labels: np.ndarray | None, classes: list[str]) -> None:
    for i, img in enumerate(images):
        folder = root / classes[labels[i]] if labels is not None else root / f"part{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).convert("RGB").save(folder / f"{i:04d}.png")


def test_imagefolder_pipeline_with_bad_images(small_idx, tmp_path):
    from selftrain.data import build_source

    src = build_source(small_idx["train"])
    x = src.load_batch(np.arange(300))[:, 0].numpy()
    y = src.labels[:300]
    classes = [f"class_{c}" for c in range(10)]
    _write_folder(tmp_path / "train", x[:100], y[:100], classes)
    _write_folder(tmp_path / "pool", x[100:220], None, classes)
    _write_folder(tmp_path / "test", x[220:], y[220:], classes)
    (tmp_path / "pool" / "part0" / "zero.jpg").write_bytes(b"")
    (tmp_path / "pool" / "part1" / "garbage.png").write_bytes(os.urandom(300))
    (tmp_path / "train" / "class_0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    overrides = tiny_overrides(small_idx) + [
        f"data.labeled=imagefolder:{tmp_path / 'train'}", f"data.unlabeled=imagefolder:{tmp_path / 'pool'}",
        f"data.test=imagefolder:{tmp_path / 'test'}", "data.label_fraction=1.0", "data.image_size=28", "data.channels=1",
    ]  # fmt: skip
    run_pipeline(build_config({}, overrides), tmp_path / "out")
    manifest = json.loads((tmp_path / "out/label/round-1/manifest.json").read_text())
    assert manifest["total"] == 122 and manifest["skipped"] == 2 and manifest["processed"] == 120
    assert {s["key"] for s in manifest["skips"]} == {"part0/zero.jpg", "part1/garbage.png"}
    data = json.loads((tmp_path / "out/data.json").read_text())
    assert data["labeled"]["skipped"] == 1 and data["labeled"]["processed"] + 1 == data["labeled"]["total"]
    with pytest.raises(Exception, match="broken.jpg"):
        run_pipeline(build_config({}, overrides + ["data.strict=true"]), tmp_path / "strict")


def test_demo_grid_writes_one_folder_per_cell_and_a_report(small_idx, tmp_path):
    sets = [a for o in tiny_overrides(small_idx) for a in ("--set", o)]
    result = _cli("demo", "--out", str(tmp_path), "--seeds", "0,1", "--label-fractions", "0.05,0.1", *sets)
    for fraction in ("0.05", "0.1"):
        for seed in (0, 1):
            assert (tmp_path / f"fraction-{fraction}" / f"seed-{seed}" / "results.csv").exists()
    assert "supervised" in result.output and "self-training" in result.output
    html = (tmp_path / "report.html").read_text()
    assert "<table" in html and "data-mean" in html


def test_the_demo_recipe_in_code_is_the_shipped_demo_config():
    from selftrain.config import dump_config, load_config
    from selftrain.demo import DEMO_RECIPE

    shipped = load_config(Path(__file__).parents[1] / "configs" / "demo.yaml")
    assert dump_config(build_config(DEMO_RECIPE)) == dump_config(shipped)


def test_segmentation_self_labels_follow_the_views_geometry():
    import kornia.augmentation as K

    from selftrain.augment import BatchAugment
    from selftrain.engine import Runtime
    from selftrain.student import _mask_consistency
    from selftrain.tasks.segmentation import Segmentation

    class Pointwise(torch.nn.Module):  # logits from each pixel alone: a flip of the image flips the prediction
        def forward(self, x):
            return torch.cat([8 * (0.5 - x), 8 * (x - 0.5)], dim=1)  # class 1 where bright; unsure near 0.5

    cpu = Runtime(torch.device("cpu"), "32-true", channels_last=False)
    task = Segmentation(num_classes=2)
    images = torch.zeros(2, 1, 8, 8)
    images[:, :, :, :3] = 1.0  # bright left side: class 1, confident
    images[:, :, :, 3:5] = 0.55  # unsure columns: softmax 0.69 < 0.9, ignored
    same = BatchAugment("none")
    loss, kept = _mask_consistency(Pointwise(), task, images, same, None, cpu, threshold=0.9)
    probs = Pointwise()(images).softmax(1)
    confident = probs.max(1).values >= 0.9
    expected = (-probs.max(1).values.log() * confident).mean()  # CE of each kept pixel against its own argmax
    assert kept.item() == pytest.approx(6 / 8) and loss.item() == pytest.approx(expected.item(), rel=1e-4)
    flip = BatchAugment("S1")
    flip.geometric = K.AugmentationSequential(K.RandomHorizontalFlip(p=1.0))
    flip.photometric = None
    # The view is mirrored: had its self-label masks not been mirrored with it, the bright columns
    # (now on the right) would be labeled background and the loss would be large.
    loss_f, kept_f = _mask_consistency(Pointwise(), task, images, flip, None, cpu, threshold=0.9)
    assert kept_f.item() == pytest.approx(6 / 8) and loss_f.item() == pytest.approx(loss.item(), rel=1e-3)  # interpolation
