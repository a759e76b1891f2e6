"""Weight-transformed convolutions: Weight Standardization and MABN's centred convolution.

* Weight Standardization (WS): Qiao, Wang, Liu, Shen, Yuille, "Micro-Batch Training with
  Batch-Channel Normalization and Weight Standardization", arXiv 1903.10520.
* Centred convolution: Yan, Wan, Zhang, Zhang, Wei, Sun, "Towards Stabilizing Batch Statistics in
  Backward Propagation of Batch Normalization", ICLR 2020 (MABN).

Both re-parametrise the weight per output channel before an ordinary convolution, so the stored
parameters (``weight``, ``bias``) and therefore the checkpoint keys are exactly those of
``nn.Conv2d``.

Two WS definitions matter here. mmcv's ``ConvWS2d`` and the released WS (detection) code divide by
the *unbiased* standard deviation plus ``eps`` (eps outside the root): ``(W - mean) / (std + eps)``,
our default, so a model trained with mmcv's ``ConvWS`` loads and computes the same thing. The BCN
repository's ImageNet networks (the BCN+WS backbones) divide by ``sqrt(var_unbiased + eps)`` (eps
inside the root): ``eps_inside_sqrt=True``. The two differ by ``eps / (2·std)`` relatively, i.e.
noticeably for small filters' std (see ``docs/norm_layers.md``).

A folded conv+norm must use :meth:`cbn_effective_weight`, never the raw ``weight``: the raw parameter
is not what the convolution applies. ``cbn_mmdet.deploy`` folds these convs exactly (also through
mmcv's ``fuse_conv_bn`` / ``efficient_conv_bn_eval`` once its guard is installed).

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


def weight_standardize(weight, eps=1e-5, eps_inside_sqrt=False):
    """Standardize a conv weight per output channel.

    ``W_hat[o] = (W[o] - mean(W[o])) / (std_unbiased(W[o]) + eps)`` (mmcv ``ConvWS2d``, the WS code),
    or ``/ sqrt(var_unbiased(W[o]) + eps)`` with ``eps_inside_sqrt=True`` (the BCN ImageNet code),
    where the statistics run over all of output channel ``o``'s entries ``(C_in / groups, *kernel)``.

    Args:
        weight (Tensor): conv weight of shape ``(C_out, C_in / groups, *kernel)`` (any conv rank).
        eps (float): added to the standard deviation, or to the variance with ``eps_inside_sqrt``;
            must be > 0. Default: 1e-5.
        eps_inside_sqrt (bool): where ``eps`` goes (see above). Default: False.

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
    if eps_inside_sqrt:
        var, mean = torch.var_mean(flat, dim=1, keepdim=True, correction=1)
        scale = torch.rsqrt(var + eps)
    else:
        std, mean = torch.std_mean(flat, dim=1, keepdim=True, correction=1)
        scale = 1.0 / (std + eps)
    return ((flat - mean) * scale).view_as(weight).to(weight.dtype)


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
    output channel's ``(C_in / groups, kh, kw)`` entries, as mmcv's ``ConvWS2d``; with
    ``eps_inside_sqrt=True`` the divisor is ``sqrt(var_unbiased + ws_eps)`` (BCN's ImageNet code).

    The standardisation runs inside ``_conv_forward(input, weight, bias)`` on the weight it is given,
    and only on the conv's own ``weight``: mmcv's ``efficient_conv_bn_eval`` hands it ``weight * s``
    (a norm folded into the *raw* weight), which re-standardising would silently undo, so that call
    raises (``cbn_mmdet.deploy.fuse_norm.install_mmcv_fold_guard`` makes mmcv run such pairs exactly instead).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device, dtype: as ``nn.Conv2d``.
        ws_eps (float, keyword-only): added to the weight's standard deviation (or variance);
            must be > 0. Default: 1e-5.
        eps_inside_sqrt (bool, keyword-only): divide by ``sqrt(var + ws_eps)`` instead of
            ``std + ws_eps``. Default: False (mmcv ``ConvWS``).

    Shape:
        - Input: ``(N, C_in, H, W)`` or ``(C_in, H, W)``; ``N = 0`` gives an empty output.
        - Output: ``(N, C_out, H_out, W_out)`` as ``nn.Conv2d``.

    Example:
        >>> conv = WeightStandardizedConv2d(8, 16, 3, padding=1, bias=False)
        >>> conv(torch.randn(2, 8, 5, 5)).shape
        torch.Size([2, 16, 5, 5])
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode='zeros', device=None, dtype=None, *, ws_eps=1e-5,
                 eps_inside_sqrt=False):
        owner = type(self).__name__
        ws_eps = check_eps(ws_eps, owner, name='ws_eps')
        if not isinstance(eps_inside_sqrt, bool):
            raise TypeError(f'{owner}: eps_inside_sqrt must be a bool, got {eps_inside_sqrt!r} '
                            f'({type(eps_inside_sqrt).__name__})')
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        _check_fan_in(self, owner)
        self.ws_eps = ws_eps
        self.eps_inside_sqrt = eps_inside_sqrt

    def cbn_effective_weight(self):
        """The standardized weight the convolution actually applies (differentiable)."""
        return weight_standardize(self.weight, self.ws_eps, self.eps_inside_sqrt)

    def forward(self, input):
        check_input_dim(input, (3, 4), type(self).__name__)
        return self._conv_forward(input, self.weight, self.bias)

    def _conv_forward(self, input, weight, bias):
        if weight is not self.weight:
            raise RuntimeError(
                f'{type(self).__name__}: asked to convolve with a weight other than its own (mmcv '
                'efficient_conv_bn_eval folds the norm into the raw weight, which WS re-standardises): '
                'turn efficient_conv_bn_eval off here or call cbn_mmdet.deploy.fuse_norm.install_mmcv_fold_guard()')
        # nn.Conv2d's F.conv2d call (keeps padding_mode support) on the standardized weight.
        return super()._conv_forward(input, self.cbn_effective_weight(), bias)

    def extra_repr(self):
        return f'{super().extra_repr()}, ws_eps={self.ws_eps}, eps_inside_sqrt={self.eps_inside_sqrt}'


class CenteredConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight is centred per output channel (MABN's ``CenConv2d``).

    Computes ``conv2d(x, W - mean(W[o]), bias)`` with the mean over each output channel's
    ``(C_in / groups, kh, kw)`` entries. The centring runs inside ``_conv_forward`` on whatever
    weight it is given: centring commutes with a per-output-channel scale, so a norm folded into the
    raw weight (mmcv's ``fuse_conv_bn`` and ``efficient_conv_bn_eval``) stays exact.
    MABN normalises by the second moment only (no mean subtraction); the centred weight takes over
    the role of the mean. MABN uses ``bias=False``
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
        return self._conv_forward(input, self.weight, self.bias)

    def _conv_forward(self, input, weight, bias):
        return super()._conv_forward(input, weight_center(weight), bias)
