"""Closed-form gradients of a conv output's channel statistics w.r.t. the conv weight.

Cross-iteration BN compensates stale statistics with a first-order Taylor step in the conv weight, so it
needs, for every output channel ``c`` of ``y = conv(x, W)`` (``M = N·Ho·Wo`` positions):

* ``dμ_c/dW_c = E[x_patch]`` — the mean input patch. It does not depend on ``c`` (only on the group of
  ``c``), so it is one vector of ``C_in·kh·kw`` numbers, and it is nearly free: a sum over the batch and a
  strided box-sum per kernel offset. The official code obtains it with a full ``autograd.grad`` call.
* ``dν_c/dW_c = 2·E[y_c · x_patch]`` — exactly a conv weight-gradient whose ``grad_output`` is
  ``2y/M``: one ``convolution_backward`` with only the weight gradient requested (as costly as the conv).
  ``sampled_second_moment_weight_grad`` estimates it from a strided subset of the output positions: the
  positions ``(a + i·rh, b + j·rw)`` of a conv with stride ``s`` are exactly the outputs of the same conv
  with stride ``s·(rh, rw)`` on the input shifted by ``s·(a, b)``, so the estimate is one weight-gradient
  ``rh·rw`` times cheaper.

Both are pure functions of tensors; no autograd graph is built or used.
"""
from torch.nn.modules.utils import _pair
import torch
import torch.nn.functional as F

__all__ = ['conv_output_size', 'mean_input_patch', 'second_moment_weight_grad', 'sampled_second_moment_weight_grad']


def conv_output_size(in_size, kernel_size, stride, padding, dilation):
    """Spatial output size ``(Ho, Wo)`` of a conv2d (floor mode, like torch)."""
    return tuple((in_size[i] + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1) // stride[i] + 1
                 for i in range(2))


def mean_input_patch(x, kernel_size, stride=1, padding=0, dilation=1):
    """``E[x_patch]`` over batch and output positions: ``dμ_c/dW_c`` of a conv fed by ``x``.

    Args:
        x (Tensor): conv input ``(N, C_in, H, W)``.
        kernel_size, stride, padding, dilation: the conv's geometry (int or pair).

    Returns:
        Tensor ``(C_in, kh, kw)``: entry ``[i, a, b]`` is the mean, over every sample and every output
        position, of the (zero-padded) input value that kernel tap ``(a, b)`` of input channel ``i`` sees.
        For a grouped conv, output channel ``c`` of group ``g`` uses the rows of group ``g``.
    """
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    n, _, h, w = x.shape
    ho, wo = conv_output_size((h, w), (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    # Summing over the batch first makes every later step independent of N.
    summed = F.pad(x.sum(0), (pw, pw, ph, ph))                     # (C_in, Hp, Wp)
    # Tap a reads rows a·dh + sh·k (k < Ho): one strided window per tap, taken with unfold.
    rows = summed.unfold(1, sh * (ho - 1) + 1, dh)[:, :kh]        # (C_in, kh, Wp, span_h)
    rows = rows[..., ::sh].sum(-1)                                # (C_in, kh, Wp)
    cols = rows.unfold(2, sw * (wo - 1) + 1, dw)[:, :, :kw]       # (C_in, kh, kw, span_w)
    return cols[..., ::sw].sum(-1) / float(n * ho * wo)


def second_moment_weight_grad(x, y, weight_shape, stride=1, padding=0, dilation=1, groups=1):
    """``dν_c/dW_c = 2·E[y_c · x_patch]`` for every output channel: one conv weight-gradient.

    Args:
        x (Tensor): conv input ``(N, C_in, H, W)``.
        y (Tensor): conv output ``(N, C_out, Ho, Wo)`` (bias included if the conv has one: ``dy/dW`` is
            the input patch either way).
        weight_shape: the conv weight's shape ``(C_out, C_in/groups, kh, kw)``.

    Returns:
        Tensor of ``weight_shape``.
    """
    m = y.shape[0] * y.shape[2] * y.shape[3]
    return _weight_grad(x, y, weight_shape, _pair(stride), _pair(padding), _pair(dilation), groups, m)


def sampled_second_moment_weight_grad(x, y, weight_shape, stride=1, padding=0, dilation=1, groups=1, step=(2, 2),
                                      phase=(0, 0)):
    """Estimate of ``dν_c/dW_c`` from the output positions ``(a + i·rh, b + j·rw)`` only.

    Args:
        x, y, weight_shape, stride, padding, dilation, groups: as :func:`second_moment_weight_grad`.
        step (pair of int): ``(rh, rw)``, the sampling strides over output rows and columns (each >= 1).
        phase (pair of int): ``(a, b)``, the first sampled row and column (``0 <= a < rh``, ``a < Ho``;
            same for ``b``). Cycling through all ``rh·rw`` phases averages to the exact value.

    Returns:
        Tensor of ``weight_shape``: ``2·mean(y_c · x_patch)`` over the sampled positions (the exact value
        when ``step == (1, 1)``). Costs ``1/(rh·rw)`` of the exact weight-gradient.
    """
    (rh, rw), (a, b) = _pair(step), _pair(phase)
    if (rh, rw) == (1, 1):
        return second_moment_weight_grad(x, y, weight_shape, stride, padding, dilation, groups)
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    y_sub = y[:, :, a::rh, b::rw]
    m = y_sub.shape[0] * y_sub.shape[2] * y_sub.shape[3]
    # Output (a + i·rh) of the stride-sh conv reads padded input rows sh·a + sh·rh·i + k·dh: a stride
    # sh·rh conv of the padded input cropped at row sh·a (same for columns), without further padding.
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    x = x[:, :, sh * a:, sw * b:]
    return _weight_grad(x, y_sub, weight_shape, (sh * rh, sw * rw), (0, 0), _pair(dilation), groups, m)


def _weight_grad(x, y, weight_shape, stride, padding, dilation, groups, m):
    """``2·Σ_p y[p]·x_patch[p] / m`` per weight entry: one weight-only ``convolution_backward``.

    The weight-gradient is linear in ``grad_output``, so the scale ``2/m`` is applied to the (small) result
    rather than to ``y``. ``m = 0`` (an empty batch) gives zeros.
    """
    weight_stub = y.new_empty(1).expand(weight_shape)
    grad = torch.ops.aten.convolution_backward(
        y, x, weight_stub, None, list(stride), list(padding), list(dilation), False, [0, 0], groups,
        [False, True, False])[1]
    return grad.mul_(2.0 / max(m, 1))
