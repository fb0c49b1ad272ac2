"""The dense tasks (segmentation, depth, detection, keypoints) through teach -> label -> student -> transfer,
on scenes and on the same scenes written as COCO, VOC and depth files."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _formats import scene_set, write_coco, write_depth, write_images, write_voc
from _resume import resumed_student_weights, same_weights
from typer.testing import CliRunner

from selftrain.cli import app
from selftrain.config import FILE_IMAGE_SIZE, ConfigError, build_config
from selftrain.data import build_source
from selftrain.data.targets import IGNORE_INDEX
from selftrain.network import Network, NetworkSpec, load_network
from selftrain.outputs import RunFolder
from selftrain.pipeline import prepare_data, run_pipeline
from selftrain.store import PseudoLabelStore
from selftrain.tasks import build_task
from selftrain.tasks.detection import DetectionHead
from selftrain.tasks.keypoints import gaussian_heatmaps

runner = CliRunner()
METRICS = {"segmentation": {"miou", "pixel_acc"}, "depth": {"absrel", "rmse", "delta1"}, "detection": {"ap", "ap50"},
           "keypoints": {"nme"}}  # fmt: skip
DENSE = list(METRICS)


def assert_rows_with_margins(rows: list[dict], task: str) -> None:
    """Teacher and student rows of each metric, and the student's margin over the teacher (student - teacher)."""
    got = {(r["method"], r["round"], r["metric"]) for r in rows}
    measured = {(m, r, k) for m, r in (("supervised", "0"), ("self-training", "1")) for k in METRICS[task]}
    assert got == measured | {("self-training", "1", f"margin.{k}") for k in METRICS[task]}
    value = {(r["method"], r["metric"]): float(r["value"]) for r in rows}
    for k in METRICS[task]:
        margin = value["self-training", k] - value["supervised", k]
        assert value["self-training", f"margin.{k}"] == pytest.approx(margin, abs=1e-3)


def dense_overrides(task: str) -> list[str]:
    """A run of a few seconds: 48 scenes of 64 px (10 labeled), 16 test scenes, a handful of steps."""
    return [
        f"task={task}", "data.labeled=scenes:train?n=48", "data.unlabeled=scenes:train?n=48",
        "data.test=scenes:test?n=16", "data.label_fraction=0.2", "model.backbone=cnn-tiny",
        "teach.steps=3", "teach.batch_size=8", "student.steps=3", "student.human_batch_size=4",
        "student.pseudo_batch_size=8", "student.augment=S4", "label.shard_size=16", "label.batch_size=8",
        "engine.checkpoint_every=2", "engine.progress=false", "engine.eval_batch_size=8", "engine.threads=1",
        "teach.optim.optimizer=adamw", "teach.optim.lr=0.001", "student.optim.optimizer=adamw", "student.optim.lr=0.001",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def scenes():
    return build_source("scenes:train?n=8")


@pytest.mark.parametrize("task", DENSE)
def test_cli_runs_a_dense_task_end_to_end_with_a_report(task, tmp_path):
    out = tmp_path / "run"
    # The pool's own view (S3) beside the human images' S4: the student's split augmentation path runs for
    # every dense task (alignment of targets under each transform: test_augment_dense.py).
    sets = [a for o in dense_overrides(task) + ["student.pool_augment=S3"] for a in ("--set", o)]
    result = runner.invoke(app, ["run", "--out", str(out), *sets], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert_rows_with_margins(rows, task)
    assert {r["task"] for r in rows} == {task}
    assert {(r["method"], r["augment"]) for r in rows} == {("supervised", "S1"), ("self-training", "S4 (pool S3)")}
    assert all(np.isfinite(float(r["value"])) for r in rows)

    manifest = json.loads((out / "label/round-1/manifest.json").read_text())
    stats = manifest["stats"][task]
    n_pool = 48 - len(json.loads((out / "splits/labeled-0.2-seed0.json").read_text())["keys"])
    assert manifest["processed"] == manifest["total"] == stats["records"] == stats["kept"] == n_pool
    assert stats["mean_confidence"] is not None and "quality" in stats  # the scene pool has hidden targets
    expected_quality = {"segmentation": {"coverage"}, "depth": METRICS["depth"], "detection": METRICS["detection"],
                        "keypoints": {"coverage", "nme_all"}}  # fmt: skip
    assert expected_quality[task] <= set(stats["quality"])

    for name in ("teach/model.safetensors", "student/round-1/model.safetensors"):
        net = load_network(out / name)  # the exported spec rebuilds the dense network
        assert net.spec.task == task and net.head is not None

    result = runner.invoke(app, ["report", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    md = (out / "report.md").read_text()
    headline = {"segmentation": "miou", "depth": "absrel (lower is better)", "detection": "ap",
                "keypoints": "nme (lower is better)"}[task]  # fmt: skip
    assert f"{task}, transfer stage, {headline}" in md
    assert "Quality (all records)" in md
    if task in ("depth", "keypoints"):
        assert "a negative Δ is the improvement" in md


def _outputs(task_name: str, scenes) -> tuple:
    """Teacher-like outputs of a random net for 3 images, with some pixels / boxes / points that pass the thresholds."""
    torch.manual_seed(0)
    task = build_task(task_name, scenes)
    if task_name == "keypoints":  # Gaussian maps at random places, peaks between 0.2 and 1
        points = torch.cat([torch.rand(3, task.num_points, 2) * 60 + 2, torch.ones(3, task.num_points, 1)], dim=2)
        peaks = torch.rand(3, task.num_points, 1, 1) * 0.8 + 0.2
        return task, gaussian_heatmaps(points, 64, 64, task.sigma) * peaks
    if task_name == "detection":
        head = DetectionHead([8, 16, 32], [1, 2, 4], task.num_classes)
        feats = [torch.randn(3, c, 64 // s, 64 // s) for c, s in ((8, 1), (16, 2), (32, 4))]
        with torch.no_grad():
            outputs = head(feats)
        # Untrained FCOS scores are ~0.1 (its prior); spread them so some boxes pass 0.5 and some do not.
        outputs["cls_logits"] = torch.randn_like(outputs["cls_logits"]) * 3
        outputs["centerness"] = torch.randn_like(outputs["centerness"]) * 3
        return task, outputs
    channels = task.num_classes
    return task, torch.randn(3, channels, 64, 64) * 3


@pytest.mark.parametrize("task_name", DENSE)
def test_dense_pseudo_labels_round_trip_through_parquet(task_name, scenes, tmp_path):
    task, outputs = _outputs(task_name, scenes)
    label_cfg = build_config({}, [f"task={task_name}"]).label
    encoded = task.encode_pseudo(outputs, **task.pseudo_options(label_cfg))
    columns = task.encode_records(outputs, label_cfg)
    table = pa.table({"key": pa.array(["a", "b", "c"]), "index": pa.array([0, 1, 2], pa.int64()),
                      **task.pseudo_table_columns([columns])})  # fmt: skip
    pq.write_table(table, tmp_path / "shard.parquet")
    decoded = task.decode_rows(pq.read_table(tmp_path / "shard.parquet"))
    assert len(decoded) == 3
    for got, want in zip(decoded, encoded):
        assert set(got) == set(want)
        for key in want:
            expected = want[key].half().float() if key == "depth" else want[key]  # depth is stored as float16
            assert got[key].dtype == expected.dtype and torch.equal(got[key], expected), key
    if task_name == "segmentation":
        assert (decoded[0]["mask"] == IGNORE_INDEX).any() and (decoded[0]["mask"] != IGNORE_INDEX).any()
    if task_name == "keypoints":
        v = torch.stack([t["keypoints"][:, 2] for t in decoded])
        assert (v == 0).any() and (v >= label_cfg.point_threshold).any()  # some points under, some over 0.5
    if task_name == "detection":
        assert sum(len(t["boxes"]) for t in decoded) > 0
        assert table.column("detection.confidence").to_pylist() == pytest.approx(
            [float(t["scores"].mean()) if len(t["scores"]) else 0.0 for t in encoded]
        )
    empty = pa.table(task.pseudo_table_columns([]))  # a shard of only bad images keeps the schema
    assert empty.num_rows == 0 and empty.schema.equals(pa.table(task.pseudo_table_columns([columns])).schema)


@pytest.mark.parametrize(
    "threshold, kept", [(0.5, [1, 1, 1, 0, 0]), (0.1, [1, 1, 1, 1, 1]), (0.9, [1, 0, 0, 0, 0])]
)
def test_keypoint_pseudo_points_under_the_point_threshold_are_missing(threshold, kept, scenes):
    task = build_task("keypoints", scenes)
    points = torch.tensor([[[10.5, 12.5, 1], [50.5, 8.5, 1], [30.5, 30.5, 1], [5.5, 60.5, 1], [44.5, 40.5, 1]]])
    peaks = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2])
    heatmaps = gaussian_heatmaps(points, 64, 64, task.sigma) * peaks[None, :, None, None]
    label_cfg = build_config({}, ["task=keypoints", f"label.point_threshold={threshold}"]).label
    columns = task.encode_records(heatmaps, label_cfg)
    (row,) = task.decode_rows(pa.table(task.pseudo_table_columns([columns])))
    got = row["keypoints"]
    assert got[:, 2].tolist() == pytest.approx((peaks * torch.tensor(kept)).tolist())  # v = confidence, or 0
    assert torch.allclose(got[:, :2], points[0, :, :2], atol=1e-4)  # the teacher's place is kept either way
    assert columns["keypoints.confidence"] == pytest.approx([0.6])  # mean peak, whatever the threshold


@pytest.mark.parametrize("task_name", DENSE)
def test_dense_network_saves_and_reloads(task_name, scenes, tmp_path):
    from selftrain.engine import export_model

    task = build_task(task_name, scenes)
    spec = NetworkSpec("cnn-tiny", task.num_classes, 1, 64, [0.3], [0.2], list(scenes.classes), task=task_name)
    net = Network(spec).eval()
    export_model(tmp_path / "model.safetensors", net, {"spec": spec.__dict__})
    again = load_network(tmp_path / "model.safetensors").eval()
    x = torch.rand(2, 1, 64, 64)
    a, b = net(x), again(x)
    if isinstance(a, dict):
        assert all(torch.equal(a[k], b[k]) for k in a)
    else:
        assert torch.equal(a, b)


def test_dense_label_interrupted_and_resumed_gives_the_records_of_an_uninterrupted_run(tmp_path, monkeypatch):
    cfg = build_config({}, dense_overrides("segmentation") + ["label.shard_size=8"])
    run_pipeline(cfg, tmp_path / "a", stages=["teach", "label"])
    run_pipeline(cfg, tmp_path / "b", stages=["teach"])
    (tmp_path / "b/teach/model.safetensors").write_bytes((tmp_path / "a/teach/model.safetensors").read_bytes())

    real_write = PseudoLabelStore.write_shard
    written = []

    def write_then_die(self, shard_id, table):
        if len(written) == 2:
            raise KeyboardInterrupt("killed after two shards")
        real_write(self, shard_id, table)
        written.append(shard_id)

    monkeypatch.setattr(PseudoLabelStore, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, tmp_path / "b", stages=["label"])
    partial = PseudoLabelStore(tmp_path / "b/label/round-1")
    assert not partial.complete and len(partial.done_shards()) == 2
    monkeypatch.setattr(PseudoLabelStore, "write_shard", real_write)
    run_pipeline(cfg, tmp_path / "b", stages=["label"])

    a = PseudoLabelStore(tmp_path / "a/label/round-1")
    b = PseudoLabelStore(tmp_path / "b/label/round-1")
    assert b.complete and a.read().equals(b.read())
    assert len(set(b.read().column("key").to_pylist())) == a.read().num_rows
    assert a.manifest["stats"] == b.manifest["stats"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["task=detection", "label.balance=true"], "class balancing is for classification"),
        (["task=depth", "label.threshold=0.2"], "depth pseudo labels have no confidence"),
        (["task=segmentation", "label.temperature=2"], "label.temperature / label.hard"),
        (["task=segmentation", "transfer.protocols=[evaluate, linear]"], "linear and finetune"),
        (["task=keypoints", "label.hard=true"], "points with confidences"),
    ],
)
def test_options_that_mean_nothing_for_a_dense_task_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config({}, overrides)


def test_a_dense_task_on_a_source_without_its_targets_is_refused(small_idx, tmp_path):
    cfg = build_config({}, [f"data.labeled={small_idx['train']}", f"data.unlabeled={small_idx['train']}",
                            f"data.test={small_idx['test']}", "task=segmentation", "engine.progress=false"])  # fmt: skip
    with pytest.raises(ValueError, match="has no mask targets"):
        run_pipeline(cfg, tmp_path)


def test_the_report_reads_a_lower_is_better_metric_the_right_way_round(tmp_path):
    from selftrain.report import build_report
    from selftrain.results import ResultRow, ResultsTable, main_table

    def row(method: str, round_: int, value: float) -> ResultRow:
        return ResultRow("transfer", method, "random", "S1", "depth", "scenes:test", 0.1, 0, round_, "absrel", value, 1.0)

    rows = [row("supervised", 0, 0.30), row("self-training", 1, 0.25)]
    _, (delta,) = main_table(rows)
    assert delta["metric"] == "absrel" and delta["delta"] == pytest.approx(-0.05) and delta["better"] is True
    ResultsTable(tmp_path / "results.csv").add(rows)
    build_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "absrel (lower is better)" in md and "-0.05 ± 0 (n=1 paired, better)" in md


# ------------------------------------------------------------------ the same runs on real annotation formats


@pytest.fixture(scope="module")
def formats(tmp_path_factory) -> dict[str, str]:
    """Scenes written in the real formats -> URIs. The labeled sets hold 16 images of two sizes
    (8 at 40 px, 8 at 48 px), the test sets 8 held-out scenes, the pool folder 8 more images."""
    root = tmp_path_factory.mktemp("formats")
    train = [("a", scene_set("train", 8, 40)), ("b", scene_set("train", 8, 48, seed=1))]
    test = [("t", scene_set("test", 8, 40))]
    labeled = write_coco(root / "coco" / "labeled.json", train)
    doc = json.loads(labeled.read_text())  # one malformed annotation: a box of zero width
    doc["annotations"].append({"id": 999, "image_id": 1, "category_id": 7, "bbox": [5, 5, 0, 9], "iscrowd": 0})
    labeled.write_text(json.dumps(doc))
    write_coco(root / "coco" / "test.json", test)
    return {
        "coco": f"coco:{labeled}", "coco-test": f"coco:{root / 'coco' / 'test.json'}",
        "voc": f"voc:{write_voc(root / 'voc', train)}?classes=4", "voc-test": f"voc:{write_voc(root / 'voc-test', test)}?classes=4",
        "depth": f"depth:{write_depth(root / 'depth', train)}", "depth-test": f"depth:{write_depth(root / 'depth-test', test)}",
        "pool": f"imagefolder:{write_images(root / 'pool', [('p', scene_set('train', 8, 44, seed=2))])}",
    }  # fmt: skip


def format_overrides(task: str, labeled: str, unlabeled: str, test: str) -> list[str]:
    """The few-second dense run, on files: half of the 16 labeled images keep their labels, 32 px."""
    data = [f"data.labeled={labeled}", f"data.unlabeled={unlabeled}", f"data.test={test}", "data.label_fraction=0.5"]
    return dense_overrides(task) + data + ["data.image_size=32"]


@pytest.mark.parametrize(
    "task, labeled, unlabeled, test",
    [
        ("detection", "coco", "coco", "coco-test"),  # the pool is the labeled file outside the split
        ("segmentation", "coco", "pool", "coco-test"),
        ("segmentation", "voc", "pool", "voc-test"),  # the pool is a folder of unlabeled images
        ("depth", "depth", "depth", "depth-test"),
    ],
)
def test_a_run_on_real_annotation_formats(task, labeled, unlabeled, test, formats, tmp_path):
    out = run_pipeline(build_config({}, format_overrides(task, formats[labeled], formats[unlabeled], formats[test])), tmp_path)
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert_rows_with_margins(rows, task)
    assert all(np.isfinite(float(r["value"])) for r in rows) and {r["dataset"] for r in rows} == {formats[test]}

    split = json.loads((out / "splits/labeled-0.5-seed0.json").read_text())
    assert split["meta"]["stratified"] is (task != "depth")  # depth maps name no class: a plain permutation
    store = PseudoLabelStore(out / "label/round-1")
    manifest, stats = store.manifest, store.manifest["stats"][task]
    n_pool = 16 - len(split["keys"]) if unlabeled == labeled else 8
    assert store.complete and manifest["processed"] == manifest["total"] == stats["records"] == n_pool
    assert store.read(columns=["key"]).num_rows == n_pool
    # Hidden targets (quality statistics) only where the pool is the labeled file.
    assert ("quality" in stats) is (unlabeled == labeled)
    assert load_network(out / "teach/model.safetensors").spec.image_size == 32

    data = json.loads((out / "data.json").read_text())
    assert data["labeled"]["total"] == data["labeled"]["processed"] == 16 and data["test"]["processed"] == 8
    if labeled == "coco":  # the malformed annotation was dropped, counted and named in the data manifest
        assert data["labeled"]["annotation_skips"] == 1
        (record,) = data["labeled"]["annotation_skip_records"]
        assert record["key"] == "a000.png" and "annotation 999: zero or negative area" in record["reason"]


def test_unstratified_splits_of_a_depth_source_are_nested_repeatable_and_sized(formats, tmp_path, caplog):
    def keys(fraction: float, out) -> list[str]:
        cfg = build_config({}, format_overrides("depth", formats["depth"], formats["depth"], formats["depth-test"])
                           + [f"data.label_fraction={fraction}", "data.image_size="])  # fmt: skip
        with caplog.at_level(logging.INFO, logger="selftrain"):
            data = prepare_data(cfg, RunFolder(out))
        assert data.classes == [] and data.image_size == FILE_IMAGE_SIZE  # unset: image files come out at 32 px
        assert data.labeled.load(0).shape[-2:] == data.test.load(0).shape[-2:] == (32, 32)
        assert data.labeled.load_targets(0)["depth"].shape == (32, 32)
        assert data.pool_targets is data.labeled  # the pool's hidden depth maps, for the label statistics
        return [data.labeled.key(int(i)) for i in data.labeled_idx]

    quarter, half = keys(0.25, tmp_path / "a"), keys(0.5, tmp_path / "a")
    assert len(quarter) == 4 and len(half) == 8 and set(quarter) < set(half)
    assert keys(0.25, tmp_path / "a") == quarter == keys(0.25, tmp_path / "b")  # reloaded, and drawn again
    assert "data.image_size not set" in caplog.text


def test_segmentation_checks_the_mask_convention_of_a_source(formats, tmp_path):
    for uri in (formats["voc"], formats["coco"]):
        source = build_source(uri, image_size=32)
        assert source.mask_classes == ["background", *source.classes]
        build_task("segmentation", source.classes).check_source(source, "data.labeled")  # accepted
        # Background last (what the COCO reader used to do) or nothing declared: refused, saying why.
        task = build_task("segmentation", source.classes)
        source.mask_classes = [*source.classes, "background"]
        with pytest.raises(ValueError, match=r"has mask values \[.*'background'\]; a segmentation run needs mask value 0"):
            task.check_source(source, "data.labeled")
        source.mask_classes = None
        with pytest.raises(ValueError, match=r"does not say what its mask values mean"):
            task.check_source(source, "data.labeled")
    # A COCO file without segmentations is a detection source only.
    doc = json.loads(Path(formats["coco-test"].removeprefix("coco:")).read_text())
    boxes_only = tmp_path / "boxes.json"
    boxes_only.write_text(json.dumps({**doc, "annotations": [{k: v for k, v in a.items() if k != "segmentation"}
                                                                for a in doc["annotations"]]}))  # fmt: skip
    source = build_source(f"coco:{boxes_only}?images={Path(formats['coco-test'][5:]).parent}")
    assert source.mask_classes is None and source.target_keys == ("boxes", "labels")
    build_task("detection", source.classes).check_source(source, "data.labeled")
    with pytest.raises(ValueError, match="has no mask targets"):
        build_task("segmentation", source.classes).check_source(source, "data.labeled")


def test_a_test_set_with_other_classes_is_refused(formats, tmp_path):
    cfg = build_config({}, format_overrides("segmentation", formats["coco"], formats["pool"], formats["voc-test"]))
    with pytest.raises(ValueError, match=r"data.test=.* has the classes \['class_1'.*'trouser'.*measured on the classes"):
        prepare_data(cfg, RunFolder(tmp_path))


@pytest.mark.parametrize("task", ["segmentation", "depth", "keypoints", "detection"])
def test_a_saved_dense_config_loads_back(task, tmp_path):
    from selftrain.config import dump_config, load_config

    path = tmp_path / "config.yaml"
    path.write_text(dump_config(build_config({}, [f"task={task}"])))  # every default written out
    assert dump_config(load_config(path)) == path.read_text()


def test_segmentation_student_with_self_labels_logs_them_and_resumes_to_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    extra = ["student.consistency=1", "student.consistency_threshold=0.05", "student.consistency_augment=S2",
             "student.steps=4", "student.pool_augment=S1", "student.augment=S1"]  # fmt: skip
    cfg = build_config({}, dense_overrides("segmentation") + extra)
    run_pipeline(cfg, tmp_path / "a")
    rows = [json.loads(line) for line in open(tmp_path / "a/student/round-1/metrics.jsonl")]
    assert rows and all(0 <= r["self_labeled"] <= 1 and r["loss_consistency"] >= 0 for r in rows)
    # A pixel's top softmax over 11 classes is at least 1/11 > 0.05: every pixel is self-labeled except where
    # the view's shift and scale brought in padding, which is ignored.
    assert all(0.5 < r["self_labeled"] < 1 for r in rows)
    # Interrupted after the step-2 checkpoint: the resumed student ends with the same weights.
    b = resumed_student_weights(cfg, tmp_path / "b", last_step=4)
    assert same_weights(load_file(tmp_path / "a/student/round-1/model.safetensors"), b)
