"""The norm benchmark core runs end to end on one tiny shape (no timing assertions: never assert speed)."""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from cbn_mmdet.benchmark import NORMS, ConvShape, build_case, memory_rows, op_rows, run_shape, time_rows
from cbn_mmdet.benchmark.memory import cbn_extra_bound_bytes, module_state_bytes
from cbn_mmdet.benchmark.norm_bench import NormResult
from cbn_mmdet.benchmark.op_count import count_aten_ops
from cbn_mmdet.benchmark.report import write_doc_section
from cbn_mmdet.ops import CrossIterationBatchNorm2d, bind_cbn_to_conv
from tests.oracles.official_cbn import OfficialCBNModule

TINY = ConvShape('FPN', 'tiny', 2, 8, 8, 6, 6, 3)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_run_shape_every_norm_and_tables():
    results = run_shape(TINY, NORMS, repeats=2, warmup=4, official=OfficialCBNModule)
    assert set(results) == set(NORMS)
    for res in results.values():
        assert len(res.times_s) == 2 and all(t > 0 for t in res.times_s)
        assert res.peak_bytes is None or res.peak_bytes >= 0
        assert 0 < res.ops_without_conv < res.ops
    header, rows = time_rows([results], NORMS)
    assert len(rows) == 1 and len(rows[0]) == len(header)
    header, rows = op_rows([results], NORMS)
    assert len(rows) == 1 and len(rows[0]) == len(header)
    assert rows[0][header.index('BN ops')] == f"{results['BN'].ops_without_conv} / {results['BN'].ops}"
    header, rows = memory_rows([results])
    assert len(rows) == 1 and len(rows[0]) == len(header)
    # the CBN window (3 entries of W, dν/dW and the mean patch) is part of the layer's extra state
    w_numel = 8 * 8 * 9
    extra = results['CBN'].state_bytes - results['BN'].state_bytes
    assert 3 * 2 * w_numel * 4 <= extra <= cbn_extra_bound_bytes(w_numel, 8, 3)


def test_official_reference_computes_our_algorithm():
    """The timing reference is the official algorithm: same outputs and gradients as our layer."""
    dt = torch.float64
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False).to(dt)
    ours = CrossIterationBatchNorm2d(4, buffer_num=2).to(dt)
    bind_cbn_to_conv(ours, conv)
    conv_ref, official = copy.deepcopy(conv), OfficialCBNModule(4, buffer_num=2, dtype=dt)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(2, 3, 6, 6, generator=gen, dtype=dt)
        probe = torch.randn(2, 4, 6, 6, generator=gen, dtype=dt)
        out = ours(conv(x.clone().requires_grad_()))
        out_ref = official(conv_ref(x.clone().requires_grad_()), conv_ref.weight)
        (out * probe).sum().backward()
        (out_ref * probe).sum().backward()
        torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(conv.weight.grad, conv_ref.weight.grad, rtol=1e-10, atol=1e-10)
        with torch.no_grad():
            for c in (conv, conv_ref):
                c.weight -= 0.1 * c.weight.grad
                c.weight.grad = None
    assert module_state_bytes(official) > module_state_bytes(nn.BatchNorm2d(4).to(dt))


def test_official_case_needs_its_factory():
    with pytest.raises(ValueError, match="norm 'CBN-official': no official-algorithm factory"):
        build_case('CBN-official', TINY)


def test_bn_op_count_is_bn_alone_plus_a_plain_conv():
    """Oracle: the ops of BN's forward + backward on a leaf input, and of a plain conv's step, counted apart."""
    results = run_shape(TINY, ('BN',), repeats=1, warmup=4, measure_peak=False)['BN']
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(TINY.n, TINY.cout, TINY.h, TINY.w, generator=gen, requires_grad=True)
    grad, bn = torch.ones_like(y), nn.BatchNorm2d(TINY.cout)
    _, bn_counts = count_aten_ops(lambda: bn(y).backward(grad))
    x = torch.randn(TINY.n, TINY.cin, TINY.h, TINY.w, generator=gen, requires_grad=True)
    conv = nn.Conv2d(TINY.cin, TINY.cout, TINY.k, padding=TINY.k // 2, bias=False)
    _, conv_counts = count_aten_ops(lambda: conv(x).backward(grad))
    assert results.ops_without_conv == sum(bn_counts.values())
    assert results.ops == sum(bn_counts.values()) + sum(conv_counts.values())


def _result(name, ms):
    return NormResult(TINY, name, times_s=[ms / 1e3])


def test_gap_to_the_floor_column():
    """Hand-derived: CBN 14 ms, floor 13 ms, BN 10 ms -> 1.40x - 1.30x = +0.10; official 21 ms -> 1.50x ours."""
    results = {n: _result(n, ms) for n, ms in (('BN', 10), ('BN+wgrad', 13), ('CBN', 14), ('CBN-official', 21))}
    header, rows = time_rows([results], ('BN', 'BN+wgrad', 'CBN', 'CBN-official'))
    row = dict(zip(header, rows[0]))
    assert row['CBN ms (x BN)'] == '14.0 (1.40x)' and row['official / ours'] == '1.50x'
    assert row['CBN − floor (x BN)'] == '+0.10'
    del results['BN+wgrad']
    header, rows = time_rows([results], ('BN', 'CBN'))
    assert dict(zip(header, rows[0]))['CBN − floor (x BN)'] == ''


class _PackedState(nn.Module):
    """One packed buffer exposed as named views in state_dict and kept as views in an attribute."""

    def __init__(self):
        super().__init__()
        self.register_buffer('packed', torch.zeros(2, 10))
        self.views = (self.packed[:, :4], self.packed[:, 4:])
        self.stub = torch.zeros(1).expand(1000)          # stride 0: one stored float

    def state_dict(self, *args, **kwargs):
        return {'mean': self.views[0], 'sq': self.views[1]}


def test_state_bytes_count_each_storage_once():
    """Hand-derived: the packed buffer is 2 x 10 floats = 80 B, the stride-0 stub 4 B; views add nothing."""
    assert module_state_bytes(_PackedState()) == 80 + 4


def test_doc_section_is_replaced_in_place(tmp_path):
    path = str(tmp_path / 'bench.md')
    write_doc_section(path, 'a', 'first')
    with open(path, 'a') as f:
        f.write('\nhand-written text\n')
    write_doc_section(path, 'b', 'other')
    write_doc_section(path, 'a', 'second')
    text = open(path).read()
    assert 'second' in text and 'first' not in text and 'hand-written text' in text and 'other' in text
    assert text.count('<!-- BEGIN a -->') == 1


def test_tool_runs_with_torch_alone(tmp_path):
    """tools/benchmark_norm.py must run on a machine without mmcv/mmengine/mmdet (e.g. a bare CUDA box)."""
    child = textwrap.dedent(f'''
        import sys
        for name in ('mmcv', 'mmengine', 'mmdet'):
            sys.modules[name] = None
        sys.argv = ['benchmark_norm.py', '--shape', '2,4,5,5,3,8', '--shape', '2,8,5,5,1,8', '--repeats', '1',
                    '--warmup', '4', '--threads', '1', '--markdown', {str(tmp_path / 'b.md')!r}]
        import runpy
        runpy.run_path({os.path.join(ROOT, 'tools', 'benchmark_norm.py')!r}, run_name='__main__')
    ''')
    result = subprocess.run([sys.executable, '-c', child], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'CBN-official' in result.stdout and 'official / ours' in result.stdout and 'BN+wgrad ops' in result.stdout
    assert '<!-- BEGIN norm-benchmark -->' in open(tmp_path / 'b.md').read()
