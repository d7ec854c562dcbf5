"""Backbones with an embedding head and a classifier.

``EmbeddingNet`` = torchvision ResNet trunk -> linear embedding head (default
128-d) -> L2 normalisation, plus a cosine classifier on the normalised
embedding (used for training with cross-entropy, and by BCT's influence loss).
``embed(x, normalize=False)`` gives the head's raw output (profile key
``normalize_embeddings``); training is the same either way, since the cosine
classifier normalises its input itself.

With ``width=64`` and ``small_stem=False`` the trunk is exactly torchvision's
``resnet18`` / ``resnet50``. ``small_stem=True`` replaces the 7x7/2 convolution
and the max-pool by one 3x3/1 convolution, the usual choice for 32x32 images
(CIFAR). ``width`` scales every stage's channel count (64 -> 128 -> 256 -> 512
for width 64) so that the default profile can train on a CPU.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

ARCHS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


class ResNetTrunk(ResNet):
    """A torchvision ResNet with a channel-width multiplier, a stem option and no fc.

    Reuses torchvision's blocks, ``_make_layer`` and ``forward``; only the
    channel counts and the stem differ.
    """

    def __init__(self, arch: str = "resnet18", width: int = 64, small_stem: bool = True):
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
        if int(width) < 1:
            raise ValueError(f"width must be a positive integer, got {width!r}")
        block, layers = ARCHS[arch]
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = width
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        if small_stem:
            self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()
        self.out_dim = width * 8 * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


class CosineClassifier(nn.Module):
    """``logits = scale * normalize(z) @ normalize(W).T`` (NormFace-style)."""

    def __init__(self, dim: int, num_classes: int, scale: float = 16.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) * 0.01)
        self.scale = scale

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(z, dim=1) @ F.normalize(self.weight, dim=1).T


class EmbeddingNet(nn.Module):
    """Trunk + embedding head + classifier.

    ``forward(x)`` returns ``(embedding, logits)`` with the embedding
    L2-normalised; ``embed(x)`` returns the embedding only, L2-normalised unless
    ``normalize=False`` (then the embedding head's raw output).
    """

    def __init__(
        self,
        arch: str = "resnet18",
        num_classes: int = 100,
        embedding_dim: int = 128,
        width: int = 64,
        small_stem: bool = True,
    ):
        super().__init__()
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes!r}")
        self.config = dict(
            arch=arch, num_classes=int(num_classes), embedding_dim=int(embedding_dim),
            width=int(width), small_stem=bool(small_stem),
        )
        self.trunk = ResNetTrunk(arch, width, small_stem)
        self.head = nn.Linear(self.trunk.out_dim, embedding_dim)
        self.classifier = CosineClassifier(embedding_dim, num_classes)

    def embed(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        z = self.head(self.trunk(x))
        return F.normalize(z, dim=1) if normalize else z

    def forward(self, x: torch.Tensor):
        z = self.embed(x)
        return z, self.classifier(z)


def build_model(config: dict) -> EmbeddingNet:
    """Rebuild a model from its JSON config (``EmbeddingNet.config``)."""
    return EmbeddingNet(**config)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
