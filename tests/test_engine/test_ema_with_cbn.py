"""mmengine's EMAHook with CBN through a real Runner: the EMA copy is taken at ``before_run``, so CBN's
conv-shaped buffers must already have their final shapes (they are sized when the model is built)."""
import pytest
import torch
import torch.nn as nn
from mmcv.cnn import ConvModule
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseModel
from mmengine.runner import Runner

import cbn_mmdet  # noqa: F401
from cbn_mmdet.ops import CrossIterationBatchNorm2d


class _TinyCBNNet(BaseModel):
    def __init__(self):
        super().__init__()
        cbn = dict(type='CBN', buffer_num=2, burnin=1)
        self.body = nn.Sequential(ConvModule(3, 8, 3, padding=1, norm_cfg=cbn),
                                  ConvModule(8, 8, 3, padding=1, norm_cfg=cbn))
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, inputs, target, mode='tensor'):
        pred = self.head(self.body(inputs)).mean((1, 2, 3))
        if mode == 'loss':
            return dict(loss=((pred - target) ** 2).mean())
        return [dict(pred=p, target=t) for p, t in zip(pred, target)]


class _Data(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(3, 6, 6, generator=g)
        return dict(inputs=x, target=x.mean())


class _MSE(BaseMetric):
    def process(self, data_batch, data_samples):
        self.results.extend(float((s['pred'] - s['target']) ** 2) for s in data_samples)

    def compute_metrics(self, results):
        return dict(mse=sum(results) / len(results))


def _loader():
    return dict(dataset=_Data(), batch_size=2, sampler=dict(type='DefaultSampler', shuffle=False),
                collate_fn=dict(type='default_collate'))


def _ema_runner(model, work_dir, update_buffers, iters):
    """A real mmengine Runner training ``model`` for ``iters`` iterations with EMAHook, then validating."""
    return Runner(
        model=model, work_dir=str(work_dir), train_dataloader=_loader(), val_dataloader=_loader(),
        val_evaluator=dict(type=_MSE), val_cfg=dict(), default_scope='mmdet',
        train_cfg=dict(by_epoch=False, max_iters=iters, val_interval=iters),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        custom_hooks=[dict(type='EMAHook', ema_type='ExpMomentumEMA', momentum=0.0002,
                           update_buffers=update_buffers)],
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=iters),
                           logger=dict(type='LoggerHook')),
        env_cfg=dict(dist_cfg=dict(backend='gloo')), log_level='WARNING')


@pytest.mark.parametrize('update_buffers', [True, False])
def test_ema_hook_trains_and_validates_the_ema_model(tmp_path, update_buffers):
    model = _TinyCBNNet()
    layers = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    assert all(m.is_bound and m.window_weight.numel() > 0 for m in layers)
    runner = _ema_runner(model, tmp_path, update_buffers, iters=6)
    runner.train()
    ema = runner.model if not hasattr(runner.model, 'module') else runner.model.module
    assert all(int(m.window_filled.sum()) == 2 for m in layers)     # the live model used its window
    metrics = runner.val()                                           # validates with the EMA weights
    assert torch.isfinite(torch.tensor(metrics['mse']))
    ema_hook = next(h for h in runner.hooks if type(h).__name__ == 'EMAHook')
    averaged = ema_hook.ema_model.module
    copies = [m for m in averaged.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    assert [m.window_weight.shape for m in copies] == [m.window_weight.shape for m in layers]
    assert all(c.bound_conv is not m.bound_conv for c, m in zip(copies, layers))   # its own convs
    if update_buffers:   # buffers are averaged too: the EMA's counter followed the live one
        assert all(int(c.iter_count) > 0 for c in copies)
    assert ema is model


class _TinyNet(BaseModel):
    """Two ConvModules with any norm/conv of this package (batch 2 per step: MABN's B must match)."""

    def __init__(self, norm_cfg, conv_cfg):
        super().__init__()
        self.body = nn.Sequential(ConvModule(3, 8, 3, padding=1, norm_cfg=norm_cfg, conv_cfg=conv_cfg),
                                  ConvModule(8, 8, 3, padding=1, norm_cfg=norm_cfg, conv_cfg=conv_cfg))
        self.head = nn.Conv2d(8, 1, 1)

    forward = _TinyCBNNet.forward


@pytest.mark.parametrize('norm_cfg,conv_cfg', [
    (dict(type='SyncCBN', buffer_num=2, burnin=1), None),
    (dict(type='CBN', buffer_num=2, burnin=1), dict(type='WSConv')),
    (dict(type='BCN', num_groups=4), dict(type='WSConv')),
    (dict(type='MABN', B=2, real_B=4), dict(type='CenConv')),
    (dict(type='SyncBN'), None),
    (dict(type='GN', num_groups=4), None),
])
@pytest.mark.parametrize('update_buffers', [True, False])
def test_ema_hook_with_every_layer(tmp_path, norm_cfg, conv_cfg, update_buffers):
    model = _TinyNet(norm_cfg, conv_cfg)
    runner = _ema_runner(model, tmp_path, update_buffers, iters=5)
    runner.train()
    metrics = runner.val()
    assert torch.isfinite(torch.tensor(metrics['mse']))
    saved = sorted(tmp_path.glob('*.pth'))
    assert saved, 'no checkpoint written'
    checkpoint = torch.load(str(saved[-1]), map_location='cpu', weights_only=False)
    assert set(checkpoint['state_dict']) and 'ema_state_dict' in checkpoint
