"""The small conv net of the fidelity studies, with any of the norm layers cbn_mmdet provides.

Four ``conv3x3 (no bias) -> norm -> ReLU`` blocks on 8x8 inputs, a 2x2 max-pool after the second block
(so the last two blocks see 4x4 maps), global average pooling and a linear classifier::

    1 -> 16 (8x8) -> 32 (8x8) -> pool -> 32 (4x4) -> 64 (4x4) -> GAP -> 10

At batch size 1 every norm still sees at least 16 values per channel.
"""
import torch.nn as nn

from ..ops import (
    BatchChannelNorm2d,
    CenteredConv2d,
    CrossIterationBatchNorm2d,
    MovingAverageBatchNorm2d,
    WeightStandardizedConv2d,
    bind_cbn_to_conv,
)

__all__ = ['NORMS', 'WIDTHS', 'SmallConvNet', 'make_conv_norm']

NORMS = ('bn', 'gn', 'bcn', 'mabn', 'cbn', 'naive', 'cbn_fullgrad')
WIDTHS = (16, 32, 32, 64)
POOL_AFTER = 1   # index of the block followed by the 2x2 max-pool


def make_conv_norm(norm, in_channels, out_channels, *, batch_size=None, num_groups=8, cbn_buffer=3,
                   cbn_burnin=0, mabn_real_batch=16, mabn_warmup=100):
    """One ``(conv, norm)`` pair of kind ``norm``.

    * ``bn``: ``nn.Conv2d`` + ``nn.BatchNorm2d``;  ``gn``: ``nn.Conv2d`` + ``nn.GroupNorm(num_groups)``;
    * ``bcn``: weight-standardized conv + ``BatchChannelNorm2d(num_groups, estimate_stats=True)``
      (the paper's micro-batch mode);
    * ``mabn``: centred conv + ``MovingAverageBatchNorm2d(B=batch_size, real_B=max(mabn_real_batch,
      batch_size))``, i.e. moving averages over ``real_B / B`` iterations;
    * ``cbn``: ``nn.Conv2d`` + ``CrossIterationBatchNorm2d(buffer_num=cbn_buffer, burnin=cbn_burnin)``,
      bound to its conv; ``naive``: the same with ``rho=0`` (cross-iteration averaging, no compensation);
    * ``cbn_fullgrad``: the same CBN with ``grad_through_window=True`` (the gradient also flows through
      the compensated past entries).
    """
    if norm not in NORMS:
        raise ValueError(f'make_conv_norm: norm must be one of {NORMS}, got {norm!r}')
    conv_args = dict(kernel_size=3, padding=1, bias=False)
    if norm == 'bcn':
        conv = WeightStandardizedConv2d(in_channels, out_channels, **conv_args)
        return conv, BatchChannelNorm2d(out_channels, num_groups=num_groups, estimate_stats=True)
    if norm == 'mabn':
        if batch_size is None:
            raise ValueError("make_conv_norm: norm='mabn' needs batch_size")
        real_batch = max(mabn_real_batch, batch_size)
        real_batch -= real_batch % batch_size
        conv = CenteredConv2d(in_channels, out_channels, **conv_args)
        return conv, MovingAverageBatchNorm2d(out_channels, B=batch_size, real_B=real_batch,
                                              warmup_iters=mabn_warmup)
    conv = nn.Conv2d(in_channels, out_channels, **conv_args)
    if norm == 'bn':
        return conv, nn.BatchNorm2d(out_channels)
    if norm == 'gn':
        return conv, nn.GroupNorm(num_groups, out_channels)
    layer = CrossIterationBatchNorm2d(out_channels, buffer_num=cbn_buffer, burnin=cbn_burnin,
                                      rho=0.0 if norm == 'naive' else 1.0,
                                      grad_through_window=norm == 'cbn_fullgrad')
    if cbn_buffer > 0:
        bind_cbn_to_conv(layer, conv)
    return conv, layer


class SmallConvNet(nn.Module):
    """The net described in the module docstring; ``norm`` and ``norm_kwargs`` go to :func:`make_conv_norm`.

    Attributes ``convs`` and ``norms`` (``nn.ModuleList``) hold the blocks in order, so analysis code
    can run the blocks one by one (see ``stats_error.probe_forward``).
    """

    def __init__(self, norm='bn', num_classes=10, in_channels=1, widths=WIDTHS, **norm_kwargs):
        super().__init__()
        self.norm_kind = norm
        convs, norms = [], []
        cin = in_channels
        for width in widths:
            conv, layer = make_conv_norm(norm, cin, width, **norm_kwargs)
            convs.append(conv)
            norms.append(layer)
            cin = width
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList(norms)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        for index, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = norm(conv(x)).relu()
            if index == POOL_AFTER:
                x = self.pool(x)
        return self.fc(x.mean((2, 3)))
