"""The official options ``two_stage`` and ``frozen`` (official ``FROZEN``) against the literal official
re-implementation, float64, with the layer built from ``norm_cfg``-style keywords."""
import pytest
import torch

from cbn_mmdet.ops import CrossIterationBatchNorm2d, bind_cbn_to_conv
from tests.oracles.official_cbn import OfficialCBNReference
from tests.test_ops.test_cross_iter_bn import DT, _pair, _run_sequence


@pytest.mark.parametrize('buffer_num,burnin', [(3, 5), (3, 2), (2, 7), (3, 0), (1, 3)])
def test_two_stage_false_grows_the_window_like_the_official_layer(buffer_num, burnin):
    conv, cbn = _pair(buffer_num=buffer_num, burnin=burnin, two_stage=False)
    ref = OfficialCBNReference(5, buffer_num=buffer_num, burnin=burnin, two_stage=False)
    _run_sequence(conv, cbn, ref, iters=12)


def test_two_stage_false_window_sizes():
    """buffer_num=3, burnin=5: int(3·min(i/5, 1)) past entries at forward i, the newest ones."""
    conv, cbn = _pair(buffer_num=3, burnin=5, two_stage=False)
    sizes = []
    bind_cbn_to_conv(cbn, conv)
    for i in range(8):
        cbn(conv(torch.randn(2, 3, 5, 5, dtype=DT, requires_grad=True))).sum().backward()
        sizes.append(int(cbn.window_filled.sum()))
    assert sizes == [0, 1, 1, 2, 3, 3, 3, 3]


def test_frozen_normalises_with_running_stats_and_keeps_them():
    conv, cbn = _pair(buffer_num=2, burnin=1, frozen=True)
    ref = OfficialCBNReference(5, buffer_num=2, burnin=1, frozen=True)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        cbn.running_mean.copy_(torch.randn(5, generator=gen, dtype=DT))
        cbn.running_var.copy_(torch.rand(5, generator=gen, dtype=DT) + 0.5)
    ref.running_mean, ref.running_var = cbn.running_mean.clone(), cbn.running_var.clone()
    before = {k: v.clone() for k, v in cbn.state_dict().items()}
    _run_sequence(conv, cbn, ref, iters=4)
    after = cbn.state_dict()
    for key in ('running_mean', 'running_var', 'num_batches_tracked', 'window_filled', 'window_mean'):
        assert torch.equal(before[key], after[key]), key
    assert int(after['iter_count']) == 4


def test_options_from_norm_cfg():
    pytest.importorskip('mmcv')
    from mmcv.cnn import build_norm_layer

    import cbn_mmdet  # noqa: F401
    _, layer = build_norm_layer(dict(type='CBN', buffer_num=2, burnin=4, two_stage=False, frozen=True), 8)
    assert layer.two_stage is False and layer.frozen is True
    assert 'two_stage=False' in repr(layer) and 'frozen=True' in repr(layer)


@pytest.mark.parametrize('kwargs,match', [
    (dict(two_stage=1), 'two_stage must be a bool, got 1'),
    (dict(frozen='yes'), "frozen must be a bool, got 'yes'"),
    (dict(frozen=True, track_running_stats=False), 'frozen=True .* needs track_running_stats=True'),
])
def test_bad_option_values(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        CrossIterationBatchNorm2d(4, **kwargs)
