"""ResNet-50 (He et al. 2016) adapted to 112×112 faces, as in the loss-comparison study.

torchvision's bottleneck ResNet-50 without pretrained weights, except that the
7×7/2 stem and max-pool become one 3×3/2 convolution (a 112 face keeps a 7×7
map after the four stages) and global pooling plus classifier become the
BN-neck embedding head.
"""

from __future__ import annotations

from torch import nn

from training.backbones.common import EmbeddingHead, downsampled


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        cout = planes * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(cin, planes, 1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, stride, 1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.body(x) + self.shortcut(x))


class ResNet50(nn.Module):
    def __init__(
        self,
        embedding_dim: int = 512,
        input_size: int = 112,
        width: int = 64,
        layers: tuple[int, ...] = (3, 4, 6, 3),
        dropout: float = 0.0,
    ):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        blocks, cin = [], width
        for stage, count in enumerate(layers):
            planes = width * 2**stage
            for i in range(count):
                blocks.append(Bottleneck(cin, planes, 2 if i == 0 and stage > 0 else 1))
                cin = planes * Bottleneck.expansion
        self.blocks = nn.Sequential(*blocks)
        self.head = EmbeddingHead(cin, downsampled(input_size, len(layers)), embedding_dim, dropout)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))
