"""The package as users get it: a wheel installed with --no-deps into a separate location, used from a
directory outside the checkout by a user config (custom_imports=['cbn_mmdet'], CBN, the burn-in hook)
through mmengine's Runner; no module of the installed package may read files of the checkout."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

USER_MODULE = '''
import torch
import torch.nn as nn
from mmcv.cnn import ConvModule
from mmengine.model import BaseModel
from mmengine.evaluator import BaseMetric
from mmengine.registry import DATASETS, METRICS, MODELS

import cbn_mmdet

print('CBN_MMDET_FILE=' + cbn_mmdet.__file__, flush=True)


@MODELS.register_module()
class ToyCBNNet(BaseModel):
    def __init__(self, norm_cfg):
        super().__init__()
        self.body = nn.Sequential(ConvModule(3, 8, 3, padding=1, norm_cfg=norm_cfg),
                                  ConvModule(8, 8, 3, padding=1, norm_cfg=norm_cfg))
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, inputs, target, mode='tensor'):
        pred = self.head(self.body(inputs)).mean((1, 2, 3))
        if mode == 'loss':
            return dict(loss=((pred - target) ** 2).mean())
        return [dict(pred=p, target=t) for p, t in zip(pred, target)]


@DATASETS.register_module()
class ToyData(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        x = torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(i))
        return dict(inputs=x, target=x.mean())


@METRICS.register_module()
class ToyMSE(BaseMetric):
    def process(self, data_batch, data_samples):
        self.results.extend(float((s['pred'] - s['target']) ** 2) for s in data_samples)

    def compute_metrics(self, results):
        return dict(mse=sum(results) / len(results))
'''

USER_CONFIG = '''
custom_imports = dict(imports=['cbn_mmdet', 'toy_user'], allow_failed_imports=False)
norm_cfg = dict(type='CBN', buffer_num=2, burnin=0)
model = dict(type='ToyCBNNet', norm_cfg=norm_cfg)
train_dataloader = dict(dataset=dict(type='ToyData'), batch_size=2, num_workers=0,
                        sampler=dict(type='DefaultSampler', shuffle=False), collate_fn=dict(type='default_collate'))
train_cfg = dict(by_epoch=True, max_epochs=2)
test_dataloader = train_dataloader
test_cfg = dict()
test_evaluator = dict(type='ToyMSE')
optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.01))
custom_hooks = [dict(type='CBNBurnInHook', burnin_epochs=1)]
default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=1), logger=dict(type='LoggerHook'))
env_cfg = dict(dist_cfg=dict(backend='gloo'))
log_level = 'WARNING'
'''

RUN_AND_INSPECT = '''
import importlib, json, pkgutil, re, sys
from pathlib import Path
from mmengine.config import Config
from mmengine.runner import Runner
import cbn_mmdet
from cbn_mmdet.ops import CrossIterationBatchNorm2d

checkout = sys.argv[1]
assert not any(Path(p or '.').resolve() == Path(checkout) for p in sys.path), sys.path
# every submodule imports from the installed location ...
names = [m.name for m in pkgutil.walk_packages(cbn_mmdet.__path__, 'cbn_mmdet.')]
files = [importlib.import_module(n).__file__ for n in names]
# ... and none derives a checkout path from its own location
pattern = re.compile(r'dirname\\([^\\n]*dirname\\([^\\n]*__file__'
                     r'|__file__[^\\n]*parents\\[|__file__\\)\\.parent\\.parent')
readers = sorted(f for f in files if pattern.search(Path(f).read_text()))
# the pattern catches the usual ways of reaching the checkout from a module of the package
for probe in ('ROOT = osp.dirname(osp.dirname(osp.dirname(__file__)))', 'Path(__file__).resolve().parents[2]',
              'Path(__file__).parent.parent / "configs"'):
    assert pattern.search(probe), probe
cfg = Config.fromfile('user_cfg.py')
cfg.work_dir = 'work_dir_runner'
runner = Runner.from_cfg(cfg)
runner.train()
layers = [m for m in runner.model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
print('RESULT=' + json.dumps(dict(file=cbn_mmdet.__file__, modules=len(names), files=files, readers=readers,
                                  filled=[int(m.window_filled.sum()) for m in layers])))
'''


def _run(cmd, **kwargs):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f'{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}'
    return result


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp('wheel')
    dist, site, user = root / 'dist', root / 'site', root / 'user'
    user.mkdir()
    _run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', str(dist), str(REPO)])
    wheels = sorted(dist.glob('cbn_mmdet-*.whl'))
    assert len(wheels) == 1, wheels
    _run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', str(site), str(wheels[0])])
    (user / 'toy_user.py').write_text(USER_MODULE)
    (user / 'user_cfg.py').write_text(USER_CONFIG)
    (user / 'run.py').write_text(RUN_AND_INSPECT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(user)]))
    return dict(site=site, user=user, env=env)


def test_user_config_runs_through_the_runner_with_the_installed_package(installed):
    site, user = installed['site'], installed['user']
    out = _run([sys.executable, 'run.py', str(REPO)], cwd=user, env=installed['env']).stdout
    result = json.loads(re.search(r'^RESULT=(.*)$', out, re.M).group(1))
    assert Path(result['file']).resolve().is_relative_to(site.resolve())
    assert result['modules'] > 20 and all(Path(f).resolve().is_relative_to(site.resolve()) for f in result['files'])
    assert result['readers'] == [], f'modules deriving checkout paths from __file__: {result["readers"]}'
    # burn-in epoch 1 plain BN, epoch 2 with the window: 2 iterations filled the 2 window slots
    assert result['filled'] == [2, 2]


def test_checkout_tools_import_the_installed_package(installed):
    """tools/train.py and tools/test.py run from the checkout path, on the user's config, with the wheel."""
    user, site = installed['user'], installed['site'].resolve()
    outputs = [_run([sys.executable, str(REPO / 'tools' / 'train.py'), 'user_cfg.py', '--work-dir', 'wd_tool'],
                    cwd=user, env=installed['env'])]
    assert (user / 'wd_tool' / 'epoch_2.pth').is_file()
    outputs.append(_run([sys.executable, str(REPO / 'tools' / 'test.py'), 'user_cfg.py', 'wd_tool/epoch_2.pth',
                         '--work-dir', 'wd_tool'], cwd=user, env=installed['env']))
    for result in outputs:
        found = re.findall(r'^CBN_MMDET_FILE=(.*)$', result.stdout, re.M)
        assert found and all(Path(f).resolve().is_relative_to(site) for f in found), found
    assert 'mse' in outputs[1].stdout + outputs[1].stderr
