"""The detector statistics study: the probe's captures and estimators against values computed here by hand
(numpy on the captured tensors, plain convolutions), and the --quick run of the tool on a tiny config."""
import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.tiny_config import TINY_DATA, load_tool, write_tiny_config

pytest.importorskip('mmdet')

from cbn_mmdet.analysis import detector_stats as ds  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A probe over the tiny CBN demo model, the training config and two collated batches."""
    from mmdet.registry import MODELS
    from mmengine.dataset import pseudo_collate

    from cbn_mmdet.engine.runner_setup import ensure_config_data, load_config, register_modules
    register_modules()
    directory = tmp_path_factory.mktemp('detector_stats')
    cfg = load_config(write_tiny_config(str(directory)))
    ensure_config_data(cfg)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.eval().requires_grad_(False)
    probe = ds.NormProbe(model)
    train_set = ds._dataset(cfg.train_dataloader.dataset, cfg.train_dataloader.dataset.pipeline)
    two = pseudo_collate([train_set[0], train_set[1]])
    one = pseudo_collate([train_set[2]])
    return dict(probe=probe, cfg=cfg, two=two, one=one, directory=directory)


def _hand_stats(y):
    """Channel mean and biased variance by numpy over (N, H, W)."""
    a = y.detach().double().numpy().transpose(1, 0, 2, 3).reshape(y.shape[1], -1)
    return a.mean(1), a.var(1)


def _conv(conv, x, weight=None):
    return F.conv2d(x, conv.weight if weight is None else weight, None, conv.stride, conv.padding, conv.dilation)


def test_study_layers_are_the_fpn_and_head_norms(tiny):
    groups = {n: g for n, (_, _, g) in tiny['probe'].layers.items()}
    assert groups['neck.lateral_convs.0'] == 'FPN P2' and groups['neck.fpn_convs.3'] == 'FPN P5'
    assert sum(g == 'box head' for g in groups.values()) == 4       # the 4conv1fc box head
    assert sum(g == 'mask head' for g in groups.values()) == 4      # the 4-conv mask head
    assert len(groups) == 16
    # every BN-type norm is taken over: the 16 of the FPN and the heads (the demo's backbone is GN)
    names = tiny['probe'].norm_names
    assert len(names) == 16 and all(n.startswith(('neck.', 'roi_head.')) for n in names), names


def test_truth_is_the_hand_computed_statistics_of_the_captured_inputs(tiny):
    probe = tiny['probe']
    stats, x, y = probe.run(tiny['two'])
    truth = probe.layer_stats(stats)
    for name, (conv, _, group) in probe.layers.items():
        assert probe.norm_of[name].startswith(name + '.')
        mean, var = _hand_stats(y[name])
        np.testing.assert_allclose(truth[name][0].double().numpy(), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(truth[name][1].double().numpy(), var, rtol=1e-4, atol=1e-7)
        # the captured norm input is the conv of the captured conv input
        torch.testing.assert_close(y[name], _conv(conv, x[name]), rtol=1e-4, atol=1e-4)
        if group.startswith('FPN'):
            assert y[name].shape[0] == 2                                # one map per image
        else:
            assert y[name].shape[0] > 2 and y[name].shape[2] in (7, 14)  # RoIs


def test_fixed_mode_with_the_batch_statistics_reproduces_the_batch_forward(tiny):
    probe = tiny['probe']
    torch.manual_seed(3)
    stats, _, y_batch = probe.run(tiny['two'])
    torch.manual_seed(3)      # same RPN / RoI sampling
    _, _, y_fixed = probe.run(tiny['two'], fixed=stats)
    for name in probe.layers:
        torch.testing.assert_close(y_fixed[name], y_batch[name], rtol=1e-4, atol=1e-5)


def test_syncbn_over_copies_of_one_batch_is_bn_on_it(tiny):
    probe = tiny['probe']
    truth, _, _ = probe.run(tiny['two'])
    runs = []
    for _ in range(3):        # a frozen model, the same image on three "GPUs"
        torch.manual_seed(5)
        runs.append(probe.run(tiny['one'], fixed=truth)[2])
    for name in probe.layers:
        sync = ds.union_statistics([r[name] for r in runs])
        bn = ds.batch_statistics(runs[0][name])
        mean, var = _hand_stats(runs[0][name])
        for a, b in zip(sync, bn):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sync[1].double().numpy(), var, rtol=1e-4, atol=1e-7)


def test_probe_leaves_the_random_streams_alone(tiny):
    """The hook's probe forwards (RPN/RoI sampling draws from torch's generator) do not shift the
    training's random numbers."""
    import random
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    with ds._isolated_rng():
        tiny['probe'].run(tiny['two'])
        np.random.rand(3)
        random.random()
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state[1]) and random.getstate() == py_state


def test_union_weighs_batches_by_size():
    a, b = torch.randn(3, 2, 4, 4), torch.randn(1, 2, 4, 4) + 5
    mean, var = ds.union_statistics([a, b])
    hand_mean, hand_var = _hand_stats(torch.cat([a, b]))
    np.testing.assert_allclose(mean.double().numpy(), hand_mean, rtol=1e-5)
    np.testing.assert_allclose(var.double().numpy(), hand_var, rtol=1e-5)


def test_cbn_window_at_unchanged_weights_is_the_naive_window_is_the_hand_average(tiny):
    probe = tiny['probe']
    truth, _, _ = probe.run(tiny['two'])
    captures = [probe.run(tiny['one'] if i % 2 else tiny['two'], fixed=truth) for i in range(3)]
    for name in ('neck.lateral_convs.1', 'neck.fpn_convs.0', 'roi_head.bbox_head.shared_convs.2',
                 'roi_head.mask_head.convs.3'):
        conv = probe.layers[name][0]
        weight = conv.weight.detach().clone()
        xs = [c[1][name] for c in captures]
        past = [(xs[1], weight), (xs[2], weight)]
        est = ds.window_estimates(conv, xs[0], past, weight, k=3)
        # naive by hand: mean of the three batches' mu, mean of their nu minus the pooled mean squared
        ys = [_conv(conv, x).double() for x in xs]
        mus = [y.mean((0, 2, 3)) for y in ys]
        nus = [(y * y).mean((0, 2, 3)) for y in ys]
        mean = sum(mus) / 3
        var = sum(nus) / 3 - mean * mean
        for which in ('naive', 'cbn'):
            torch.testing.assert_close(est[which][0].double(), mean, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(est[which][1].double(), var, rtol=1e-3, atol=1e-5)


def test_cbn_mean_is_the_exact_mean_at_the_current_weight(tiny):
    """The mean is linear in the layer's own weight: CBN's compensated window mean equals the mean of the
    past inputs convolved with the current weight; the naive window's does not."""
    probe = tiny['probe']
    truth, _, _ = probe.run(tiny['two'])
    name = 'neck.fpn_convs.1'
    conv = probe.layers[name][0]
    xs = [probe.run(tiny['one'] if i % 2 else tiny['two'], fixed=truth)[1][name] for i in range(3)]
    gen = torch.Generator().manual_seed(0)
    w_t = conv.weight.detach().clone()
    old = [w_t + 0.2 * w_t.std() * torch.randn(w_t.shape, generator=gen) for _ in range(2)]
    est = ds.window_estimates(conv, xs[0], [(xs[1], old[0]), (xs[2], old[1])], w_t, k=3)
    exact = sum(_conv(conv, x, w_t).double().mean((0, 2, 3)) for x in xs) / 3
    stale = (_conv(conv, xs[0], w_t).double().mean((0, 2, 3)) + sum(
        _conv(conv, x, w).double().mean((0, 2, 3)) for x, w in zip(xs[1:], old))) / 3
    torch.testing.assert_close(est['cbn'][0].double(), exact, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(est['naive'][0].double(), stale, rtol=1e-4, atol=1e-5)
    assert (exact - stale).abs().max() > 1e-3


def test_error_metrics_by_hand():
    var_true = torch.tensor([4.0, 1.0])
    # |log(4e) - log 4| = 1 and 0 for the second channel
    assert ds.logvar_error(torch.tensor([4.0 * math.e, 1.0]), var_true) == pytest.approx(0.5)
    assert ds.logvar_error(torch.tensor([1.0, math.exp(-2.0)]), var_true) == pytest.approx((math.log(4) + 2) / 2)


def test_evaluate_point_zero_error_when_the_truth_is_the_estimate(tiny):
    probe = tiny['probe']
    truth, _, _ = probe.run(tiny['two'])
    history = []
    for i in range(2):
        _, x, y = probe.run(tiny['one'], fixed=truth)
        history.append(dict(x=x, y=y, weight=probe.weights(), truth=None))
    # the truth of the current entry = its own statistics: BN's error is 0
    history[0]['truth'] = {n: ds.batch_statistics(history[0]['y'][n]) for n in probe.layers}
    rows = ds.evaluate_point(probe.layers, history, [history[1]['y']], (2,))
    assert {r['estimator'] for r in rows} == set(ds.ESTIMATORS)
    assert len(rows) == len(probe.layers) * len(ds.ESTIMATORS)
    for r in rows:
        assert math.isfinite(r['mean_err']) and math.isfinite(r['var_err']) and r['weight_drift'] == 0.0
        if r['estimator'] == 'bn':
            assert r['mean_err'] < 1e-5 and r['var_err'] < 1e-4 and r['logvar_err'] < 1e-4


@pytest.mark.parametrize('field, value, words', [
    ('windows', (1, 2), 'windows=(1, 2)'),
    ('points', (2,), 'points=(2,)'),          # needs max(windows) - 1 = 3 earlier iterations
    ('points', (5, 5), 'repeated'),
    ('ref_size', 1, 'ref_size=1'),
])
def test_bad_settings_name_the_field(field, value, words):
    cfg = ds.DetectorStatsConfig(**{'windows': (2, 4), field: value})
    with pytest.raises(ValueError, match=words.replace('(', r'\(').replace(')', r'\)')):
        cfg.check()


def test_default_points_spread_over_the_run():
    cfg = ds.DetectorStatsConfig(windows=(2, 4, 8), num_points=3)
    cfg.check()
    assert ds.spread_points(cfg, 100) == (7, 53, 99)
    with pytest.raises(ValueError, match='num_points=0'):
        ds.DetectorStatsConfig(num_points=0).check()


def test_quick_tool_run(tiny, tmp_path):
    config = write_tiny_config(str(tmp_path), data_root=str(tiny['directory'] / 'data') + '/')
    result = load_tool('analysis/detector_stats.py').main(
        ['--quick', '--config', config, '--out', str(tmp_path / 'out')])
    out = tmp_path / 'out'
    for name in ('detector_stats_raw.csv', 'detector_stats_summary.csv', 'detector_stats_by_iter.csv',
                 'detector_stats_points.csv', 'detector_stats_summary.md', 'detector_stats_vs_window.png',
                 'detector_stats_vs_iter.png', 'detector_stats_config.txt'):
        assert (out / name).stat().st_size > 0, name
    with open(out / 'detector_stats_raw.csv') as f:
        rows = list(csv.DictReader(f))
    assert {r['estimator'] for r in rows} == set(ds.ESTIMATORS)
    assert {r['iter'] for r in rows} == {'1'} and {r['window'] for r in rows} == {'2'}
    assert {r['group'] for r in rows} == {'FPN P2', 'FPN P3', 'FPN P4', 'FPN P5', 'box head', 'mask head'}
    assert all(math.isfinite(float(r[m])) for r in rows for m in ('mean_err', 'var_err', 'logvar_err'))
    # one step of training between the two iterations: the weights moved, so the window is stale
    assert all(float(r['weight_drift']) > 0 for r in rows)
    table = (out / 'detector_stats_summary.md').read_text()
    assert '| box head |' in table and 'cbn k=2' in table
    assert result['points'][0]['iter'] == 1
    assert TINY_DATA['num_val'] >= 2     # the quick reference batch


def test_point_past_the_run_is_refused(tiny, tmp_path):
    config = write_tiny_config(str(tmp_path), data_root=str(tiny['directory'] / 'data') + '/')
    with pytest.raises(SystemExit, match='points=.*the last point must be < 8'):
        load_tool('analysis/detector_stats.py').main(
            ['--quick', '--config', config, '--points', '50', '--out', str(tmp_path / 'out')])
