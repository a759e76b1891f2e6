"""A tiny train -> checkpoint -> --resume cycle on the CBN demo config (torch>=2.6 checkpoints).

The resumed run must continue from the saved iteration (not from 0) with the CBN layers' buffers
(window, counters, running statistics) exactly as saved, and mmengine's own local loader must still
refuse such a checkpoint outside ``trusted_checkpoints`` (the fix is narrow).
"""
import copy
import pickle

import pytest
import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner.checkpoint import CheckpointLoader

from cbn_mmdet.engine.checkpoint import trusted_checkpoints
from cbn_mmdet.engine.training import prepare_train_config, train
from cbn_mmdet.ops import CrossIterationBatchNorm2d

SEEN = []


@HOOKS.register_module(force=True)
class _RecordStartHook(Hook):
    """Records where training starts and the CBN buffers it starts with (after any resume)."""

    priority = 'LOWEST'

    def before_train(self, runner):
        model = runner.model.module if hasattr(runner.model, 'module') else runner.model
        # the checkpointed state (the packed window is saved as its named parts), parameters aside
        cbn = {name: copy.deepcopy({k: v for k, v in m.state_dict().items() if k not in ('weight', 'bias')})
               for name, m in model.named_modules()
               if isinstance(m, CrossIterationBatchNorm2d) and m.buffer_num > 0}   # (not the backbone's SyncBN)
        SEEN.append(dict(iter=runner.iter, epoch=runner.epoch, cbn=cbn))


def _train(config, work_dir, resume=None):
    cfg = prepare_train_config(config, work_dir=str(work_dir), resume=resume, log=lambda m: None)
    cfg.custom_hooks = [*cfg.custom_hooks, dict(type='_RecordStartHook'), dict(type='RNGStateHook')]
    cfg.experiment_name = f'resume_test_{len(SEEN)}'   # separate loggers/visualizers within one process
    return train(cfg)


@pytest.fixture(scope='module')
def first_run(tiny_cbn_config, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp('first')
    SEEN.clear()
    runner = _train(tiny_cbn_config, work_dir)
    assert runner.iter == 8 and SEEN[-1]['iter'] == 0
    return work_dir


def test_resume_continues_from_the_saved_iteration_with_cbn_buffers(first_run, tiny_cbn_config, tmp_path):
    ckpt = first_run / 'epoch_1.pth'
    saved = torch.load(ckpt, map_location='cpu', weights_only=False)
    assert saved['meta']['iter'] == 4 and saved['meta']['epoch'] == 1
    runner = _train(tiny_cbn_config, tmp_path / 'resumed', resume=str(ckpt))
    start = SEEN[-1]
    assert (start['iter'], start['epoch']) == (4, 1)          # continues, does not restart at 0
    assert runner.iter == 8 and runner.epoch == 2
    assert len(start['cbn']) == 16                              # FPN 4+4, bbox head 4, mask head 4
    state = saved['state_dict']
    used_window = 0
    for layer, buffers in start['cbn'].items():
        for name, value in buffers.items():
            assert torch.equal(value, state[f'{layer}.{name}']), f'{layer}.{name} not restored'
        used_window += int(buffers['window_filled'].any())
        assert int(buffers['iter_count']) >= 4
    assert used_window >= 8           # the window was in use when epoch 1 ended (burn-in: 1 iteration)


def test_resumed_run_is_bitwise_identical_to_uninterrupted(first_run, tiny_cbn_config, tmp_path):
    """With RNGStateHook, iterations 5-8 after a resume give exactly the uninterrupted run's weights
    (without it, 276 tensors differ: mmdet's RoI samplers draw from the global RNG)."""
    runner = _train(tiny_cbn_config, tmp_path / 'resumed', resume=str(first_run / 'epoch_1.pth'))
    assert runner.iter == 8
    final = torch.load(first_run / 'epoch_2.pth', map_location='cpu', weights_only=False)['state_dict']
    resumed = torch.load(tmp_path / 'resumed' / 'epoch_2.pth', map_location='cpu', weights_only=False)
    differing = [k for k, v in final.items() if not torch.equal(v, resumed['state_dict'][k])]
    assert not differing, f'{len(differing)} tensors differ after resume, e.g. {differing[:5]}'


def test_auto_resume_from_the_work_dir(first_run, tiny_cbn_config):
    # resume='auto' (`--resume` without a path): the latest checkpoint of the work_dir (epoch 2 = the end)
    runner = _train(tiny_cbn_config, first_run, resume='auto')
    assert SEEN[-1]['iter'] == 8 and runner.iter == 8


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split('.')[:2]) < (2, 6),
                    reason='torch < 2.6 loads with weights_only=False by default')
def test_trust_is_narrow(first_run):
    ckpt = str(first_run / 'epoch_1.pth')
    with pytest.raises(pickle.UnpicklingError):             # mmengine's loader alone: refused by torch
        CheckpointLoader.load_checkpoint(ckpt, map_location='cpu')
    with trusted_checkpoints(dirs=[str(first_run / 'other')]):          # another directory: still refused
        with pytest.raises(pickle.UnpicklingError):
            CheckpointLoader.load_checkpoint(ckpt, map_location='cpu')
    with trusted_checkpoints(paths=[ckpt]):
        assert CheckpointLoader.load_checkpoint(ckpt, map_location='cpu')['meta']['epoch'] == 1
    with trusted_checkpoints(dirs=[str(first_run)]):
        assert 'message_hub' in CheckpointLoader.load_checkpoint(ckpt, map_location='cpu')
    with pytest.raises(pickle.UnpicklingError):             # restored on exit
        CheckpointLoader.load_checkpoint(ckpt, map_location='cpu')
