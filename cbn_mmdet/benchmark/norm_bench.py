"""Conv + norm + ReLU training-step benchmark: time, peak memory and persistent state per norm layer.

Every case is ``relu(norm(conv(x)))`` followed by a backward with a fixed random output gradient and an
SGD step (outside the timed region), so the conv weights move between steps as in training and CBN
compensates a full window of stale entries. The timed region is forward + backward. Cases of one shape
are run *interleaved* (one step of each case per round, the order rotated every round) after a warm-up,
and the median per case is reported; on CUDA each step is timed with CUDA events after a synchronize.
Each case's top-level aten ops per training step are counted too (``op_count``; deterministic).

The case ``CBN-official`` is the official algorithm; its implementation is not part of this package (a
wheel ships no reference layers): the caller passes a factory ``official(num_features, buffer_num)``
returning a module called as ``norm(x, conv_weight)`` (``tools/benchmark_norm.py`` passes the test
oracle's module).

Imports torch and ``cbn_mmdet.ops`` only (runs on a CUDA machine without mmcv).
"""
import math
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..ops import (
    BatchChannelNorm2d,
    CenteredConv2d,
    CrossIterationBatchNorm2d,
    MovingAverageBatchNorm2d,
    bind_cbn_to_conv,
    second_moment_weight_grad,
)
from .memory import module_state_bytes, peak_step_bytes
from .op_count import count_aten_ops

__all__ = ['ConvShape', 'NORMS', 'DEFAULT_NORMS', 'BNPlusWeightGrad', 'fpn_shapes', 'roi_shapes',
           'small_map_shapes', 'default_shapes', 'build_case', 'case_op_counts', 'run_shape', 'run_norm_benchmark',
           'NormResult', 'time_rows', 'op_rows', 'memory_rows', 'profile_case']

BUFFER_NUM = 3                    # the paper's window (buffer3)
FAST_SAMPLE = 0.25                # stat_grad_sample of the 'CBN-fast' case
# Display order; 'BN' is the reference of every ratio. 'BN+wgrad' is conv + BN + one extra conv
# weight-gradient (that of dν/dW, nothing else): the compute floor of exact CBN, measured in the same run.
NORMS = ('BN', 'GN', 'BCN', 'MABN', 'BN+wgrad', 'CBN', 'CBN-fast', 'CBN-official')
DEFAULT_NORMS = NORMS


class BNPlusWeightGrad(nn.BatchNorm2d):
    """BatchNorm2d that also computes ``second_moment_weight_grad`` of its conv, and discards it."""

    def __init__(self, num_features, conv):
        super().__init__(num_features)
        self._conv = (conv,)
        self._input = None
        conv.register_forward_pre_hook(self._capture)

    def _capture(self, conv, args):
        self._input = args[0]

    def forward(self, x):
        conv, inp, self._input = self._conv[0], self._input, None
        with torch.no_grad():
            second_moment_weight_grad(inp, x.detach(), conv.weight.shape, conv.stride, conv.padding, conv.dilation,
                                      conv.groups)
        return super().forward(x)


@dataclass(frozen=True)
class ConvShape:
    """A conv feeding a norm: input ``(n, cin, h, w)``, ``cout`` outputs, ``k``×``k`` kernel, stride 1."""

    group: str        # 'FPN', 'RoI', 'small map' or 'custom'
    name: str
    n: int
    cin: int
    cout: int
    h: int
    w: int
    k: int

    @property
    def label(self):
        return f'{self.name} {self.n}x{self.cin}x{self.h}x{self.w} {self.k}x{self.k}->{self.cout}'


# FPN levels of an 800x1333 image padded to 800x1344 (mmdet pads to a multiple of 32): P2..P5 at
# strides 4..32; 1x1 laterals read ResNet-50's C2..C5 (256, 512, 1024, 2048 channels).
_FPN_LEVELS = (('P2', 200, 336, 256), ('P3', 100, 168, 512), ('P4', 50, 84, 1024), ('P5', 25, 42, 2048))


def fpn_shapes(batches=(1, 2, 4), levels=('P2', 'P3', 'P4', 'P5'), kernels=(3, 1)):
    shapes = []
    for level, h, w, c_lateral in _FPN_LEVELS:
        if level not in levels:
            continue
        for n in batches:
            for k in kernels:
                cin = 256 if k == 3 else c_lateral
                name = f'{level} {"fpn 3x3" if k == 3 else "lateral 1x1"}'
                shapes.append(ConvShape('FPN', name, n, cin, 256, h, w, k))
    return shapes


def roi_shapes(rois=(64, 128, 256, 512), sizes=(7, 14)):
    # 7x7: the 4conv1fc box head's convs; 14x14: the 4-conv mask head's convs.
    return [ConvShape('RoI', 'box head 3x3' if s == 7 else 'mask head 3x3', r, 256, 256, s, s, 3)
            for s in sizes for r in rois]


def small_map_shapes():
    """A small 32x32 map at batch 2, 256 channels, 3x3 and 1x1: where per-op overhead weighs most."""
    return [ConvShape('small map', 'small map 3x3', 2, 256, 256, 32, 32, 3),
            ConvShape('small map', 'small map 1x1', 2, 256, 256, 32, 32, 1)]


def default_shapes(full=False):
    """``--full``: every FPN level at batch 1, 2, 4 (3x3 and 1x1) and every RoI shape; else a subset
    that a 2-core CPU runs in minutes (the small FPN levels at batch 2, the smallest RoI batches, 64 RoIs
    at the mask head's 14x14). Both end with :func:`small_map_shapes`."""
    if full:
        return fpn_shapes() + roi_shapes() + small_map_shapes()
    return (fpn_shapes(batches=(2,), levels=('P4', 'P5'))
            + roi_shapes(rois=(64,), sizes=(7, 14)) + roi_shapes(rois=(256,), sizes=(7,)) + small_map_shapes())


@dataclass
class Case:
    norm_name: str
    conv: nn.Module
    norm: nn.Module
    optimizer: torch.optim.Optimizer
    pass_weight: bool = False

    def forward_backward(self, x, grad, relu=True):
        y = self.conv(x)
        out = self.norm(y, self.conv.weight) if self.pass_weight else self.norm(y)
        if relu:
            out = torch.relu(out)
        out.backward(grad)

    def optimizer_step(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def build_norm(norm_name, channels, conv, batch, official=None):
    """The norm module of a case; binds CBN to ``conv``. Returns ``(norm, pass_weight)``.

    ``official``: the factory of the ``CBN-official`` case (see the module doc)."""
    if norm_name == 'BN':
        return nn.BatchNorm2d(channels), False
    if norm_name == 'BN+wgrad':
        return BNPlusWeightGrad(channels, conv), False
    groups = math.gcd(32, channels)    # 32 groups as in the configs (fewer for tiny test shapes)
    if norm_name == 'GN':
        return nn.GroupNorm(groups, channels), False
    if norm_name == 'BCN':
        return BatchChannelNorm2d(channels, num_groups=groups, estimate_stats=True), False
    if norm_name == 'MABN':
        # K = real_B / B = 2 past rows; warmup_iters=0 so the warmed-up steps use the moving averages.
        return MovingAverageBatchNorm2d(channels, B=batch, real_B=2 * batch, warmup_iters=0), False
    if norm_name in ('CBN', 'CBN-fast'):
        fast = dict(stat_grad_sample=FAST_SAMPLE) if norm_name == 'CBN-fast' else {}
        norm = CrossIterationBatchNorm2d(channels, buffer_num=BUFFER_NUM, burnin=0, **fast)
        bind_cbn_to_conv(norm, conv)
        return norm, False
    if norm_name == 'CBN-official':
        if official is None:
            raise ValueError("norm 'CBN-official': no official-algorithm factory given (official=None); pass "
                             'official=callable(num_features, buffer_num) or leave the case out')
        return official(channels, buffer_num=BUFFER_NUM), True
    raise ValueError(f'unknown norm {norm_name!r}; choose from {", ".join(NORMS)}')


def build_case(norm_name, shape, device='cpu', lr=1e-3, seed=0, official=None):
    torch.manual_seed(seed)
    conv_cls = CenteredConv2d if norm_name == 'MABN' else nn.Conv2d
    conv = conv_cls(shape.cin, shape.cout, shape.k, padding=shape.k // 2, bias=False)
    norm, pass_weight = build_norm(norm_name, shape.cout, conv, shape.n, official)
    conv.to(device).train()
    norm.to(device).train()
    params = list(conv.parameters()) + list(norm.parameters())
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
    return Case(norm_name, conv, norm, optimizer, pass_weight)


@dataclass
class NormResult:
    shape: ConvShape
    norm_name: str
    times_s: list = field(default_factory=list)
    state_bytes: int = 0             # persistent state of the norm layer (see memory.module_state_bytes)
    peak_bytes: int = None           # peak memory allocated during one training step (None: not measured)
    ops: int = None                  # top-level aten ops of one forward + backward, conv included
    ops_without_conv: int = None     # the same minus those of a plain conv's forward + backward

    @property
    def median_s(self):
        return statistics.median(self.times_s)


class _Timer:
    def __init__(self, device):
        self.cuda = torch.device(device).type == 'cuda'

    def time(self, fn):
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


def _fresh_grads(case, x):
    x.grad = None
    for p in list(case.conv.parameters()) + list(case.norm.parameters()):
        p.grad = None


def case_op_counts(case, x, grad):
    """Top-level aten ops of one forward + backward of ``case`` (window full when called after the
    warm-up): ``(conv included, conv excluded)``. *Excluded* subtracts the ops of a plain ``nn.Conv2d``
    of the same geometry (no hooks, so a layer's conv hooks and MABN's weight centring count as the
    norm's); gradients are cleared before each count so that both see fresh accumulation."""
    conv = case.conv
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=False)
    plain.to(device=conv.weight.device, dtype=conv.weight.dtype)
    x.grad = None
    _, conv_counts = count_aten_ops(lambda: plain(x).backward(grad))
    _fresh_grads(case, x)
    _, counts = count_aten_ops(case.forward_backward, x, grad, relu=False)
    x.grad = None
    included = sum(counts.values())
    return included, included - sum(conv_counts.values())


def run_shape(shape, norms=DEFAULT_NORMS, repeats=10, warmup=None, device='cpu', measure_peak=True,
              seed=0, log=None, official=None, count_ops=True):
    """Benchmark every norm of ``norms`` on one shape; return ``{norm_name: NormResult}``.

    ``official``: the factory of the ``CBN-official`` case (module doc); ``count_ops``: also count each
    case's aten ops per step (:func:`case_op_counts`, after the timed steps)."""
    warmup = BUFFER_NUM + 2 if warmup is None else max(warmup, BUFFER_NUM + 1)   # CBN window full
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.n, shape.cin, shape.h, shape.w, generator=gen).to(device).requires_grad_()
    grad = torch.randn(shape.n, shape.cout, shape.h, shape.w, generator=gen).to(device)
    cases = [build_case(name, shape, device, seed=seed, official=official) for name in norms]
    results = {case.norm_name: NormResult(shape, case.norm_name) for case in cases}
    timer = _Timer(device)

    def step(case):
        case.forward_backward(x, grad)
        x.grad = None

    for case in cases:
        for _ in range(warmup):
            step(case)
            case.optimizer_step()
    for r in range(repeats):
        for i in range(len(cases)):
            case = cases[(i + r) % len(cases)]      # rotate the order: no case always runs first
            results[case.norm_name].times_s.append(timer.time(lambda: step(case)))
            case.optimizer_step()
    for case in cases:
        result = results[case.norm_name]
        result.state_bytes = module_state_bytes(case.norm)
        if count_ops:
            result.ops, result.ops_without_conv = case_op_counts(case, x, grad)
            case.optimizer_step()
        if measure_peak:
            result.peak_bytes = peak_step_bytes(lambda: step(case), device)
            case.optimizer_step()
        if log is not None:
            log(f'  {shape.label:48s} {case.norm_name:13s} {1e3 * result.median_s:9.2f} ms')
    return results


def run_norm_benchmark(shapes, norms=DEFAULT_NORMS, repeats=10, warmup=None, device='cpu', measure_peak=True,
                       log=None, official=None, count_ops=True):
    """Run :func:`run_shape` on every shape; return a list of ``{norm_name: NormResult}`` (one per shape)."""
    return [run_shape(shape, norms, repeats, warmup, device, measure_peak, log=log, official=official,
                      count_ops=count_ops) for shape in shapes]


# ---------------------------------------------------------------------------------------------- reports
def _ratio(results, name, ref='BN'):
    if name not in results or ref not in results:
        return None
    return results[name].median_s / results[ref].median_s


def _shape_of(results):
    return next(iter(results.values())).shape


def time_rows(all_results, norms):
    """Rows ``shape | <norm> ms (×BN) ... | official/ours | CBN − floor``: the last is CBN's distance to its
    compute floor (``BN+wgrad``: conv + BN + one weight-gradient), in units of the conv+BN step."""
    rows = []
    for results in all_results:
        row = [_shape_of(results).label]
        for name in norms:
            if name not in results:
                row.append('')
                continue
            ratio = _ratio(results, name)
            ms = 1e3 * results[name].median_s
            row.append(f'{ms:.1f}' if name == 'BN' or ratio is None else f'{ms:.1f} ({ratio:.2f}x)')
        ours, official = results.get('CBN'), results.get('CBN-official')
        row.append(f'{official.median_s / ours.median_s:.2f}x' if ours and official else '')
        cbn, floor = _ratio(results, 'CBN'), _ratio(results, 'BN+wgrad')
        row.append(f'{cbn - floor:+.2f}' if cbn is not None and floor is not None else '')
        rows.append(row)
    return ['conv shape'] + [f'{n} ms' + ('' if n == 'BN' else ' (x BN)') for n in norms] + \
        ['official / ours', 'CBN − floor (x BN)'], rows


def op_rows(all_results, norms):
    """Rows ``shape | <norm> ops without conv / with conv ...`` (top-level aten ops of one training step)."""
    rows = []
    for results in all_results:
        row = [_shape_of(results).label]
        for name in norms:
            res = results.get(name)
            row.append(f'{res.ops_without_conv} / {res.ops}' if res is not None and res.ops is not None else '')
        rows.append(row)
    return ['conv shape'] + [f'{n} ops' for n in norms], rows


def memory_rows(all_results):
    """Rows: extra persistent state per CBN layer (ours, fast, official) vs the budget, and step peaks."""
    from .memory import cbn_extra_bound_bytes
    from .report import fmt_bytes
    rows = []
    for results in all_results:
        shape = _shape_of(results)
        bn = results.get('BN')
        if bn is None:
            continue
        w_numel = shape.cout * shape.cin * shape.k * shape.k
        bound = cbn_extra_bound_bytes(w_numel, shape.cout, BUFFER_NUM)
        row = [shape.label]
        for name in ('CBN', 'CBN-fast', 'CBN-official'):
            res = results.get(name)
            row.append(fmt_bytes(res.state_bytes - bn.state_bytes) if res else '')
        extra_peak = None
        if results.get('CBN') and results['CBN'].peak_bytes is not None and bn.peak_bytes is not None:
            extra_peak = results['CBN'].peak_bytes - bn.peak_bytes
        total = None if extra_peak is None or 'CBN' not in results else \
            results['CBN'].state_bytes - bn.state_bytes + max(extra_peak, 0)
        row += [fmt_bytes(bound), fmt_bytes(total),
                'yes' if total is not None and total <= bound else ('n/a' if total is None else 'NO')]
        for name in ('BN', 'GN', 'CBN', 'CBN-fast', 'CBN-official'):
            res = results.get(name)
            row.append(fmt_bytes(res.peak_bytes) if res else '')
        rows.append(row)
    header = ['conv shape', 'extra state CBN', 'CBN-fast', 'official', 'budget n(3|W|+2C)+2|W|',
              'CBN extra state + extra step peak', 'within budget', 'step peak BN', 'GN', 'CBN', 'CBN-fast',
              'official']
    return header, rows


def profile_case(norm_name, shape, steps=5, device='cpu', row_limit=15, seed=0, official=None):
    """torch.profiler table (self CPU time) of ``steps`` warmed-up training steps of one case."""
    from torch.profiler import ProfilerActivity, profile
    case = build_case(norm_name, shape, device, seed=seed, official=official)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.n, shape.cin, shape.h, shape.w, generator=gen).to(device).requires_grad_()
    grad = torch.randn(shape.n, shape.cout, shape.h, shape.w, generator=gen).to(device)
    for _ in range(BUFFER_NUM + 2):
        case.forward_backward(x, grad)
        case.optimizer_step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == 'cuda' else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            case.forward_backward(x, grad)
            x.grad = None
            case.optimizer_step()
    sort = 'self_cuda_time_total' if torch.device(device).type == 'cuda' else 'self_cpu_time_total'
    return prof.key_averages().table(sort_by=sort, row_limit=row_limit, max_name_column_width=40)
