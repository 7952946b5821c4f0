"""MobileFaceNet (Chen, Liu, Gao, Han 2018): inverted residual bottlenecks and a global
depthwise head.

Table 1 of the paper at 112×112: conv3×3/2 (64) → depthwise 3×3 (64) →
bottlenecks (t, c, n, s) = (2,64,5,2) (4,128,1,2) (2,128,6,1) (4,128,1,2)
(2,128,2,1) → conv1×1 (512) → linear global depthwise conv 7×7 → linear
conv1×1 (embedding) → BatchNorm.  ``width`` scales every channel count.
"""

from __future__ import annotations

from torch import nn

from training.backbones.common import conv_bn, downsampled

SETTINGS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        self.body = nn.Sequential(
            conv_bn(cin, hidden, 1),
            conv_bn(hidden, hidden, 3, stride, groups=hidden),
            conv_bn(hidden, cout, 1, act=None),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileFaceNet(nn.Module):
    def __init__(self, embedding_dim: int = 512, input_size: int = 112, width: float = 1.0):
        super().__init__()

        def ch(c: int) -> int:
            return max(8, int(round(c * width / 8)) * 8)

        c0 = ch(64)
        layers: list[nn.Module] = [conv_bn(3, c0, 3, 2), conv_bn(c0, c0, 3, 1, groups=c0)]
        cin = c0
        for t, c, n, s in SETTINGS:
            for i in range(n):
                layers.append(Bottleneck(cin, ch(c), s if i == 0 else 1, t))
                cin = ch(c)
        last = ch(512)
        layers.append(conv_bn(cin, last, 1))
        self.features = nn.Sequential(*layers)
        side = downsampled(input_size, 4)
        self.gdc = nn.Sequential(  # linear global depthwise conv + linear 1×1 projection
            nn.Conv2d(last, last, side, groups=last, bias=False),
            nn.BatchNorm2d(last),
            nn.Conv2d(last, embedding_dim, 1, bias=False),
            nn.Flatten(1),
        )
        self.bn = nn.BatchNorm1d(embedding_dim)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.bn(self.gdc(self.features(x)))
