"""A checkpoint of another model stops tools/test.py, --resume and fuse_norm.py with a message naming the
checkpoint and the first mismatching keys (mmengine alone loads it non-strictly and goes on).

Oracle: state_dicts of real models built from the tiny config with one part changed (the mask head
removed = a Faster R-CNN; depth 50 instead of 18); for BN->CBN, the CBN model's state without the buffers
torch's own BatchNorm2d does not have.
"""
import os.path as osp
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

from cbn_mmdet.engine.checkpoint_match import check_checkpoint_matches, read_checkpoint_state
from cbn_mmdet.engine.config_checks import ConfigError
from cbn_mmdet.engine.runner_setup import register_modules
from cbn_mmdet.engine.testing import prepare_test_config
from cbn_mmdet.engine.training import prepare_train_config
from cbn_mmdet.ops import CrossIterationBatchNorm2d
from tests.tiny_config import ROOT, load_tool


def _model(config, **changes):
    from mmdet.registry import MODELS
    from mmengine.config import Config
    register_modules()
    cfg = Config.fromfile(config)
    cfg.merge_from_dict(changes)
    torch.manual_seed(0)
    return MODELS.build(cfg.model)


@pytest.fixture(scope='module')
def ckpts(tiny_cbn_config, tmp_path_factory):
    """{'own', 'faster', 'r50', 'bn'}: checkpoint files (mmengine layout: a dict with 'state_dict')."""
    root = tmp_path_factory.mktemp('ckpts')
    own = _model(tiny_cbn_config)
    bn_keys = set(nn.BatchNorm2d(1).state_dict())
    cbn_only = {f'{name}.{key}' for name, m in own.named_modules() if isinstance(m, CrossIterationBatchNorm2d)
                for key in m.state_dict() if key not in bn_keys}
    states = dict(own=own.state_dict(),
                  faster=_model(tiny_cbn_config, **{'model.roi_head.mask_head': None,
                                                    'model.roi_head.mask_roi_extractor': None}).state_dict(),
                  r50=_model(tiny_cbn_config, **{'model.backbone.depth': 50}).state_dict(),
                  bn={k: v for k, v in own.state_dict().items() if k not in cbn_only})
    assert cbn_only and len(states['bn']) < len(states['own'])
    paths = {}
    for name, state in states.items():
        paths[name] = str(root / f'{name}.pth')
        torch.save(dict(meta=dict(epoch=1), state_dict=state), paths[name])
    return paths


def test_own_checkpoint_passes_and_bn_into_cbn_only_warns(tiny_cbn_config, ckpts):
    check_checkpoint_matches(_model(tiny_cbn_config), ckpts['own'])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        check_checkpoint_matches(_model(tiny_cbn_config), ckpts['bn'])
    assert any('loaded a BN checkpoint into CBN' in str(w.message) for w in caught)


@pytest.mark.parametrize('name, expected', [
    ('faster', r"model key\(s\) missing from it: roi_head\.mask_head\."),
    ('r50', r"shape mismatch\(es\): backbone\.layer1\.0\.conv1\.weight \(32, 32, 1, 1\) in the checkpoint vs "
            r"\(32, 32, 3, 3\) in the model"),     # (the demo's half-width backbone)
])
def test_another_models_checkpoint_is_refused(tiny_cbn_config, ckpts, name, expected):
    with pytest.raises(ConfigError, match=expected) as info:
        check_checkpoint_matches(_model(tiny_cbn_config), ckpts[name])
    assert ckpts[name] in str(info.value) and '--allow-partial-load' in str(info.value)
    notes = []
    check_checkpoint_matches(_model(tiny_cbn_config), ckpts[name], allow_partial=True, log=notes.append)
    assert len(notes) == 1 and notes[0].startswith('partial load (--allow-partial-load)')


def test_mask_model_checkpoint_into_faster_names_the_unexpected_keys(tiny_cbn_config, ckpts):
    faster = _model(tiny_cbn_config, **{'model.roi_head.mask_head': None, 'model.roi_head.mask_roi_extractor': None})
    with pytest.raises(ConfigError, match=r"key\(s\) the model does not have: roi_head\.mask_head\."):
        check_checkpoint_matches(faster, ckpts['own'])


@pytest.mark.parametrize('kind, expected', [
    ('empty', r'is empty \(0 bytes\)'),
    ('random', 'is not a readable torch checkpoint'),
    ('truncated', 'is not a readable torch checkpoint'),
    ('not_a_state', 'holds no state_dict of tensors'),
])
def test_unreadable_checkpoint_files_are_named(ckpts, tmp_path, kind, expected):
    path = tmp_path / f'{kind}.pth'
    if kind == 'random':
        path.write_bytes(torch.randint(0, 256, (4096, ), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.uint8).numpy().tobytes())
    elif kind == 'truncated':
        data = open(ckpts['own'], 'rb').read()
        path.write_bytes(data[:len(data) // 2])
    elif kind == 'not_a_state':
        torch.save([1, 2, 3], path)
    else:
        path.write_bytes(b'')
    with pytest.raises(ConfigError, match=expected) as info:
        read_checkpoint_state(str(path))
    assert str(path) in str(info.value)


def test_test_tool_refuses_before_the_work_dir(tiny_cbn_config, ckpts, tmp_path):
    work_dir = tmp_path / 'wd'
    with pytest.raises(SystemExit, match=r"tools/test.py: config error: checkpoint '.*faster.pth' does not match"):
        load_tool('test.py').main([tiny_cbn_config, ckpts['faster'], '--work-dir', str(work_dir)])
    assert not work_dir.exists()
    notes = []
    cfg = prepare_test_config(tiny_cbn_config, ckpts['faster'], allow_partial_load=True, log=notes.append)
    assert cfg.load_from == ckpts['faster'] and 'partial load' in notes[0]
    assert load_tool('test.py').parse_args([tiny_cbn_config, 'x.pth', '--allow-partial-load']).allow_partial_load


def test_resume_from_another_models_checkpoint_is_refused(tiny_cbn_config, ckpts, tmp_path):
    work_dir = tmp_path / 'wd'
    with pytest.raises(SystemExit, match=r"config error: --resume '.*r50.pth' does not match .*shape mismatch"):
        load_tool('train.py').main([tiny_cbn_config, '--work-dir', str(work_dir), '--resume', ckpts['r50']])
    assert not work_dir.exists()
    # auto-resume finds the latest checkpoint of the work_dir: checked the same way
    work_dir.mkdir()
    (work_dir / 'last_checkpoint').write_text(ckpts['faster'])
    with pytest.raises(ConfigError, match="--resume '.*faster.pth' does not match"):
        prepare_train_config(tiny_cbn_config, work_dir=str(work_dir), resume='auto')


def test_resume_into_an_empty_work_dir_says_so(tiny_cbn_config, tmp_path):
    notes = []
    cfg = prepare_train_config(tiny_cbn_config, work_dir=str(tmp_path / 'new'), resume='auto', log=notes.append)
    assert cfg.resume is False
    assert any('no checkpoint in work_dir' in n and 'training starts from scratch' in n for n in notes)


def test_fuse_tool_refuses_a_mismatched_pair(tiny_cbn_config, ckpts):
    from cbn_mmdet.deploy.fuse_detector import build_detector
    with pytest.raises(SystemExit, match=r"fuse_norm: checkpoint '.*faster.pth' does not match"):
        load_tool('deploy/fuse_norm.py').main([tiny_cbn_config, ckpts['faster']])
    model = build_detector(tiny_cbn_config, ckpts['own'])            # the matching pair loads
    saved = torch.load(ckpts['own'], weights_only=False)['state_dict']
    key = 'neck.fpn_convs.0.conv.weight'
    torch.testing.assert_close(model.state_dict()[key], saved[key])


def test_through_a_real_subprocess(tiny_cbn_config, ckpts, tmp_path, subprocess_env):
    work_dir = tmp_path / 'wd'
    proc = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'test.py'), tiny_cbn_config, ckpts['faster'],
                           '--work-dir', str(work_dir)], capture_output=True, text=True, env=subprocess_env,
                          timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('tools/test.py: config error: checkpoint') and 'roi_head.mask_head.' in last
    assert 'Traceback' not in proc.stderr and not work_dir.exists()
