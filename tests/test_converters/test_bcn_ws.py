"""BCN+WS ImageNet checkpoints (released layout) -> our mmdet ResNet with BCN + WSConv(eps_inside_sqrt).

Oracle: an mmdet ResNet-50 built from the authors' layers (tests/oracles/official_layers.py), whose
state_dict IS the released layout (plus ``module.`` and ``fc.*``); the converted ResNet must compute the
same features in eval.
"""
import pytest
import torch
from mmengine.registry import MODELS

import cbn_mmdet  # noqa: F401  (registers BCN, WSConv)
from cbn_mmdet.converters import ConversionError, convert_bcn_ws_resnet
from cbn_mmdet.converters.bcn_ws import build_bcn_ws_resnet
from cbn_mmdet.ops import weight_standardize
from tests.oracles.official_layers import OfficialBCN, OfficialWSConv2d

MODELS.register_module('OfficialBCNOracle', module=OfficialBCN, force=True)
MODELS.register_module('OfficialWSConvOracle', module=OfficialWSConv2d, force=True)


def _official_resnet(depth=50):
    from mmdet.models.backbones import ResNet
    return ResNet(depth=depth, norm_cfg=dict(type='OfficialBCNOracle', num_groups=32),
                  conv_cfg=dict(type='OfficialWSConvOracle'), norm_eval=False)


def _randomise(model, gen):
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith('num_batches_tracked'):
                tensor.fill_(int(torch.randint(1, 10**6, (), generator=gen)))
            elif name.endswith('running_var') or name.endswith('pbn.weight') or (
                    tensor.dim() == 3 and name.endswith('.weight')):
                tensor.copy_(torch.rand(tensor.shape, generator=gen, dtype=torch.float64) + 0.5)
            else:
                scale = 0.05 if tensor.dim() == 4 else 0.2
                tensor.copy_(torch.randn(tensor.shape, generator=gen, dtype=torch.float64) * scale)


def _eval64(model):
    model.double()
    model.eval()    # (mmdet's ResNet.train returns None: no chaining)


@pytest.fixture(scope='module')
def released():
    gen = torch.Generator().manual_seed(0)
    # float64 throughout: the fold is computed in float64, so a float32 source would differ by its rounding
    official = _official_resnet().double()
    _randomise(official, gen)
    sd = {f'module.{k}': v.clone() for k, v in official.state_dict().items()}
    sd['module.fc.weight'] = torch.randn(1000, 2048, generator=gen, dtype=torch.float64)
    sd['module.fc.bias'] = torch.randn(1000, generator=gen, dtype=torch.float64)
    return official, sd


def test_synthetic_checkpoint_has_the_released_layout(released):
    _, sd = released
    assert sd['module.bn1.weight'].shape == (1, 32, 1) and sd['module.bn1.pbn.running_var'].shape == (64,)
    assert sd['module.layer1.0.downsample.1.pbn.weight'].shape == (256,)
    assert sd['module.layer4.2.conv3.weight'].shape == (2048, 512, 1, 1)
    assert 'module.layer4.2.bn3.pbn.num_batches_tracked' in sd and 'module.fc.weight' in sd


def test_converted_resnet_computes_the_official_features(released):
    official, sd = released
    ours = build_bcn_ws_resnet(50).double()
    ours.load_state_dict(convert_bcn_ws_resnet(sd), strict=True)
    _eval64(official), _eval64(ours)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = official(x), ours(x)
    for level, (e, g) in enumerate(zip(expected, got)):
        assert e.abs().max() > 0.1, level    # features carry signal, not zeros
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9, msg=f'stage {level}')


def test_default_ws_variant_would_not_match(released):
    """The variant matters: the same weights through WSConv's default (std + eps) differ measurably."""
    official, sd = released
    ours = build_bcn_ws_resnet(50, conv_cfg=dict(type='WSConv')).double()
    ours.load_state_dict(convert_bcn_ws_resnet(sd), strict=True)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _eval64(official), _eval64(ours)
        e, g = official(x)[0], ours(x)[0]
    assert (g - e).abs().max() > 1e-4


@pytest.mark.parametrize('std,expected', [(0.03, 0.0052), (0.01, 0.0476)])
def test_ws_variants_differ_by_the_stated_amount(std, expected):
    """docs: (std + eps) vs sqrt(var + eps) at eps=1e-5 differ by ~0.5 % at a per-filter std of 0.03 and
    ~5 % at 0.01 (hand-derived: sqrt(s² + 1e-5) / (s + 1e-5) - 1)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 3 * 3 * 64, dtype=torch.float64, generator=gen)
    w = (w - w.mean(1, keepdim=True)) / w.std(1, keepdim=True) * std
    w = w.reshape(64, 64, 3, 3)
    outside = weight_standardize(w, 1e-5, eps_inside_sqrt=False)
    inside = weight_standardize(w, 1e-5, eps_inside_sqrt=True)
    ratio = (outside.norm() / inside.norm()).item() - 1
    assert ratio == pytest.approx(expected, abs=2e-4)


def test_unknown_key_is_named(released):
    _, sd = released
    bad = dict(sd, **{'module.layer1.0.extra.scale': torch.ones(3)})
    with pytest.raises(ConversionError, match=r"^unknown key 'layer1\.0\.extra\.scale' in the BCN\+WS checkpoint$"):
        convert_bcn_ws_resnet(bad)


def test_missing_key_is_named(released):
    _, sd = released
    bad = {k: v for k, v in sd.items() if k != 'module.layer2.0.bn2.bias'}
    with pytest.raises(ConversionError, match=r"^missing key 'layer2\.0\.bn2\.bias' in the BCN\+WS checkpoint$"):
        convert_bcn_ws_resnet(bad)


def test_non_positive_inner_scale_is_refused(released):
    _, sd = released
    bad = dict(sd)
    bad['module.layer1.0.bn1.pbn.weight'] = sd['module.layer1.0.bn1.pbn.weight'].clone()
    bad['module.layer1.0.bn1.pbn.weight'][5] = -0.5
    with pytest.raises(ConversionError, match=r"^key 'layer1\.0\.bn1\.pbn\.weight': channel 5 is -0\.5; only"):
        convert_bcn_ws_resnet(bad)
