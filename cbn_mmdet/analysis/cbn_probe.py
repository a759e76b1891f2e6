"""The statistics the real ``CrossIterationBatchNorm2d`` normalises with, for a given window history.

The study needs CBN's estimate ``(μ̄, σ̄²)`` for chosen past inputs and weights. Rather than re-implement
the layer, a fresh layer (γ = 1, β = 0) bound to a probe conv is fed the past iterations, oldest first,
each with its own weight, then the current one; its output is ``(y − μ̄)/(σ̄ + eps)``, an affine map of
the input ``y`` per channel, from which ``μ̄`` and ``σ̄`` are read back exactly (a least-squares line,
exact up to rounding). ``compensate_sq=False`` zeroes the stored ``∂ν/∂W`` before the current step:
CBN with the mean compensated and the second moment not.
"""
import torch
import torch.nn as nn

from ..ops import CrossIterationBatchNorm2d, bind_cbn_to_conv

__all__ = ['cbn_window_statistics', 'read_back_statistics']


def read_back_statistics(y, out, eps):
    """``(μ̄, σ̄²)`` of a γ=1, β=0 CBN step from its input ``y`` and output ``out = (y − μ̄)/(σ̄ + eps)``."""
    yc = y - y.mean((0, 2, 3), keepdim=True)
    oc = out - out.mean((0, 2, 3), keepdim=True)
    slope = (yc * oc).sum((0, 2, 3)) / (yc * yc).sum((0, 2, 3))
    intercept = out.mean((0, 2, 3)) - slope * y.mean((0, 2, 3))
    std = 1.0 / slope - eps
    return -intercept / slope, std * std


def cbn_window_statistics(conv, past, current_input, weight_t, rho=1.0, compensate_sq=True, eps=1e-5):
    """``(μ̄, σ̄²)`` CBN uses for ``conv(current_input)`` at ``weight_t`` after the ``past`` iterations.

    Args:
        conv (nn.Conv2d): gives the geometry (bias-free, ``groups=1``); its own weight is not used.
        past (list): ``[(input, weight), ...]`` of the past iterations, newest first (at least one).
        current_input (Tensor): the conv input of the current iteration.
        weight_t (Tensor): the current conv weight.
        rho (float): the layer's ``rho`` (0 = naive cross-iteration averaging).
        compensate_sq (bool): ``False`` zeroes the stored ``∂ν/∂W`` (no ν-compensation).
    """
    if not past:
        raise ValueError('cbn_window_statistics: needs at least one past iteration, got none')
    if conv.groups != 1 or conv.bias is not None:
        raise ValueError('cbn_window_statistics: needs a bias-free conv with groups=1, got '
                         f'groups={conv.groups}, bias={conv.bias is not None}')
    dtype, device = weight_t.dtype, weight_t.device
    probe = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, bias=False).to(dtype=dtype, device=device)
    layer = CrossIterationBatchNorm2d(conv.out_channels, eps=eps, buffer_num=len(past), rho=rho,
                                      burnin=0).to(dtype=dtype, device=device)
    bind_cbn_to_conv(layer, probe)
    with torch.enable_grad():    # the window path runs for inputs that require grad
        for x, weight in reversed(past):
            with torch.no_grad():
                probe.weight.copy_(weight)
            # a training step enters CBN's window at its backward (once its gradient is known finite)
            layer(probe(x.detach().requires_grad_())).sum().backward()
        with torch.no_grad():
            probe.weight.copy_(weight_t)
            if not compensate_sq:
                layer.window_sq_grad.zero_()
        y = probe(current_input.detach().requires_grad_())
        out = layer(y)
    return read_back_statistics(y.detach(), out.detach(), eps)
