"""Dense-prediction building blocks: feature pyramids, the FPN decoder, and the segmentation,
depth and keypoint tasks (shapes, hand-computed losses, pseudo labels, metric round trips, overfit)."""

import math

import pytest
import torch

from selftrain.backbones import FeatureBackbone, build_backbone, build_feature_backbone
from selftrain.checkpoint import save_weights
from selftrain.data.targets import IGNORE_INDEX
from selftrain.tasks import TASKS
from selftrain.tasks.depth import Depth
from selftrain.tasks.keypoints import Keypoints, decode_heatmaps, gaussian_heatmaps
from selftrain.tasks.segmentation import Segmentation

TIMM_NAME = "resnet10t"


def _task(name):
    return {"segmentation": Segmentation(4), "depth": Depth(), "keypoints": Keypoints(3)}[name]


def _targets(name, b, h, w):
    g = torch.Generator().manual_seed(0)
    if name == "segmentation":
        return [{"mask": torch.randint(0, 4, (h, w), generator=g)} for _ in range(b)]
    if name == "depth":
        return [{"depth": torch.rand(h, w, generator=g) * 9 + 1} for _ in range(b)]
    pts = torch.rand(b, 3, 2, generator=g) * (w - 1)
    return [{"keypoints": torch.cat([p, torch.ones(3, 1)], dim=1)} for p in pts]


# --------------------------------------------------------------------------- backbones


@pytest.mark.parametrize("name, strides", [("cnn-tiny", [1, 2, 4]), (TIMM_NAME, [2, 4, 8, 16, 32])])
def test_feature_backbone_levels(name, strides):
    backbone = build_feature_backbone(name, in_chans=1)
    assert isinstance(backbone, FeatureBackbone)
    assert backbone.strides == strides
    maps = backbone(torch.rand(2, 1, 64, 64))
    assert [m.shape[1] for m in maps] == backbone.channels
    assert [64 // m.shape[-1] for m in maps] == strides


def test_small_cnn_pyramid_matches_classifier_features():
    cnn = build_backbone("cnn-tiny", num_classes=5, in_chans=1).eval()
    x = torch.rand(2, 1, 32, 32)
    maps = cnn.forward_pyramid(x)
    assert torch.equal(maps[-1], cnn.forward_features(x))
    assert [m.shape[1] for m in maps] == cnn.pyramid_channels


@pytest.mark.parametrize("name", ["cnn-tiny", TIMM_NAME])
def test_classification_checkpoint_loads_into_feature_backbone(name, tmp_path, caplog):
    torch.manual_seed(0)
    cls = build_backbone(name, num_classes=5, in_chans=1)
    save_weights(tmp_path / "w.safetensors", cls.state_dict())
    feats = build_feature_backbone(name, in_chans=1, weights=str(tmp_path / "w.safetensors"))
    own = {k.removeprefix(feats.weight_prefix): v for k, v in feats.state_dict().items()}
    for key, value in own.items():
        assert torch.equal(value, cls.state_dict()[key]), key
    assert "missing" not in caplog.text
    cls.eval(), feats.eval()
    x = torch.rand(2, 1, 64, 64)
    ref = cls.forward_pyramid(x)[-1] if name == "cnn-tiny" else cls.forward_features(x)
    assert torch.allclose(feats(x)[-1], ref, atol=1e-6)


def test_whole_network_checkpoint_loads(tmp_path):
    from selftrain.network import Network, NetworkSpec

    net = Network(NetworkSpec(backbone="cnn-tiny", num_classes=3, channels=1, image_size=32, mean=[0.5], std=[0.2]))
    save_weights(tmp_path / "net.safetensors", net.state_dict())
    feats = build_feature_backbone("cnn-tiny", in_chans=1, weights=str(tmp_path / "net.safetensors"))
    assert torch.equal(feats.features[0][0].weight, net.backbone.features[0][0].weight)


def test_unknown_feature_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backbone 'resnet-nope'"):
        build_feature_backbone("resnet-nope", in_chans=1)


# --------------------------------------------------------------------------- heads: shapes, losses, backward


@pytest.mark.parametrize("backbone_name", ["cnn-tiny", TIMM_NAME])
@pytest.mark.parametrize("task_name", ["segmentation", "depth", "keypoints"])
def test_head_shapes_loss_and_backward(task_name, backbone_name):
    torch.manual_seed(0)
    task = _task(task_name)
    backbone = build_feature_backbone(backbone_name, in_chans=1)
    head = task.build_head(backbone.channels, backbone.strides)
    x = torch.rand(2, 1, 64, 64)
    outputs = head(backbone(x))
    channels = {"segmentation": 4, "depth": 1, "keypoints": 3}[task_name]
    assert outputs.shape == (2, channels, 64, 64)
    targets = _targets(task_name, 2, 64, 64)
    loss = task.loss(outputs, targets)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert all(p.grad is not None for p in head.parameters())
    preds = task.predict(outputs.detach())
    assert len(preds) == 2 and set(preds[0]) == set(targets[0])
    assert preds[0][next(iter(targets[0]))].shape == next(iter(targets[0].values())).shape
    assert len(task.encode_pseudo(outputs.detach())) == 2


def test_tasks_are_registered_with_headline_metrics():
    expected = [("segmentation", "miou", True), ("depth", "absrel", False), ("keypoints", "nme", False)]
    for name, metric, higher in expected:
        cls = TASKS.get(name)
        assert (cls.name, cls.metric, cls.higher_is_better) == (name, metric, higher)
        assert cls(3).build_metric() is not cls(3).build_metric()


def test_segmentation_loss_by_hand_with_an_ignored_pixel():
    # Image 0: 2 classes, 1x3 pixels; pixel 2 ignored. Image 1: everything ignored -> 0.
    logits = torch.tensor([[[[2.0, 0.0, 5.0]], [[0.0, 1.0, -5.0]]], [[[1.0, 1.0, 1.0]], [[0.0, 0.0, 0.0]]]])
    targets = [{"mask": torch.tensor([[0, 1, IGNORE_INDEX]])}, {"mask": torch.full((1, 3), IGNORE_INDEX)}]
    loss = Segmentation(2).loss(logits, targets)
    ce0 = -math.log(math.exp(2) / (math.exp(2) + 1))  # pixel 0, class 0
    ce1 = -math.log(math.exp(1) / (math.exp(1) + 1))  # pixel 1, class 1
    assert loss.tolist() == pytest.approx([(ce0 + ce1) / 2, 0.0], abs=1e-6)


def test_depth_loss_by_hand_on_four_pixels_one_invalid():
    log_pred = torch.log(torch.tensor([[[[2.0, 4.0], [1.0, 7.0]]]]))  # (1, 1, 2, 2)
    target = torch.tensor([[1.0, 4.0], [2.0, 0.0]])  # the 0 is no value
    d = [math.log(2 / 1), 0.0, math.log(1 / 2)]
    expected = sum(v * v for v in d) / 3 - 0.5 * (sum(d) / 3) ** 2
    assert Depth().loss(log_pred, [{"depth": target}]).item() == pytest.approx(expected, abs=1e-6)
    assert Depth(silog_lambda=0.0).loss(log_pred, [{"depth": target}]).item() == pytest.approx(2 * math.log(2) ** 2 / 3)
    assert Depth().loss(log_pred, [{"depth": torch.zeros(2, 2)}]).item() == 0.0


def test_keypoint_loss_excludes_invisible_points():
    task = Keypoints(2, sigma=1.0)
    points = torch.tensor([[2.5, 3.5, 1.0], [1.0, 1.0, 0.0]])
    heat = gaussian_heatmaps(points[None], 6, 6, 1.0)  # (1, 2, 6, 6); the invisible map is all 0
    outputs = heat.clone()
    outputs[0, 1] = 7.0  # garbage where the point is invisible: must not count
    outputs[0, 0, 0, 0] += 0.6  # one wrong pixel on the visible map
    assert task.loss(outputs, [{"keypoints": points}]).item() == pytest.approx(0.36 / 36, abs=1e-7)
    none_visible = points.clone()
    none_visible[:, 2] = 0
    assert task.loss(outputs, [{"keypoints": none_visible}]).item() == 0.0


# --------------------------------------------------------------------------- pseudo labels


def test_segmentation_pseudo_masks_ignore_low_confidence_pixels():
    # Pixel 0: confident class 1; pixel 1: softmax max 0.55; pixel 2: uniform (1/3).
    p = torch.tensor([[0.05, 0.9, 0.05], [0.55, 0.3, 0.15], [1 / 3, 1 / 3, 1 / 3]])
    logits = p.log().T.reshape(1, 3, 1, 3)
    assert Segmentation(3).encode_pseudo(logits)[0]["mask"].tolist() == [[1, 0, IGNORE_INDEX]]
    assert Segmentation(3).encode_pseudo(logits, threshold=0.6)[0]["mask"].tolist() == [[1, IGNORE_INDEX, IGNORE_INDEX]]


def test_keypoint_pseudo_labels_zero_low_confidence_points():
    points = torch.tensor([[[10.5, 5.5, 1.0], [3.5, 12.5, 1.0]]])
    heat = gaussian_heatmaps(points, 16, 16, 2.0)
    heat[0, 1] *= 0.3  # a weak teacher map
    pseudo = Keypoints(2).encode_pseudo(heat)[0]["keypoints"]
    assert pseudo[0].tolist() == pytest.approx([10.5, 5.5, 1.0], abs=1e-5)
    assert pseudo[1, :2].tolist() == pytest.approx([3.5, 12.5], abs=1e-5) and pseudo[1, 2] == 0.0
    assert Keypoints(2).encode_pseudo(heat, threshold=0.2)[0]["keypoints"][1, 2] == pytest.approx(0.3)


def test_pseudo_point_quality_by_hand():
    # One image, true points on a 3-4-5 triangle (box diagonal 5); the pseudo labels keep points 0 and 1.
    truth = torch.tensor([[0.5, 0.5, 1.0], [3.5, 0.5, 1.0], [3.5, 4.5, 1.0]])
    pseudo = torch.tensor([[0.5, 1.5, 0.9], [3.5, 0.5, 0.7], [3.5, 2.5, 0.0]])  # errors 1, 0, 2 (the last dropped)
    meter = Keypoints(3).quality_meter()
    meter.update([{"keypoints": pseudo}], [{"keypoints": truth}])
    result = meter.compute()
    assert result["nme"] == pytest.approx(100 * (1 + 0) / 2 / 5)  # norm: all true points, not only the kept ones
    assert result["nme_all"] == pytest.approx(100 * (1 + 0 + 2) / 3 / 5)
    assert result["coverage"] == pytest.approx(100 * 2 / 3)
    none_kept = Keypoints(3).quality_meter()
    none_kept.update([{"keypoints": pseudo * torch.tensor([1.0, 1.0, 0.0])}], [{"keypoints": truth}])
    assert set(none_kept.compute()) == {"nme_all", "coverage"} and none_kept.compute()["coverage"] == 0


def test_depth_pseudo_targets_are_the_teacher_maps():
    out = torch.randn(2, 1, 4, 4)
    pseudo = Depth().encode_pseudo(out)
    assert torch.allclose(pseudo[1]["depth"], out[1, 0].exp()) and (pseudo[0]["depth"] > 0).all()


def test_decode_locates_an_off_centre_gaussian_exactly():
    points = torch.tensor([[[7.9, 4.2, 1.0]]])
    decoded = decode_heatmaps(gaussian_heatmaps(points, 16, 16, 1.5))
    assert torch.allclose(decoded[0, 0, :2], points[0, 0, :2], atol=1e-4)


# --------------------------------------------------------------------------- metric round trips


def test_perfect_predictions_give_perfect_metrics():
    mask = torch.randint(0, 4, (2, 8, 8))
    logits = torch.nn.functional.one_hot(mask, 4).permute(0, 3, 1, 2).float() * 10
    seg = Segmentation(4)
    meter = seg.build_metric()
    meter.update(seg.predict(logits), [{"mask": m} for m in mask])
    assert meter.compute()["miou"] == pytest.approx(100.0)

    depth = torch.rand(2, 8, 8) * 9 + 1
    dep = Depth()
    meter = dep.build_metric()
    meter.update(dep.predict(depth.log()[:, None]), [{"depth": d} for d in depth])
    result = meter.compute()
    assert result["absrel"] == pytest.approx(0.0, abs=1e-6) and result["delta1"] == 100.0

    points = torch.tensor([[[3.5, 4.5, 1.0], [12.5, 9.5, 1.0], [6.5, 14.5, 0.0]]]).repeat(2, 1, 1)
    kp = Keypoints(3)
    meter = kp.build_metric()
    meter.update(kp.predict(gaussian_heatmaps(points, 16, 16, 2.0)), [{"keypoints": p} for p in points])
    assert meter.compute()["nme"] == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- overfit


@pytest.fixture(scope="module")
def eight_scenes():
    """8 real scenes (rendering needs Fashion-MNIST; reading it takes most of this test's time)."""
    from selftrain.data.sources import DataError, build_source

    try:
        return build_source("scenes:train?n=8&size=64")
    except DataError as exc:
        pytest.skip(f"Fashion-MNIST unavailable: {exc}")


def test_keypoint_task_takes_its_size_and_flip_pairs_from_the_source(eight_scenes):
    from selftrain.augment import BatchAugment
    from selftrain.tasks import build_task

    task = build_task("keypoints", eight_scenes)
    assert (task.num_points, task.num_classes, task.flip_pairs) == (5, 5, ((2, 3),))
    with pytest.raises(ValueError, match="sized by its source's points"):
        build_task("keypoints", eight_scenes.classes)
    with pytest.raises(ValueError, match="has 5 keypoints per image, the labeled source 3"):
        Keypoints(3).check_source(eight_scenes, "data.test")
    images = eight_scenes.load_batch(list(range(8))).float().repeat(4, 1, 1, 1) / 255  # 32 samples, ~half mirrored
    targets = task.load_targets(eight_scenes, list(range(8)) * 4)
    aug = BatchAugment("S1")

    def left_of_right(points):
        return all(p[2, 0] <= p[3, 0] for p in points if (p[2:4, 2] > 0).all())

    torch.manual_seed(0)
    _, out = task.augment(aug, images, targets)
    assert left_of_right([t["keypoints"] for t in out])  # the task swaps the pair in mirrored images
    torch.manual_seed(0)
    _, unswapped = aug.forward_dense(images, targets)
    assert not left_of_right([t["keypoints"] for t in unswapped])  # without the pairs, mirrored ones cross


def test_segmentation_overfits_eight_scenes(eight_scenes):
    source = eight_scenes
    torch.manual_seed(0)
    images = source.load_batch(list(range(8))).float() / 255  # (8, 1, 64, 64)
    targets = [source.load_targets(i) for i in range(8)]
    task = Segmentation(len(source.mask_classes), width=16)  # narrow: 60 steps in ~5 s
    backbone = build_feature_backbone("cnn-tiny", in_chans=1)
    head = task.build_head(backbone.channels, backbone.strides)
    model = torch.nn.Sequential(backbone, head)

    def miou() -> float:
        model.eval()
        with torch.no_grad():
            meter = task.build_metric()
            meter.update(task.predict(model(images)), targets)
        model.train()
        return meter.compute()["miou"]

    before = miou()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = task.loss(model(images), targets).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = miou()
    assert after > before + 20, (before, after)
