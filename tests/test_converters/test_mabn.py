"""Official MABN2d state_dicts -> our MovingAverageBatchNorm2d: same eval output, buffers carried over."""
import pytest
import torch
import torch.nn as nn

from cbn_mmdet.converters import ConversionError, convert_mabn
from cbn_mmdet.ops import CenteredConv2d, MovingAverageBatchNorm2d
from tests.oracles.official_layers import OfficialMABN2d

C, B, REAL_B = 8, 2, 32


def _official():
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(CenteredConv2d(3, C, 3, padding=1, bias=False), OfficialMABN2d(C, B=B, real_B=REAL_B))
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith('iters'):
                tensor.fill_(1234)
            elif name.endswith('running_var') or name.endswith('buffer_x2'):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen))
    return model


def _ours():
    return nn.Sequential(CenteredConv2d(3, C, 3, padding=1, bias=False),
                         MovingAverageBatchNorm2d(C, B=B, real_B=REAL_B))


def test_released_layout():
    sd = _official().state_dict()
    assert sd['1.running_var'].shape == (1, C, 1, 1) and '1.running_mean' not in sd
    assert sd['1.buffer_x2'].shape == (REAL_B // B, C) and sd['1.iters'].shape == (1,)


def test_converted_eval_output_equals_the_official():
    official = _official().eval()
    sd = {f'module.{k}': v for k, v in official.state_dict().items()}
    ours = _ours()
    ours.load_state_dict(convert_mabn(sd), strict=True)
    ours.eval()
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), official(x), rtol=1e-6, atol=1e-6)
    norm = ours[1]
    assert int(norm.iters) == 1234 and int(norm.num_batches_tracked) == 1234
    assert torch.equal(norm.buffer_gz, official[1].buffer_gz)
    assert torch.equal(norm.running_mean, torch.zeros(C))


def test_running_mean_in_an_official_layer_is_unknown():
    sd = dict(_official().state_dict(), **{'1.running_mean': torch.zeros(1, C, 1, 1)})
    with pytest.raises(ConversionError, match=r"^unknown key '1\.running_mean' in an official MABN layer$"):
        convert_mabn(sd)


def test_missing_buffer_is_named():
    sd = {k: v for k, v in _official().state_dict().items() if k != '1.buffer_gz'}
    with pytest.raises(ConversionError, match=r"^missing key '1\.buffer_gz' in the official MABN checkpoint$"):
        convert_mabn(sd)


def test_wrong_running_var_shape_is_named():
    sd = dict(_official().state_dict(), **{'1.running_var': torch.ones(1, C, 2, 1)})
    with pytest.raises(ConversionError, match=r"^key '1\.running_var': expected shape \(1, C, 1, 1\)"):
        convert_mabn(sd)
