"""cbn_mmdet.ops must import, and its layers run, with torch alone (e.g. on a GPU box without mmcv)."""
import subprocess
import sys
import textwrap

_CHILD = textwrap.dedent('''
    import sys
    for name in ('mmcv', 'mmengine', 'mmdet'):
        sys.modules[name] = None     # any `import mmcv...` now raises ImportError
    import torch
    import cbn_mmdet.ops as ops
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
    cbn = ops.CrossIterationBatchNorm2d(4, buffer_num=2)
    ops.bind_cbn_to_conv(cbn, conv)
    for _ in range(3):
        cbn(conv(torch.randn(2, 3, 6, 6, requires_grad=True))).sum().backward()
    assert int(cbn.window_filled.sum()) == 2
    ops.SyncBatchNorm(4)(torch.randn(2, 4, 3, 3))
    ops.MovingAverageBatchNorm2d(4, B=1, real_B=2)(torch.randn(2, 4, 3, 3))
    ops.BatchChannelNorm2d(4, num_groups=2)(torch.randn(2, 4, 3, 3))
    print('ok')
''')


def test_ops_import_with_mmcv_mmengine_mmdet_unimportable():
    result = subprocess.run([sys.executable, '-c', _CHILD], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith('ok')
