"""The error that CBN's fast mode (``stat_grad_sample``) adds to the compensated window statistics.

An exact CBN layer and a fast one are bound to the *same* conv and see the same inputs and the same weight
trajectory (the exact layer's loss drives the SGD steps, each a fixed fraction ``step_size`` of ``|W|``).
After every step the stored window of both layers is compensated to the current weight and compared:

* ``nu``    — relative error of each compensated ``ν_τ(W_t)`` (fast vs exact), per entry and channel;
* ``var``   — relative error of the window variance ``σ̄² = mean(ν) − μ̄²`` that the layer normalises with;
* ``taylor`` — for scale: the error of the exact first-order compensation itself against the truth
  (the past batches re-run through the conv with the current weight), and ``naive`` the error of using
  the stale ``ν_τ`` without compensation (``rho = 0``);
* ``float32`` — our float32 compensation (per-entry offsets, ``_compensated_window``) against the same
  formula evaluated in float64 with ``W_t − W_τ`` materialised: the rounding error of the offset trick.

Torch only.
"""
import statistics

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import CrossIterationBatchNorm2d, bind_cbn_to_conv

__all__ = ['fast_mode_error', 'smooth_features']


def smooth_features(n, c, h, w, generator, upsample=4, dtype=torch.float32):
    """Feature-map-like input: low-resolution noise bilinearly upsampled, rectified with an offset."""
    low = torch.randn(n, c, max(-(-h // upsample), 2), max(-(-w // upsample), 2), generator=generator, dtype=dtype)
    return F.relu(F.interpolate(low, size=(h, w), mode='bilinear', align_corners=False) + 0.5)


def _compensated(cbn, weight):
    """Window entries of ``cbn`` moved to ``weight`` in float64 with ``W_t − W_τ`` materialised."""
    dt = torch.float64
    n, c = cbn.window_mean.shape
    delta = weight.to(dt).reshape(1, c, -1) - cbn.window_weight.to(dt).reshape(n, c, -1)
    groups = cbn.window_mean_grad.shape[1]
    d_mean = torch.einsum('ngok,ngk->ngo', delta.reshape(n, groups, c // groups, -1),
                          cbn.window_mean_grad.to(dt)).reshape(n, c)
    d_sq = (delta * cbn.window_sq_grad.to(dt).reshape(n, c, -1)).sum(-1)
    return cbn.window_mean.to(dt) + cbn.rho * d_mean, cbn.window_sq.to(dt) + cbn.rho * d_sq


def _window_var(mean_t, sq_t, past_mean, past_sq):
    # All entries kept (compensated ν ≥ μ² holds for these well-conditioned channels): biased variance.
    means = torch.cat([mean_t.unsqueeze(0), past_mean])
    sqs = torch.cat([sq_t.unsqueeze(0), past_sq])
    mean = means.mean(0)
    return sqs.mean(0) - mean * mean


def fast_mode_error(cin=256, cout=256, k=3, n=2, h=32, w=32, sample=0.25, steps=12, step_size=0.01,
                    smooth=True, upsample=4, buffer_num=3, seed=0):
    """Run exact and fast CBN side by side; return a dict of error statistics (see the module doc)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
    exact = CrossIterationBatchNorm2d(cout, buffer_num=buffer_num)
    fast = CrossIterationBatchNorm2d(cout, buffer_num=buffer_num, stat_grad_sample=sample)
    bind_cbn_to_conv(exact, conv)
    bind_cbn_to_conv(fast, conv)
    past_inputs = []
    errs = {key: [] for key in ('nu', 'var', 'taylor', 'naive', 'float32')}
    for step in range(steps):
        x = smooth_features(n, cin, h, w, gen, upsample) if smooth else torch.randn(n, cin, h, w, generator=gen)
        weight = conv.weight.detach()
        if step >= buffer_num:     # window full: compare the compensated statistics at this weight
            with torch.no_grad():
                mean_e, sq_e = _compensated(exact, weight)
                mean_f, sq_f = _compensated(fast, weight)
                errs['nu'].append(((sq_f - sq_e).abs() / sq_e.abs()).flatten())
                # the truth: the stored batches (newest first in the ring order) re-run with W_t
                truth = {}
                for j, x_old in past_inputs[-buffer_num:]:
                    y_old = F.conv2d(x_old.double(), weight.double(), padding=k // 2)
                    truth[j] = (y_old.mean((0, 2, 3)), (y_old * y_old).mean((0, 2, 3)))
                for j, (mu_true, nu_true) in truth.items():
                    errs['taylor'].append(((sq_e[j] - nu_true).abs() / nu_true).flatten())
                    errs['naive'].append(((exact.window_sq[j].double() - nu_true).abs() / nu_true).flatten())
                ours32 = exact._compensated_window(weight, torch.float32)[1].double()
                errs['float32'].append(((ours32 - sq_e).abs() / sq_e.abs()).flatten())
                y = F.conv2d(x.double(), weight.double(), padding=k // 2)
                mean_t, sq_t = y.mean((0, 2, 3)), (y * y).mean((0, 2, 3))
                var_e = _window_var(mean_t, sq_t, mean_e, sq_e)
                var_f = _window_var(mean_t, sq_t, mean_f, sq_f)
                errs['var'].append(((var_f - var_e).abs() / var_e.abs()).flatten())
        slot = int(exact.window_head)
        x_in = x.clone().requires_grad_()
        out = conv(x_in)
        out_e = exact(out)
        fast(out)
        (out_e * torch.randn(out_e.shape, generator=gen)).sum().backward()
        with torch.no_grad():
            grad = conv.weight.grad
            conv.weight -= step_size * conv.weight.norm() * grad / grad.norm()
            conv.weight.grad = None
        past_inputs = [(j, xo) for j, xo in past_inputs if j != slot] + [(slot, x)]
    summary = {}
    for key, values in errs.items():
        flat = torch.cat(values) if values else torch.zeros(1)
        summary[key] = {'median': statistics.median(flat.tolist()), 'p99': torch.quantile(flat.double(), 0.99).item(),
                        'max': flat.max().item()}
    summary['config'] = dict(cin=cin, cout=cout, k=k, n=n, h=h, w=w, sample=sample, steps=steps,
                             step_size=step_size, smooth=smooth, upsample=upsample, buffer_num=buffer_num)
    return summary
