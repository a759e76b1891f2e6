"""tools/model_converters/*: argument parsing, writing, and one-line exits on a bad checkpoint."""
import importlib.util
from pathlib import Path

import pytest
import torch

from cbn_mmdet.converters.bcn_ws import build_bcn_ws_resnet
from tests.test_converters.test_bcn_ws import _official_resnet, _randomise
from tests.test_converters.test_cbn_detector import CONFIG, _build, _v06_checkpoint
from tests.test_converters.test_mabn import _official

TOOLS = Path(__file__).resolve().parents[2] / 'tools' / 'model_converters'


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bcn_ws_tool_writes_a_strictly_loading_checkpoint(tmp_path):
    official = _official_resnet()
    _randomise(official, torch.Generator().manual_seed(0))
    src, dst = tmp_path / 'rn50_bcn_ws.pth', tmp_path / 'out.pth'
    torch.save({'state_dict': {f'module.{k}': v for k, v in official.state_dict().items()}}, src)
    _tool('bcn_ws_to_mmdet').main([str(src), str(dst)])
    saved = torch.load(dst, weights_only=True)
    build_bcn_ws_resnet(50).load_state_dict(saved['state_dict'], strict=True)
    assert saved['meta'] == {'converted_from': 'rn50_bcn_ws.pth'}


def test_bcn_ws_tool_wrong_depth_exits_with_one_line(tmp_path):
    official = _official_resnet()
    src = tmp_path / 'rn50.pth'
    torch.save({'state_dict': official.state_dict()}, src)
    with pytest.raises(SystemExit) as exit_info:
        _tool('bcn_ws_to_mmdet').main([str(src), str(tmp_path / 'out.pth'), '--depth', '101'])
    message = str(exit_info.value)
    assert message.startswith(f'{src}: missing key ') and '\n' not in message
    assert not (tmp_path / 'out.pth').exists()


def test_mabn_tool(tmp_path):
    src, dst = tmp_path / 'mabn.pth', tmp_path / 'out.pth'
    torch.save(_official().state_dict(), src)
    _tool('mabn_to_mmdet').main([str(src), str(dst)])
    assert torch.load(dst, weights_only=True)['state_dict']['1.running_var'].shape == (8,)


def test_cbn_tool_against_the_config(tmp_path):
    target = _build().state_dict()
    src, dst = tmp_path / 'official.pth', tmp_path / 'out.pth'
    torch.save({'state_dict': _v06_checkpoint(target), 'meta': {}}, src)
    _tool('cbn_v06_to_mmdet').main([str(src), str(CONFIG), str(dst)])
    _build().load_state_dict(torch.load(dst, weights_only=True)['state_dict'], strict=True)


@pytest.mark.parametrize('name, with_config', [('bcn_ws_to_mmdet', False), ('mabn_to_mmdet', False),
                                               ('cbn_v06_to_mmdet', True)])
def test_every_tool_refuses_a_non_dict_checkpoint_in_one_line(tmp_path, name, with_config):
    src, dst = tmp_path / 'list.pth', tmp_path / 'out.pth'
    torch.save([torch.zeros(1)], src)
    with pytest.raises(SystemExit) as exit_info:
        _tool(name).main([str(src), str(CONFIG), str(dst)] if with_config else [str(src), str(dst)])
    assert str(exit_info.value) == f'{src}: expected a dict checkpoint, got list'
    assert not dst.exists()
