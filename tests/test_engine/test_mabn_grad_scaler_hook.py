"""MABNGradScalerHook hands the AMP optimizer wrapper's GradScaler to every MABN layer, and tools/train.py's
config preparation adds it to AMP runs. What MABN does with the scaler is tested in
tests/test_ops/test_mabn_grad_scaler.py (against an unscaled run)."""
import types

import torch
import torch.nn as nn

from cbn_mmdet.engine.hooks import MABNGradScalerHook
from cbn_mmdet.engine.training import prepare_train_config
from cbn_mmdet.ops import MovingAverageBatchNorm2d


def _runner(model, optim_wrapper):
    notes = []
    return types.SimpleNamespace(model=model, optim_wrapper=optim_wrapper,
                                 logger=types.SimpleNamespace(info=notes.append)), notes


def test_every_mabn_layer_gets_the_wrappers_scaler():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), MovingAverageBatchNorm2d(4, B=2, real_B=4), nn.Conv2d(4, 4, 1),
                          MovingAverageBatchNorm2d(4, B=2, real_B=4), nn.BatchNorm2d(4))
    scaler = torch.amp.GradScaler('cpu')
    wrapped = types.SimpleNamespace(module=model)               # as DDP / MMDistributedDataParallel
    runner, notes = _runner(wrapped, types.SimpleNamespace(loss_scaler=scaler))
    MABNGradScalerHook().before_train(runner)
    assert model[1]._grad_scaler is scaler and model[3]._grad_scaler is scaler
    assert len(notes) == 1 and '2 MABN layers' in notes[0]


def test_a_wrapper_dict_and_no_scaler():
    model = nn.Sequential(MovingAverageBatchNorm2d(4, B=2, real_B=4))
    scaler = torch.amp.GradScaler('cpu')
    optim = {'a': types.SimpleNamespace(), 'b': types.SimpleNamespace(loss_scaler=scaler)}
    MABNGradScalerHook().before_train(_runner(model, optim)[0])
    assert model[0]._grad_scaler is scaler
    runner, notes = _runner(model, types.SimpleNamespace())   # a plain OptimWrapper: no loss scaling
    MABNGradScalerHook().before_train(runner)
    assert model[0]._grad_scaler is None and notes == []


def test_train_config_adds_the_hook_to_amp_runs_only(tiny_cbn_config, tmp_path):
    plain = prepare_train_config(tiny_cbn_config, work_dir=str(tmp_path / 'a'))
    assert not any(h.get('type') == 'MABNGradScalerHook' for h in plain.custom_hooks)
    amp = prepare_train_config(tiny_cbn_config, work_dir=str(tmp_path / 'b'),
                               cfg_options={'optim_wrapper.type': 'AmpOptimWrapper'})
    assert [h for h in amp.custom_hooks if h.get('type') == 'MABNGradScalerHook'] == [dict(type='MABNGradScalerHook')]
