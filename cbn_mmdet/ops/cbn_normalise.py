"""Fused normalisation of CBN with a closed-form, BN-style backward.

Both CBN paths normalise with statistics that are affine in the current batch's mean ``μ_t`` and second
moment ``ν_t = var_t + μ_t²`` (every other term is a constant: past window entries carry no gradient)::

    window:  μ̄ = c·μ_t + A,   σ̄² = max(c·ν_t + B − μ̄², 0)          (c = kept_t / n, A, B: past sums / n)
    plain:   μ̄ = μ_t,         σ̄² = f·var_t                          (f = M/(M−1) for the unbiased variance)
    y = γ·(x − μ̄)·inv + β,    inv = 1/(sqrt(σ̄²) + ε)   or   1/sqrt(σ̄² + ε)

Autograd would run the batch-moment backward and several broadcasted products; here the backward is
one fused BN reduction (``native_batch_norm_backward`` in eval mode gives ``g·γ·inv``, ``Σ g·(x−μ̄)·inv``
and ``Σ g``) plus one elementwise pass::

    dL/dx = g·γ·inv + dμ_t/M + dν_t·2x/M
    dμ̄ = −γ·inv·Σg − 2·μ̄·f·dσ̄²,   dσ̄² = γ·Σg(x−μ̄) · d inv/dσ̄²,   dμ_t = c·dμ̄,   dν_t = c·f·dσ̄²
"""
import torch

__all__ = ['cbn_normalise']


class _CBNNormalise(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, mean_t, var_t, coef, past_mean, past_sq, var_factor, eps,
                eps_inside_sqrt, count):
        if var_factor is None:    # window path
            mean = torch.addcmul(past_mean, coef, mean_t)
            raw_var = torch.addcmul(torch.addcmul(past_sq, coef, var_t + mean_t * mean_t), mean, mean, value=-1)
            var = raw_var.clamp_min(0)
            var_live = raw_var >= 0            # the clamp passes no gradient where it is active
            factor = 1.0
        else:                     # plain path: coef = 1, no past
            mean = mean_t
            var = var_t * var_factor
            var_live = None
            factor = var_factor
        std = var.sqrt()
        inv = torch.rsqrt(var + eps) if eps_inside_sqrt else 1.0 / (std + eps)
        gamma = weight if weight is not None else torch.ones_like(inv)
        # BN's eval kernel with running_var = 1/inv² and eps = 0 computes exactly γ(x − μ̄)·inv + β in
        # one fused pass (several times faster than a broadcasted addcmul on CPU).
        out = torch.batch_norm(x, gamma, bias, mean, inv.pow(-2), False, 0.0, 0.0,
                               torch.backends.cudnn.enabled)
        ctx.save_for_backward(x, gamma, mean, inv, std, coef, var_live)
        ctx.config = (factor, eps_inside_sqrt, count, weight is not None, bias is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, gamma, mean, inv, std, coef, var_live = ctx.saved_tensors
        factor, eps_inside_sqrt, count, has_weight, has_bias = ctx.config
        grad_out = grad_out.contiguous(memory_format=_memory_format(x))
        # Eval-mode BN backward with running_var = 1/inv² and eps = 0: exactly our inv; only its fused
        # reductions are used (Σ g·(x − μ̄)·inv and Σ g), dL/dx is assembled below in two passes.
        # save_mean/save_invstd must be real tensors: CUDA's kernel asserts they are defined whenever the
        # input gradient is not requested (and uses them instead of the running statistics when
        # non-empty); the CPU kernel reads the running ones in eval mode. Both describe the same μ̄, inv.
        _, grad_weight, sum_g = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, gamma, mean, inv.pow(-2), mean, inv, False, 0.0, [False, True, True])
        centred_sum = grad_weight / inv                 # Σ g·(x − μ̄)
        if eps_inside_sqrt:
            dinv_dvar = -0.5 * inv.pow(3)
        else:   # d/dv (sqrt(v) + eps)^-1; zero where v = 0 (autograd would give inf·0 there)
            dinv_dvar = torch.where(std > 0, -0.5 * inv * inv / std.clamp_min(torch.finfo(std.dtype).tiny),
                                    torch.zeros_like(std))
        grad_var = gamma * centred_sum * dinv_dvar
        if var_live is not None:
            grad_var = grad_var * var_live
        grad_mean_bar = -gamma * inv * sum_g - 2.0 * factor * mean * grad_var
        grad_mean_t = coef * grad_mean_bar
        grad_sq_t = coef * factor * grad_var
        # dL/dx = g·γ·inv (direct) + dμ_t/M + x·2dν_t/M (x enters μ_t = Σx/M and ν_t = Σx²/M).
        # The per-channel affine x·b + a is again BN's eval kernel (mean 0, var 1, eps 0): one fast pass.
        ones = torch.ones_like(inv)
        grad_x = torch.batch_norm(x, 2.0 * grad_sq_t / count, grad_mean_t / count, torch.zeros_like(inv),
                                  ones, False, 0.0, 0.0, torch.backends.cudnn.enabled)
        grad_x.addcmul_(grad_out, (gamma * inv).view(1, -1, 1, 1))
        # μ̄ = ... + A and σ̄² = ... + B − μ̄²: the past terms get dμ̄ and dσ̄² (used by grad_through_window)
        grad_past_mean = grad_mean_bar if ctx.needs_input_grad[6] else None
        grad_past_sq = grad_var if ctx.needs_input_grad[7] else None
        return (grad_x, grad_weight if has_weight else None, sum_g if has_bias else None,
                None, None, None, grad_past_mean, grad_past_sq, None, None, None, None)


def _memory_format(x):
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and \
        not x.is_contiguous() else torch.contiguous_format


def cbn_normalise(x, weight, bias, mean_t, var_t, count, *, coef=None, past_mean=None, past_sq=None,
                  var_factor=None, eps=1e-5, eps_inside_sqrt=False):
    """Normalise ``x`` (N, C, H, W) with CBN statistics; gradients flow to ``x`` through μ_t and ν_t.

    ``mean_t``/``var_t`` (biased) are the current batch's moments (no graph needed: the backward is in
    closed form). Give ``coef``, ``past_mean``, ``past_sq`` for the window path, or ``var_factor`` for the
    plain path (``M/(M−1)`` for the unbiased variance, 1 for the biased one).
    """
    if var_factor is None and coef is None:
        raise ValueError('cbn_normalise: give coef/past_mean/past_sq (window) or var_factor (plain)')
    if var_factor is not None:
        coef = torch.ones_like(mean_t)
    return _CBNNormalise.apply(x, weight, bias, mean_t.detach(), var_t.detach(), coef, past_mean, past_sq,
                               var_factor, eps, eps_inside_sqrt, count)
