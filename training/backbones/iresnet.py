"""IResNet-18/34/50/100: the improved residual networks of the ArcFace family
(Duta et al.; Deng et al.).

Input 112×112 (any multiple of 16 works), four stride-2 stages, pre-activation
style blocks BN → conv3×3 → BN → PReLU → conv3×3(stride) → BN, and the BN-neck
embedding head.
"""

from __future__ import annotations

from torch import nn

from training.backbones.common import EmbeddingHead, downsampled

LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3)}


class IBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


class IResNet(nn.Module):
    def __init__(
        self,
        depth: int = 50,
        embedding_dim: int = 512,
        input_size: int = 112,
        width: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__()
        if depth not in LAYERS:
            raise ValueError(f"IResNet depth must be one of {sorted(LAYERS)}, got {depth}")
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.PReLU(width)
        )
        blocks, cin = [], width
        for stage, count in enumerate(LAYERS[depth]):
            cout = width * 2**stage
            for i in range(count):
                blocks.append(IBasicBlock(cin, cout, 2 if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = EmbeddingHead(cin, downsampled(input_size, 4), embedding_dim, dropout)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))
