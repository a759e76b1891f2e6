"""CBN finds its conv inside mmcv/mmdet blocks without forking them, or says which layer cannot."""
import pytest
import torch
import torch.nn as nn
from mmcv.cnn import ConvModule
from mmdet.models.backbones import ResNet

import cbn_mmdet  # noqa: F401
from cbn_mmdet.ops import CBNBindError, CrossIterationBatchNorm2d, bind_cbn_convs, bind_cbn_to_conv

CBN = dict(type='CBN', buffer_num=2)


def _cbn_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, CrossIterationBatchNorm2d)}


@pytest.mark.parametrize('depth,deep_stem', [(18, False), (50, False), (18, True)])
def test_resnet_blocks_stem_and_downsample_bind(depth, deep_stem):
    """BasicBlock (which the official code could not do), Bottleneck, stem, deep stem, downsample."""
    model = ResNet(depth, norm_cfg=CBN, norm_eval=False, deep_stem=deep_stem, init_cfg=None)
    layers = _cbn_layers(model)
    assert all(m.is_bound for m in layers.values())       # bound while the backbone was built
    assert bind_cbn_convs(model) == {}                     # nothing left for the explicit walk
    expected_pairs = {'layer1.0.bn1': 'layer1.0.conv1', 'layer2.0.downsample.1': 'layer2.0.downsample.0'}
    expected_pairs['stem.1' if deep_stem else 'bn1'] = 'stem.0' if deep_stem else 'conv1'
    modules = dict(model.named_modules())
    for norm_name, conv_name in expected_pairs.items():
        assert layers[norm_name].bound_conv is modules[conv_name], norm_name
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    for _ in range(2):
        sum(o.sum() for o in model(x)).backward()
    assert all(int(m.window_filled.sum()) == 2 for m in layers.values())


def test_binding_happens_at_construction_and_names_at_first_forward():
    model = ResNet(18, norm_cfg=CBN, norm_eval=False, init_cfg=None)
    layers = _cbn_layers(model)
    assert all(m.is_bound and m.window_weight.numel() > 0 for m in layers.values())
    sum(o.sum() for o in model(torch.randn(2, 3, 32, 32, requires_grad=True))).backward()
    assert all(m._layer_name == name for name, m in layers.items())


def test_norm_fed_by_another_conv_is_detected():
    """bn2 bound to conv1 (a wrong binding) is caught at the first training forward, naming both."""
    model = ResNet(18, norm_cfg=CBN, norm_eval=False, init_cfg=None)
    block = model.layer1[0]
    bind_cbn_to_conv(block.bn2, block.conv1, name='layer1.0.bn2', conv_name='layer1.0.conv1')
    with pytest.raises(CBNBindError, match=r"CBN layer 'layer1.0.bn2'.*not the output of its bound conv "
                                           r"'layer1.0.conv1'"):
        model(torch.randn(2, 3, 32, 32, requires_grad=True))


def test_norm_before_conv_raises_naming_the_layer():
    model = nn.Sequential(ConvModule(4, 4, 3, padding=1, norm_cfg=CBN, order=('norm', 'conv', 'act')))
    with pytest.raises(CBNBindError, match=r"CBN layer '0.bn'.*puts the norm before the conv"):
        model(torch.randn(2, 4, 5, 5, requires_grad=True))


def test_eval_needs_no_binding():
    model = nn.Sequential(ConvModule(4, 4, 3, padding=1, norm_cfg=CBN, order=('norm', 'conv', 'act')))
    model.eval()
    assert model(torch.randn(1, 4, 5, 5)).shape == (1, 4, 5, 5)


def test_user_module_with_helper():
    class UserBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, 8, 1, bias=False)
            self.norm = CrossIterationBatchNorm2d(8, buffer_num=2)
            bind_cbn_to_conv(self.norm, self.proj)     # the documented one-liner

        def forward(self, x):
            return torch.relu(self.norm(self.proj(x)))

    block = UserBlock()
    for _ in range(3):
        block(torch.randn(2, 3, 4, 4, requires_grad=True)).sum().backward()
    assert block.norm.bound_conv is block.proj and int(block.norm.window_filled.sum()) == 2


def test_user_module_without_helper_raises_naming_the_layer():
    class UserBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, 8, 1, bias=False)
            self.norm = CrossIterationBatchNorm2d(8, buffer_num=2)

        def forward(self, x):
            return self.norm(self.proj(x))

    with pytest.raises(CBNBindError, match="CBN layer 'norm' cannot identify its conv"):
        UserBlock()(torch.randn(2, 3, 4, 4, requires_grad=True))


def test_mmcv_ws_conv_is_refused_with_advice():
    module = ConvModule(4, 8, 3, padding=1, conv_cfg=dict(type='ConvWS'), norm_cfg=CBN)
    with pytest.raises(CBNBindError, match="ConvWS2d transforms its weight; use conv_cfg=dict\\(type='WSConv'\\)"):
        bind_cbn_convs(module)


def test_our_ws_conv_compensates_in_the_standardized_weight():
    module = ConvModule(4, 8, 3, padding=1, conv_cfg=dict(type='WSConv'), norm_cfg=CBN)
    for _ in range(2):
        module(torch.randn(2, 4, 5, 5, requires_grad=True)).sum().backward()
    stored = module.norm.window_weight[0]
    effective = module.conv.cbn_effective_weight().detach().flatten(1)   # entries are stored as (C, K)
    assert torch.allclose(stored, effective) or torch.allclose(module.norm.window_weight[1], effective)
