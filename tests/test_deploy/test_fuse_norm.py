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
    from cbn_mmdet.deploy.fuse_tool import main
    out = tmp_path / 'fused.pth'
    cfg = tmp_path / 'cfg.py'
    cfg.write_text("_base_ = '" + str(__import__('pathlib').Path(__file__).resolve().parents[2] /
                                      'configs/cbn/mask_rcnn_r50_fpn_cbn_buffer3_burnin8_1x.py') + "'\n"
                   "model = dict(backbone=dict(depth=18, init_cfg=None), neck=dict(in_channels=[64, 128, 256, 512]))\n")
    report, diff = main([str(cfg), '--out', str(out), '--shape', '64', '64'])
    assert diff < 1e-3 and out.exists()
    assert len(report['fused']) > 20 and not report['kept']
