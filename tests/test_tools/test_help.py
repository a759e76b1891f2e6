"""Every command line in tools/ starts: ``--help`` exits 0 and prints its usage (run from any directory)."""
import glob
import os.path as osp
import subprocess
import sys

import pytest

from tests.tiny_config import ROOT

TOOLS = sorted(osp.relpath(p, osp.join(ROOT, 'tools')) for p in glob.glob(osp.join(ROOT, 'tools', '**', '*.py'),
                                                                            recursive=True)
               if not osp.basename(p).startswith('_'))


def test_the_tools_are_found():
    assert {'train.py', 'test.py', 'demo.py', 'analysis/results_table.py', 'deploy/fuse_norm.py',
            'misc/synthetic_coco.py'} <= set(TOOLS)


@pytest.mark.parametrize('tool', TOOLS)
def test_help(tool, tmp_path, subprocess_env):
    proc = subprocess.run([sys.executable, osp.join(ROOT, 'tools', tool), '--help'], cwd=tmp_path,
                          env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith('usage:')
