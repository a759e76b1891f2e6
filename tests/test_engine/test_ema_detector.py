"""mmengine's EMAHook on a real detector with CBN, through tools/train.py and tools/test.py.

EMAHook deep-copies the model at ``before_run`` and, when saving, swaps the averaged weights into
``checkpoint['state_dict']`` (the live ones go to ``ema_state_dict``): so the checkpoint tools/test.py
loads *is* the EMA model, and it must build, load strictly and evaluate."""
import os.path as osp

import pytest
import torch

from tests.tiny_config import load_tool, write_tiny_config

EMA = ("custom_hooks = [dict(type='CBNBurnInHook', burnin_iters=1), dict(type='EMAHook', "
       "ema_type='ExpMomentumEMA', momentum=0.0002, update_buffers={update_buffers})]\n"
       'train_cfg = dict(max_epochs=1)\n')


@pytest.mark.parametrize('update_buffers', [True, False])
def test_ema_detector_trains_and_tests(tmp_path, tiny_dir, update_buffers):
    config = write_tiny_config(str(tmp_path), data_root=osp.join(tiny_dir, 'data') + '/',
                               extra=EMA.format(update_buffers=update_buffers))
    work_dir = str(tmp_path / 'work')
    load_tool('train.py').main([config, '--work-dir', work_dir])
    checkpoint_path = osp.join(work_dir, 'epoch_1.pth')
    checkpoint = torch.load(checkpoint_path, map_location='cpu', weights_only=False)
    ema, live = checkpoint['state_dict'], checkpoint['ema_state_dict']
    # The averaged weights are what the checkpoint's state_dict holds, and they differ from the trained ones.
    name = next(k for k in ema if k.endswith('neck.fpn_convs.0.bn.weight'))
    assert not torch.equal(ema[name], live['module.' + name] if 'module.' + name in live else live[name])
    # CBN windows have their final (conv-shaped) sizes in both copies.
    window = next(k for k in ema if k.endswith('window_sq_grad') and 'neck.' in k)   # (the backbone's SyncCBN has none)
    assert ema[window].numel() > 0
    metrics = load_tool('test.py').main([config, checkpoint_path, '--work-dir', str(tmp_path / 'test')])
    assert 'coco/bbox_mAP' in metrics and 'coco/segm_mAP' in metrics
