"""The data and the small net of the fidelity studies."""
import pytest
import torch
import torch.nn as nn

from cbn_mmdet.analysis.data import load_dataset, synthetic_digits
from cbn_mmdet.analysis.nets import NORMS, SmallConvNet, make_conv_norm
from cbn_mmdet.analysis.stats_error import probe_forward


def test_synthetic_is_deterministic_and_split():
    a, la = synthetic_digits(num_samples=50, data_seed=3)
    b, lb = synthetic_digits(num_samples=50, data_seed=3)
    assert a.shape == (50, 1, 8, 8) and torch.equal(a, b) and torch.equal(la, lb)
    x_train, y_train, x_test, y_test = load_dataset('synthetic')
    assert x_train.shape == (1438, 1, 8, 8) and x_test.shape == (359, 1, 8, 8)
    assert abs(x_train.mean().item()) < 1e-5 and abs(x_train.std().item() - 1) < 1e-4
    assert set(y_train.tolist()) == set(range(10))


def test_digits_split():
    pytest.importorskip('sklearn')
    x_train, y_train, x_test, y_test = load_dataset('digits')
    assert x_train.shape[0] + x_test.shape[0] == 1797 and x_test.shape[0] == 359


def test_load_dataset_rejects_unknown_name():
    with pytest.raises(ValueError, match="got 'cifar'"):
        load_dataset('cifar')


@pytest.mark.parametrize('norm', NORMS)
def test_every_norm_trains_one_step_at_batch_one(norm):
    torch.manual_seed(0)
    net = SmallConvNet(norm, batch_size=1, cbn_burnin=1, mabn_warmup=1)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    for _ in range(3):
        loss = nn.functional.cross_entropy(net(torch.randn(1, 1, 8, 8)), torch.tensor([3]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    net.eval()
    assert net(torch.randn(5, 1, 8, 8)).shape == (5, 10)


def test_make_conv_norm_errors():
    with pytest.raises(ValueError, match="got 'ln'"):
        make_conv_norm('ln', 3, 4)
    with pytest.raises(ValueError, match='needs batch_size'):
        make_conv_norm('mabn', 3, 4)


def test_probe_forward_matches_bn_training_forward():
    """With its own statistics, probe_forward is the BN net's training forward (the 'truth' definition)."""
    torch.manual_seed(0)
    net = SmallConvNet('bn').double().train()
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    seen = []
    hooks = [conv.register_forward_pre_hook(lambda m, args: seen.append(args[0])) for conv in net.convs]
    net(x)
    for h in hooks:
        h.remove()
    inputs, stats = probe_forward(net, x)
    for a, b in zip(inputs, seen):
        torch.testing.assert_close(a, b)
    # With given statistics the layers use them instead (here: other statistics change the features).
    shifted = [(m + 1.0, v * 2.0) for m, v in stats]
    inputs2, _ = probe_forward(net, x, stats=shifted)
    torch.testing.assert_close(inputs2[0], inputs[0])
    assert not torch.allclose(inputs2[1], inputs[1])


def test_ghost_batch_norm_is_per_chunk_bn():
    from cbn_mmdet.analysis.stats_error import GhostBatchNorm2d
    torch.manual_seed(0)
    ghost = GhostBatchNorm2d(3, chunk=2).double()
    with torch.no_grad():
        ghost.weight.uniform_(0.5, 1.5)
        ghost.bias.uniform_(-1, 1)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    ref = torch.cat([nn.functional.batch_norm(c, None, None, ghost.weight, ghost.bias, True, 0.0, ghost.eps)
                     for c in x.split(2)])
    torch.testing.assert_close(ghost(x), ref)
    with pytest.raises(ValueError, match='not a multiple of chunk=4'):
        GhostBatchNorm2d(3, chunk=4)(x)
