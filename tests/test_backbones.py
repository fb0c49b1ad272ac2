"""Every registered backbone goes through the same checks: shape, finite loss, backward,
save/load round trip and determinism; a timm model works through the same path."""

import pytest
import torch

from selftrain.backbones import BACKBONES, build_backbone
from selftrain.checkpoint import save_weights
from selftrain.network import Network, NetworkSpec, load_network

NAMES = [*BACKBONES.names(), "resnet10t"]  # the last one comes from timm


def _spec(name, channels=1, size=28):
    return NetworkSpec(backbone=name, num_classes=5, channels=channels, image_size=size, mean=[0.5] * channels, std=[0.25] * channels)


@pytest.mark.parametrize("name", NAMES)
def test_backbone_contract(name, tmp_path):
    torch.manual_seed(0)
    net = Network(_spec(name))
    x = torch.rand(4, 1, 28, 28)
    logits = net(x)
    assert logits.shape == (4, 5)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    feats = net.features(x)
    assert feats.shape == (4, net.backbone.num_features)

    path = tmp_path / "model.safetensors"
    from selftrain.engine import export_model

    export_model(path, net, {"spec": net.spec.__dict__})
    again = load_network(path).eval()
    net.eval()
    assert torch.equal(net(x), again(x))
    assert torch.equal(again(x), again(x))  # deterministic in eval mode


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backbone 'resnet-nope'"):
        build_backbone("resnet-nope", num_classes=2, in_chans=1)


def test_local_weights_load_and_a_foreign_head_is_skipped(tmp_path, caplog):
    src = build_backbone("cnn-tiny", num_classes=10, in_chans=1)
    save_weights(tmp_path / "w.safetensors", src.state_dict())
    dst = build_backbone("cnn-tiny", num_classes=3, in_chans=1, weights=str(tmp_path / "w.safetensors"))
    assert torch.equal(dst.features[0][0].weight, src.features[0][0].weight)
    assert "skipped for shape" in caplog.text


def test_weights_that_match_nothing_are_refused(tmp_path):
    save_weights(tmp_path / "w.safetensors", {"something.else": torch.zeros(3)})
    with pytest.raises(ValueError, match="no parameter matches"):
        build_backbone("cnn-tiny", num_classes=3, in_chans=1, weights=str(tmp_path / "w.safetensors"))
