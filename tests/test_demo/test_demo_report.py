"""The demo's report: seed aggregation, the noise rule, the wording of results.md, the loss plot."""
import math

import pytest

from cbn_mmdet.demo import NOISE_RULE, exceeds_noise, plot_losses, results_markdown, seed_stats, summarize_matches
from cbn_mmdet.evaluation.bootstrap import ImageMatches
from tests.test_evaluation.test_bootstrap import _coco
from tests.test_evaluation.test_results_table import fake_work_dirs


def test_loss_plot(tmp_path):
    cbn = fake_work_dirs(tmp_path)[0]
    png = plot_losses({'cbn': str(cbn)}, str(tmp_path / 'losses.png'))
    assert open(png, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'


def test_seed_stats():
    assert seed_stats([0.3]) == (0.3, None)
    mean, std = seed_stats([0.1, 0.2, 0.6])
    assert mean == pytest.approx(0.3)
    assert std == pytest.approx(math.sqrt(((0.2) ** 2 + 0.1 ** 2 + 0.3 ** 2) / 2))   # ddof = 1
    with pytest.raises(ValueError, match='no values'):
        seed_stats([])


def test_noise_rule():
    assert exceeds_noise(0.01, 0.05) == (True, 'interval excludes 0')
    assert exceeds_noise(-0.05, -0.01) == (True, 'interval excludes 0')
    assert exceeds_noise(-0.01, 0.05) == (False, 'interval includes 0')
    # with seeds: also |diff| > 2 SE, SE = sqrt(sa²/N + sb²/N) = sqrt(2 * 0.03² / 3) = 0.0245 -> 2 SE = 0.049
    assert exceeds_noise(0.01, 0.05, diff=0.03, std_a=0.03, std_b=0.03, num_seeds=3) == (
        False, 'interval excludes 0 but |Δ| <= 2 SE = 4.9 (seed noise)')
    assert exceeds_noise(0.04, 0.08, diff=0.06, std_a=0.03, std_b=0.03, num_seeds=3) == (
        True, 'interval excludes 0 and |Δ| > 2 SE = 4.9')


def _detector(num_images, right, wrong_score=0.5):
    """One box per image, found exactly in the first ``right`` images (AP known by hand, see
    tests/test_evaluation/test_bootstrap.py)."""
    gt = _coco(range(1, num_images + 1), [dict(image_id=i, category_id=1, bbox=[10, 10, 20, 20])
                                          for i in range(1, num_images + 1)])
    dets = [dict(image_id=i, category_id=1, score=0.9 if i <= right else wrong_score,
                 bbox=[10, 10, 20, 20] if i <= right else [60, 60, 20, 20]) for i in range(1, num_images + 1)]
    return ImageMatches(gt, dets)


def _runs(hits_per_seed, n=41):
    runs = []
    for hits in hits_per_seed:
        box = _detector(n, hits)     # the same matches stand in for the mask AP
        runs.append({'original': {'bbox': box, 'segm': box}, 'precise': {'bbox': box, 'segm': box}})
    return runs


def _hand(hits, n=41):   # 100 k / 41 is never an integer: no recall threshold on a boundary
    return 0.0 if hits == 0 else (math.floor(100 * hits / n) + 1) / 101


def test_summary_and_wording_one_seed():
    matches = {'baseline': _runs([20]), 'bn': _runs([21]), 'cbn': _runs([34])}
    summary = summarize_matches(matches, num_samples=100)
    assert summary['num_seeds'] == 1 and summary['num_images'] == 41
    assert summary['ap']['cbn']['original']['bbox']['mean'] == pytest.approx(_hand(34))
    assert summary['ap']['cbn']['original']['bbox']['std'] is None
    diffs = {(d['variant'], d['ref']): d for d in summary['diffs']['original']['bbox']}
    assert set(diffs) == {('bn', 'baseline'), ('cbn', 'baseline'), ('cbn', 'bn')}   # BN vs baseline once
    assert diffs['cbn', 'baseline']['diff'] == pytest.approx(_hand(34) - _hand(20))
    assert diffs['cbn', 'baseline']['exceeds'] and diffs['cbn', 'baseline']['low'] > 0   # 14 more images right
    assert not diffs['bn', 'baseline']['exceeds']                                       # one image more
    summary['val_loss'] = {'baseline': dict(train=1.0, eval_original=1.1, eval_precise=1.05, num_images=10),
                           'bn': dict(train=1.0, eval_original=1.9, eval_precise=1.2, num_images=10)}
    summary['seconds'] = {n: dict(train=60, test=20) for n in matches}
    untrained = dict(metrics={'coco/bbox_mAP': 0.0, 'coco/segm_mAP': 0.0})
    text = results_markdown(summary, untrained, 321, 'tiny')
    assert 'one seed (seed 0; the training noise is not measured: run with --seeds 3)' in text
    assert NOISE_RULE in text and '321 s' in text and '(tiny)' in text
    ap_cbn = summary['ap']['cbn']['original']['bbox']
    assert (f'| cbn | CBN | {100 * ap_cbn["mean"]:.1f} [{100 * ap_cbn["low"]:.1f}, {100 * ap_cbn["high"]:.1f}] |'
            in text)
    d = diffs['cbn', 'baseline']
    assert (f'| cbn | baseline | {100 * d["diff"]:+.1f} [{100 * d["low"]:+.1f}, {100 * d["high"]:+.1f}] | '
            '**yes** (interval excludes 0) |') in text
    assert '| bn | baseline | +' in text and 'no (interval includes 0)' in text
    assert '* better than baseline beyond the noise: cbn; not distinguishable from baseline at this size: bn.' in text
    assert 'Eval-mode minus train-mode loss: baseline +0.100, bn +0.900' in text
    assert '| bn | +0.0 | +0.0 | 1.000 | 1.900 | 1.200 |' in text


def test_summary_over_seeds():
    # three seeds each; the cbn seeds scatter: mean ± std over seeds, interval of the seed-mean
    matches = {'baseline': _runs([20, 20, 20]), 'bn': _runs([20, 21, 19]), 'cbn': _runs([20, 30, 40])}
    summary = summarize_matches(matches, num_samples=100)
    entry = summary['ap']['cbn']['original']['bbox']
    mean, std = seed_stats([_hand(h) for h in (20, 30, 40)])
    assert summary['num_seeds'] == 3
    assert (entry['mean'], entry['std']) == (pytest.approx(mean), pytest.approx(std))
    assert entry['low'] < mean < entry['high']
    d = {(x['variant'], x['ref']): x for x in summary['diffs']['original']['bbox']}['cbn', 'baseline']
    # every resample has cbn >= baseline (the interval excludes 0), but the seeds scatter: 2 SE > |diff|
    assert d['low'] > 0 and not d['exceeds'] and 'seed noise' in d['reason']
    text = results_markdown(dict(summary, val_loss={}, seconds={}), dict(metrics={}), 1, 'x')
    assert 'mean ± std over 3 seeds (seeds 0–2)' in text
    assert f'| cbn | CBN | {100 * mean:.1f} ± {100 * std:.1f} [' in text
