"""AMP memory policy: under bf16 autocast CBN keeps for its backward exactly what BN keeps — the activation
in its own (half) dtype plus per-channel vectors — not a float32 copy (which would double the activation
memory of every CBN layer). Measured deterministically: the bytes of the storages autograd saves."""
import pytest
import torch
import torch.nn as nn

from cbn_mmdet.ops import CrossIterationBatchNorm2d

N, CIN, C, HW = 2, 16, 32, 16


def _saved_bytes(fn):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _norm_share(norm, **norm_kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(CIN, C, 3, padding=1, bias=False)
    model = nn.Sequential(conv, norm)
    x = torch.randn(N, CIN, HW, HW, requires_grad=True)
    for _ in range(5):        # window full
        with torch.autocast('cpu', dtype=torch.bfloat16):
            model(x).float().sum().backward()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        return _saved_bytes(lambda: model(x)) - _saved_bytes(lambda: conv(x))


@pytest.mark.parametrize('kwargs', [dict(buffer_num=3), dict(buffer_num=0),
                                    dict(buffer_num=3, grad_through_window=True)])
def test_cbn_saves_the_half_activation_like_bn(kwargs):
    activation = N * C * HW * HW * 2                       # bf16 bytes of the conv output
    bn = _norm_share(nn.BatchNorm2d(C))
    cbn = _norm_share(CrossIterationBatchNorm2d(C, **kwargs))
    assert activation <= bn <= activation + 64 * C          # BN: the activation + per-channel vectors
    # grad_through_window also keeps dA/dW, dB/dW: two float32 tensors of the conv weight's size
    weight_sized = 2 * C * CIN * 9 * 4 if kwargs.get('grad_through_window') else 0
    assert activation <= cbn <= activation + 64 * C + weight_sized, (cbn, activation)
