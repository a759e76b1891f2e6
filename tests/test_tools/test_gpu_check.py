"""tools/gpu_check.py: its CPU dry run (``--quick``) passes, and its report logic (known failures, XPASS)."""
import importlib.util
import os.path as osp
import re
import subprocess
import sys

import pytest
import torch

from tests.tiny_config import ROOT

TOOL = osp.join(ROOT, 'tools', 'gpu_check.py')
LINE = re.compile(r'^(PASS|FAIL|SKIP|XFAIL) (\S+) (.+)$')


def _load_tool():
    spec = importlib.util.spec_from_file_location('_gpu_check_tool', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_dry_run_passes(tmp_path, subprocess_env):
    # --device cpu: the dry run even on a machine with CUDA
    proc = subprocess.run([sys.executable, TOOL, '--quick', '--device', 'cpu'], cwd=tmp_path, env=subprocess_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line and not line.startswith('#')]
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), [line for line, m in zip(lines, parsed) if not m]
    status = {m.group(2): m.group(1) for m in parsed}
    assert not [check for check, s in status.items() if s == 'FAIL'], proc.stdout
    # Every layer ran its float32 parity check against float64; autocast and channels_last ran too.
    tool = _load_tool()
    assert {'cbn_window', 'sync_cbn', 'sync_bn', 'bcn_wsconv', 'mabn_cenconv'} <= set(tool.QUICK_LAYERS)
    for name in tool.QUICK_LAYERS:
        if f'parity/{name}/fp32' not in status:      # a layer this checkout does not have yet
            continue
        for mode in tool.MODES:
            assert status.get(f'parity/{name}/{mode}') in ('PASS', 'SKIP'), (name, mode)
    assert status['parity/cbn_window/fp32'] == status['parity/mabn_cenconv/bf16_autocast'] == 'PASS'
    assert status['import/cbn_mmdet.ops'] == 'PASS'
    assert status['amp_inf_grad/cbn_window'] == status['amp_inf_batch/cbn_window'] == 'PASS'
    assert status['compile/cbn'] == 'PASS'
    # The CUDA-only checks skip, saying why.
    for check in ('syncs/cbn_window/fp32', 'timing/cbn'):
        assert status[check] == 'SKIP'
    assert 'CUDA only' in proc.stdout
    # XFAIL only for the failures listed as known.
    assert {c for c, s in status.items() if s == 'XFAIL'} <= set(tool.KNOWN_FAILURES)
    assert re.search(r'# summary: \d+ PASS, 0 FAIL, \d+ SKIP, \d+ XFAIL', proc.stdout)


def test_known_failure_that_passes_is_a_fail(capsys, monkeypatch):
    tool = _load_tool()
    known = 'parity/known/fp32'
    monkeypatch.setitem(tool.KNOWN_FAILURES, known, 'a defect listed as known')
    report = tool.Report()
    report.line('PASS', known, 'ok')
    report.line('FAIL', known, 'still broken')
    report.line('FAIL', 'parity/new/fp32', 'broken')
    report.run('parity/raises/fp32', lambda: 1 / 0)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f'FAIL {known} XPASS ok')
    assert out[1].startswith(f'XFAIL {known} still broken (known: ')
    assert out[2] == 'FAIL parity/new/fp32 broken'
    assert out[3].startswith('FAIL parity/raises/fp32 ZeroDivisionError: division by zero (')
    assert report.counts == {'PASS': 0, 'FAIL': 3, 'SKIP': 0, 'XFAIL': 1}


def test_bad_steps_is_one_line_error(tmp_path, subprocess_env):
    proc = subprocess.run([sys.executable, TOOL, '--steps', '1'], cwd=tmp_path, env=subprocess_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith('--steps must be >= 2, got 1')


@pytest.mark.parametrize('norm', ['bn', 'gn', 'cbn', 'official'])
def test_timing_steps_run_on_cpu(norm):
    """The timed steps (CUDA only in the tool) build and train here: the official algorithm's API included."""
    import cbn_mmdet.ops as ops
    tool = _load_tool()
    harness = tool.Harness(torch, ops, 'cpu', 2, True)
    step = tool.timing_step(harness, norm, tool._load_official(), 32, 6, 2)
    first = step().detach().clone()
    second = step().detach()
    assert torch.isfinite(second).all() and not torch.equal(first, second)


def test_known_failures_name_real_checks():
    """No stale entry: every known failure is a check of the full (CUDA) run."""
    import cbn_mmdet.ops as ops
    tool = _load_tool()
    names = [name for name, _ in tool.plan_checks(tool.Harness(torch, ops, 'cpu', 2, False), dry=False)]
    assert len(names) == len(set(names))
    assert set(tool.KNOWN_FAILURES) <= set(names), set(tool.KNOWN_FAILURES) - set(names)
