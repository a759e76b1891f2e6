"""mmdet/mmengine special-case BN by isinstance/class-name checks: each new norm must be recognised."""
import pytest
import torch
import torch.nn as nn
from mmcv.cnn import ConvModule, build_norm_layer
from mmdet.models.backbones import ResNet
from mmengine.model import BaseModule
from mmengine.optim import build_optim_wrapper

import cbn_mmdet  # noqa: F401
from tests.test_models.norm_cases import BN_LIKE, NORM_CFGS


@pytest.mark.parametrize('name', BN_LIKE)
def test_resnet_norm_eval_freezes_statistics(name):
    model = ResNet(18, norm_cfg=NORM_CFGS[name], norm_eval=True, init_cfg=None)
    model.train()
    norms = [m for m in model.modules() if type(m).__name__ == type(build_norm_layer(NORM_CFGS[name], 64)[1]).__name__]
    assert norms and all(not m.training for m in norms)


@pytest.mark.parametrize('name', sorted(NORM_CFGS))
def test_optimizer_norm_decay_mult(name):
    model = nn.Sequential(ConvModule(3, 16, 3, padding=1, norm_cfg=NORM_CFGS[name]))
    wrapper = build_optim_wrapper(model, dict(
        optimizer=dict(type='SGD', lr=0.1, weight_decay=1e-4), paramwise_cfg=dict(norm_decay_mult=0.0)))
    norm = model[0].norm
    decays = {id(p): g['weight_decay'] for g in wrapper.optimizer.param_groups for p in g['params']}
    assert decays[id(norm.weight)] == 0.0 and decays[id(norm.bias)] == 0.0
    assert decays[id(model[0].conv.weight)] == pytest.approx(1e-4)


@pytest.mark.parametrize('name', BN_LIKE)
def test_init_cfg_constant_on_batchnorm_layers(name):
    class Net(BaseModule):
        def __init__(self):
            super().__init__(init_cfg=dict(type='Constant', val=0.25, bias=0.5, layer=['_BatchNorm']))
            self.norm = build_norm_layer(NORM_CFGS[name], 16)[1]   # a direct child, as in ResNet

    net = Net()
    net.init_weights()
    assert torch.all(net.norm.weight == 0.25) and torch.all(net.norm.bias == 0.5)


@pytest.mark.parametrize('name', sorted(NORM_CFGS))
def test_empty_batch_through_conv_module(name):
    """RoI heads call their convs with N=0 when an image has no proposals."""
    module = ConvModule(8, 16, 3, padding=1, norm_cfg=NORM_CFGS[name])
    module.train()
    for _ in range(2):   # fill CBN windows first
        module(torch.randn(2, 8, 5, 5, requires_grad=True)).sum().backward()
    out = module(torch.randn(0, 8, 5, 5, requires_grad=True))
    assert out.shape == (0, 16, 5, 5)
    out.sum().backward()
    module.eval()
    assert module(torch.randn(0, 8, 5, 5)).shape == (0, 16, 5, 5)


@pytest.mark.parametrize('name', sorted(NORM_CFGS))
def test_autocast_bf16_through_conv_module(name):
    module = ConvModule(8, 16, 3, padding=1, norm_cfg=NORM_CFGS[name])
    for _ in range(3):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = module(torch.randn(2, 8, 5, 5, requires_grad=True))
        assert torch.isfinite(out.float()).all()
        out.float().sum().backward()
    assert all(b.dtype != torch.bfloat16 for b in module.buffers())


@pytest.mark.parametrize('name', sorted(NORM_CFGS))
def test_state_dict_round_trip(name):
    torch.manual_seed(0)
    a = ConvModule(4, 8, 3, padding=1, norm_cfg=NORM_CFGS[name])
    for _ in range(3):
        a(torch.randn(2, 4, 5, 5, requires_grad=True)).sum().backward()
    b = ConvModule(4, 8, 3, padding=1, norm_cfg=NORM_CFGS[name])
    b.load_state_dict(a.state_dict())
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    torch.testing.assert_close(a(x), b(x.detach().clone().requires_grad_()))
