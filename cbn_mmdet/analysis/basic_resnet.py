"""A small CIFAR-style ResNet of BasicBlocks, every conv and norm built by mmcv from ``conv_cfg``/``norm_cfg``.

For 28x28 grey images (Fashion-MNIST)::

    stem: conv3x3(1 -> 16, stride 2) -> norm -> ReLU                    28x28 -> 14x14
    stage 1: BasicBlock(16 -> 16)                                      14x14
    stage 2: BasicBlock(16 -> 32, stride 2, 1x1 conv + norm shortcut)  7x7
    stage 3: BasicBlock(32 -> 64, stride 2, 1x1 conv + norm shortcut)  4x4
    global average pool -> linear(64 -> 10)

(``blocks`` per stage, default 1: a ResNet-8.) The stem has stride 2 to keep the study cheap on CPU; at
batch size 1 the last stage's norms still see 16 values per channel.

The blocks follow mmdet's ``BasicBlock`` naming (``conv{k}`` with ``norm{k}_name``; the shortcut an
``nn.Sequential(conv, norm)``), so ``norm_cfg=dict(type='CBN', ...)`` binds each CBN to the conv that
feeds it through cbn_mmdet's conv finders, with no code of its own — the same path as in a detector.
Requires mmcv (``import cbn_mmdet.models`` registers the layers and the finders).
"""
import torch.nn as nn
from mmcv.cnn import build_conv_layer, build_norm_layer

from .. import models as _models  # noqa: F401  (registers the layers and the CBN conv finders)

__all__ = ['BasicBlock', 'BasicResNet']


class BasicBlock(nn.Module):
    """``relu(norm2(conv2(relu(norm1(conv1(x))))) + shortcut(x))``; the shortcut is the identity or a
    strided 1x1 conv + norm."""

    def __init__(self, in_channels, out_channels, stride=1, conv_cfg=None, norm_cfg=None):
        super().__init__()
        norm_cfg = norm_cfg or dict(type='BN')
        self.norm1_name, norm1 = build_norm_layer(norm_cfg, out_channels, postfix=1)
        self.norm2_name, norm2 = build_norm_layer(norm_cfg, out_channels, postfix=2)
        self.conv1 = build_conv_layer(conv_cfg, in_channels, out_channels, 3, stride=stride, padding=1,
                                      bias=False)
        self.add_module(self.norm1_name, norm1)
        self.conv2 = build_conv_layer(conv_cfg, out_channels, out_channels, 3, padding=1, bias=False)
        self.add_module(self.norm2_name, norm2)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                build_conv_layer(conv_cfg, in_channels, out_channels, 1, stride=stride, bias=False),
                build_norm_layer(norm_cfg, out_channels)[1])

    @property
    def norm1(self):
        return getattr(self, self.norm1_name)

    @property
    def norm2(self):
        return getattr(self, self.norm2_name)

    def forward(self, x):
        out = self.norm1(self.conv1(x)).relu()
        out = self.norm2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return (out + identity).relu()


class BasicResNet(nn.Module):
    """The net of the module docstring.

    Args:
        conv_cfg (dict | None): mmcv conv config of every conv (``None``: ``nn.Conv2d``).
        norm_cfg (dict | None): mmcv norm config of every norm (``None``: BN).
        widths (tuple[int]): channels of the stages. Default: (16, 32, 64).
        blocks (int): BasicBlocks per stage. Default: 1.
        in_channels (int): input channels. Default: 1.
        num_classes (int): outputs of the classifier. Default: 10.
    """

    def __init__(self, conv_cfg=None, norm_cfg=None, widths=(16, 32, 64), blocks=1, in_channels=1,
                 num_classes=10):
        super().__init__()
        norm_cfg = norm_cfg or dict(type='BN')
        widths = tuple(widths)
        if not widths or any(not isinstance(w, int) or w <= 0 for w in widths):
            raise ValueError(f'BasicResNet: widths must be positive ints, got {widths!r}')
        if not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f'BasicResNet: blocks must be an int >= 1, got {blocks!r}')
        self.norm1_name, norm1 = build_norm_layer(norm_cfg, widths[0], postfix=1)
        self.conv1 = build_conv_layer(conv_cfg, in_channels, widths[0], 3, stride=2, padding=1, bias=False)
        self.add_module(self.norm1_name, norm1)
        layers, cin = [], widths[0]
        for index, width in enumerate(widths):
            for block in range(blocks):
                stride = 2 if index > 0 and block == 0 else 1
                layers.append(BasicBlock(cin, width, stride, conv_cfg=conv_cfg, norm_cfg=norm_cfg))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    @property
    def norm1(self):
        return getattr(self, self.norm1_name)

    def forward(self, x):
        x = self.norm1(self.conv1(x)).relu()
        x = self.layers(x)
        return self.fc(x.mean((2, 3)))
