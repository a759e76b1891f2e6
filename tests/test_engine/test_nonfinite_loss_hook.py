"""NonFiniteLossHook stops a run whose loss became NaN/Inf, naming the iteration and the loss terms."""
import math
import types

import pytest
import torch

from cbn_mmdet.engine import NonFiniteLossHook
from cbn_mmdet.engine.training import prepare_train_config
from tests.tiny_config import load_tool


def _runner(iteration=0):
    warnings = []
    return types.SimpleNamespace(iter=iteration, epoch=0, warnings=warnings,
                                 logger=types.SimpleNamespace(warning=warnings.append))


def _outputs(loss_cls=0.5, loss_bbox=0.25):
    terms = dict(loss_cls=torch.tensor(loss_cls), loss_bbox=torch.tensor(loss_bbox), acc=torch.tensor(50.0))
    return dict(loss=terms['loss_cls'] + terms['loss_bbox'], **terms)


def test_finite_losses_pass_and_non_loss_entries_are_ignored():
    hook, runner = NonFiniteLossHook(), _runner()
    for it in range(3):
        runner.iter = it
        hook.after_train_iter(runner, it, outputs=dict(_outputs(), acc=torch.tensor(math.nan)))   # not a loss
    assert hook.seen == [] and runner.warnings == []


@pytest.mark.parametrize('bad', [math.nan, math.inf, -math.inf])
def test_first_non_finite_loss_stops_naming_iteration_and_term(bad):
    hook, runner = NonFiniteLossHook(), _runner(iteration=41)
    with pytest.raises(FloatingPointError, match=rf'iteration 42 .*loss_bbox={bad}'):
        hook.after_train_iter(runner, 41, outputs=_outputs(loss_bbox=bad))


def test_max_nonfinite_tolerates_then_stops():
    hook, runner = NonFiniteLossHook(max_nonfinite=3), _runner()
    for it, value in enumerate([math.nan, 1.0, math.inf]):
        runner.iter = it
        hook.after_train_iter(runner, it, outputs=_outputs(loss_cls=value))
    assert [it for it, _ in hook.seen] == [1, 3] and len(runner.warnings) == 2
    runner.iter = 3
    with pytest.raises(FloatingPointError, match=r'3 non-finite iteration\(s\) \(first: 1, max_nonfinite=3\)'):
        hook.after_train_iter(runner, 3, outputs=_outputs(loss_cls=math.nan))


@pytest.mark.parametrize('value', [0, -1, 1.5, True, 'x'])
def test_bad_max_nonfinite(value):
    with pytest.raises(ValueError, match=f'max_nonfinite must be an int >= 1, got {value!r}'):
        NonFiniteLossHook(max_nonfinite=value)


def test_train_tool_adds_it_once_and_the_option_leaves_it_out(tiny_cbn_config, tmp_path):
    def hooks(**kwargs):
        cfg = prepare_train_config(tiny_cbn_config, work_dir=str(tmp_path / 'wd'), log=lambda m: None, **kwargs)
        return [h['type'] for h in cfg.custom_hooks]
    assert hooks().count('NonFiniteLossHook') == 1
    assert 'NonFiniteLossHook' not in hooks(nonfinite_check=False)
    mine = hooks(cfg_options={'custom_hooks': [dict(type='NonFiniteLossHook', max_nonfinite=5)]})
    assert mine.count('NonFiniteLossHook') == 1          # the config's own one is kept, not doubled
    assert load_tool('train.py').parse_args([tiny_cbn_config, '--allow-nonfinite-loss']).allow_nonfinite_loss


def test_nan_training_stops_at_the_first_iteration_through_the_tool(tiny_cbn_config, tmp_path):
    """std=0 in the data preprocessor makes every input Inf: the loss is NaN from iteration 1."""
    work_dir = tmp_path / 'wd'
    with pytest.raises(SystemExit, match=r'stopped: NonFiniteLossHook: non-finite loss at iteration 1 '):
        load_tool('train.py').main([tiny_cbn_config, '--work-dir', str(work_dir), '--cfg-options',
                                    'model.data_preprocessor.std=[0,0,0]', 'experiment_name=nan_run'])
    assert not list(work_dir.glob('*.pth'))               # no NaN checkpoint was written
