"""CamResNet: a torchvision ResNet trunk, a 1x1 conv classifier before pooling, BoostLU, then GAP.

``logit = mean_hw(BoostLU(cam))`` with ``BoostLU(x) = alpha * x for x > 0, else x``. Because
``mean(BoostLU(cam)) = GAP(cam) + (alpha - 1) * GAP(relu(cam))``, alpha = 1 is exactly the usual
GAP + Linear head, so ImageNet fc weights reshape into the 1x1 conv.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from bgtrain.config import ModelConfig
from bgtrain.ops import boostlu, boostlu_pool

_TRUNKS = {18: torchvision.models.resnet18, 34: torchvision.models.resnet34,
           50: torchvision.models.resnet50, 101: torchvision.models.resnet101}
# torchvision's names of the modules that make up ``CamResNet.trunk``, in order (the trunk's keys are their indices).
TORCHVISION_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


class CamResNet(nn.Module):
    """ResNet whose classifier runs before pooling, so every logit is the mean of its CAM."""

    def __init__(self, num_classes: int, depth: int = 50, alpha_train: float = 5.0, alpha_eval: float = 5.0,
                 pretrained: str | None = None) -> None:
        super().__init__()
        if depth not in _TRUNKS:
            raise ValueError(f"depth must be one of {sorted(_TRUNKS)}, got {depth}")
        resnet = _TRUNKS[depth](weights=None)
        self.num_classes = num_classes
        self.alpha_train = float(alpha_train)  # plain attributes: switch BoostLU on a built model
        self.alpha_eval = float(alpha_eval)
        self.trunk = nn.Sequential(*(getattr(resnet, name) for name in TORCHVISION_TRUNK))
        self.classifier = nn.Conv2d(resnet.fc.in_features, num_classes, kernel_size=1, bias=True)
        if pretrained is not None:
            self.load_torchvision_weights(pretrained)

    @property
    def alpha(self) -> float:
        """The BoostLU alpha in force: ``alpha_train`` in train mode, ``alpha_eval`` in eval mode."""
        return self.alpha_train if self.training else self.alpha_eval

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk features (B, D, h, w)."""
        return self.trunk(x)

    def cam(self, x: torch.Tensor, boosted: bool = False) -> torch.Tensor:
        """Class activation maps (B, C, h, w): the 1x1 classifier on the features, bias included.

        ``boosted=True`` applies BoostLU with the current alpha, which is what the logits average.
        """
        cam = self.classifier(self.forward_features(x))
        return boostlu(cam, self.alpha) if boosted else cam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, C)."""
        return boostlu_pool(self.classifier(self.forward_features(x)), self.alpha)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.classifier.parameters())

    def trunk_parameters(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters())

    def load_torchvision_weights(self, path: str | Path) -> None:
        """Load a torchvision ResNet state dict; fc becomes the 1x1 conv when its class count matches."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model.pretrained: weights file {path} does not exist "
                                    "(bgtrain never downloads weights; point model.pretrained at a local "
                                    "torchvision ResNet state dict, or set it to null)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        trunk_state = {}
        for key, value in state.items():
            top, _, rest = key.partition(".")
            if top in TORCHVISION_TRUNK:
                trunk_state[f"{TORCHVISION_TRUNK.index(top)}.{rest}"] = value
        try:
            missing, _ = self.trunk.load_state_dict(trunk_state, strict=False)
        except RuntimeError as e:
            raise ValueError(f"model.pretrained: {path} does not fit this ResNet (is it a ResNet of the "
                             f"configured depth, model.depth?): {str(e)[:300]}") from None
        if missing:
            raise ValueError(f"model.pretrained: {path} lacks trunk weights such as {missing[:3]} "
                             f"(is it a ResNet of the configured depth?)")
        fc_w, fc_b = state.get("fc.weight"), state.get("fc.bias")
        if fc_w is not None and fc_w.shape[0] == self.num_classes:
            bias = self.classifier.bias
            if bias is None:  # built with bias=True in __init__
                raise RuntimeError("the classifier has no bias")
            with torch.no_grad():
                self.classifier.weight.copy_(fc_w.reshape(self.classifier.weight.shape))
                bias.copy_(fc_b)

    def torchvision_state_dict(self, head: bool = True) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`load_torchvision_weights`: torchvision ResNet keys; the 1x1 conv becomes ``fc``."""
        state = {}
        for key, value in self.trunk.state_dict().items():
            index, _, rest = key.partition(".")
            state[f"{TORCHVISION_TRUNK[int(index)]}.{rest}"] = value.detach().clone()
        if head:
            bias = self.classifier.bias
            if bias is None:  # built with bias=True in __init__
                raise RuntimeError("the classifier has no bias")
            state["fc.weight"] = self.classifier.weight.detach().reshape(self.num_classes, -1).clone()
            state["fc.bias"] = bias.detach().clone()
        return state


def build_model(cfg: ModelConfig, num_classes: int) -> CamResNet:
    """The one place a model config becomes a module."""
    model = CamResNet(num_classes, cfg.depth, cfg.alpha_train, cfg.alpha_eval, cfg.pretrained)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
