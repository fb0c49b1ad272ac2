"""The pretrain stage: every method trains, the probe stays off the backbone, exports load, runs resume."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import tiny_overrides
from selftrain.backbones import build_backbone
from selftrain.cli import app
from selftrain.config import ConfigError, PretrainConfig, build_config
from selftrain.engine import Runtime
from selftrain.pipeline import run_pipeline
from selftrain.pretrain import build_pretrain_model, init_name, pretrain_step
from selftrain.pretraining import METHODS, build_method

CPU = Runtime(torch.device("cpu"), "32-true", channels_last=False)
METHOD_NAMES = ("supervised", "simclr", "moco", "byol", "swav")


def _method(name: str, **options):
    cfg = PretrainConfig(method=name, data="mnist:train" if name == "supervised" else None, hidden_dim=32,
                         projection_dim=16, **options)  # fmt: skip
    torch.manual_seed(0)
    backbone = build_backbone("cnn-tiny", num_classes=0, in_chans=1)
    return build_method(name, backbone, cfg, steps=10, image_size=28, channels=1, num_classes=4, mean=[0.3], std=[0.3])


def _batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 4, (n,), generator=g)


def _pretrain_overrides(small_idx, *extra: str) -> list[str]:
    return tiny_overrides(small_idx) + ["pretrain.steps=6", "pretrain.batch_size=16", "pretrain.hidden_dim=32",
                                        "pretrain.projection_dim=16", *extra]  # fmt: skip


def test_every_config_method_is_registered():
    assert set(METHOD_NAMES) == set(METHODS.names()) == set(PretrainConfig.model_fields["method"].annotation.__args__)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_each_method_trains_a_few_steps_with_a_finite_loss(name):
    options = {"swav": {"prototypes": 10}}.get(name, {})
    model = _method(name, **({"swav": PretrainConfig().swav.model_copy(update=options)} if options else {}))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    images, labels = _batch()
    for step in range(3):
        loss, feats = model.loss(model.views(images), labels, step)
        assert torch.isfinite(loss) and feats.shape == (8, model.dim)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(not torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())


def test_momentum_encoders_follow_the_online_ones_without_gradients():
    model = _method("byol")
    assert not any(p.requires_grad for p in model.backbone_momentum.parameters())
    images, labels = _batch()
    loss, _ = model.loss(model.views(images), labels, 0)
    loss.backward()
    assert all(p.grad is None for p in model.backbone_momentum.parameters())


def test_swav_multi_crop_views_and_scores():
    swav = PretrainConfig().swav.model_copy(update={"prototypes": 12, "local_crops": 4, "local_size": 0.5})
    model = _method("swav", swav=swav)
    images, labels = _batch(6)
    views = model.views(images)
    assert [tuple(v.shape) for v in views] == [(6, 1, 28, 28)] * 2 + [(6, 1, 14, 14)] * 4
    scores, feats = model._scores(views[2:])
    assert len(scores) == 4 and scores[0].shape == (6, 12) and feats.shape == (24, model.dim)
    default = _method("swav").views(images)
    assert len(default) == 8 and default[-1].shape[-1] == round(0.43 * 28)  # FRL: 2 global + 6 local crops


def test_views_are_random_per_sample_and_in_range():
    model = _method("simclr")
    images = _batch(1)[0].expand(4, -1, -1, -1)
    v0, v1 = model.views(images)
    assert v0.min() >= 0 and v0.max() <= 1
    assert not torch.equal(v0[0], v0[1]) and not torch.equal(v0, v1)


def test_online_probe_sees_detached_features(small_idx, tmp_path):
    from selftrain.pipeline import prepare_data
    from selftrain.outputs import RunFolder

    cfg = build_config({}, _pretrain_overrides(small_idx))
    data = prepare_data(cfg, RunFolder(tmp_path))
    model = build_pretrain_model(cfg, data.pool, data.pool_idx, data.image_size, data.channels)
    assert model.probe is not None and model.probe.out_features == 10
    objective = model.loss
    model.loss = lambda views, labels, step: (lambda l, f: (l * 0, f))(*objective(views, labels, step))
    images = data.pool.load_batch(data.pool_idx[:16]).float() / 255
    labels = torch.as_tensor(data.pool.labels[data.pool_idx[:16]])
    out = pretrain_step(model, images, labels, 0, CPU)
    out["loss"].backward()  # the objective contributes exactly zero: what is left is the probe's loss
    assert out["probe_loss"] > 0 and 0 <= out["probe_top1"] <= 100
    assert model.probe.weight.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for p in model.backbone.parameters())


def test_unlabeled_source_turns_the_probe_off_and_supervised_refuses_it(small_idx, tmp_path):
    import numpy as np

    from conftest import write_idx
    from selftrain.data import build_source

    write_idx(tmp_path / "pool", (np.random.default_rng(0).random((64, 28, 28)) * 255).astype(np.uint8), None)
    pool = build_source(f"idx:{tmp_path / 'pool'}")
    cfg = build_config({}, _pretrain_overrides(small_idx))
    assert build_pretrain_model(cfg, pool, np.arange(64), 28, 1).probe is None
    sup = build_config({}, _pretrain_overrides(small_idx, "pretrain.method=supervised", f"pretrain.data={pool.uri}"))
    with pytest.raises(ValueError, match="supervised pre-training needs a source with classes"):
        build_pretrain_model(sup, pool, np.arange(64), 28, 1)


def test_cli_pretrain_exports_a_backbone_that_loads_back(small_idx, tmp_path):
    sets = [a for o in _pretrain_overrides(small_idx) for a in ("--set", o)]
    result = CliRunner().invoke(app, ["pretrain", "--out", str(tmp_path), *sets], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    folder = tmp_path / "pretrain"
    meta = json.loads((folder / "backbone.json").read_text())
    assert meta["method"] == "simclr" and meta["steps"] == 6 and meta["init"] == "ssl:simclr"
    assert meta["probe_top1"] is not None and 0 <= meta["probe_top1"] <= 100  # test set shares the pool's classes
    assert json.loads((folder / "done.json").read_text())["steps"] == 6
    state = load_file(folder / "backbone.safetensors")
    backbone = build_backbone("cnn-tiny", num_classes=0, in_chans=1)
    backbone.load_state_dict(state)  # strict: exactly the backbone, heads and probe left out
    assert not any(k.startswith(("head", "probe", "fc")) for k in state)
    assert not (tmp_path / "teach").exists()


def test_timm_backbone_export_loads_into_timm(small_idx, tmp_path):
    import timm

    overrides = _pretrain_overrides(small_idx, "model.backbone=resnet10t", "pretrain.steps=2", "pretrain.batch_size=4",
                                    "pretrain.method=byol", "engine.eval_batch_size=200")  # fmt: skip
    run_pipeline(build_config({}, overrides), tmp_path, stages=["pretrain"])
    path = tmp_path / "pretrain" / "backbone.safetensors"
    assert json.loads(path.with_suffix(".json").read_text())["timm"] is True
    model = timm.create_model("resnet10t", pretrained=True, pretrained_cfg_overlay={"file": str(path)}, num_classes=0, in_chans=1)
    saved = load_file(path)
    assert model.state_dict().keys() == saved.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


def test_model_weights_pretrain_reaches_teach_and_student_and_fills_the_init_column(small_idx, tmp_path):
    overrides = _pretrain_overrides(
        small_idx, "stages=[pretrain,teach,label,student,transfer]", "model.weights=pretrain", "teach.steps=1",
        "teach.optim.lr=1e-9", "student.steps=1", "student.optim.lr=1e-9", "transfer.protocols=[evaluate,linear]",
        "transfer.steps=20",
    )  # fmt: skip
    out = run_pipeline(build_config({}, overrides), tmp_path)
    pretrained = load_file(out / "pretrain" / "backbone.safetensors")
    teacher = load_file(out / "teach" / "model.safetensors")
    student = load_file(out / "student" / "round-1" / "model.safetensors")
    convs = [k for k, v in pretrained.items() if k.endswith("weight") and v.ndim == 4]
    assert convs
    for key in convs:  # one step at lr 1e-9 leaves the conv weights where they started
        torch.testing.assert_close(teacher[f"backbone.{key}"], pretrained[key], atol=1e-6, rtol=0)
        torch.testing.assert_close(student[f"backbone.{key}"], pretrained[key], atol=1e-6, rtol=0)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["init"] for r in rows if r["method"] != "pretrain"} == {"ssl:simclr"}
    assert {r["method"] for r in rows} == {"pretrain", "supervised", "self-training"}
    assert {r["metric"] for r in rows if r["method"] == "pretrain"} == {"linear.top1", "linear.top5", "linear.loss"}


def test_model_weights_pretrain_without_the_stage_says_what_to_run(small_idx, tmp_path):
    overrides = tiny_overrides(small_idx) + ["model.weights=pretrain"]
    with pytest.raises(FileNotFoundError, match="run the pretrain stage first"):
        run_pipeline(build_config({}, overrides), tmp_path, stages=["teach"])


def test_init_names():
    def name(*overrides):
        return init_name(build_config({}, list(overrides)))

    assert name() == "random"
    assert name("model.weights=pretrain") == "ssl:simclr"
    assert name("model.weights=pretrain", "pretrain.method=swav") == "ssl:swav"
    assert name("model.weights=pretrain", "pretrain.method=supervised", "pretrain.data=mnist:train") == "supervised"
    assert name("model.weights=/some/file.safetensors") == "pretrained"


RESUME_OPTIONS = {
    "supervised": ["pretrain.data=mnist:train"], "moco": ["pretrain.moco.queue_size=32"], "swav": ["pretrain.swav.prototypes=20"],
}  # fmt: skip


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_interrupted_pretrain_resumes_to_the_same_weights(small_idx, tmp_path, name):
    overrides = _pretrain_overrides(small_idx, f"pretrain.method={name}", "pretrain.steps=10", "engine.checkpoint_every=4",
                                    "engine.threads=1", *RESUME_OPTIONS.get(name, []))  # fmt: skip
    cfg = build_config({}, overrides)
    run_pipeline(cfg, tmp_path / "a", stages=["pretrain"])
    run_pipeline(cfg, tmp_path / "b", stages=["pretrain"])
    # As if killed just after the step-8 checkpoint: the final checkpoint and export never happened.
    folder = tmp_path / "b" / "pretrain"
    for file in ("done.json", "backbone.safetensors", "backbone.json"):
        (folder / file).unlink()
    shutil.rmtree(folder / "checkpoints" / "step-0000010")
    assert [p.name for p in (folder / "checkpoints").iterdir()] == ["step-0000008"]
    run_pipeline(cfg, tmp_path / "b", stages=["pretrain"])
    # Everything the method holds (heads, momentum encoders, MoCo's queue, prototypes, probe) resumed.
    a = load_file(tmp_path / "a" / "pretrain" / "checkpoints" / "step-0000010" / "model.safetensors")
    b = load_file(folder / "checkpoints" / "step-0000010" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert name != "moco" or "criterion.memory_bank.bank" in a
    assert torch.equal(load_file(folder / "backbone.safetensors")["features.0.0.weight"], a["backbone.features.0.0.weight"])


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["pretrain.method=moco", "pretrain.simclr.temperature=0.1"], "pretrain.simclr.temperature: options of method 'simclr'"),
        (["pretrain.method=supervised"], "pretrain.data: supervised pre-training needs a labeled source"),
        (["pretrain.method=swav", "pretrain.swav.local_scale=[0.5,0.1]"], "pretrain.swav.local_scale"),
        (["pretrain.crop_scale=[0,2]"], "pretrain.crop_scale"),
        (["pretrain.temperature=0.1"], "pretrain.temperature: unknown key"),
        (["pretrain.method=dino"], "pretrain.method"),
        (["stages=[pretrain]", "data.unlabeled=null"], "pretrain.data: self-supervised pre-training needs images"),
    ],
)
def test_config_errors_name_the_keys(overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        build_config({}, overrides)


def test_pretrain_is_opt_in_and_first():
    assert "pretrain" not in build_config({}).stages
    assert build_config({}, ["stages=[transfer,pretrain,teach]"]).stages == ["pretrain", "teach", "transfer"]
