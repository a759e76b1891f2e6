"""Fused normalisation of CBN with a closed-form backward that is one BN backward kernel.

Both CBN paths normalise with statistics that are affine in the current batch's mean ``μ_t`` and second
moment ``ν_t = var_t + μ_t²`` (every other term is a constant: past window entries carry no gradient)::

    window:  μ̄ = c·μ_t + A,   σ̄² = max(c·ν_t + B − μ̄², 0)          (c = 1/n: n entries kept, A, B: past sums / n)
    plain:   μ̄ = μ_t,         σ̄² = f·var_t                          (f = M/(M−1) for the unbiased variance)
    y = γ·(x − μ̄)·inv + β,    inv = 1/(sqrt(σ̄²) + ε)   or   1/sqrt(σ̄² + ε)

Forward: BN's eval kernel with ``running_var = σ̄² + 2ε·sqrt(σ̄²)`` and ``eps = ε²`` computes exactly
``1/(sqrt(σ̄²) + ε)`` (``σ̄²`` and ``ε`` as given with ``eps_inside_sqrt``): one fused pass, in the input's dtype.

Backward. With ``g = dL/dy``, ``M`` the elements per channel and ``dot = Σ g·(x − μ̄)/M``, the chain rule
through μ_t and ν_t gives, per channel, ``dL/dx = a·g + b·x + d`` with::

    a = γ·inv,   b = −c·f·q·a·dot,   d = −c·a·Σg/M − μ̄·b,   q = inv/sqrt(σ̄²) (ε outside) or inv² (inside)

(``q = 0`` where the clamp is active). BN's *training* backward with saved mean ``μ̄``, saved inverse std
``s`` and weight ``γ'`` computes ``γ's·g − γ's·Σg/M − γ's³·dot·(x − μ̄)``: the same form, and with
``s² = c·f·q`` and ``γ' = a/s`` the same ``a`` and ``b``. Its constant lacks only the factor ``c``: the
window path adds ``(1 − c)·a·Σg/M`` per channel. So the input gradient is that one kernel (plus one
per-channel add on the window path) instead of a reduction and two elementwise passes; ``Σ g·(x − μ̄)·s``
and ``Σ g`` come out of the same kernel and give γ's and β's gradients. Where ``q = 0`` the kernel would
need an infinite ``γ'``: ``s`` is floored at ``_TINY_INV_STD`` there, which leaves ``b`` at ``1e-24·a·dot``
instead of exactly 0.
"""
import torch

from ._bn_common import cached_constant

__all__ = ['cbn_normalise']

# Floor of the kernel's saved inverse std where the variance path carries no gradient (see above):
# small enough that s²·a·dot vanishes next to every other term, large enough that γ' = a/s stays finite.
_TINY_INV_STD = 1e-12


# Position of conv_weight among _CBNNormalise.forward's inputs (ctx.needs_input_grad is indexed by it).
_CONV_WEIGHT_ARG = 13

def _filled(like, value):
    """A dense tensor of ``like``'s shape, dtype and device filled with ``value``, cached: a per-channel
    constant operand of a multi-tensor kernel (dense, so that a GPU takes its fused path)."""
    return cached_constant(('filled', tuple(like.shape), value, like.dtype, like.device),
                           lambda: torch.full_like(like, value, memory_format=torch.contiguous_format))


class _CBNNormalise(torch.autograd.Function):
    """The per-channel arithmetic is grouped into multi-tensor kernels (one kernel, one dispatch for
    several C-vectors that do not depend on each other): on a GPU each operator is a kernel launch, and a
    step is mostly such small ones. With ``std = sqrt(σ̄²)``, ``u = std + ε``, ``w = σ̄² + ε·std = std·u``:
    ``inv = 1/u`` and ``s² = c·f/w``."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var_raw, coef, var_factor, eps, eps_inside_sqrt, count, commit,
                slope_mean, slope_sq, conv_weight):
        var = var_raw.clamp_min(0)
        if eps_inside_sqrt:
            var_in, bn_eps, saved = var, eps, (var, var_raw)
        else:
            std = var.sqrt()
            one = _filled(std, 1.0)
            # base + scale·factor, one kernel: var_in = σ̄² + 2ε·std, the kernel's variance (see the module
            # docstring); u and w for the backward; 1 − c, the window's share of the input gradient's constant
            terms = [(var, std, 2.0 * eps), (std, one, eps), (var, std, eps)]
            if coef is not None:
                terms.append((one, coef, -1.0))
            base, factor, scale = (list(t) for t in zip(*terms))
            var_in, u, w, *rest = torch._foreach_addcmul(base, factor, [one] * len(terms), scale)
            bn_eps, saved = eps * eps, (u, w, rest[0] if rest else None)
        out = torch.ops.aten.native_batch_norm(x, weight, bias, mean, var_in, False, 0.0, bn_eps)[0]
        ctx.save_for_backward(x, weight, mean, coef, slope_mean, slope_sq, *saved)
        ctx.config = (var_factor, eps, eps_inside_sqrt, count, bias is not None)
        ctx.conv_weight_meta = None if conv_weight is None else (conv_weight.shape, conv_weight.dtype)
        ctx.commit = commit
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, coef, slope_mean, slope_sq, *saved = ctx.saved_tensors
        var_factor, eps, eps_inside_sqrt, count, has_bias = ctx.config
        windowed = coef is not None
        through_window = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        to_conv = windowed and ctx.needs_input_grad[_CONV_WEIGHT_ARG]    # grad_through_window: its slopes
        # (BN's backward kernels take any strides of grad_out, as torch's own BN backward relies on.)
        cf = coef if windowed else var_factor
        if eps_inside_sqrt:
            var_in, var_raw = saved
            inv = torch.rsqrt(var_in + eps)
            s = torch.where(var_raw >= 0, inv * (cf.sqrt() if windowed else cf ** 0.5), _TINY_INV_STD)
            ratio = inv / s
            rest = torch.rsub(coef, 1.0) if windowed else None
            inv_rest = inv * rest if windowed else None
            inv_c = inv * coef if to_conv else None
        else:
            u, w, rest = saved
            # s² = c·f/w, infinite exactly where σ̄² = 0 (a constant channel or the clamp active), where the
            # variance path carries no gradient: floored there, before s, 1/s and inv = 1/u are taken in one
            # kernel, so that the kernel's γ' = a/s stays finite and consistent with s.
            s_sq = torch.div(coef, w) if windowed else torch.reciprocal(w).mul_(cf)
            s_sq = torch.nan_to_num(s_sq, posinf=_TINY_INV_STD ** 2, neginf=_TINY_INV_STD ** 2)   # (w = −0.0)
            s, s_inv, inv = torch._foreach_pow([s_sq, s_sq, u], [0.5, -0.5, -1.0])
            inv_c = None
            if to_conv:    # ratio = inv/s, inv·(1 − c) for the window's constant, inv·c for the window terms
                ratio, inv_rest, inv_c = torch._foreach_mul([inv, inv, inv], [s_inv, rest, coef])
            elif windowed:
                ratio, inv_rest = torch._foreach_mul([inv, inv], [s_inv, rest])
            else:
                ratio, inv_rest = inv * s_inv, None
        # the kernel's weight γ' = a/s = γ·ratio, and (window path) the window's share γ·inv·(1 − c); for
        # the window terms' gradient also a = γ·inv and a·c
        a = a_c = None
        if weight is None:
            kernel_weight, window_share, a, a_c = ratio, inv_rest, inv, inv_c
        elif to_conv:
            kernel_weight, window_share, a, a_c = torch._foreach_mul([ratio, inv_rest, inv, inv_c], [weight] * 4)
        elif windowed:
            kernel_weight, window_share = torch._foreach_mul([ratio, inv_rest], [weight, weight])
        else:
            kernel_weight, window_share = weight * ratio, None
        # (Σg(x − μ̄)·s is γ's gradient, and the window terms' without γ too)
        grad_x, centred, sum_g = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, kernel_weight, None, None, mean, s, True, 0.0,
            [True, weight is not None or through_window or to_conv, True])
        if ctx.commit is not None:   # the layer's state takes this step only if Σg is finite too
            ctx.commit.apply(sum_g)
            ctx.commit = None
        grad_weight = None
        if windowed:   # BN's constant has a, the window's c·a: add the difference (1 − c)·a·Σg/M
            if weight is None:
                constant = window_share * sum_g
            else:          # with γ's gradient Σg(x − μ̄)·s·(inv/s): one multi-tensor kernel
                constant, grad_weight = torch._foreach_mul([window_share, centred], [sum_g, ratio])
            grad_x.add_(constant.view(1, -1, 1, 1), alpha=1.0 / count)
        elif weight is not None:
            grad_weight = centred * ratio
        grad_mean = grad_var = grad_conv = None
        if through_window:
            # μ̄ and σ̄² given with graphs of their own: their gradients.
            if a is None:
                a = inv if weight is None else weight * inv
            grad_var = -0.5 * a * centred * s / cf          # dL/dσ̄² = −a·Σg(x−μ̄)·q/2, q = s²/(c·f)
            grad_mean = -a * sum_g
        if to_conv:
            grad_conv = _window_terms_grad(a, a_c, centred, sum_g, s, mean, slope_mean, slope_sq)
            grad_conv = grad_conv.view(ctx.conv_weight_meta[0]).to(ctx.conv_weight_meta[1])
        return (grad_x, grad_weight, sum_g if has_bias else None, grad_mean, grad_var, None, None, None, None,
                None, None, None, None, grad_conv)


def _window_terms_grad(a, a_c, centred, sum_g, s, mean, slope_mean, slope_sq):
    """``grad_through_window``: the conv weight's gradient through the window terms, ``(C, K)``.

    The window's averages are ``μ̄ = c·μ_t + A`` and ``S = c·ν_t + B`` (``σ̄² = S − μ̄²``), with ``A`` and ``B``
    linear in the weight: ``dA/dW = c·ρ·Σ_τ kept_τ·∂μ_τ/∂W`` (``B`` likewise with ∂ν_τ/∂W). With
    ``g_μ = dL/dμ̄ = −a·Σg`` and ``g_σ = dL/dσ̄² = −a·Σg(x − μ̄)·s²/(2c)`` (``centred = Σg(x − μ̄)·s``):
    ``dL/dW = (g_μ − 2μ̄·g_σ)·dA/dW + g_σ·dB/dW``. The slopes come without their factor ``−c·ρ``
    (``slope_* = −ρ·Σ_τ kept_τ·∂_τ/∂W``), so the per-channel factors here are ``−c·(g_μ − 2μ̄·g_σ) =
    a·c·Σg − μ̄·P`` and ``−c·g_σ = P/2``, ``P = a·centred·s``: no division by ``c``."""
    ac_sum_g, a_centred = torch._foreach_mul([a_c, a], [sum_g, centred])
    p = a_centred * s
    mean_factor = torch.addcmul(ac_sum_g, mean, p, value=-1)
    return torch.addcmul(slope_mean * mean_factor.unsqueeze(1), slope_sq, p.unsqueeze(1), value=0.5)


def cbn_normalise(x, weight, bias, mean, var_raw, count, *, coef=None, var_factor=1.0, eps=1e-5,
                  eps_inside_sqrt=False, commit=None, window_slopes=None, conv_weight=None):
    """Normalise ``x`` (N, C, H, W) with CBN statistics; gradients flow to ``x`` through μ_t and ν_t.

    Args:
        x: the input, any floating dtype (kept: statistics are float32 or wider, the large tensors are not).
        weight, bias: γ, β ``(C,)`` or None.
        mean: ``μ̄`` ``(C,)``; var_raw: ``σ̄²`` before the clamp at 0 ``(C,)``. Either may carry a graph of its
            own (``grad_through_window``); the gradient through the current batch is in closed form.
        count: ``M``, elements per channel of the current batch.
        coef: window path: ``c`` ``(C,)``, the current entry's share of the window mean. None: plain path.
        var_factor: plain path: ``f`` with ``σ̄² = f·var_t`` (``M/(M−1)`` for the unbiased variance).
        commit: a :class:`~cbn_mmdet.ops.cbn_window.StepCommit` applied in backward with ``Σ g``: the step's
            statistics enter the layer's state only if its gradient is finite.
        window_slopes, conv_weight: ``grad_through_window`` on the window path: the stored entries' slopes
            ``(−ρ·Σ_τ kept_τ·∂μ_τ/∂W, −ρ·Σ_τ kept_τ·∂ν_τ/∂W)``, each ``(C, K)``, and the live conv weight,
            which then gets the gradient of the window terms (the output does not depend on it).
    """
    slope_mean, slope_sq = (None, None) if window_slopes is None else window_slopes
    if (conv_weight is None) != (window_slopes is None) or (conv_weight is not None and coef is None):
        raise ValueError('cbn_normalise: window_slopes and conv_weight go together, and with coef (the window '
                         f'path); got window_slopes={window_slopes is not None}, conv_weight='
                         f'{conv_weight is not None}, coef={coef is not None}')
    return _CBNNormalise.apply(x, weight, bias, mean, var_raw, coef, float(var_factor), float(eps),
                               bool(eps_inside_sqrt), count, commit, slope_mean, slope_sq, conv_weight)
