"""PreciseBNHook: after it, every layer's running statistics are those of its input over the concatenated
batches, computed here by hand (each norm fed by its own conv of the input, so its input is known
exactly; a chained BN whose input depends on the previous BN's train-mode output); nothing else of the
model changes; an unsupported layer is refused before training; through a real mmengine Runner; and
all-reduced over two gloo processes."""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModel
from mmengine.runner import Runner

import cbn_mmdet  # noqa: F401  (registers the hook)
from cbn_mmdet.engine.hooks import PreciseBNHook
from cbn_mmdet.engine.hooks.precise_bn_hook import precise_bn_layers, update_bn_stats
from cbn_mmdet.ops import (
    BatchChannelNorm2d,
    BatchRenorm2d,
    CrossIterationBatchNorm2d,
    MovingAverageBatchNorm2d,
    SyncBatchNorm,
    bind_cbn_to_conv,
)
from tests.dist_utils import spawn


class _Branches(nn.Module):
    """Each norm after its own conv of the input; ``bn2`` after ``bn`` (train-mode output) -> relu -> conv;
    ``frozen`` is kept in eval by ``train()`` (like ``norm_eval``); GN has no running statistics."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.convs = nn.ModuleList(nn.Conv2d(3, 4, 3, padding=1, bias=False) for _ in range(6))
        self.bn = nn.BatchNorm2d(4)
        self.sync = SyncBatchNorm(4)
        self.cbn = CrossIterationBatchNorm2d(4, buffer_num=2)
        bind_cbn_to_conv(self.cbn, self.convs[2])
        self.mabn = MovingAverageBatchNorm2d(4, B=2, real_B=4, warmup_iters=0)
        self.brn = BatchRenorm2d(4, warmup_iters=0)
        self.frozen = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.chain_conv = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def train(self, mode=True):
        super().train(mode)
        self.frozen.eval()
        return self

    def forward(self, x):
        first = self.bn(self.convs[0](x))
        outs = [first, self.sync(self.convs[1](x)), self.cbn(self.convs[2](x)), self.mabn(self.convs[3](x)),
                self.brn(self.convs[4](x)), self.frozen(self.convs[5](x)), self.gn(self.convs[5](x)),
                self.bn2(self.chain_conv(F.relu(first)))]
        return sum(o.square().mean() for o in outs)


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 6, 6, generator=g) * 2 + 1 for _ in range(n)]


def _mean_var(x):
    return x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True)


def _expected(model, batches):
    """The population statistics of each layer's input over the concatenated batches, by hand."""
    with torch.no_grad():
        conv = [torch.cat([c(b) for b in batches]) for c in model.convs]
        chain = torch.cat([model.chain_conv(F.relu(F.batch_norm(model.convs[0](b), None, None, model.bn.weight,
                                                                model.bn.bias, training=True, eps=model.bn.eps)))
                           for b in batches])
    out = {name: _mean_var(conv[i]) for i, name in enumerate(['bn', 'sync', 'cbn'])}
    out['brn'] = _mean_var(conv[4])
    out['mabn'] = (torch.zeros(4), conv[3].square().mean((0, 2, 3)))
    out['bn2'] = _mean_var(chain)
    return out


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_update_bn_stats_matches_the_concatenated_batches():
    model = _Branches().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x in _batches(5, seed=7):          # some training first: windows, counters, moving averages
        opt.zero_grad()
        model(x).backward()
        opt.step()
    before = _state(model)
    assert int(model.cbn.window_filled.sum()) == 2
    model.eval()
    batches = _batches(4)
    result = update_bn_stats(model, batches, num_iters=6, forward=lambda m, b: m(b))   # cycles: 0 1 2 3 0 1
    assert not model.training                                                         # mode restored
    assert sorted(result['layers']) == ['bn', 'bn2', 'brn', 'cbn', 'mabn', 'sync'] and result['unfed'] == []
    used = batches + batches[:2]
    after = model.state_dict()
    for name, (mean, var) in _expected(model, used).items():
        torch.testing.assert_close(after[f'{name}.running_mean'], mean, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(after[f'{name}.running_var'], var, rtol=1e-5, atol=1e-5, msg=name)
        assert not torch.equal(after[f'{name}.running_var'], before[f'{name}.running_var']), name
    # everything else is as it was: weights, the frozen BN, counters, CBN's window, MABN's averages
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {f'{n}.running_{s}' for n in ('bn', 'sync', 'cbn', 'brn', 'bn2') for s in ('mean', 'var')} | {
        'mabn.running_var'}
    assert model.cbn._iter_shadow == int(model.cbn.iter_count)


def test_bn2_sees_the_train_mode_output():
    # the chained layer's statistics are those of a train-mode (batch statistics) first BN, not eval mode
    model = _Branches()
    model.bn.running_mean.fill_(3.0)
    batches = _batches(2)
    update_bn_stats(model, batches, num_iters=2, forward=lambda m, b: m(b))
    with torch.no_grad():
        eval_chain = torch.cat([model.chain_conv(F.relu(F.batch_norm(model.convs[0](b), torch.full((4,), 3.0),
                                                                     torch.ones(4), model.bn.weight, model.bn.bias)))
                                for b in batches])
    assert not torch.allclose(model.bn2.running_mean, eval_chain.mean((0, 2, 3)), atol=1e-3)


def test_refuses_what_it_cannot_handle():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), BatchChannelNorm2d(4, num_groups=2)).train()
    with pytest.raises(TypeError, match=r'PreciseBNHook: cannot re-estimate the statistics of 1 '
                                        r'\(cbn_mmdet\.ops\.batch_channel_norm\.BatchChannelNorm2d\); supported: '):
        precise_bn_layers(model)
    with pytest.raises(TypeError, match='cannot re-estimate'):
        update_bn_stats(model, _batches(1), 1, forward=lambda m, b: m(b))

    class MyBN(nn.BatchNorm2d):       # a subclass may compute anything: refused, not guessed
        pass

    with pytest.raises(TypeError, match=r'of 0 \(.*MyBN\)'):
        precise_bn_layers(nn.Sequential(MyBN(3)).train())
    for kwargs, message in ((dict(num_iters=0), 'num_iters must be a positive int, got 0'),
                            (dict(interval=1.5), 'interval must be a positive int or None, got 1.5'),
                            (dict(original_checkpoint='a/b.pth'), "must be a file name .*'a/b.pth'")):
        with pytest.raises(ValueError, match=message):
            PreciseBNHook(**kwargs)


# --------------------------------------------------------------------------- through a real Runner
class _Net(BaseModel):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, inputs, target, mode='tensor'):
        pred = self.head(F.relu(self.bn(self.conv(inputs)))).mean((1, 2, 3))
        if mode == 'loss':
            return dict(loss=((pred - target) ** 2).mean())
        return pred


class _Data(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        x = torch.randn(3, 5, 5, generator=torch.Generator().manual_seed(i)) * 3 + 2
        return dict(inputs=x, target=x.mean())


@pytest.mark.parametrize('by_epoch', [True, False])
def test_through_a_runner(tmp_path, by_epoch):
    loader = dict(dataset=_Data(), batch_size=2, sampler=dict(type='DefaultSampler', shuffle=False),
                  collate_fn=dict(type='default_collate'))
    train_cfg = dict(by_epoch=True, max_epochs=2) if by_epoch else dict(by_epoch=False, max_iters=5)
    runner = Runner(model=_Net(), work_dir=str(tmp_path), train_dataloader=loader, train_cfg=train_cfg,
                    optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05)),
                    custom_hooks=[dict(type='PreciseBNHook', num_iters=3, original_checkpoint='original.pth')],
                    default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=100, by_epoch=by_epoch)),
                    default_scope='mmdet', log_level='WARNING')
    runner.train()
    model = runner.model
    with torch.no_grad():   # the final weights on the loader's first 3 batches (2 images each, in order)
        x = torch.cat([model.conv(torch.stack([_Data()[i]['inputs'] for i in (2 * b, 2 * b + 1)])) for b in range(3)])
    mean, var = _mean_var(x)
    torch.testing.assert_close(model.bn.running_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.bn.running_var, var, rtol=1e-5, atol=1e-5)
    saved = torch.load(tmp_path / ('epoch_2.pth' if by_epoch else 'iter_5.pth'), weights_only=False)['state_dict']
    torch.testing.assert_close(saved['bn.running_var'], var, rtol=1e-5, atol=1e-5)   # saved after the hook
    original = torch.load(tmp_path / 'original.pth', weights_only=False)['state_dict']
    torch.testing.assert_close(original['conv.weight'], saved['conv.weight'])
    assert not torch.allclose(original['bn.running_var'], var, atol=1e-3)             # the training EMA
    assert original['bn.num_batches_tracked'] == saved['bn.num_batches_tracked'] == (6 if by_epoch else 5)


# --------------------------------------------------------------------------- two gloo processes
class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv_a, self.conv_b = nn.Conv2d(3, 4, 3, bias=False), nn.Conv2d(3, 4, 3, bias=False)
        self.sync, self.bn = SyncBatchNorm(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.sync(self.conv_a(x)).sum() + self.bn(self.conv_b(x)).sum()


def _dist_worker(rank, port, world):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    try:
        model = _Pair()
        update_bn_stats(model, _batches(3, seed=10 + rank), num_iters=3, forward=lambda m, b: m(b))
        every = [b for r in range(world) for b in _batches(3, seed=10 + r)]   # all processes' batches
        with torch.no_grad():
            for layer, conv in ((model.sync, model.conv_a), (model.bn, model.conv_b)):
                mean, var = _mean_var(torch.cat([conv(b) for b in every]))
                torch.testing.assert_close(layer.running_mean, mean, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(layer.running_var, var, rtol=1e-5, atol=1e-5)
    finally:
        dist.destroy_process_group()


def test_all_reduced_over_processes():
    import random
    spawn(_dist_worker, args=(random.randint(20000, 40000), 2), nprocs=2, timeout=120)
