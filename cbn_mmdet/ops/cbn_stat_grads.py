"""Closed-form gradients of a conv output's channel statistics w.r.t. the conv weight.

Cross-iteration BN compensates stale statistics with a first-order Taylor step in the conv weight, so it
needs, for every output channel ``c`` of ``y = conv(x, W)`` (``M = N·Ho·Wo`` positions):

* ``dμ_c/dW_c = E[x_patch]`` — the mean input patch. It does not depend on ``c`` (only on the group of
  ``c``), so it is one vector of ``C_in·kh·kw`` numbers per group: the weight-gradient of the conv for a
  constant output gradient ``1/M`` with one output channel per group (1/C_out of the conv's cost, one
  kernel). The official code obtains it with a full ``autograd.grad`` call.
* ``dν_c/dW_c = 2·E[y_c · x_patch]`` — exactly a conv weight-gradient whose ``grad_output`` is
  ``2y/M``: one ``convolution_backward`` with only the weight gradient requested (as costly as the conv).
  ``sampled_second_moment_weight_grad`` estimates it from a strided grid of output positions: rows
  ``a + i·rh`` of a conv with stride ``s`` and padding ``p`` are the outputs of the same conv with stride
  ``s·rh`` and padding ``p − a·s``, so the estimate is one weight-gradient ``rh·rw`` times cheaper, with
  no copy of the input.

Both are pure functions of tensors; no autograd graph is built or used.
"""
import math

import torch
from torch.nn.modules.utils import _pair

from ._bn_common import cached_constant

__all__ = ['conv_output_size', 'mean_input_patch', 'second_moment_weight_grad', 'sampled_second_moment_weight_grad']

def _expanded(like, shape, value=None):
    """A one-element tensor of ``like``'s dtype/device expanded to ``shape`` (``value`` or uninitialised),
    cached: the weight "stubs" ``convolution_backward`` needs only for their shape, and the constant output
    gradient of the mean patch."""
    def make():
        base = like.new_empty(1) if value is None else like.new_full((1,) * len(shape), value)
        return base.expand(*shape)
    return cached_constant(('expanded', tuple(shape), value, like.dtype, like.device), make)


def _half_prescale(dtype, m):
    """The scale of a float16 kernel's output gradient for a sum over ``m`` positions, else 1.

    A half weight-gradient accumulates in float32 but rounds its result to half: ``Σ y·x_patch`` over the
    positions of a large map (an FPN P2 level has ~10⁵) exceeds half's range (65504) before any 1/m, and
    a constant output gradient 1/m is a subnormal half (less than 6.1e-5) from m ≈ 16k on. A power of two
    near 1/sqrt(m) keeps both in range — exact, since it only moves the exponent — and the rest of the
    scale is applied to the small result.
    """
    if dtype != torch.float16 or m <= 1:
        return 1.0
    return 2.0 ** -round(math.log2(m) / 2)


def conv_output_size(in_size, kernel_size, stride, padding, dilation):
    """Spatial output size ``(Ho, Wo)`` of a conv2d (floor mode, like torch)."""
    return tuple((in_size[i] + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1) // stride[i] + 1
                 for i in range(2))


def mean_input_patch(x, kernel_size, stride=1, padding=0, dilation=1, raw=False):
    """``E[x_patch]`` over batch and output positions: ``dμ_c/dW_c`` of a conv fed by ``x``.

    Args:
        x (Tensor): conv input ``(N, C_in, H, W)``.
        kernel_size, stride, padding, dilation: the conv's geometry (int or pair).

    Returns:
        Tensor ``(C_in, kh, kw)`` in float32 (float64 for a float64 input): entry ``[i, a, b]`` is the mean,
        over every sample and every output position, of the (zero-padded) input value that kernel tap
        ``(a, b)`` of input channel ``i`` sees. For a grouped conv, output channel ``c`` of group ``g``
        uses the rows of group ``g``.

        ``raw=True``: the same ``C_in·kh·kw`` values as the kernel produced them (x's dtype, any shape),
        for a caller that copies them into a buffer of its own at once (no reshape, no cast of its own).
    """
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    n, cin, h, w = x.shape
    ho, wo = conv_output_size((h, w), (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if (kh, kw, ph, pw, sh, sw) == (1, 1, 0, 0, 1, 1):
        # A 1x1 conv without padding or stride reads every input position once: one reduction.
        mean = x.mean((0, 2, 3), dtype=dtype)
        return mean if raw else mean.view(cin, 1, 1)
    # The weight-gradient of a one-output conv (same geometry, no groups: the mean patch of an input
    # channel does not depend on the grouping) whose output gradient is 1/M everywhere is exactly the
    # mean patch: one kernel, the conv's own, whatever the geometry.
    m = max(n * ho * wo, 1)
    pre = _half_prescale(x.dtype, m)
    grad_output = _expanded(x, (n, 1, ho, wo), 1.0 / m if pre == 1.0 else pre)
    grad = torch.ops.aten.convolution_backward(
        grad_output, x, _expanded(x, (1, cin, kh, kw)), None, [sh, sw], [ph, pw], [dh, dw], False, [0, 0], 1,
        [False, True, False])[1]
    if pre != 1.0:
        return grad.to(dtype).mul_(1.0 / (m * pre)).view(cin, kh, kw)
    return grad if raw else grad.reshape(cin, kh, kw).to(dtype)


def second_moment_weight_grad(x, y, weight_shape, stride=1, padding=0, dilation=1, groups=1, out=None):
    """``dν_c/dW_c = 2·E[y_c · x_patch]`` for every output channel: one conv weight-gradient.

    Args:
        x (Tensor): conv input ``(N, C_in, H, W)``.
        y (Tensor): conv output ``(N, C_out, Ho, Wo)`` (bias included if the conv has one: ``dy/dW`` is
            the input patch either way).
        weight_shape: the conv weight's shape ``(C_out, C_in/groups, kh, kw)``.
        out (Tensor, optional): written with the result (``weight_shape``, any dtype) instead of a new tensor.

    Returns:
        Tensor of ``weight_shape``.
    """
    m = y.shape[0] * y.shape[2] * y.shape[3]
    return _weight_grad(x, y, weight_shape, _pair(stride), _pair(padding), _pair(dilation), groups, m, out)


def sampled_second_moment_weight_grad(x, y, weight_shape, stride=1, padding=0, dilation=1, groups=1, step=(2, 2),
                                      phase=(0, 0), out=None):
    """Estimate of ``dν_c/dW_c`` from the output positions on a strided grid only.

    Args:
        x, y, weight_shape, stride, padding, dilation, groups, out: as :func:`second_moment_weight_grad`.
        step (pair of int): ``(rh, rw)``, the sampling strides over output rows and columns (each >= 1).
        phase (pair of int): ``(a, b)``, the first sampled row and column (``0 <= a < rh``, same for ``b``).

    Returns:
        Tensor of ``weight_shape``: ``2·mean(y_c · x_patch)`` over the sampled positions — rows
        ``a, a + rh, a + 2·rh, ...`` and columns likewise (the exact value when ``step == (1, 1)``) — at
        about ``1/(rh·rw)`` of the cost of the exact weight-gradient.

    The grid is realised without copying the input: rows ``a + i·rh`` of a stride-``s`` conv with padding
    ``p`` are the outputs of the same conv with stride ``s·rh`` and padding ``p − a·s`` (where ``a·s > p``,
    padding 0 on the input cropped by ``a·s − p`` rows). With the smaller padding, a shifted grid's last
    row may need zero padding the strided conv does not have; that row is then left out of the sample
    (and a grid that would be empty falls back to ``a = 0``). Columns likewise. A 1x1 conv without
    padding or groups is a plain matrix product over the gathered positions.
    """
    (rh, rw), (a, b) = _pair(step), _pair(phase)
    if (rh, rw) == (1, 1):
        return second_moment_weight_grad(x, y, weight_shape, stride, padding, dilation, groups, out)
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    n, cout, kh, kw = y.shape[0], y.shape[1], weight_shape[2], weight_shape[3]
    if (kh, kw, ph, pw) == (1, 1, 0, 0) and groups == 1:
        # Gather the sampled input positions (|x|/(rh·rw) numbers) and multiply: no im2col, no full copy.
        xs = x[:, :, a * sh::sh * rh, b * sw::sw * rw].reshape(n, x.shape[1], -1)
        ys = y[:, :, a::rh, b::rw].reshape(n, cout, -1)
        m = max(ys.shape[0] * ys.shape[2], 1)
        pre = _half_prescale(ys.dtype, m)
        if pre != 1.0:
            ys = ys * pre
        grad = torch.bmm(ys, xs.transpose(1, 2)).sum(0) if n > 0 else y.new_zeros(weight_shape[:2])
        return _scaled(grad.view(weight_shape), 2.0 / (m * pre), out)
    (a, crop_h, pad_h, rows), (b, crop_w, pad_w, cols) = (
        _shifted_grid(x.shape[2 + i], (kh, kw)[i], (sh, sw)[i], (ph, pw)[i], (dh, dw)[i], (rh, rw)[i], (a, b)[i])
        for i in range(2))
    if crop_h or crop_w:
        x = x[:, :, crop_h:, crop_w:]
    y_sub = y[:, :, a::rh, b::rw][:, :, :rows, :cols]
    m = y_sub.shape[0] * y_sub.shape[2] * y_sub.shape[3]
    return _weight_grad(x, y_sub, weight_shape, (sh * rh, sw * rw), (pad_h, pad_w), (dh, dw), groups, m, out)


def _shifted_grid(size, k, s, p, d, r, a):
    """``(phase, crop, padding, count)`` of the sampled grid along one spatial dimension (see above)."""
    for phase in (a, 0):
        crop, pad = max(phase * s - p, 0), max(p - phase * s, 0)
        count = (size - crop + 2 * pad - d * (k - 1) - 1) // (s * r) + 1
        if count >= 1:
            return phase, crop, pad, count
    return 0, 0, p, 0    # no output position at all (an empty map)


def _weight_grad(x, y, weight_shape, stride, padding, dilation, groups, m, out=None):
    """``2·Σ_p y[p]·x_patch[p] / m`` per weight entry: one weight-only ``convolution_backward``.

    The weight-gradient is linear in ``grad_output``, so the scale ``2/m`` is applied to the (small) result
    rather than to ``y`` — except for the power of two a float16 ``y`` is scaled by first, so that the sum
    stays in half's range (:func:`_half_prescale`). ``m = 0`` (an empty batch) gives zeros.
    """
    pre = _half_prescale(y.dtype, m)
    grad = torch.ops.aten.convolution_backward(
        y if pre == 1.0 else y * pre, x, _expanded(y, weight_shape), None, list(stride), list(padding),
        list(dilation), False, [0, 0], groups, [False, True, False])[1]
    return _scaled(grad, 2.0 / (max(m, 1) * pre), out)


def _scaled(grad, scale, out):
    """``grad·scale``, in place, or written into ``out`` (one operator either way)."""
    return grad.mul_(scale) if out is None else torch.mul(grad, scale, out=out)
