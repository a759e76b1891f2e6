"""Folding eval-mode norms into convs keeps the outputs (the unfused model is the oracle)."""
import copy

import pytest
import torch
import torch.nn as nn
from mmcv.cnn import ConvModule
from mmdet.models.backbones import ResNet

import cbn_mmdet  # noqa: F401
from cbn_mmdet.deploy import fuse_norm_layers

CASES = {
    'BN': (dict(type='BN'), None),
    'SyncBN': (dict(type='SyncBN'), None),
    'CBN': (dict(type='CBN', buffer_num=2), None),
    'CBN-eps-inside': (dict(type='CBN', buffer_num=2, eps_inside_sqrt=True), None),
    'MABN': (dict(type='MABN', B=1, real_B=2), dict(type='CenConv')),
    'BCN': (dict(type='BCN', num_groups=4), dict(type='WSConv')),
    'GN': (dict(type='GN', num_groups=4), None),
}


def _trained(norm_cfg, conv_cfg):
    torch.manual_seed(0)
    model = nn.Sequential(ConvModule(3, 8, 3, padding=1, norm_cfg=norm_cfg, conv_cfg=conv_cfg),
                          ConvModule(8, 8, 1, norm_cfg=norm_cfg, conv_cfg=conv_cfg))
    for _ in range(4):
        model(torch.randn(2, 3, 6, 6, requires_grad=True) * 3 + 1).sum().backward()
    return model.eval()


@pytest.mark.parametrize('name', sorted(CASES))
def test_fused_outputs_match(name):
    model = _trained(*CASES[name])
    reference = copy.deepcopy(model)
    report = fuse_norm_layers(model)
    x = torch.randn(3, 3, 6, 6) * 3 + 1
    torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)
    if name == 'GN':
        assert not report['fused'] and set(report['kept']) == {'0.gn', '1.gn'}
    else:
        assert report['fused'] == ['0.bn', '1.bn']
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_cbn_needs_its_eps_placement():
    """mmcv's fold (eps inside the root) would differ from CBN's eval; ours must not."""
    model = _trained(dict(type='CBN', buffer_num=2, eps=1e-1), None)
    reference = copy.deepcopy(model)
    fuse_norm_layers(model)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


def test_resnet_with_cbn_fuses_everywhere():
    model = ResNet(18, norm_cfg=dict(type='CBN', buffer_num=1), norm_eval=False, init_cfg=None)
    for _ in range(2):
        sum(o.sum() for o in model(torch.randn(2, 3, 32, 32, requires_grad=True))).backward()
    model.eval()
    reference = copy.deepcopy(model)
    report = fuse_norm_layers(model)
    assert not report['kept'] and len(report['fused']) == 20   # stem + 8 blocks x 2 + 3 downsamples
    x = torch.randn(1, 3, 32, 32)
    for a, b in zip(model(x), reference(x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_training_model_is_refused():
    with pytest.raises(RuntimeError, match='model.eval'):
        fuse_norm_layers(nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)))


def test_fuse_tool_on_a_cbn_detector_config(tmp_path):
    """The CLI on the paper's CBN Mask R-CNN config (random weights, small input): verified, saved."""
    from tests.tiny_config import load_tool
    main = load_tool('deploy/fuse_norm.py').main
    out = tmp_path / 'fused.pth'
    cfg = tmp_path / 'cfg.py'
    cfg.write_text("_base_ = '" + str(__import__('pathlib').Path(__file__).resolve().parents[2] /
                                      'configs/cbn/mask_rcnn_r50_fpn_cbn_buffer3_burnin8_1x.py') + "'\n"
                   "model = dict(backbone=dict(depth=18, init_cfg=None), neck=dict(in_channels=[64, 128, 256, 512]))\n")
    report, diff = main([str(cfg), '--out', str(out), '--shape', '64', '64'])
    assert diff < 1e-3 and out.exists()
    assert len(report['fused']) > 20 and not report['kept']


# ----------------------------------------------------------------------------- weight-transforming convs

WS_CONVS = {
    'WSConv': dict(type='WSConv'),
    'WSConv-eps-inside': dict(type='WSConv', eps_inside_sqrt=True),
    'ConvWS': dict(type='ConvWS'),      # mmcv's
    'ConvAWS': dict(type='ConvAWS'),    # mmcv's adaptive WS (learned gamma/beta on the standardized weight)
    'CenConv': dict(type='CenConv'),
}


@pytest.mark.parametrize('conv', sorted(WS_CONVS))
@pytest.mark.parametrize('norm', [dict(type='BN'), dict(type='MABN', B=1, real_B=2)])
def test_weight_transforming_convs_fold_into_plain_convs(conv, norm):
    model = _trained(norm, WS_CONVS[conv])
    if conv == 'ConvAWS':
        with torch.no_grad():   # non-trivial adaptive parameters
            for block in model:
                block.conv.weight_gamma.uniform_(0.5, 1.5)
                block.conv.weight_beta.uniform_(-0.1, 0.1)
    reference = copy.deepcopy(model)
    report = fuse_norm_layers(model)
    assert report['fused'] == ['0.bn', '1.bn'] and all(type(block.conv) is nn.Conv2d for block in model)
    x = torch.randn(3, 3, 6, 6) * 3 + 1
    torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)


def test_unknown_weight_transform_is_kept_with_its_reason():
    from cbn_mmdet.ops import WeightStandardizedConv2d

    class ScaledWS(WeightStandardizedConv2d):
        def cbn_effective_weight(self):
            return 2 * super().cbn_effective_weight()

    model = nn.Sequential(ScaledWS(3, 4, 3), nn.BatchNorm2d(4)).eval()
    report = fuse_norm_layers(model)
    assert not report['fused'] and 'ScaledWS transforms its weight' in report['kept']['1']
    assert isinstance(model[1], nn.BatchNorm2d)


def test_conv_subclass_keeps_its_forward():
    """A conv subclass with its own forward (mmcv's adaptive padding) is folded in place on a copy."""
    from mmcv.cnn.bricks.conv2d_adaptive_padding import Conv2dAdaptivePadding
    torch.manual_seed(0)
    model = nn.Sequential(Conv2dAdaptivePadding(3, 4, 3, stride=2, bias=False), nn.BatchNorm2d(4))
    model(torch.randn(2, 3, 7, 7))
    model.eval()
    reference = copy.deepcopy(model)
    fuse_norm_layers(model)
    assert type(model[0]) is Conv2dAdaptivePadding and isinstance(model[1], nn.Identity)
    x = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)
