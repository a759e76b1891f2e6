"""Tests of cbn_mmdet.ops.batch_channel_norm against an independent composition of torch layers
(BatchNorm2d without affine -> GroupNorm without affine -> per-channel affine) and, for the
micro-batch mode, against statistics computed by hand."""
import io

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from cbn_mmdet.ops.batch_channel_norm import BatchChannelNorm2d

C, G = 8, 4


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class RefBCN(nn.Module):
    """Oracle: stock torch layers composed as the algorithm describes."""

    def __init__(self, num_features, num_groups, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps, momentum, affine=False, track_running_stats=track_running_stats)
        self.gn = nn.GroupNorm(num_groups, num_features, eps, affine=False)
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x):
        out = self.gn(self.bn(x))
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out


def make_pair(affine=True, track_running_stats=True, momentum=0.1, eps=1e-5):
    ours = BatchChannelNorm2d(C, eps, momentum, affine, track_running_stats, num_groups=G).double()
    ref = RefBCN(C, G, eps, momentum, affine, track_running_stats).double()
    if affine:
        with torch.no_grad():
            for module in (ours, ref):
                module.weight.copy_(torch.linspace(0.5, 1.5, C))
                module.bias.copy_(torch.linspace(-0.3, 0.3, C))
    return ours, ref


def assert_same_step(ours, ref, x):
    """Forward and backward of one step agree (output, input grad, parameter grads)."""
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    out, expected = ours(x1), ref(x2)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad)
    if ours.affine:
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad)


def assert_same_stats(ours, ref):
    torch.testing.assert_close(ours.running_mean, ref.bn.running_mean)
    torch.testing.assert_close(ours.running_var, ref.bn.running_var)
    assert ours.num_batches_tracked.item() == ref.bn.num_batches_tracked.item()


def batch(n=3, scale=2.0, shift=0.5):
    return torch.randn(n, C, 4, 5, dtype=torch.float64) * scale + shift


# ----------------------------------------------------------------------------- vs the composition


@pytest.mark.parametrize('affine', [True, False])
@pytest.mark.parametrize('momentum', [0.1, None])
def test_training_matches_composition(affine, momentum):
    ours, ref = make_pair(affine=affine, momentum=momentum)
    for _ in range(3):
        assert_same_step(ours, ref, batch())
        assert_same_stats(ours, ref)


def test_eval_matches_composition():
    ours, ref = make_pair()
    for _ in range(2):
        x = batch()
        ours(x)
        ref(x)
    ours.eval()
    ref.eval()
    assert_same_step(ours, ref, batch(scale=3.0, shift=-1.0))
    assert_same_stats(ours, ref)  # untouched in eval


def test_without_running_stats_uses_batch_stats_in_eval():
    ours, ref = make_pair(track_running_stats=False)
    assert ours.running_mean is None and ours.num_batches_tracked is None
    ours.eval()
    ref.eval()
    assert_same_step(ours, ref, batch())


def test_gradcheck():
    norm = BatchChannelNorm2d(4, num_groups=2).double()
    x = torch.randn(2, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: norm(t), (x,))


def test_is_a_batchnorm():
    norm = BatchChannelNorm2d(C, num_groups=G)
    assert isinstance(norm, _BatchNorm)
    assert type(norm).__mro__[1] is _BatchNorm  # direct subclass: mmengine's init_cfg layer='_BatchNorm'
    assert BatchChannelNorm2d._abbr_ == 'bn'   # module named bn*: BN checkpoints load
    assert norm.num_groups == G and 'num_groups=4' in repr(norm)


def test_default_num_groups():
    assert BatchChannelNorm2d(64).num_groups == 32


# ----------------------------------------------------------------------------- micro-batch mode


def hand_group_norm(x, num_groups, eps):
    n, c, h, w = x.shape
    g = x.reshape(n, num_groups, -1)
    mean = g.mean(dim=2, keepdim=True)
    var = ((g - mean) ** 2).mean(dim=2, keepdim=True)
    return ((g - mean) / torch.sqrt(var + eps)).reshape(n, c, h, w)


def test_estimate_stats_forward_and_backward_by_hand():
    eps, m = 1e-5, 0.25
    norm = BatchChannelNorm2d(C, eps, m, num_groups=G, estimate_stats=True, estimate_mode='unbiased').double()
    rm0 = torch.linspace(-1, 1, C, dtype=torch.float64)
    rv0 = torch.linspace(0.5, 3, C, dtype=torch.float64)
    weight = torch.linspace(0.5, 1.5, C, dtype=torch.float64)
    bias = torch.linspace(-0.2, 0.2, C, dtype=torch.float64)
    with torch.no_grad():
        norm.running_mean.copy_(rm0)
        norm.running_var.copy_(rv0)
        norm.weight.copy_(weight)
        norm.bias.copy_(bias)
    x = batch(n=2).requires_grad_(True)
    out = norm(x)

    # Running stats: updated first (torch convention, unbiased variance) ...
    flat = x.detach().transpose(0, 1).reshape(C, -1)
    mean = flat.mean(1)
    var_unbiased = ((flat - mean[:, None]) ** 2).sum(1) / (flat.shape[1] - 1)
    rm1 = (1 - m) * rm0 + m * mean
    rv1 = (1 - m) * rv0 + m * var_unbiased
    torch.testing.assert_close(norm.running_mean, rm1)
    torch.testing.assert_close(norm.running_var, rv1)
    assert norm.num_batches_tracked.item() == 1

    # ... then used as constants to normalise this very batch.
    x_ref = x.detach().clone().requires_grad_(True)
    bn = (x_ref - rm1.view(1, -1, 1, 1)) / torch.sqrt(rv1.view(1, -1, 1, 1) + eps)
    expected = hand_group_norm(bn, G, eps) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    torch.testing.assert_close(out, expected)

    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_estimate_stats_eval_is_plain_bcn_eval():
    est = BatchChannelNorm2d(C, num_groups=G, estimate_stats=True).double()
    plain = BatchChannelNorm2d(C, num_groups=G).double()
    for _ in range(2):
        est(batch())
    plain.load_state_dict(est.state_dict())
    x = batch()
    torch.testing.assert_close(est.eval()(x), plain.eval()(x))


def test_estimate_stats_allows_two_forwards_before_backward():
    # Gradient accumulation: the second forward updates the running stats in place; the first
    # step's backward must still work and use the first step's statistics.
    norm = BatchChannelNorm2d(C, num_groups=G, estimate_stats=True).double()
    x1, x2 = batch().requires_grad_(True), batch().requires_grad_(True)
    out1 = norm(x1)
    snapshot = norm.state_dict()
    out2 = norm(x2)
    (out1.sum() + out2.square().sum()).backward()

    x1_ref = x1.detach().clone().requires_grad_(True)
    # Rebuild step 1 by hand from its own (post-update) statistics; affine is identity at init.
    stats = (snapshot['running_mean'], snapshot['running_var'])
    bn = (x1_ref - stats[0].view(1, -1, 1, 1)) / torch.sqrt(stats[1].view(1, -1, 1, 1) + norm.eps)
    hand_group_norm(bn, G, norm.eps).sum().backward()
    torch.testing.assert_close(x1.grad, x1_ref.grad)


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize('estimate_stats', [False, True])
def test_empty_batch(estimate_stats):
    norm = BatchChannelNorm2d(C, num_groups=G, estimate_stats=estimate_stats)
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    x = torch.randn(0, C, 4, 4, requires_grad=True)
    out = norm(x)
    assert out.shape == (0, C, 4, 4)
    out.sum().backward()
    for key, value in norm.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert (norm.weight.grad == 0).all() and (norm.bias.grad == 0).all()
    assert norm.eval()(x).shape == (0, C, 4, 4)


@pytest.mark.parametrize('estimate_stats', [False, True])
def test_autocast_bf16_stats_in_fp32(estimate_stats):
    norm = BatchChannelNorm2d(C, num_groups=G, estimate_stats=estimate_stats)
    ref = BatchChannelNorm2d(C, num_groups=G, estimate_stats=estimate_stats)
    x = torch.randn(2, C, 4, 4) * 3 + 1
    x_bf16 = x.bfloat16().requires_grad_(True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = norm(x_bf16)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()
    assert norm.running_mean.dtype == norm.running_var.dtype == torch.float32
    # Statistics from the bf16 values, computed in float32: as a float32 layer on the same values.
    expected = ref(x.bfloat16().float())
    torch.testing.assert_close(norm.running_mean, ref.running_mean)
    torch.testing.assert_close(norm.running_var, ref.running_var)
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)
    out.float().sum().backward()
    assert x_bf16.grad.dtype == torch.bfloat16 and torch.isfinite(x_bf16.grad.float()).all()


def test_half_precision_module_updates_its_buffers():
    norm = BatchChannelNorm2d(C, num_groups=G).bfloat16()
    out = norm(torch.randn(2, C, 4, 4).bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert norm.running_mean.dtype == torch.bfloat16 and norm.running_mean.abs().sum() > 0


def test_state_dict_round_trip():
    norm = BatchChannelNorm2d(C, num_groups=G, momentum=0.3)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    for _ in range(2):
        norm(torch.randn(2, C, 4, 4))
    blob = io.BytesIO()
    torch.save(norm.state_dict(), blob)
    blob.seek(0)
    fresh = BatchChannelNorm2d(C, num_groups=G, momentum=0.3)
    fresh.load_state_dict(torch.load(blob))
    for key, value in norm.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = torch.randn(2, C, 4, 4)
    torch.testing.assert_close(fresh.eval()(x), norm.eval()(x), atol=0, rtol=0)
    torch.testing.assert_close(fresh.train()(x), norm.train()(x), atol=0, rtol=0)


def test_loads_a_batchnorm_checkpoint_strictly():
    bn = nn.BatchNorm2d(C)
    norm = BatchChannelNorm2d(C, num_groups=G)
    assert list(norm.state_dict()) == list(bn.state_dict())
    norm.load_state_dict(bn.state_dict(), strict=True)


def test_constructor_errors():
    with pytest.raises(ValueError, match=r'BatchChannelNorm2d: num_groups=3 must divide num_features=8'):
        BatchChannelNorm2d(8, num_groups=3)
    with pytest.raises(ValueError, match=r'num_groups must be a positive int, got 0'):
        BatchChannelNorm2d(8, num_groups=0)
    with pytest.raises(TypeError, match=r'num_groups must be an int, got 2.0'):
        BatchChannelNorm2d(8, num_groups=2.0)
    with pytest.raises(ValueError, match=r'num_features must be a positive int, got 0'):
        BatchChannelNorm2d(0, num_groups=1)
    with pytest.raises(ValueError, match=r'eps must be > 0, got -1e-05'):
        BatchChannelNorm2d(8, eps=-1e-5, num_groups=2)
    with pytest.raises(ValueError, match=r'momentum must be in \[0, 1\], got 1.5'):
        BatchChannelNorm2d(8, momentum=1.5, num_groups=2)
    with pytest.raises(TypeError, match=r'estimate_stats must be a bool, got 1'):
        BatchChannelNorm2d(8, num_groups=2, estimate_stats=1)
    with pytest.raises(ValueError, match=r'estimate_stats=True needs track_running_stats=True'):
        BatchChannelNorm2d(8, track_running_stats=False, num_groups=2, estimate_stats=True)


def test_input_errors():
    norm = BatchChannelNorm2d(C, num_groups=G)
    with pytest.raises(ValueError, match=r'BatchChannelNorm2d: expected 4D input .* got 3D input'):
        norm(torch.randn(C, 4, 4))
    with pytest.raises(ValueError, match=r'more than 1 value per channel'):
        norm(torch.randn(1, C, 1, 1))
    norm.eval()(torch.randn(1, C, 1, 1))  # fine with running statistics


# ----------------------------------------------------------------------------- official EstBN update


class EstBNOracle:
    """The released EstBN's training step, written out per channel with plain sums: the variance is the
    biased second moment about the OLD running mean, both buffers then move by the momentum, and the
    input is normalised with the updated buffers (eps inside the root)."""

    def __init__(self, rm, rv, momentum, eps):
        self.rm, self.rv, self.m, self.eps = rm.clone(), rv.clone(), momentum, eps

    def step(self, x):
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        n = flat.shape[1]
        batch_mean = flat.sum(1) / n
        second_moment = ((flat - self.rm[:, None]) ** 2).sum(1) / n
        self.rm = (1 - self.m) * self.rm + self.m * batch_mean
        self.rv = (1 - self.m) * self.rv + self.m * second_moment
        return (x - self.rm.view(1, -1, 1, 1)) / torch.sqrt(self.rv.view(1, -1, 1, 1) + self.eps)


def test_official_estimate_mode_is_the_default():
    assert BatchChannelNorm2d(C, num_groups=G).estimate_mode == 'official'
    assert "estimate_mode='official'" in repr(BatchChannelNorm2d(C, num_groups=G))


def test_official_estimate_mode_matches_estbn_over_steps():
    eps, m = 1e-5, 0.3
    norm = BatchChannelNorm2d(C, eps, m, num_groups=G, estimate_stats=True, estimate_mode='official').double()
    rm0 = torch.linspace(-1, 1, C, dtype=torch.float64)
    rv0 = torch.linspace(0.5, 3, C, dtype=torch.float64)
    with torch.no_grad():
        norm.running_mean.copy_(rm0)
        norm.running_var.copy_(rv0)
        norm.weight.copy_(torch.linspace(0.5, 1.5, C))
        norm.bias.copy_(torch.linspace(-0.2, 0.2, C))
    oracle = EstBNOracle(rm0, rv0, m, eps)
    for step in range(3):
        x = (batch(n=2) * (step + 1) + step).requires_grad_(True)   # a moving mean: the shift term matters
        out = norm(x)
        bn = oracle.step(x.detach())
        expected = hand_group_norm(bn, G, eps) * norm.weight.detach().view(1, -1, 1, 1) \
            + norm.bias.detach().view(1, -1, 1, 1)
        torch.testing.assert_close(norm.running_mean, oracle.rm)
        torch.testing.assert_close(norm.running_var, oracle.rv)
        torch.testing.assert_close(out, expected)
    # The two modes really differ (the shift of the mean and the biased/unbiased factor).
    unbiased = BatchChannelNorm2d(C, eps, m, num_groups=G, estimate_stats=True, estimate_mode='unbiased').double()
    unbiased.running_mean.copy_(rm0)
    unbiased.running_var.copy_(rv0)
    official = BatchChannelNorm2d(C, eps, m, num_groups=G, estimate_stats=True).double()
    official.running_mean.copy_(rm0)
    official.running_var.copy_(rv0)
    x = batch(n=2) + 2
    unbiased(x)
    official(x)
    assert (official.running_var - unbiased.running_var).abs().min() > 1e-3


def test_official_estimate_mode_gradient_treats_stats_as_constants():
    norm = BatchChannelNorm2d(C, 1e-5, 0.3, num_groups=G, estimate_stats=True).double()
    oracle = EstBNOracle(norm.running_mean, norm.running_var, 0.3, 1e-5)
    x = batch(n=2).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    grad = torch.randn_like(x)
    norm(x).backward(grad)
    oracle.step(x.detach())   # the updated statistics, computed off the graph
    bn = (x_ref - oracle.rm.view(1, -1, 1, 1)) / torch.sqrt(oracle.rv.view(1, -1, 1, 1) + 1e-5)
    hand_group_norm(bn, G, 1e-5).backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_estimate_mode_is_checked():
    with pytest.raises(ValueError, match=r"^BatchChannelNorm2d: estimate_mode must be one of .*got 'EstBN'$"):
        BatchChannelNorm2d(C, num_groups=G, estimate_mode='EstBN')


@pytest.mark.parametrize('eps', [0, 0.0, -1.0])
def test_eps_must_be_positive(eps):
    with pytest.raises(ValueError, match=r'^BatchChannelNorm2d: eps must be > 0, got'):
        BatchChannelNorm2d(C, eps=eps, num_groups=G)


@pytest.mark.parametrize('estimate_stats', [False, True])
@pytest.mark.parametrize('training', [True, False])
def test_empty_batch_dtype_under_autocast_is_the_non_empty_dtype(estimate_stats, training):
    norm = BatchChannelNorm2d(C, num_groups=G, estimate_stats=estimate_stats).train(training)
    for dtype in (torch.float32, torch.bfloat16):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            full = norm(torch.randn(2, C, 4, 4, dtype=dtype))
            empty = norm(torch.randn(0, C, 4, 4, dtype=dtype))
        assert empty.dtype == full.dtype == dtype and empty.shape == (0, C, 4, 4)
