"""The study's window estimates come from the real CrossIterationBatchNorm2d (``cbn_probe``): checked
against the official algorithm (``tests/oracles``), hand-derivable cases, and the Taylor step of
``stat_estimators.compensate`` (float64)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cbn_mmdet.analysis.cbn_probe import cbn_window_statistics, read_back_statistics
from cbn_mmdet.analysis.stat_estimators import ESTIMATORS, compensate, pooled_moments, record_entry
from tests.oracles.official_cbn import OfficialCBNReference

DT = torch.float64


def _conv(cin=3, cout=4, seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, 3, padding=1, bias=False).to(DT)


def _history(conv, iters, seed=3):
    """``[(input, weight)]`` of ``iters`` iterations, newest first, the weight changing each step."""
    gen = torch.Generator().manual_seed(seed)
    weight = conv.weight.detach().clone()
    runs = []
    for _ in range(iters):
        runs.insert(0, (torch.randn(2, conv.in_channels, 6, 6, generator=gen, dtype=DT) * 1.5 + 0.3, weight))
        weight = weight * (1 + 0.1 * torch.randn(weight.shape, generator=gen, dtype=DT))
    return runs, weight


def _official_statistics(conv, past, current_input, weight_t, rho, buffer_num):
    """Feed the official algorithm the same history; read its statistics back from its output."""
    ref = OfficialCBNReference(conv.out_channels, buffer_num=buffer_num, rho=rho)
    gamma, beta = torch.ones(conv.out_channels, dtype=DT), torch.zeros(conv.out_channels, dtype=DT)
    for x, weight in [*reversed(past), (current_input, weight_t)]:
        w = weight.clone().requires_grad_()
        y = F.conv2d(x.requires_grad_(), w, None, conv.stride, conv.padding)
        out = ref(y, w, gamma, beta)
    return read_back_statistics(y.detach(), out.detach(), ref.eps)


@pytest.mark.parametrize('rho', [0.0, 1.0])
@pytest.mark.parametrize('window', [2, 4])
def test_matches_the_official_algorithm(rho, window):
    conv = _conv()
    runs, weight_t = _history(conv, window)
    current, past = runs[0][0], runs[1:]
    mean, var = cbn_window_statistics(conv, past, current, weight_t, rho=rho)
    ref_mean, ref_var = _official_statistics(conv, past, current, weight_t, rho, buffer_num=window - 1)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(var, ref_var, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize('name', sorted(ESTIMATORS))
def test_unchanged_weights_give_concatenated_batch_statistics(name):
    rho, compensate_sq = ESTIMATORS[name]
    conv = _conv()
    batches = [torch.randn(2, 3, 5, 5, dtype=DT) + i for i in range(4)]
    weight = conv.weight.detach()
    past = [(x, weight) for x in batches[:-1][::-1]]
    mean, var = cbn_window_statistics(conv, past, batches[-1], weight, rho, compensate_sq)
    var_ref, mean_ref = torch.var_mean(conv(torch.cat(batches)).detach(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, mean_ref)
    torch.testing.assert_close(var, var_ref)
    entries = [record_entry(conv, x) for x in batches]
    mean, var = pooled_moments(entries)            # exact statistics pooled: the same union
    torch.testing.assert_close(mean, mean_ref)
    torch.testing.assert_close(var, var_ref)


def test_window_of_one_is_batch_norm():
    conv = _conv()
    x = torch.randn(2, 3, 5, 5, dtype=DT)
    mean, var = pooled_moments([record_entry(conv, x)])
    var_ref, mean_ref = torch.var_mean(conv(x).detach(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, mean_ref)
    torch.testing.assert_close(var, var_ref)


@pytest.mark.parametrize('compensate_sq', [True, False])
def test_layer_window_of_two_is_the_mean_with_the_taylor_step(compensate_sq):
    """Window of two valid entries: μ̄ = (μ_t + μ_τ(W_t)) / 2, ν̄ likewise, with compensate()'s step."""
    conv = _conv()
    runs, weight_t = _history(conv, 2)
    (x_t, _), (x_past, w_past) = runs
    mean, var = cbn_window_statistics(conv, [(x_past, w_past)], x_t, weight_t, compensate_sq=compensate_sq)
    past = record_entry(conv, x_past, w_past)
    current = record_entry(conv, x_t, weight_t)
    comp_mean, comp_sq = compensate(past, weight_t, rho_sq=1.0 if compensate_sq else 0.0)
    assert (comp_sq - comp_mean ** 2 >= 0).all()          # both entries are kept
    exp_mean = (current.mean + comp_mean) / 2
    torch.testing.assert_close(mean, exp_mean, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(var, (current.sq + comp_sq) / 2 - exp_mean ** 2, rtol=1e-7, atol=1e-9)


def test_sq_compensation_matters():
    conv = _conv()
    runs, weight_t = _history(conv, 3)
    full = cbn_window_statistics(conv, runs[1:], runs[0][0], weight_t)
    mean_only = cbn_window_statistics(conv, runs[1:], runs[0][0], weight_t, compensate_sq=False)
    torch.testing.assert_close(full[0], mean_only[0])                     # the mean is the same
    assert (full[1] - mean_only[1]).abs().max() > 1e-3                    # the variance is not


def test_rejects_bad_input():
    conv = _conv()
    x = torch.randn(2, 3, 5, 5, dtype=DT)
    with pytest.raises(ValueError, match='at least one past iteration'):
        cbn_window_statistics(conv, [], x, conv.weight.detach())
    grouped = nn.Conv2d(4, 4, 3, groups=2, bias=False).to(DT)
    with pytest.raises(ValueError, match='groups=2'):
        cbn_window_statistics(grouped, [(x, grouped.weight)], x, grouped.weight.detach())
    biased = nn.Conv2d(3, 4, 3).to(DT)
    with pytest.raises(ValueError, match='bias=True'):
        cbn_window_statistics(biased, [(x, biased.weight)], x, biased.weight.detach())
