"""Fold eval-mode norm layers into the preceding conv, per layer family, where it is exact.

An eval-mode norm that is a per-channel affine map ``y = s·z + t`` folds into the conv ``z = W*x + b``
as ``W' = s·W``, ``b' = s·b + t``. Per family:

* BN / SyncBN: ``s = γ / sqrt(var + eps)``, ``t = β − s·mean``;
* CBN: eps is on the standard deviation (the official choice): ``s = γ / (sqrt(var) + eps)`` — mmcv's
  ``fuse_conv_bn`` would use ``sqrt(var + eps)`` and be slightly wrong;
* MABN: no mean (its ``running_mean`` stays 0): ``s = γ / sqrt(var + eps)``, ``t = β``;
* BCN: only its BN part (running statistics, no affine) is per-channel; it folds, and the layer becomes
  the ``GroupNorm`` (with BCN's affine) that follows it — GN depends on the sample and cannot fold;
* GN: not foldable (kept).

Weight-transforming convs (``WSConv``, ``CenConv``) are first replaced by a plain ``nn.Conv2d`` holding
the weight they convolve with. The producing conv is found with the same finders CBN uses.
"""
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..ops import BatchChannelNorm2d, CrossIterationBatchNorm2d, MovingAverageBatchNorm2d
from ..ops.cbn_binding import CBNBindError, find_producing_conv

__all__ = ['fuse_norm_layers', 'fold_norm_into_conv']


def _norm_affine(norm):
    """``(s, t, replacement)`` of an eval-mode norm, or None when it is not a per-channel affine map."""
    if not isinstance(norm, _BatchNorm) or getattr(norm, 'running_var', None) is None:
        return None   # GN, LN, IN, or a BN without running statistics: depends on the sample
    rm, rv = norm.running_mean.double(), norm.running_var.double()
    gamma = norm.weight.double() if norm.weight is not None else torch.ones_like(rv)
    beta = norm.bias.double() if norm.bias is not None else torch.zeros_like(rv)
    if isinstance(norm, BatchChannelNorm2d):
        s = 1.0 / torch.sqrt(rv + norm.eps)
        group_norm = nn.GroupNorm(norm.num_groups, norm.num_features, eps=norm.eps, affine=norm.affine)
        if norm.affine:
            group_norm.weight.data.copy_(norm.weight.data)
            group_norm.bias.data.copy_(norm.bias.data)
        return s, -rm * s, group_norm
    if isinstance(norm, CrossIterationBatchNorm2d):
        s = gamma / (torch.sqrt(rv + norm.eps) if norm.eps_inside_sqrt else torch.sqrt(rv) + norm.eps)
        return s, beta - rm * s, nn.Identity()
    if isinstance(norm, MovingAverageBatchNorm2d):
        s = gamma / torch.sqrt(rv + norm.eps)
        return s, beta - rm * s, nn.Identity()
    if isinstance(norm, _BatchNorm) and norm.track_running_stats and norm.running_var is not None:
        s = gamma / torch.sqrt(rv + norm.eps)
        return s, beta - rm * s, nn.Identity()
    return None


def _plain_conv(conv):
    """A plain nn.Conv2d computing what ``conv`` computes (WS/centred convs bake their weight in)."""
    getter = getattr(conv, 'cbn_effective_weight', None)
    if getter is None and type(conv) in (nn.Conv2d,):
        return conv
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    plain = plain.to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        plain.weight.copy_(getter() if getter is not None else conv.weight)
        plain.bias.copy_(conv.bias if conv.bias is not None else torch.zeros_like(plain.bias))
    return plain


def fold_norm_into_conv(conv, norm):
    """Return ``(fused_conv, replacement_for_norm)`` or None if ``norm`` cannot be folded."""
    affine = _norm_affine(norm)
    if affine is None:
        return None
    s, t, replacement = affine
    fused = _plain_conv(conv)
    if fused is conv:   # copy so that the caller decides when to swap
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                          conv.padding, conv.dilation, conv.groups, bias=True,
                          padding_mode=conv.padding_mode).to(device=conv.weight.device,
                                                             dtype=conv.weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(conv.weight)
            fused.bias.copy_(conv.bias if conv.bias is not None else torch.zeros_like(fused.bias))
    with torch.no_grad():
        w = fused.weight.double() * s.view(-1, 1, 1, 1)
        b = fused.bias.double() * s + t
        fused.weight.copy_(w)
        fused.bias.copy_(b)
    return fused, replacement


def _set_child(root, qualified, module):
    parent_name, _, child = qualified.rpartition('.')
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def fuse_norm_layers(model):
    """Fold every foldable eval-mode norm of ``model`` into its conv, in place.

    Returns ``{'fused': [norm names], 'kept': {norm name: reason}}``. Works on a model in eval mode.
    """
    if model.training:
        raise RuntimeError('fuse_norm_layers: call model.eval() first (folding uses running statistics)')
    report = {'fused': [], 'kept': {}}
    modules = dict(model.named_modules())
    plan = []
    for parent_name, parent in modules.items():
        for child_name, child in parent.named_children():
            if not isinstance(child, (_BatchNorm, nn.GroupNorm)):
                continue
            name = f'{parent_name}.{child_name}' if parent_name else child_name
            if _norm_affine(child) is None:
                report['kept'][name] = f'{type(child).__name__} is not a per-channel affine map in eval'
                continue
            try:
                conv = find_producing_conv(parent, child_name, child)
            except CBNBindError as err:
                report['kept'][name] = f'no producing conv: {err}'
                continue
            conv_name = next(n for n, m in modules.items() if m is conv)
            plan.append((name, child, conv_name, conv))
    for name, norm, conv_name, conv in plan:
        fused, replacement = fold_norm_into_conv(conv, norm)
        _set_child(model, conv_name, fused)
        _set_child(model, name, replacement)
        report['fused'].append(name)
    return report
