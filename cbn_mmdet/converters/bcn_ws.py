"""BCN+WS ImageNet ResNets as released by the BCN authors -> mmdet ``ResNet`` with ``BCN`` + ``WSConv``.

Released layout (pytorch-classification, keys prefixed ``module.``), for every norm prefix ``P``:
``P.pbn.{weight,bias,running_mean,running_var,num_batches_tracked}`` (an affine BN) and
``P.weight``/``P.bias`` of shape ``(1, G, 1)`` (a per-group affine after the group normalisation); the
convs are WS convs dividing by ``sqrt(var_unbiased + 1e-5)``; ``fc.*`` is the classifier.

Ours: ``P.{weight,bias}`` per channel after the group normalisation and no inner affine. In eval the
inner BN is the per-channel affine ``γp·(x − m)/s + βp`` with ``s = sqrt(v + eps)``, i.e. a BN without
affine whose statistics are ``m' = m − βp·s/γp`` and ``s' = s/γp``: ``v' = s'² − eps``. That is exact for
γp > 0 (a channel flipped by γp < 0 changes its group's mean, which no per-channel statistic can
express), so a γp ≤ 0 is refused. The per-group affine becomes the per-channel one, each group's value
repeated ``C/G`` times. The convs load unchanged into ``WSConv(eps_inside_sqrt=True)``.
"""
from .common import ConversionError, strip_prefix

_INNER = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')


def _norm_prefixes(state_dict):
    return sorted(k[:-len('.pbn.running_mean')] for k in state_dict if k.endswith('.pbn.running_mean'))


def convert_bcn_ws_resnet(state_dict, eps=1e-5):
    """Released BCN+WS ResNet state_dict -> mmdet ResNet (``BCN``, ``WSConv``) backbone state_dict.

    Args:
        state_dict (dict): the released keys (with or without ``module.``).
        eps (float): the BN eps of the released layers (1e-5), kept by our ``BCN``.
    """
    source = strip_prefix(state_dict, 'module.')
    prefixes = _norm_prefixes(source)
    if not prefixes:
        raise ConversionError('no key ending in .pbn.running_mean: not a released BCN checkpoint')
    norm_keys = {f'{p}.pbn.{n}' for p in prefixes for n in _INNER} | {f'{p}.{n}' for p in prefixes
                                                                       for n in ('weight', 'bias')}
    out = {}
    for key, value in source.items():
        if key.startswith('fc.') or key in norm_keys:
            continue    # the classifier is dropped; norms are converted below
        if key.endswith('.weight') and value.dim() == 4:
            out[key] = value.clone()    # a (WS) conv
            continue
        raise ConversionError(f'unknown key {key!r} in the BCN+WS checkpoint')
    for prefix in prefixes:
        for key in [f'{prefix}.pbn.{n}' for n in _INNER] + [f'{prefix}.weight', f'{prefix}.bias']:
            if key not in source:
                raise ConversionError(f'missing key {key!r} in the BCN+WS checkpoint')
        out.update(_convert_norm(source, prefix, eps))
    return out


def _convert_norm(source, prefix, eps):
    gamma_p, beta_p = source[f'{prefix}.pbn.weight'].double(), source[f'{prefix}.pbn.bias'].double()
    mean, var = source[f'{prefix}.pbn.running_mean'].double(), source[f'{prefix}.pbn.running_var'].double()
    if bool((gamma_p <= 0).any()):
        channel = int((gamma_p <= 0).nonzero()[0])
        raise ConversionError(f'key {prefix + ".pbn.weight"!r}: channel {channel} is {float(gamma_p[channel])}; '
                              'only a positive inner BN scale folds exactly into BCN')
    channels = gamma_p.numel()
    group_w, group_b = source[f'{prefix}.weight'], source[f'{prefix}.bias']
    if group_w.dim() != 3 or group_w.shape[0] != 1 or group_w.shape[2] != 1 or channels % group_w.shape[1]:
        raise ConversionError(f'key {prefix + ".weight"!r}: expected shape (1, G, 1) with G dividing {channels}, '
                              f'got {tuple(group_w.shape)}')
    repeat = channels // group_w.shape[1]
    std = (var + eps).sqrt() / gamma_p
    dtype = source[f'{prefix}.pbn.running_var'].dtype
    return {
        f'{prefix}.running_mean': (mean - beta_p * std).to(dtype),
        f'{prefix}.running_var': (std * std - eps).to(dtype),
        f'{prefix}.num_batches_tracked': source[f'{prefix}.pbn.num_batches_tracked'].clone(),
        # group g covers channels [g*C/G, (g+1)*C/G): repeat_interleave keeps that order
        f'{prefix}.weight': group_w.reshape(-1).repeat_interleave(repeat).clone(),
        f'{prefix}.bias': group_b.reshape(-1).repeat_interleave(repeat).clone(),
    }


def bcn_ws_resnet_cfg(depth):
    """The mmdet ResNet config the converted state_dict loads into (strictly)."""
    return dict(type='ResNet', depth=depth, num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=-1,
                norm_cfg=dict(type='BCN', num_groups=32, estimate_stats=True),
                conv_cfg=dict(type='WSConv', eps_inside_sqrt=True), norm_eval=False, style='pytorch')



def build_bcn_ws_resnet(depth, conv_cfg=None):
    """The mmdet ResNet of :func:`bcn_ws_resnet_cfg` (``conv_cfg`` overrides the WS conv, for comparisons)."""
    from mmdet.models.backbones import ResNet
    cfg = bcn_ws_resnet_cfg(depth)
    cfg.pop('type')
    if conv_cfg is not None:
        cfg['conv_cfg'] = conv_cfg
    return ResNet(**cfg)
