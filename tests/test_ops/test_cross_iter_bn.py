"""CBN against the literal official re-implementation (tests/oracles/official_cbn.py), float64."""
import copy

import pytest
import torch
import torch.nn as nn

from cbn_mmdet.ops.cbn_binding import CBNBindError, bind_cbn_convs, bind_cbn_to_conv
from cbn_mmdet.ops.cbn_window import combine, compensate
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


def test_compensation_is_exercised():
    """The sequence above must be sensitive to the compensation: rho=0 (naive) differs from rho=1."""
    conv, cbn = _pair(buffer_num=3, rho=0.0)
    ref = OfficialCBNReference(5, buffer_num=3, rho=1.0)
    with pytest.raises(AssertionError):
        _run_sequence(conv, cbn, ref)


def _bound(cin=3, cout=4, **kwargs):
    conv, cbn = _pair(cin=cin, cout=cout, **kwargs)
    bind_cbn_to_conv(cbn, conv)
    return conv, cbn


def _step(conv, cbn, x):
    out = cbn(conv(x.requires_grad_()))
    out.sum().backward()
    return out


def test_gradient_accumulation_equals_concatenated_batch():
    """Unchanged weights: a window of k micro-batches uses the statistics of their concatenation."""
    conv, cbn = _bound(buffer_num=3)
    micro = [torch.randn(2, 3, 5, 5, dtype=DT) + i for i in range(4)]
    for x in micro[:3]:
        _step(conv, cbn, x.clone())
    out = cbn(conv(micro[3].clone().requires_grad_()))
    with torch.no_grad():
        y_all = conv(torch.cat(micro))
        y_last = conv(micro[3])
        mean = y_all.mean((0, 2, 3)).view(1, -1, 1, 1)
        std = y_all.var((0, 2, 3), unbiased=False).sqrt().view(1, -1, 1, 1)
        expected = (y_last - mean) / (std + cbn.eps) * cbn.weight.view(1, -1, 1, 1) + cbn.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_burnin_boundary_and_window_fill():
    conv, cbn = _bound(buffer_num=2, burnin=3)
    for it in range(1, 7):
        _step(conv, cbn, torch.randn(2, 3, 5, 5, dtype=DT))
        assert int(cbn.iter_count) == it
        # nothing enters the window during burn-in (forwards 1..3); then one entry per forward, max 2
        assert int(cbn.window_filled.sum()) == min(max(it - 3, 0), 2)
    assert int(cbn.window_head) == (6 - 3) % 2


def test_all_entries_invalid_falls_back_to_current_batch():
    conv, cbn = _bound(buffer_num=2)
    for _ in range(2):
        _step(conv, cbn, torch.randn(2, 3, 5, 5, dtype=DT))
    with torch.no_grad():   # make every stored entry invalid: nu < mu^2
        cbn.window_mean.fill_(10.0)
        cbn.window_sq.fill_(1.0)
    x = torch.randn(2, 3, 5, 5, dtype=DT)
    with torch.no_grad():
        conv_out = conv(x)
    out = cbn(conv(x.clone().requires_grad_()))
    assert torch.isfinite(out).all()
    assert int(cbn.num_fallbacks) == 0     # the current entry stays valid: not a fallback
    mean = conv_out.mean((0, 2, 3)).view(1, -1, 1, 1)
    std = conv_out.var((0, 2, 3), unbiased=False).sqrt().view(1, -1, 1, 1)
    expected = (conv_out - mean) / (std + cbn.eps) * cbn.weight.view(1, -1, 1, 1) + cbn.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_no_valid_past_entry_leaves_the_current_batch_alone():
    """Official: an entry is dropped when its compensated ν − μ² < 0. The current entry is a variance by
    construction (ν_t = var_t + μ_t²), so it is always kept: with every past entry invalid the window mean
    is the current batch's, never 0/0 (official: NaN when nothing is kept)."""
    conv, cbn = _bound(cin=2, cout=2, buffer_num=1)
    _step(conv, cbn, torch.randn(2, 2, 4, 4, dtype=DT))
    with torch.no_grad():
        cbn.window_mean.fill_(10.0)     # every past entry invalid: nu < mu^2
        cbn.window_sq.fill_(1.0)
    current = torch.tensor([[0.5, -0.5], [0.25 - 1e-12, 0.25]], dtype=DT)   # channel 0 rounds "invalid"
    views = cbn._window_views()
    with torch.no_grad():               # the current entry in the staging row, as a forward writes it
        views.staging_stats.copy_(current)
        views.rows['weight'][-1].copy_(conv.weight.flatten(1))
    mean, sq = compensate(views.rows, conv.weight.detach(), cbn.rho)
    mean_bar, sq_bar, coef, shares = combine(mean, sq, views.threshold)
    assert not shares[:-1].any()        # no past entry kept
    torch.testing.assert_close(coef, torch.ones(2, dtype=DT))          # current batch alone
    torch.testing.assert_close(torch.stack((mean_bar, sq_bar)), current, rtol=0, atol=0)
    # end to end: a clamped variance gives a finite output and finite gradients
    with torch.no_grad():
        conv.weight.zero_()             # a constant (zero) conv output: variance exactly 0
    out = cbn(conv(torch.randn(2, 2, 4, 4, dtype=DT, requires_grad=True)))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(conv.weight.grad).all()
    assert int(cbn.num_fallbacks) == 0


def test_empty_batch():
    conv, cbn = _bound(buffer_num=2)
    for _ in range(2):
        _step(conv, cbn, torch.randn(2, 3, 5, 5, dtype=DT))
    state = {k: v.clone() for k, v in cbn.state_dict().items()}
    out = cbn(conv(torch.randn(0, 3, 5, 5, dtype=DT, requires_grad=True)))
    assert out.shape == (0, 4, 5, 5)
    out.sum().backward()
    for key in ('running_mean', 'running_var', 'window_mean', 'window_filled', 'window_head'):
        assert torch.equal(state[key], cbn.state_dict()[key]), key
    cbn.eval()
    assert cbn(torch.zeros(0, 4, 3, 3, dtype=DT)).shape == (0, 4, 3, 3)


def test_eval_is_bn_with_running_stats_and_eps_on_std():
    conv, cbn = _bound(buffer_num=2)
    for _ in range(3):
        _step(conv, cbn, torch.randn(2, 3, 5, 5, dtype=DT))
    cbn.eval()
    y = torch.randn(2, 4, 3, 3, dtype=DT)
    rm, rv = cbn.running_mean.view(1, -1, 1, 1), cbn.running_var.view(1, -1, 1, 1)
    expected = (y - rm) / (rv.sqrt() + cbn.eps) * cbn.weight.view(1, -1, 1, 1) + cbn.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(cbn(y), expected)
    # with eps inside the sqrt, eval is exactly torch's BN
    bn_like = CrossIterationBatchNorm2d(4, eps_inside_sqrt=True).to(DT).eval()
    torch_bn = nn.BatchNorm2d(4).to(DT).eval()
    torch_bn.load_state_dict({k: v for k, v in cbn.state_dict().items() if k in torch_bn.state_dict()})
    with pytest.warns(UserWarning, match='BN checkpoint'):
        bn_like.load_state_dict(torch_bn.state_dict())
    torch.testing.assert_close(bn_like(y), torch_bn(y))


def test_bn_compatible_options_equal_torch_bn_in_training():
    torch.manual_seed(0)
    cbn = CrossIterationBatchNorm2d(4, eps_inside_sqrt=True, unbiased_plain_var=False).to(DT)
    bn = nn.BatchNorm2d(4).to(DT)
    x = torch.randn(3, 4, 5, 5, dtype=DT)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn_like(x)
    (cbn(x1) * g).sum().backward()
    (bn(x2) * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(cbn.running_var, bn.running_var)


def test_resume_mid_window_equals_uninterrupted():
    def make():
        return _bound(buffer_num=3, burnin=2)

    xs = [torch.randn(2, 3, 5, 5, dtype=DT, generator=torch.Generator().manual_seed(i)) for i in range(9)]
    conv_a, cbn_a = make()
    outs_a = []
    for x in xs:
        outs_a.append(_step(conv_a, cbn_a, x.clone()).detach())
        with torch.no_grad():
            conv_a.weight -= 0.1 * conv_a.weight.grad
            conv_a.weight.grad = None
    conv_b, cbn_b = make()
    for x in xs[:5]:
        _step(conv_b, cbn_b, x.clone())
        with torch.no_grad():
            conv_b.weight -= 0.1 * conv_b.weight.grad
            conv_b.weight.grad = None
    saved = {'conv': copy.deepcopy(conv_b.state_dict()), 'cbn': copy.deepcopy(cbn_b.state_dict())}
    conv_c, cbn_c = _pair(cout=4, buffer_num=3, burnin=2, seed=123)   # fresh, other init, unbound
    conv_c.load_state_dict(saved['conv'])
    cbn_c.load_state_dict(saved['cbn'])
    bind_cbn_to_conv(cbn_c, conv_c)
    for i, x in enumerate(xs[5:], start=5):
        out = _step(conv_c, cbn_c, x.clone())
        assert torch.equal(out.detach(), outs_a[i]), f'iteration {i} differs after resume'
        with torch.no_grad():
            conv_c.weight -= 0.1 * conv_c.weight.grad
            conv_c.weight.grad = None


def test_bn_checkpoint_loads_with_documented_policy():
    bn = nn.BatchNorm2d(4)
    bn.running_mean.fill_(0.5)
    cbn = CrossIterationBatchNorm2d(4, buffer_num=2)
    with pytest.warns(UserWarning, match='window starts empty'):
        result = cbn.load_state_dict(bn.state_dict(), strict=True)
    assert not result.missing_keys
    assert torch.equal(cbn.running_mean, bn.running_mean)
    assert int(cbn.window_filled.sum()) == 0 and int(cbn.iter_count) == 0


def test_partial_cbn_state_is_reported_missing():
    cbn = CrossIterationBatchNorm2d(4, buffer_num=2)
    state = cbn.state_dict()
    del state['window_mean']
    with pytest.raises(RuntimeError, match='window_mean'):
        CrossIterationBatchNorm2d(4, buffer_num=2).load_state_dict(state)


def test_autocast_statistics_in_fp32():
    conv, cbn = _pair(buffer_num=2)
    conv, cbn = conv.float(), cbn.float()
    bind_cbn_to_conv(cbn, conv)
    for _ in range(3):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = cbn(conv(torch.randn(2, 3, 6, 6, requires_grad=True)))
        assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
        out.float().sum().backward()
    assert cbn.window_mean.dtype == torch.float32 and cbn.window_weight.dtype == torch.float32
    assert torch.isfinite(cbn.window_sq_grad).all()


def test_deepcopy_rebinds_to_the_copied_conv():
    parent = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), CrossIterationBatchNorm2d(4, buffer_num=2))
    bind_cbn_convs(parent)
    clone = copy.deepcopy(parent)
    assert clone[1].bound_conv is clone[0]
    clone(torch.randn(2, 3, 5, 5, requires_grad=True)).sum().backward()
    assert int(clone[1].window_filled.sum()) == 1 and int(parent[1].window_filled.sum()) == 0


def test_auto_binding_when_the_structure_is_built():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), CrossIterationBatchNorm2d(4, buffer_num=2),
                          nn.ReLU())
    assert model[1].bound_conv is model[0]                  # bound at registration: buffers final
    assert model[1].window_weight.shape == (2, 4, 27) and model[1].window_mean_grad.shape == (2, 1, 27)
    late = nn.Sequential(nn.Identity(), CrossIterationBatchNorm2d(4, buffer_num=2))
    assert not late[1].is_bound                              # no conv before it yet
    late[0] = nn.Conv2d(3, 4, 1, bias=False)                 # registering the conv binds it
    assert late[1].bound_conv is late[0]


def test_auto_binding_at_first_forward_of_parent():
    model = nn.Sequential(nn.Identity(), CrossIterationBatchNorm2d(4, buffer_num=2), nn.ReLU())
    model._modules['0'] = nn.Conv2d(3, 4, 3, padding=1, bias=False)   # bypasses registration hooks
    assert not model[1].is_bound
    model(torch.randn(2, 3, 5, 5, requires_grad=True)).sum().backward()
    assert model[1].bound_conv is model[0] and model[1]._layer_name == '1'


def test_unbindable_layer_raises_naming_it():
    model = nn.Sequential(nn.ReLU(), CrossIterationBatchNorm2d(3, buffer_num=2))
    with pytest.raises(CBNBindError, match="CBN layer '1'"):
        model(torch.randn(2, 3, 5, 5, requires_grad=True))
    with pytest.raises(CBNBindError, match="'1' cannot identify its conv"):
        bind_cbn_convs(model)


def test_standalone_layer_without_conv_raises():
    cbn = CrossIterationBatchNorm2d(3, buffer_num=2)
    with pytest.raises(CBNBindError, match='no conv'):
        cbn(torch.randn(2, 3, 4, 4, requires_grad=True))
    assert CrossIterationBatchNorm2d(3)(torch.randn(2, 3, 4, 4)).shape == (2, 3, 4, 4)   # buffer_num=0: plain


@pytest.mark.parametrize('kwargs,match', [
    (dict(buffer_num=-1), 'buffer_num must be >= 0, got -1'),
    (dict(buffer_num=1.5), 'buffer_num must be an int'),
    (dict(burnin=-2), 'burnin must be >= 0, got -2'),
    (dict(rho=float('nan')), 'rho must be finite'),
    (dict(rho=float('inf')), 'rho must be finite'),
    (dict(momentum=1.5), r'momentum must be in \[0, 1\], got 1.5'),
    (dict(momentum=-0.1), r'momentum must be in \[0, 1\]'),
    (dict(eps=-1.0), 'eps must be > 0, got -1.0'),
    (dict(eps=0.0), 'eps must be > 0, got 0.0'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        CrossIterationBatchNorm2d(4, **kwargs)


def test_bad_input_rank_and_conv():
    with pytest.raises(ValueError, match='expected 4D input'):
        CrossIterationBatchNorm2d(4)(torch.randn(2, 4))
    with pytest.raises(CBNBindError, match='out_channels=5 != num_features=4'):
        bind_cbn_to_conv(CrossIterationBatchNorm2d(4, buffer_num=1), nn.Conv2d(3, 5, 1))
    with pytest.raises(CBNBindError, match='expected an nn.Conv2d'):
        bind_cbn_to_conv(CrossIterationBatchNorm2d(4, buffer_num=1), nn.Linear(3, 4))


def test_non_finite_input_leaves_state_untouched_and_is_counted():
    conv, cbn = _bound(buffer_num=2)
    for _ in range(3):
        _step(conv, cbn, torch.randn(2, 3, 5, 5, dtype=DT))
    before = {k: v.clone() for k, v in cbn.state_dict().items()}
    x = torch.randn(2, 3, 5, 5, dtype=DT)
    x[0, 0, 2, 2] = float('nan')
    cbn(conv(x.requires_grad_())).sum().backward()      # the step enters the state at its backward
    conv.weight.grad = None
    after = cbn.state_dict()
    assert int(after['num_nonfinite']) == 1
    for key in ('running_mean', 'running_var', 'window_mean', 'window_sq', 'window_weight', 'window_head',
                'window_filled'):
        assert torch.equal(before[key], after[key]), key
    _step(conv, cbn, torch.randn(2, 3, 5, 5, dtype=DT))      # training goes on normally afterwards
    assert torch.isfinite(cbn.running_var).all() and int(cbn.window_head) != int(before['window_head'])


def test_channels_last_matches_contiguous():
    conv_a, cbn_a = _bound(buffer_num=2)
    conv_b, cbn_b = copy.deepcopy(conv_a), copy.deepcopy(cbn_a)
    conv_b = conv_b.to(memory_format=torch.channels_last)
    bind_cbn_to_conv(cbn_b, conv_b)
    for _ in range(3):
        x = torch.randn(2, 3, 6, 6, dtype=DT)
        xa, xb = x.clone().requires_grad_(), x.clone().to(memory_format=torch.channels_last).requires_grad_()
        out_a, out_b = cbn_a(conv_a(xa)), cbn_b(conv_b(xb))
        out_a.sum().backward()
        out_b.sum().backward()
        torch.testing.assert_close(out_a, out_b)
        torch.testing.assert_close(xa.grad, xb.grad)


@pytest.mark.parametrize('buffer_num,burnin', [(3, 0), (2, 3)])
def test_grad_through_window_matches_differentiable_oracle(buffer_num, burnin):
    """Opt-in: the gradient also flows through the Taylor compensation into the conv weight."""
    conv, cbn = _pair(buffer_num=buffer_num, burnin=burnin, grad_through_window=True)
    ref = OfficialCBNReference(5, buffer_num=buffer_num, burnin=burnin, grad_through_window=True)
    _run_sequence(conv, cbn, ref)


def test_grad_through_window_changes_only_the_weight_gradient():
    """Same forward, same input gradient as the official mode; a different conv-weight gradient."""
    conv_a, cbn_a = _bound(buffer_num=2)
    conv_b, cbn_b = copy.deepcopy(conv_a), CrossIterationBatchNorm2d(4, buffer_num=2, grad_through_window=True).to(DT)
    cbn_b.load_state_dict(cbn_a.state_dict())
    bind_cbn_to_conv(cbn_b, conv_b)
    for it in range(3):
        x = torch.randn(2, 3, 5, 5, dtype=DT)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_a, out_b = cbn_a(conv_a(xa)), cbn_b(conv_b(xb))
        probe = torch.randn_like(out_a)
        (out_a * probe).sum().backward()
        (out_b * probe).sum().backward()
        torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
        torch.testing.assert_close(xa.grad, xb.grad)
        if it > 0:   # once the window holds entries the weight gradients differ
            assert not torch.allclose(conv_a.weight.grad, conv_b.weight.grad)
        conv_a.weight.grad = conv_b.weight.grad = None


@pytest.mark.parametrize('eps_inside_sqrt', [False, True])
def test_grad_through_window_without_affine_equals_unit_affine(eps_inside_sqrt):
    """affine=False is γ = 1, β = 0: the same outputs and gradients, window terms included (the BN kernel's
    Σg(x − μ̄) is needed for them even without a γ to take it)."""
    torch.manual_seed(0)
    conv_a = nn.Conv2d(3, 4, 3, padding=1, bias=False).to(DT)
    conv_b = copy.deepcopy(conv_a)
    kwargs = dict(buffer_num=2, grad_through_window=True, eps_inside_sqrt=eps_inside_sqrt)
    cbn_a = CrossIterationBatchNorm2d(4, **kwargs).to(DT)             # γ = 1, β = 0 (never stepped)
    cbn_b = CrossIterationBatchNorm2d(4, affine=False, **kwargs).to(DT)
    bind_cbn_to_conv(cbn_a, conv_a)
    bind_cbn_to_conv(cbn_b, conv_b)
    for it in range(5):
        x = torch.randn(2, 3, 5, 5, dtype=DT)
        probe = torch.randn(2, 4, 5, 5, dtype=DT)
        grads = []
        for conv, cbn in ((conv_a, cbn_a), (conv_b, cbn_b)):
            xi = x.clone().requires_grad_()
            (cbn(conv(xi)) * probe).sum().backward()
            grads.append((xi.grad, conv.weight.grad.clone()))
            with torch.no_grad():
                conv.weight -= 0.05 * conv.weight.grad
            conv.weight.grad = None
        for a, b in zip(*grads):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('conv_type', ['WeightStandardizedConv2d', 'CenteredConv2d'])
def test_grad_through_window_reaches_the_raw_weight_of_a_transformed_conv(conv_type):
    """A WS / centred conv applies a function of its raw weight: the window terms' gradient must flow
    through it. Oracle: the same layer given that weight explicitly, forward(x, weight), with the transform
    taken by autograd outside the layer."""
    import torch.nn.functional as F

    from cbn_mmdet.ops import weight_std_conv
    transform = {'WeightStandardizedConv2d': weight_std_conv.weight_standardize,
                 'CenteredConv2d': weight_std_conv.weight_center}[conv_type]
    torch.manual_seed(0)
    conv = getattr(weight_std_conv, conv_type)(3, 4, 3, padding=1, bias=False).to(DT)
    raw = conv.weight.detach().clone().requires_grad_()
    cbn_a = CrossIterationBatchNorm2d(4, buffer_num=2, grad_through_window=True).to(DT)
    cbn_b = copy.deepcopy(cbn_a)
    bind_cbn_to_conv(cbn_a, conv)
    for it in range(4):
        x = torch.randn(2, 3, 5, 5, dtype=DT)
        probe = torch.randn(2, 4, 5, 5, dtype=DT)
        (cbn_a(conv(x.clone().requires_grad_())) * probe).sum().backward()
        weight = transform(raw)
        (cbn_b(F.conv2d(x.clone().requires_grad_(), weight, padding=1), weight) * probe).sum().backward()
        torch.testing.assert_close(conv.weight.grad, raw.grad, rtol=1e-9, atol=1e-10)
        with torch.no_grad():
            conv.weight -= 0.05 * conv.weight.grad
            raw -= 0.05 * raw.grad
        conv.weight.grad = raw.grad = None


@pytest.mark.parametrize('windowed', [False, True])
def test_normalise_treats_a_negative_zero_variance_as_zero(windowed):
    """σ̄² = −0.0 (an exact cancellation) is a zero variance: the same output and finite gradients as +0.0."""
    from cbn_mmdet.ops.cbn_normalise import cbn_normalise
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, dtype=DT)
    probe = torch.randn_like(x)
    results = []
    for zero in (0.0, -0.0):
        xi, gamma = x.clone().requires_grad_(), torch.ones(3, dtype=DT, requires_grad=True)
        var_raw = torch.tensor([zero, 1.0, 2.0], dtype=DT)
        coef = torch.full((3,), 0.5, dtype=DT) if windowed else None
        out = cbn_normalise(xi, gamma, torch.zeros(3, dtype=DT), x.mean((0, 2, 3)), var_raw, 32, coef=coef)
        (out * probe).sum().backward()
        results.append((out.detach(), xi.grad, gamma.grad))
    for positive, negative in zip(*results):
        assert torch.isfinite(negative).all()
        torch.testing.assert_close(negative, positive, rtol=0, atol=0)


def test_window_slopes_come_with_their_conv_weight_on_the_window_path():
    from cbn_mmdet.ops.cbn_normalise import cbn_normalise
    x, v = torch.randn(2, 4, 3, 3), torch.ones(4)
    slopes = (torch.zeros(4, 9), torch.zeros(4, 9))
    with pytest.raises(ValueError, match='window_slopes=True, conv_weight=False, coef=True'):
        cbn_normalise(x, v, v, v * 0, v, 18, coef=v / 2, window_slopes=slopes)
    with pytest.raises(ValueError, match='window_slopes=True, conv_weight=True, coef=False'):
        cbn_normalise(x, v, v, v * 0, v, 18, window_slopes=slopes, conv_weight=torch.zeros(4, 1, 3, 3))


def test_two_forwards_before_one_backward_store_both_entries():
    """A module called twice before its backward (a shared head): each step's entry is written into the
    staging row, so the first step's pending entry must survive the second forward. Oracle: after the one
    backward the ring holds both batches' own means (torch's mean of the conv outputs), and nothing else;
    the running statistics took each batch's own mean and unbiased variance once (in either order)."""
    conv, cbn = _bound(buffer_num=3)
    _step(conv, cbn, torch.randn(2, 3, 5, 5, dtype=DT))             # window path from here on (burnin=0)
    running = (cbn.running_mean.clone(), cbn.running_var.clone())
    xs = [torch.randn(2, 3, 5, 5, dtype=DT) + 3 * i for i in (1, 2)]
    ys, outs = [], []
    for x in xs:                            # conv, norm, conv, norm: then one backward for both
        ys.append(conv(x.requires_grad_()))
        outs.append(cbn(ys[-1]))
    sum(o.sum() for o in outs).backward()
    stored = cbn.window_mean[cbn.window_filled]
    expected = torch.stack([y.detach().mean((0, 2, 3)) for y in ys])
    assert stored.shape == (3, 4) and int(cbn.window_head) == 0
    for mean in expected:
        assert torch.isclose(stored, mean, rtol=1e-12, atol=1e-12).all(1).any(), (mean, stored)
    m = cbn.momentum
    batch = [(y.detach().mean((0, 2, 3)), y.detach().var((0, 2, 3))) for y in ys]
    orders = [[torch.lerp(torch.lerp(r, a[i], m), b[i], m) for i, r in enumerate(running)]
              for a, b in (batch, batch[::-1])]
    assert any(all(torch.allclose(got, want, rtol=1e-12, atol=1e-12)
                   for got, want in zip((cbn.running_mean, cbn.running_var), order)) for order in orders)


def test_a_cast_between_forward_and_backward_stores_the_step_in_the_new_window():
    """``.float()`` replaces the window between a step's forward and its backward: the step's entry must
    land in the new window (the one the layer keeps), not in the discarded one. Oracle: the newest stored
    mean is the batch's own mean (torch's mean of the conv output), and the ring advanced by one."""
    conv, cbn = _bound(buffer_num=3)
    _step(conv, cbn, torch.randn(2, 3, 5, 5, dtype=DT))
    x = torch.randn(2, 3, 5, 5, dtype=DT) + 2.0
    y = conv(x.requires_grad_())
    out = cbn(y)
    head = int(cbn.window_head)
    cbn.float()
    out.sum().backward()
    assert cbn.window.dtype == torch.float32 and int(cbn.window_head) == (head + 1) % 3
    torch.testing.assert_close(cbn.window_mean[head], y.detach().mean((0, 2, 3)).float())
    assert int(cbn.window_filled.sum()) == 2 and int(cbn.num_nonfinite) == 0


def test_a_device_move_between_forward_and_backward_is_said_and_stores_nothing():
    """A move to another device cannot complete the pending step (its graph is on the old device): the
    layer warns, and the backward still runs."""
    conv, cbn = _bound(buffer_num=3)
    _step(conv, cbn, torch.randn(2, 3, 5, 5, dtype=DT))
    out = cbn(conv(torch.randn(2, 3, 5, 5, dtype=DT).requires_grad_()))
    with pytest.warns(UserWarning, match='moved to another device between a training forward'):
        cbn.to('meta')
    out.sum().backward()
    assert conv.weight.grad is not None and cbn.window.device.type == 'meta'


def test_a_non_finite_slope_refuses_the_step(monkeypatch):
    """Finite statistics but a non-finite ∂ν/∂W: the whole entry is checked, so the step enters nothing —
    one non-finite slope would make every later compensation NaN — and is counted in num_nonfinite. The
    current entry is compensated like every row (0·Inf), so the step's own output is not finite either:
    a step a GradScaler skips."""
    import cbn_mmdet.ops.cross_iter_bn as module
    conv, cbn = _bound(buffer_num=2)
    for _ in range(2):
        _step(conv, cbn, torch.randn(2, 3, 5, 5, dtype=DT))
    before = {k: v.clone() for k, v in cbn.state_dict().items() if k != 'num_batches_tracked'}
    original = module.second_moment_weight_grad

    def overflowing(*args, **kwargs):
        return original(*args, **kwargs).fill_(float('inf'))

    monkeypatch.setattr(module, 'second_moment_weight_grad', overflowing)
    out = _step(conv, cbn, torch.randn(2, 3, 5, 5, dtype=DT))
    assert not torch.isfinite(out).all()
    after = cbn.state_dict()
    for key, value in before.items():
        if key in ('iter_count', 'num_nonfinite'):
            continue
        assert torch.equal(after[key], value), key
    assert int(after['num_nonfinite']) == int(before['num_nonfinite']) + 1


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_a_module_cast_to_half_keeps_float32_statistics(dtype):
    """`.half()` / `.bfloat16()` on conv + CBN: the current entry is averaged from its window row, so the
    window stays float32; half-rounded moments with a large mean (bias 30) would cancel in ν − μ² (inf in
    float16). Oracle: the same layer in float64; tolerance: half's own rounding of the output."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 1)
    with torch.no_grad():
        conv.bias.fill_(30.0)
    cbn = CrossIterationBatchNorm2d(16, buffer_num=3, burnin=0)
    bind_cbn_to_conv(cbn, conv)
    ref_conv, ref_cbn = copy.deepcopy((conv, cbn))        # one copy: the copied CBN is bound to the copied conv
    ref_conv.double()
    ref_cbn.double()
    conv.to(dtype)
    cbn.to(dtype)
    x = torch.randn(2, 8, 16, 16)
    for _ in range(3):
        out = cbn(conv(x.to(dtype).requires_grad_()))
        out.float().sum().backward()
        ref = ref_cbn(ref_conv(x.double().requires_grad_()))
        ref.sum().backward()
    assert cbn.window.dtype == torch.float32 and cbn.window_filled.sum() == 3
    assert int(cbn.num_nonfinite) == 0
    tol = 0.1 if dtype == torch.float16 else 0.5
    assert (out.double() - ref).abs().max() < tol
