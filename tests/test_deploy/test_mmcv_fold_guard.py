"""mmcv's own conv+BN folds on every norm x conv pair of the package, through the REAL mmcv functions.

Oracle: the unfused eval-mode model. Each pair must come out exact (allclose to it) or be refused
loudly; never a silently different model. ``fuse_conv_bn`` is what mmdet's ``--fuse-conv-bn`` calls;
``efficient_conv_bn_eval`` is ConvModule's on-the-fly fold.
"""
import copy
import importlib
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
from mmcv.cnn import ConvModule, fuse_conv_bn

import cbn_mmdet  # noqa: F401  (registration)
from cbn_mmdet.deploy.fuse_norm import (
    FoldError,
    install_mmcv_fold_guard,
    mmcv_fold_guard_installed,
    uninstall_mmcv_fold_guard,
)
from cbn_mmdet.ops import CBNBindError, WeightStandardizedConv2d

NORMS = {
    'BN': dict(type='BN'),
    'SyncBN': dict(type='SyncBN'),
    'CBN': dict(type='CBN', buffer_num=2, eps=1e-2),   # a large eps makes the eps placement visible
    'MABN': dict(type='MABN', B=1, real_B=2),
    'BCN': dict(type='BCN', num_groups=4, estimate_stats=True),
}
CONVS = {'Conv2d': None, 'WSConv': dict(type='WSConv'), 'CenConv': dict(type='CenConv'),
         'ConvWS': dict(type='ConvWS')}
PATHS = ('fuse_conv_bn', 'efficient_conv_bn_eval')


@pytest.fixture
def guard():
    was_installed = mmcv_fold_guard_installed()
    install_mmcv_fold_guard()
    yield
    if not was_installed:
        uninstall_mmcv_fold_guard()


@pytest.fixture
def no_guard():
    was_installed = mmcv_fold_guard_installed()
    uninstall_mmcv_fold_guard()
    yield
    if was_installed:
        install_mmcv_fold_guard()


def _trained(norm, conv):
    """Two ConvModules trained a few steps, with non-trivial affines, in eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(ConvModule(3, 8, 3, padding=1, norm_cfg=NORMS[norm], conv_cfg=CONVS[conv]),
                          ConvModule(8, 8, 1, norm_cfg=NORMS[norm], conv_cfg=CONVS[conv]))
    for _ in range(4):
        model(torch.randn(2, 3, 6, 6, requires_grad=True) * 3 + 1).sum().backward()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _apply(path, model):
    if path == 'fuse_conv_bn':
        return fuse_conv_bn(model)
    for block in model:
        block.turn_on_efficient_conv_bn_eval(True)
    return model


def _input():
    return torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(1)) * 3 + 1


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('conv', sorted(CONVS))
@pytest.mark.parametrize('norm', sorted(NORMS))
def test_every_pair_is_exact_with_the_guard(guard, norm, conv, path):
    if norm == 'CBN' and conv == 'ConvWS':
        # CBN refuses mmcv's ConvWS already at its first training forward (it cannot see the weight).
        with pytest.raises(CBNBindError, match='ConvWS2d transforms its weight'):
            _trained(norm, conv)
        return
    model = _trained(norm, conv)
    x = _input()
    with torch.no_grad():
        reference = model(x)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            out = _apply(path, model)(x)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
    warned = [str(w.message) for w in caught if 'efficient_conv_bn_eval' in str(w.message)]
    # Only BCN under the efficient path is run unfused, and it says so (once per layer).
    assert len(warned) == (2 if (norm, path) == ('BCN', 'efficient_conv_bn_eval') else 0), warned
    if path == 'fuse_conv_bn':
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        assert all(type(block.conv) in (nn.Conv2d, nn.Sequential) or conv in ('Conv2d', 'CenConv')
                   for block in model)


def test_bcn_under_fuse_conv_bn_keeps_its_group_norm(guard):
    model = fuse_conv_bn(_trained('BCN', 'WSConv'))
    fused = model[0].conv
    assert isinstance(fused, nn.Sequential) and type(fused[0]) is nn.Conv2d
    assert isinstance(fused[1], nn.GroupNorm) and fused[1].num_groups == 4
    assert isinstance(model[0].bn, nn.Identity)


def test_efficient_path_keeps_gradients(guard):
    """The efficient mode is also meant for fine-tuning with frozen statistics: gradients must match."""
    model = _trained('CBN', 'WSConv')
    model.zero_grad(set_to_none=True)
    reference = copy.deepcopy(model)
    x = _input()
    _apply('efficient_conv_bn_eval', model)(x).square().sum().backward()
    reference(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        # float32 sums of terms up to ~1e3: an element's rounding is relative to the gradient's scale
        # (a misplaced eps = 1e-2 would be off by ~1e-2 of it)
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6 * float(q.grad.abs().max()), msg=name)


def test_unknown_weight_transform_is_refused(guard):
    class ScaledWS(WeightStandardizedConv2d):
        def cbn_effective_weight(self):
            return 2 * super().cbn_effective_weight()

    model = nn.Sequential(ScaledWS(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(FoldError, match='ScaledWS transforms its weight'):
        fuse_conv_bn(model)


def test_install_is_idempotent_and_reversible(no_guard):
    fcb = importlib.import_module('mmcv.cnn.utils.fuse_conv_bn')   # the attribute is shadowed by the function
    original = fcb._fuse_conv_bn
    first = install_mmcv_fold_guard()
    guarded = fcb._fuse_conv_bn
    assert install_mmcv_fold_guard() == first and fcb._fuse_conv_bn is guarded is not original
    uninstall_mmcv_fold_guard()
    assert fcb._fuse_conv_bn is original and not mmcv_fold_guard_installed()


# ----------------------------------------------------------------------------- without the guard


@pytest.mark.parametrize('conv', ['WSConv', 'ConvWS'])
def test_without_the_guard_mmcv_breaks_ws_convs(no_guard, conv):
    """Why the guard exists: mmcv folds into the raw weight, which the WS conv re-standardises."""
    model = _trained('BN', conv)
    x = _input()
    with torch.no_grad():
        reference = model(x)
        out = fuse_conv_bn(model)(x)
    assert float((out - reference).norm() / reference.norm()) > 0.1


def test_without_the_guard_ws_refuses_the_efficient_path(no_guard):
    model = _apply('efficient_conv_bn_eval', _trained('BN', 'WSConv'))
    with pytest.raises(RuntimeError, match='WeightStandardizedConv2d: asked to convolve with a weight other'):
        model(_input())


@pytest.mark.parametrize('path', PATHS)
def test_without_the_guard_centred_conv_is_still_exact(no_guard, path):
    """CenConv centres whatever weight it is handed, and centring commutes with the fold's scale."""
    model = _trained('MABN', 'CenConv')
    x = _input()
    with torch.no_grad():
        reference = model(x)
        out = _apply(path, model)(x)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)


def test_import_cbn_mmdet_installs_the_guard():
    # A fresh interpreter: mmdet's --fuse-conv-bn must fold exactly as soon as a config imports cbn_mmdet.
    code = ('import importlib, cbn_mmdet; from cbn_mmdet.deploy.fuse_norm import mmcv_fold_guard_installed; '
            "fcb = importlib.import_module('mmcv.cnn.utils.fuse_conv_bn'); "
            "assert mmcv_fold_guard_installed() and fcb._fuse_conv_bn.__module__ == 'cbn_mmdet.deploy.fuse_norm'")
    subprocess.run([sys.executable, '-c', code], check=True)
