"""tools/dist_train.sh with 2 CPU processes (gloo) trains the CBN demo config for 2 iterations."""
import os.path as osp
import re
import socket
import subprocess

import torch

from tests.tiny_config import ROOT


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_dist_train_two_gloo_processes(tiny_cbn_config, tmp_path, subprocess_env):
    work_dir = tmp_path / 'wd'
    env = dict(subprocess_env, PORT=str(_free_port()), PYTHON=osp.join(ROOT, '.venv', 'bin', 'python'))
    if not osp.exists(env['PYTHON']):
        env['PYTHON'] = 'python'
    if torch.cuda.is_available():       # this test is about the CPU path
        env['CUDA_VISIBLE_DEVICES'] = ''
    # global batch 2 over 2 processes = 1 image each; 2 iterations of 2 images (indices=4, 1 epoch)
    proc = subprocess.run(
        ['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), tiny_cbn_config, '2', '--work-dir', str(work_dir),
         '--cfg-options', 'train_cfg.max_epochs=1', 'train_dataloader.dataset.indices=4', 'global_batch_size=2',
         'custom_hooks=[]'],
        env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert 'train_dataloader.batch_size 2 -> 1' in log               # global batch kept over 2 processes
    iters = re.findall(r'Epoch\(train\) \[1\]\[(\d)/2\]', log)
    assert iters == ['1', '2'], log[-3000:]                         # logged once (rank 0), 2 iterations
    assert (work_dir / 'epoch_1.pth').is_file()
    run_log = ''.join(open(p).read() for p in work_dir.glob('*/*.log'))
    assert "dist_cfg: {'backend': 'gloo'}" in run_log and 'GPU number: 2' in run_log   # 2 gloo processes
    ckpt = torch.load(work_dir / 'epoch_1.pth', map_location='cpu', weights_only=False)
    assert ckpt['meta']['iter'] == 2
    assert not any(k.startswith('module.') for k in ckpt['state_dict'])   # saved unwrapped, like mmdet
