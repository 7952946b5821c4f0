"""MobileNetV1 (Howard et al. 2017) adapted to 112×112 faces, as in the loss-comparison study.

Depthwise-separable stack of the paper (stem 32, then 64, 128×2, 256×2,
512×6, 1024×2) with width multiplier α; the last stride-2 block becomes
stride 1 so a 112 face keeps a 7×7 map, and average pooling plus classifier
become the BN-neck embedding head.
"""

from __future__ import annotations

from torch import nn

from training.backbones.common import EmbeddingHead, conv_bn, downsampled

# (output channels, stride) of each depthwise-separable block
BLOCKS = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 1),
    (1024, 1),
)


class MobileNetV1(nn.Module):
    def __init__(
        self,
        embedding_dim: int = 512,
        input_size: int = 112,
        width: float = 1.0,
        dropout: float = 0.0,
    ):
        super().__init__()

        def ch(c: int) -> int:
            return max(8, int(c * width))

        layers: list[nn.Module] = [conv_bn(3, ch(32), 3, 2, act="relu")]
        cin = ch(32)
        for cout, stride in BLOCKS:
            layers += [
                conv_bn(cin, cin, 3, stride, groups=cin, act="relu"),
                conv_bn(cin, ch(cout), 1, act="relu"),
            ]
            cin = ch(cout)
        self.features = nn.Sequential(*layers)
        self.head = EmbeddingHead(cin, downsampled(input_size, 4), embedding_dim, dropout)

    def forward(self, x):
        return self.head(self.features(x))
