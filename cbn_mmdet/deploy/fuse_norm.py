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

The conv side: a conv that transforms its weight before convolving (``WSConv``, ``CenConv``, mmcv's
``ConvWS``/``ConvAWS``) is replaced by a plain ``nn.Conv2d`` holding the folded *effective* weight — a
fold into the raw weight would be re-standardised away at the next forward. Any other ``nn.Conv2d``
(subclasses too, e.g. adaptive padding) is folded in place on a copy, as mmcv does. A subclass of a
weight-transforming conv we do not know (e.g. mmcv's SAC) is refused: its transform is unknown.

:func:`install_mmcv_fold_guard` routes mmcv's own folds (``fuse_conv_bn``, the ``--fuse-conv-bn`` of
mmdet's tools, and ``efficient_conv_bn_eval`` of ``ConvModule`` and of mmengine) through these rules.
"""
import copy
import warnings
import weakref

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..ops import (
    BatchChannelNorm2d,
    CenteredConv2d,
    CrossIterationBatchNorm2d,
    WeightStandardizedConv2d,
)
from ..ops.cbn_binding import CBNBindError, find_producing_conv

__all__ = ['fuse_norm_layers', 'fold_norm_into_conv', 'FoldError', 'effective_conv_weight',
           'install_mmcv_fold_guard', 'uninstall_mmcv_fold_guard', 'mmcv_fold_guard_installed']


class FoldError(RuntimeError):
    """A conv/norm pair that cannot be folded exactly."""


# ----------------------------------------------------------------------------- the norm side


def _norm_affine(norm):
    """``(s, t, replacement)`` of an eval-mode norm in float64, or None when it is not a per-channel affine
    map (GN, LN, IN, a BN without running statistics: they depend on the sample)."""
    if not isinstance(norm, _BatchNorm) or getattr(norm, 'running_var', None) is None:
        return None
    rm, rv = norm.running_mean.double(), norm.running_var.double()
    gamma = norm.weight.double() if norm.weight is not None else torch.ones_like(rv)
    beta = norm.bias.double() if norm.bias is not None else torch.zeros_like(rv)
    if isinstance(norm, BatchChannelNorm2d):
        s = 1.0 / torch.sqrt(rv + norm.eps)
        group_norm = nn.GroupNorm(norm.num_groups, norm.num_features, eps=norm.eps, affine=norm.affine)
        group_norm = group_norm.to(device=rv.device, dtype=norm.running_var.dtype)
        if norm.affine:
            with torch.no_grad():
                group_norm.weight.copy_(norm.weight)
                group_norm.bias.copy_(norm.bias)
        return s, -rm * s, group_norm
    if isinstance(norm, CrossIterationBatchNorm2d) and not norm.eps_inside_sqrt:
        s = gamma / (torch.sqrt(rv) + norm.eps)
    else:   # BN, SyncBN, MABN (its running_mean stays 0), CBN with eps inside the root
        s = gamma / torch.sqrt(rv + norm.eps)
    return s, beta - rm * s, nn.Identity()


def _mmcv_formula_is_exact(norm):
    """mmcv's folds compute ``γ / sqrt(var + eps)`` and then drop the norm: right for a plain BN only."""
    if isinstance(norm, BatchChannelNorm2d):
        return False
    if isinstance(norm, CrossIterationBatchNorm2d):
        return norm.eps_inside_sqrt
    return True


# ----------------------------------------------------------------------------- the conv side


def _mmcv_ws_types():
    try:
        from mmcv.cnn.bricks.conv_ws import ConvAWS2d, ConvWS2d
    except ImportError:   # mmcv absent: only our own convs exist
        return None, None
    return ConvWS2d, ConvAWS2d


def _mmcv_ws_weight(conv):
    """mmcv ``conv_ws_2d``'s weight: ``(W - mean) / (std_unbiased + eps)`` per output channel."""
    flat = conv.weight.flatten(1)
    std, mean = torch.std_mean(flat, dim=1, keepdim=True)
    return ((flat - mean) / (std + conv.eps)).view_as(conv.weight)


def _weight_transform(conv):
    """The callable giving the weight ``conv`` convolves with, or None when it uses ``conv.weight`` as is.

    Raises ``FoldError`` for a subclass of a weight-transforming conv whose transform we do not know.
    """
    ws_type, aws_type = _mmcv_ws_types()
    if type(conv) in (WeightStandardizedConv2d, CenteredConv2d):
        return conv.cbn_effective_weight
    if ws_type is not None and type(conv) is ws_type:
        return lambda: _mmcv_ws_weight(conv)
    if aws_type is not None and type(conv) is aws_type:
        return lambda: conv._get_weight(conv.weight)
    known = tuple(t for t in (WeightStandardizedConv2d, CenteredConv2d, ws_type, aws_type) if t is not None)
    if isinstance(conv, known) or hasattr(conv, 'cbn_effective_weight'):
        raise FoldError(f'{type(conv).__name__} transforms its weight in a way this fold does not know '
                        f'(a subclass of {type(conv).__mro__[1].__name__}); it cannot be folded exactly')
    return None


def effective_conv_weight(conv):
    """The weight ``conv`` actually convolves with (the standardized/centred one for WS-type convs)."""
    transform = _weight_transform(conv)
    return conv.weight if transform is None else transform()


def _plain_copy(conv):
    """A plain ``nn.Conv2d`` with the effective weight of a weight-transforming conv (and a bias)."""
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    plain = plain.to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        plain.weight.copy_(effective_conv_weight(conv))
        plain.bias.copy_(conv.bias if conv.bias is not None else torch.zeros_like(plain.bias))
    return plain


def _scale_in_place(conv, s, t):
    """``W ← s·W``, ``b ← s·b + t`` (computed in float64), adding a bias parameter when there is none."""
    with torch.no_grad():
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(s)
        weight = conv.weight.double() * s.view(-1, *([1] * (conv.weight.dim() - 1)))
        conv.weight = nn.Parameter(weight.to(conv.weight.dtype), conv.weight.requires_grad)
        conv.bias = nn.Parameter((bias * s + t).to(conv.weight.dtype), conv.weight.requires_grad)
    return conv


def fold_norm_into_conv(conv, norm):
    """Return ``(fused_conv, replacement_for_norm)`` or None if ``norm`` is not a per-channel affine map.

    ``conv`` and ``norm`` are left untouched. Raises ``FoldError`` for a conv with an unknown weight
    transform.
    """
    affine = _norm_affine(norm)
    if affine is None:
        return None
    s, t, replacement = affine
    fused = _plain_copy(conv) if _weight_transform(conv) is not None else copy.deepcopy(conv)
    return _scale_in_place(fused, s, t), replacement


# ----------------------------------------------------------------------------- whole models


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
                _weight_transform(conv)
            except (CBNBindError, FoldError) as err:
                report['kept'][name] = f'no foldable producing conv: {err}'
                continue
            conv_name = next(n for n, m in modules.items() if m is conv)
            plan.append((name, child, conv_name, conv))
    for name, norm, conv_name, conv in plan:
        fused, replacement = fold_norm_into_conv(conv, norm)
        _set_child(model, conv_name, fused)
        _set_child(model, name, replacement)
        report['fused'].append(name)
    return report


# ----------------------------------------------------------------------------- mmcv's own folds

_ORIGINALS = {}   # (module, attribute) -> the function the guard replaced
_warned = weakref.WeakSet()   # the norm layers already warned about


def _warn_once(norm, message):
    if norm not in _warned:
        _warned.add(norm)
        warnings.warn(message, stacklevel=3)


def _guarded_fuse_conv_bn(conv, bn):
    """mmcv ``_fuse_conv_bn(conv, bn)``: its caller puts the result in the conv's place and replaces the
    norm by ``nn.Identity``, so what we return must compute ``bn(conv(x))`` on its own."""
    original = _ORIGINALS[('mmcv.cnn.utils.fuse_conv_bn', '_fuse_conv_bn')]
    if _weight_transform(conv) is None and _mmcv_formula_is_exact(bn):
        return original(conv, bn)   # the plain case: mmcv's own fold, unchanged
    folded = fold_norm_into_conv(conv, bn)
    if folded is None:
        return original(conv, bn)   # a BN without running statistics: mmcv's own behaviour
    fused, replacement = folded
    return fused if isinstance(replacement, nn.Identity) else nn.Sequential(fused, replacement)


def _efficient_fold(bn, conv, x):
    """The on-the-fly fold of ``efficient_conv_bn_eval`` for pairs mmcv's formula gets wrong (exact,
    differentiable). Falls back to the unfused ``bn(conv(x))`` where no fold exists (BCN)."""
    if isinstance(bn, BatchChannelNorm2d):
        _warn_once(bn, 'efficient_conv_bn_eval: BatchChannelNorm2d ends in a group '
                   'normalisation, which does not fold; running the conv and the norm unfused')
        return bn(type(conv).forward(conv, x))
    transformed = _weight_transform(conv) is not None
    weight = effective_conv_weight(conv)
    var = bn.running_var
    gamma = bn.weight if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(var)
    if isinstance(bn, CrossIterationBatchNorm2d) and not bn.eps_inside_sqrt:
        s = gamma / (var.sqrt() + bn.eps)
    else:
        s = gamma * torch.rsqrt(var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(var)
    weight = weight * s.view(-1, *([1] * (weight.dim() - 1)))
    bias = beta + s * (bias - bn.running_mean)
    if transformed:   # nn.Conv2d's own call: the weight is already the effective one, not transformed again
        return nn.Conv2d._conv_forward(conv, x, weight, bias)
    return conv._conv_forward(x, weight, bias)   # what mmcv calls


def _make_guarded_efficient(key):
    def guarded(bn, conv, x):
        if _weight_transform(conv) is None and _mmcv_formula_is_exact(bn):
            return _ORIGINALS[key](bn, conv, x)
        return _efficient_fold(bn, conv, x)
    guarded.__doc__ = f'``{key[0]}.{key[1]}`` made exact for every layer of cbn_mmdet (see fuse_norm).'
    return guarded


_TARGETS = (('mmcv.cnn.utils.fuse_conv_bn', '_fuse_conv_bn'),
            ('mmcv.cnn.bricks.conv_module', 'efficient_conv_bn_eval_forward'),
            ('mmengine.model.efficient_conv_bn_eval', 'efficient_conv_bn_eval_forward'))


def install_mmcv_fold_guard():
    """Make mmcv's and mmengine's conv+BN folds exact for every conv/norm pair (idempotent).

    ``fuse_conv_bn`` and ``efficient_conv_bn_eval`` assume a plain ``nn.Conv2d`` followed by a norm that
    is ``γ·(z − mean)/sqrt(var + eps) + β``. For other pairs — a weight-transforming conv (WS: the fold
    would be re-standardised away; mmcv's ``ConvWS`` too), CBN (eps on the std), BCN (a group
    normalisation follows) — they would silently build a different model; the guard folds those with
    this module's rules instead (BCN under ``fuse_conv_bn``: the fused conv followed by the GroupNorm;
    under ``efficient_conv_bn_eval``: run unfused, with a warning). Plain pairs still take mmcv's code.

    It replaces three module attributes looked up at call time (mmcv's ``_fuse_conv_bn``, the
    ``efficient_conv_bn_eval_forward`` of mmcv's ``conv_module`` and of mmengine), so it covers every
    caller of ``fuse_conv_bn`` and every ``ConvModule`` whose efficient mode is turned on afterwards.
    Returns the list of the replaced attributes.
    """
    import importlib
    installed = []
    for key in _TARGETS:
        try:
            module = importlib.import_module(key[0])
        except ImportError:
            continue
        if key not in _ORIGINALS:
            _ORIGINALS[key] = getattr(module, key[1])
            guard = _guarded_fuse_conv_bn if key[1] == '_fuse_conv_bn' else _make_guarded_efficient(key)
            setattr(module, key[1], guard)
        installed.append('.'.join(key))
    return installed


def mmcv_fold_guard_installed():
    """Whether :func:`install_mmcv_fold_guard` is in effect."""
    return bool(_ORIGINALS)


def uninstall_mmcv_fold_guard():
    """Put mmcv's and mmengine's original functions back (for tests that need the unguarded behaviour)."""
    import importlib
    for key, original in list(_ORIGINALS.items()):
        setattr(importlib.import_module(key[0]), key[1], original)
        del _ORIGINALS[key]
