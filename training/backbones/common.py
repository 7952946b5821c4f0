"""Pieces every backbone shares: the BN-neck embedding head and spatial-size bookkeeping."""

from __future__ import annotations

from torch import nn


def conv_bn(
    cin: int,
    cout: int,
    kernel: int = 3,
    stride: int = 1,
    groups: int = 1,
    act: str | None = "prelu",
) -> nn.Sequential:
    """Conv (no bias) → BatchNorm → PReLU / ReLU / nothing."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act == "prelu":
        layers.append(nn.PReLU(cout))
    elif act == "relu":
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def downsampled(size: int, strides: int) -> int:
    """Spatial side after ``strides`` stride-2 convolutions with 'same' padding (ceil division)."""
    for _ in range(strides):
        size = (size + 1) // 2
    return size


class EmbeddingHead(nn.Module):
    """The BN-neck of ArcFace-style networks: BN2d → dropout → flatten → FC → BN1d
    (no affine scale).

    The final BatchNorm1d keeps the embedding centred; its output is the
    embedding (normalised later by the loss and by the service).
    """

    def __init__(self, channels: int, side: int, embedding_dim: int, dropout: float = 0.0):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(channels * side * side, embedding_dim)
        self.features = nn.BatchNorm1d(embedding_dim)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def forward(self, x):
        x = self.dropout(self.bn(x)).flatten(1)
        return self.features(self.fc(x))
