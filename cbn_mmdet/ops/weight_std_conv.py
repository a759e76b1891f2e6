"""Weight-transformed convolutions: Weight Standardization and MABN's centred convolution.

* Weight Standardization (WS): Qiao, Wang, Liu, Shen, Yuille, "Micro-Batch Training with
  Batch-Channel Normalization and Weight Standardization", arXiv 1903.10520.
* Centred convolution: Yan, Wan, Zhang, Zhang, Wei, Sun, "Towards Stabilizing Batch Statistics in
  Backward Propagation of Batch Normalization", ICLR 2020 (MABN).

Both re-parametrise the weight per output channel before an ordinary convolution, so the stored
parameters (``weight``, ``bias``) and therefore the checkpoint keys are exactly those of
``nn.Conv2d``.

Two WS definitions are in circulation: mmcv's ``ConvWS2d`` and the released WS code divide by the
*unbiased* standard deviation plus ``eps`` (eps outside the root), timm divides by
``sqrt(biased var + eps)``. We follow mmcv and the paper's code:
``(W - mean(W)) / (std_unbiased(W) + eps)``, so a model trained with mmcv's ``ConvWS`` loads and
computes the same thing.

A folded conv+norm (mmcv's ``fuse_conv_bn``) must use :meth:`cbn_effective_weight`, never the raw
``weight``: the raw parameter is not what the convolution applies.

BibTeX::

    @article{qiao2019ws,
      title={Micro-Batch Training with Batch-Channel Normalization and Weight Standardization},
      author={Qiao, Siyuan and Wang, Huiyu and Liu, Chenxi and Shen, Wei and Yuille, Alan},
      journal={arXiv preprint arXiv:1903.10520}, year={2019}}
    @inproceedings{yan2020mabn,
      title={Towards Stabilizing Batch Statistics in Backward Propagation of Batch Normalization},
      author={Yan, Junjie and Wan, Ruosi and Zhang, Xiangyu and Zhang, Wei and Wei, Yichen and Sun, Jian},
      booktitle={ICLR}, year={2020}}
"""
import math

import torch
from torch import nn

from ._validate import check_eps, check_input_dim

__all__ = ['weight_standardize', 'weight_center', 'WeightStandardizedConv2d', 'CenteredConv2d']


def _check_weight(weight, owner):
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f'{owner}: weight must be a torch.Tensor, got {type(weight).__name__}')
    if weight.dim() < 2:
        raise ValueError(f'{owner}: weight must have at least 2 dims (out_channels, ...), got shape '
                         f'{tuple(weight.shape)}')


def _flat_fp32(weight):
    """The weight as (out_channels, fan_in), in at least float32.

    Statistics of a bf16/fp16 weight would lose most of their digits; float64 stays float64 so
    gradcheck sees exact arithmetic.
    """
    return weight.flatten(1).to(torch.promote_types(weight.dtype, torch.float32))


def weight_standardize(weight, eps=1e-5):
    """Standardize a conv weight per output channel (mmcv ``ConvWS2d`` / the WS paper's code).

    ``W_hat[o] = (W[o] - mean(W[o])) / (std_unbiased(W[o]) + eps)`` where the statistics run over
    all of output channel ``o``'s entries ``(C_in / groups, *kernel)``.

    Args:
        weight (Tensor): conv weight of shape ``(C_out, C_in / groups, *kernel)`` (any conv rank).
        eps (float): added to the standard deviation (outside the square root). Default: 1e-5.

    Returns:
        Tensor: same shape and dtype as ``weight``; differentiable w.r.t. ``weight``.
    """
    _check_weight(weight, 'weight_standardize')
    eps = check_eps(eps, 'weight_standardize')
    if weight[0].numel() < 2:
        # The unbiased std of a single entry is 0/0: refuse instead of returning NaN weights.
        raise ValueError('weight_standardize: each output channel needs >= 2 entries (fan-in), got '
                         f'weight of shape {tuple(weight.shape)}')
    flat = _flat_fp32(weight)
    std, mean = torch.std_mean(flat, dim=1, keepdim=True, correction=1)
    return ((flat - mean) / (std + eps)).view_as(weight).to(weight.dtype)


def weight_center(weight):
    """Subtract each output channel's mean from a conv weight (MABN's centred conv).

    Args:
        weight (Tensor): conv weight of shape ``(C_out, C_in / groups, *kernel)``.

    Returns:
        Tensor: ``W - mean(W[o])`` per output channel ``o``; same shape and dtype as ``weight``.
    """
    _check_weight(weight, 'weight_center')
    flat = _flat_fp32(weight)
    return (flat - flat.mean(dim=1, keepdim=True)).view_as(weight).to(weight.dtype)


def _check_fan_in(conv, owner):
    """Both transforms are degenerate for a fan-in of 1 (NaN for WS, an all-zero weight for
    centring), which only a 1x1 depthwise conv has: refuse it at build time."""
    fan_in = conv.in_channels // conv.groups * math.prod(conv.kernel_size)
    if fan_in < 2:
        raise ValueError(f'{owner}: fan-in (in_channels/groups * kh * kw) must be >= 2, got '
                         f'in_channels={conv.in_channels}, groups={conv.groups}, '
                         f'kernel_size={conv.kernel_size}')


class WeightStandardizedConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight is standardized per output channel before every convolution.

    Computes ``conv2d(x, (W - mean) / (std_unbiased + ws_eps), bias)`` with statistics over each
    output channel's ``(C_in / groups, kh, kw)`` entries, as mmcv's ``ConvWS2d``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device, dtype: as ``nn.Conv2d``.
        ws_eps (float, keyword-only): added to the weight's standard deviation. Default: 1e-5.

    Shape:
        - Input: ``(N, C_in, H, W)`` or ``(C_in, H, W)``; ``N = 0`` gives an empty output.
        - Output: ``(N, C_out, H_out, W_out)`` as ``nn.Conv2d``.

    Example:
        >>> conv = WeightStandardizedConv2d(8, 16, 3, padding=1, bias=False)
        >>> conv(torch.randn(2, 8, 5, 5)).shape
        torch.Size([2, 16, 5, 5])
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode='zeros', device=None, dtype=None, *, ws_eps=1e-5):
        owner = type(self).__name__
        ws_eps = check_eps(ws_eps, owner, name='ws_eps')
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        _check_fan_in(self, owner)
        self.ws_eps = ws_eps

    def cbn_effective_weight(self):
        """The standardized weight the convolution actually applies (differentiable)."""
        return weight_standardize(self.weight, self.ws_eps)

    def forward(self, input):
        check_input_dim(input, (3, 4), type(self).__name__)
        # _conv_forward is nn.Conv2d's F.conv2d call; reusing it keeps padding_mode support.
        return self._conv_forward(input, self.cbn_effective_weight(), self.bias)

    def extra_repr(self):
        return f'{super().extra_repr()}, ws_eps={self.ws_eps}'


class CenteredConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight is centred per output channel (MABN's ``CenConv2d``).

    Computes ``conv2d(x, W - mean(W[o]), bias)`` with the mean over each output channel's
    ``(C_in / groups, kh, kw)`` entries. MABN normalises by the second moment only (no mean
    subtraction); the centred weight takes over the role of the mean. MABN uses ``bias=False``
    (a bias would re-introduce the offset the centring removes); the default here follows
    ``nn.Conv2d`` (``bias=True``) so the layer is a drop-in conv, so pass ``bias=False`` for MABN.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device, dtype: as ``nn.Conv2d``.

    Shape:
        - Input: ``(N, C_in, H, W)`` or ``(C_in, H, W)``; ``N = 0`` gives an empty output.
        - Output: ``(N, C_out, H_out, W_out)`` as ``nn.Conv2d``.

    Example:
        >>> conv = CenteredConv2d(8, 16, 3, padding=1, bias=False)
        >>> conv(torch.randn(2, 8, 5, 5)).shape
        torch.Size([2, 16, 5, 5])
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode='zeros', device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        _check_fan_in(self, type(self).__name__)

    def cbn_effective_weight(self):
        """The centred weight the convolution actually applies (differentiable)."""
        return weight_center(self.weight)

    def forward(self, input):
        check_input_dim(input, (3, 4), type(self).__name__)
        return self._conv_forward(input, self.cbn_effective_weight(), self.bias)
