"""Model rules of docs/design.md ("Model"): CamResNet is torchvision's ResNet with fc moved before pooling, BoostLU on
the CAM, GAP, and a train/eval alpha switch. References are torchvision's own models and formulas written out here.
"""
from __future__ import annotations

import pytest
import torch
import torchvision

from bgtrain.config import ModelConfig
from bgtrain.model import CamResNet, build_model
from bgtrain.ops import boostlu, boostlu_pool

IMG = 64                                                            # small images keep the suite fast on 2 cores


def _images(b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def _torchvision_pair(depth: int, num_classes: int, tmp_path) -> tuple[torch.nn.Module, CamResNet]:
    """A random-init torchvision ResNet, and a CamResNet loaded from its state dict through `pretrained=`."""
    torch.manual_seed(depth)
    factory = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50}[depth]
    tv = factory(weights=None, num_classes=num_classes)
    with torch.no_grad():                                           # non-trivial BN statistics and fc bias
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        tv.fc.bias.uniform_(-1, 1)
    path = tmp_path / f"resnet{depth}.pt"
    torch.save(tv.state_dict(), path)
    cam = CamResNet(num_classes, depth=depth, alpha_train=1.0, alpha_eval=1.0, pretrained=str(path))
    return tv.eval(), cam.eval()


@pytest.mark.parametrize("depth", [18, 50])
def test_alpha_one_equals_torchvision_gap_plus_fc(depth: int, tmp_path) -> None:
    tv, cam = _torchvision_pair(depth, 7, tmp_path)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(cam(x), tv(x), rtol=1e-5, atol=1e-5)
        # The 1x1 conv holds exactly the fc weights, reshaped.
        torch.testing.assert_close(cam.classifier.weight[:, :, 0, 0], tv.fc.weight, rtol=0, atol=0)
        torch.testing.assert_close(cam.classifier.bias, tv.fc.bias, rtol=0, atol=0)


def test_closed_form_logit_is_gap_cam_plus_alpha_minus_one_gap_relu_cam() -> None:
    torch.manual_seed(1)
    model = CamResNet(5, depth=18, alpha_train=5.0, alpha_eval=5.0).eval()
    with torch.no_grad():
        model.classifier.bias.uniform_(-0.5, 0.5)                   # a CAM with both signs
        x = _images(3, 1)
        cam = model.cam(x)
        assert (cam > 0).any() and (cam < 0).any()
        ref = cam.mean((2, 3)) + (5.0 - 1.0) * torch.relu(cam).mean((2, 3))
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.cam(x, boosted=True).mean((2, 3)), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [5.0, 1.0, 0.5])
def test_boostlu_boosts_only_strictly_positive_entries(alpha: float) -> None:
    """alpha*x where x > 0, x elsewhere (0 included); with alpha < 1 this is not max(x, alpha*x)."""
    x = torch.tensor([-3.0, -0.5, 0.0, 0.25, 2.0])
    ref = torch.tensor([-3.0, -0.5, 0.0, 0.25 * alpha, 2.0 * alpha])
    torch.testing.assert_close(boostlu(x, alpha), ref)
    if alpha >= 1:
        torch.testing.assert_close(boostlu(x, alpha), torch.maximum(x, alpha * x))

    xg = x.clone().requires_grad_(True)
    boostlu(xg, alpha).sum().backward()
    torch.testing.assert_close(xg.grad, torch.tensor([1.0, 1.0, 1.0, alpha, alpha]))

    cam = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    ref_pool = torch.where(cam > 0, alpha * cam, cam).mean((2, 3))
    torch.testing.assert_close(boostlu_pool(cam, alpha), ref_pool)


def test_alpha_switch_train_uses_alpha_train_and_eval_uses_alpha_eval() -> None:
    """"BoostLU in inference only" = train with alpha 1, evaluate with alpha 5; both plain mutable attributes."""
    torch.manual_seed(3)
    model = CamResNet(4, depth=18, alpha_train=1.0, alpha_eval=5.0)
    with torch.no_grad():
        model.classifier.bias.uniform_(-0.5, 0.5)
    x = _images(3, 3)

    def expected(alpha: float) -> torch.Tensor:
        cam = model.cam(x)
        return cam.mean((2, 3)) + (alpha - 1) * torch.relu(cam).mean((2, 3))

    with torch.no_grad():
        model.train()
        assert model.alpha == 1.0
        torch.testing.assert_close(model(x), expected(1.0), rtol=1e-5, atol=1e-5)
        model.eval()
        assert model.alpha == 5.0
        torch.testing.assert_close(model(x), expected(5.0), rtol=1e-5, atol=1e-5)
        model.alpha_eval = 3.0                                      # switch on a built model
        assert model.alpha == 3.0
        torch.testing.assert_close(model(x), expected(3.0), rtol=1e-5, atol=1e-5)
        model.train()
        model.alpha_train = 5.0
        assert model.alpha == 5.0
        torch.testing.assert_close(model(x), expected(5.0), rtol=1e-5, atol=1e-5)


def test_cam_is_batch_classes_by_input_over_32() -> None:
    model = CamResNet(6, depth=18).eval()
    with torch.no_grad():
        for size in (64, 96):
            x = torch.randn(2, 3, size, size)
            assert tuple(model.cam(x).shape) == (2, 6, size // 32, size // 32)
            assert tuple(model(x).shape) == (2, 6)


def test_build_model_from_config_in_channels_last() -> None:
    torch.manual_seed(4)
    cfg = ModelConfig(depth=18, alpha_train=1.0, alpha_eval=5.0, pretrained=None, channels_last=True)
    model = build_model(cfg, 3).eval()
    assert isinstance(model, CamResNet)
    assert (model.alpha_train, model.alpha_eval, model.num_classes) == (1.0, 5.0, 3)
    conv1 = model.trunk[0].weight
    assert conv1.is_contiguous(memory_format=torch.channels_last) and not conv1.is_contiguous()

    plain = CamResNet(3, depth=18, alpha_train=1.0, alpha_eval=5.0).eval()
    plain.load_state_dict(model.state_dict())
    x = _images(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), plain(x),
                                   rtol=1e-5, atol=1e-5)


def test_missing_pretrained_file_names_path_and_setting(tmp_path) -> None:
    missing = tmp_path / "nowhere" / "resnet50-imagenet.pth"
    with pytest.raises(FileNotFoundError) as err:
        build_model(ModelConfig(depth=18, pretrained=str(missing)), 3)
    assert str(missing) in str(err.value) and "model.pretrained" in str(err.value)


def test_gradients_reach_trunk_and_classifier() -> None:
    model = CamResNet(3, depth=18, alpha_train=5.0).train()
    model(_images(2, 5)).sum().backward()
    assert model.classifier.weight.grad is not None and model.classifier.weight.grad.abs().sum() > 0
    assert model.trunk[0].weight.grad is not None and model.trunk[0].weight.grad.abs().sum() > 0


def test_pretrained_trunk_loads_and_fc_of_another_class_count_is_left_out(tmp_path) -> None:
    """ImageNet weights (1000-way fc) for a 3-class model: trunk from the file, classifier keeps its own init."""
    torch.manual_seed(6)
    tv = torchvision.models.resnet18(weights=None, num_classes=10)
    path = tmp_path / "resnet18-10way.pt"
    torch.save(tv.state_dict(), path)
    torch.manual_seed(7)
    model = CamResNet(3, depth=18, pretrained=str(path))
    torch.testing.assert_close(model.trunk[0].weight, tv.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.trunk[7][1].bn2.running_var, tv.layer4[1].bn2.running_var, rtol=0, atol=0)
    assert tuple(model.classifier.weight.shape) == (3, 512, 1, 1)


def test_pretrained_file_of_another_depth_is_a_clear_error(tmp_path) -> None:
    """A resnet18 file for a depth-50 model: the error names the file and the setting, not a raw size mismatch."""
    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises((ValueError, RuntimeError)) as err:
        CamResNet(3, depth=50, pretrained=str(path))
    assert "model.pretrained" in str(err.value) and str(path) in str(err.value), str(err.value)[:300]
