"""CBN against the literal official re-implementation (tests/oracles/official_cbn.py), float64."""
import copy

import pytest
import torch
import torch.nn as nn

from cbn_mmdet.ops.cbn_binding import CBNBindError, bind_cbn_to_conv, bind_cbn_convs
from cbn_mmdet.ops.cross_iter_bn import CrossIterationBatchNorm2d
from tests.oracles.official_cbn import OfficialCBNReference

DT = torch.float64


def _pair(cin=3, cout=5, k=3, stride=1, padding=1, dilation=1, groups=1, seed=0, **cbn_kwargs):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=False).to(DT)
    cbn = CrossIterationBatchNorm2d(cout, **cbn_kwargs).to(DT)
    with torch.no_grad():
        cbn.weight.uniform_(0.5, 1.5)
        cbn.bias.uniform_(-0.5, 0.5)
    return conv, cbn


def _run_sequence(conv, cbn, ref, iters=12, lr=0.2, mode='bound', n=2, hw=6, seed=1):
    """Train ours and the oracle side by side with SGD; compare everything at every iteration."""
    if mode in ('bound', 'bound+weight'):
        bind_cbn_to_conv(cbn, conv)
    conv_ref = copy.deepcopy(conv)
    gamma = cbn.weight.detach().clone().requires_grad_()
    beta = cbn.bias.detach().clone().requires_grad_()
    gen = torch.Generator().manual_seed(seed)
    for it in range(iters):
        x = torch.randn(n, conv.in_channels, hw, hw, generator=gen, dtype=DT) * 2 + 0.5
        probe = torch.randn(n, conv.out_channels, *conv(x).shape[2:], generator=gen, dtype=DT)
        x1 = x.clone().requires_grad_()
        y = conv(x1)
        out = cbn(y, conv.weight) if mode in ('explicit', 'bound+weight') else cbn(y)
        (out * probe).sum().backward()
        x2 = x.clone().requires_grad_()
        out_ref = ref(conv_ref(x2), conv_ref.weight, gamma, beta)
        (out_ref * probe).sum().backward()
        tol = dict(rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out, out_ref, **tol, msg=f'output, iter {it}')
        torch.testing.assert_close(x1.grad, x2.grad, **tol, msg=f'input grad, iter {it}')
        torch.testing.assert_close(conv.weight.grad, conv_ref.weight.grad, **tol, msg=f'W grad {it}')
        torch.testing.assert_close(cbn.weight.grad, gamma.grad, **tol, msg=f'gamma grad {it}')
        torch.testing.assert_close(cbn.bias.grad, beta.grad, **tol, msg=f'beta grad {it}')
        torch.testing.assert_close(cbn.running_mean, ref.running_mean, **tol)
        torch.testing.assert_close(cbn.running_var, ref.running_var, **tol)
        with torch.no_grad():
            for p, q in ((conv.weight, conv_ref.weight), (cbn.weight, gamma), (cbn.bias, beta)):
                p -= lr * p.grad
                q -= lr * q.grad
                p.grad = None
                q.grad = None


@pytest.mark.parametrize('mode', ['bound', 'explicit', 'bound+weight'])
@pytest.mark.parametrize('buffer_num,burnin', [(3, 0), (3, 4), (1, 0), (0, 0), (5, 2)])
def test_matches_official_sequence(mode, buffer_num, burnin):
    conv, cbn = _pair(buffer_num=buffer_num, burnin=burnin)
    ref = OfficialCBNReference(5, buffer_num=buffer_num, burnin=burnin)
    _run_sequence(conv, cbn, ref, mode=mode)


@pytest.mark.parametrize('geometry', [
    dict(k=1, padding=0), dict(k=3, stride=2, padding=1), dict(k=3, padding=2, dilation=2),
    dict(cin=4, cout=6, k=3, padding=1, groups=2), dict(k=7, stride=2, padding=3)])
def test_matches_official_conv_geometries(geometry):
    conv, cbn = _pair(buffer_num=3, rho=0.7, **geometry)
    ref = OfficialCBNReference(conv.out_channels, buffer_num=3, rho=0.7)
    _run_sequence(conv, cbn, ref, iters=6, hw=9)
