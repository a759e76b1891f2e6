"""tools/analysis/results_table.py on fake work_dirs laid out as mmengine writes them."""
import os.path as osp
import subprocess
import sys

from tests.test_evaluation.test_results_table import fake_work_dirs
from tests.tiny_config import ROOT


def test_cli_writes_markdown(tmp_path):
    dirs = fake_work_dirs(tmp_path)
    out = tmp_path / 'table.md'
    proc = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'analysis', 'results_table.py'),
                           *map(str, dirs[:2]), '--markdown', str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == proc.stdout
    assert '| Mask R-50-FPN | CBN | 38.0 / 38.4 (-0.4) |' in proc.stdout
