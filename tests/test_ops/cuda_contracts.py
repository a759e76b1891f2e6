"""CUDA's contracts, checked on CPU: a dispatch mode that rejects what torch's CUDA kernels reject, and the
layer cases every contract and host-sync test runs (each layer, each option, a few real training steps).

``CudaContractMode`` sees every aten call of the code under it. Each rule below mirrors one check of
torch's CUDA code path (``aten/src/ATen/native/cuda/Normalization.cu`` and ``Normalization.cuh``, the
device checks of TensorIterator and of the copy/index kernels): calls the CPU kernels accept but a GPU run
would refuse, or would pay for with a host synchronisation. Device rules only fire where a non-CPU device
takes part: run the model on the ``meta`` device (``meta_device()``) to exercise them without a GPU.
"""
import contextlib
import copy
import io

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import cbn_mmdet.ops as ops

__all__ = ['CudaContractError', 'CudaContractMode', 'LAYER_CASES', 'MODES', 'build_case', 'train_steps',
           'eval_forward', 'reload', 'meta_device', 'to_meta', 'case_params', 'KNOWN_HOST_SYNCS']

_REDUCED = (torch.float16, torch.bfloat16)

# Device -> host reads: each is a cudaMemcpy D2H followed by a stream synchronisation
# (at::native::_local_scalar_dense_cuda; equal() returns a host bool through it).
_HOST_READS = {'aten._local_scalar_dense.default', 'aten.item.default', 'aten.is_nonzero.default',
               'aten.equal.default'}
# Output shape depends on the data: nonzero_cuda_out copies the count to the host and synchronises; the
# ops below are built on it (or on the same count read).
_DATA_DEPENDENT_SHAPE = {'aten.nonzero.default', 'aten.masked_select.default', 'aten._unique2.default',
                         'aten.unique_dim.default', 'aten.unique_consecutive.default',
                         'aten.repeat_interleave.Tensor'}
# BN entry points whose arguments go to batch_norm_*_cuda_template: (input, weight, bias, running_mean,
# running_var) positions.
_BN_FORWARD = {'aten.native_batch_norm.default': (0, 1, 2, 3, 4),
               'aten._native_batch_norm_legit.default': (0, 1, 2, 3, 4),
               'aten._native_batch_norm_legit_functional.default': (0, 1, 2, 3, 4),
               'aten._native_batch_norm_legit.no_stats': (0, 1, 2, None, None),
               'aten._native_batch_norm_legit_no_training.default': (0, 1, 2, 3, 4),
               'aten._batch_norm_with_update.default': (0, 1, 2, 3, 4),
               'aten._batch_norm_with_update_functional.default': (0, 1, 2, 3, 4),
               'aten._batch_norm_no_update.default': (0, 1, 2, 3, 4),
               'aten.cudnn_batch_norm.default': (0, 1, 2, 3, 4)}
# Backward: (grad_out, input, weight, running_mean, running_var, save_mean, save_invstd) positions.
_BN_BACKWARD = {'aten.native_batch_norm_backward.default': (0, 1, 2, 3, 4, 5, 6),
                'aten.batch_norm_backward.default': (0, 1, 2, 3, 4, 5, 6)}
# The SyncBN-style kernels taking explicit statistics: name -> (input position, [statistic positions]).
_BN_STAT_KERNELS = {'aten.batch_norm_elemt.default': (0, (3, 4)),
                    'aten.batch_norm_backward_elemt.default': (1, (2, 3)),
                    'aten.batch_norm_backward_reduce.default': (1, (2, 3))}
_COPIES = {'aten._to_copy.default', 'aten.copy_.default', 'aten.copy.default'}


class CudaContractError(AssertionError):
    """A call a CUDA run would refuse (or pay a host synchronisation for)."""


def _acc_type(dtype):
    """at::toAccumulateType(dtype, /*is_cuda=*/true) for the floating types BN dispatches on."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tensors(args, kwargs):
    flat = []
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            flat.append(a)
        elif isinstance(a, (list, tuple)):
            flat.extend(t for t in a if isinstance(t, torch.Tensor))
    return flat


def _at(args, i):
    return args[i] if i is not None and i < len(args) else None


class CudaContractMode(TorchDispatchMode):
    """Raise :class:`CudaContractError` on the first call a CUDA run would reject.

    ``host_syncs=False`` leaves device->host reads to the host-sync tests (they are a cost, not an error,
    on CUDA); every other rule is always on. ``seen`` holds the name of every aten op that ran.
    """

    def __init__(self, host_syncs=True):
        super().__init__()
        self.host_syncs = host_syncs
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        self.seen.add(name)
        self._check(name, func, args, kwargs)
        return func(*args, **kwargs)

    # ------------------------------------------------------------------ rules
    def _check(self, name, func, args, kwargs):
        if self.host_syncs:
            self._rule_host_sync(name, args)
        self._rule_devices(name, args, kwargs)
        if name in _BN_FORWARD:
            pos = _BN_FORWARD[name]
            self._rule_bn_param_dtypes(name, args[pos[0]], [_at(args, i) for i in pos[1:]])
        if name in _BN_BACKWARD:
            self._rule_bn_backward(name, *[_at(args, i) for i in _BN_BACKWARD[name]])
        if name in _BN_STAT_KERNELS:
            self._rule_bn_stat_kernels(name, args)

    def _fail(self, rule, message):
        raise CudaContractError(f'{rule}: {message}')

    def _rule_host_sync(self, name, args):
        # _local_scalar_dense_cuda: cudaMemcpyAsync D2H + cudaStreamSynchronize (set_sync_debug_mode errors).
        if name in _HOST_READS:
            self._fail('host sync', f'{name} reads a device value on the host')
        # nonzero_cuda_out: the number of nonzeros is copied to the host before the output is allocated.
        if name in _DATA_DEPENDENT_SHAPE:
            if name == 'aten.repeat_interleave.Tensor' and len(args) > 1:
                return
            self._fail('host sync', f'{name} has a data-dependent output shape (nonzero count read on host)')
        # A tensor made from Python data (torch.tensor(...)): with device=<a GPU> it is a blocking copy from
        # pageable host memory (copy_kernel_cuda synchronises). Stricter than CUDA for a CPU scalar that
        # stays on the CPU, but no layer needs one in a training step.
        if name == 'aten.lift_fresh.default':
            self._fail('host sync', 'torch.tensor(<host data>) inside the step (a blocking host-to-device copy '
                       'when made on a GPU)')
        # index.Tensor with a bool mask: the mask is turned into indices by nonzero (same count read).
        if name == 'aten.index.Tensor':
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
                self._fail('host sync', 'boolean-mask indexing (aten.index with a bool index) calls nonzero')

    def _rule_devices(self, name, args, kwargs):
        tensors = _tensors(args, kwargs)
        devices = {t.device.type for t in tensors}
        if len(devices) <= 1 and name not in _COPIES:
            return
        if devices - {'cpu'}:
            # TensorIterator's compute_types / the index kernels' device checks: "Expected all tensors to
            # be on the same device"; only 0-dim CPU tensors are accepted as scalars.
            stray = [tuple(t.shape) for t in tensors if t.device.type == 'cpu' and t.dim() > 0]
            if stray and name not in _COPIES:
                self._fail('device', f'{name} mixes device tensors with CPU tensors of shape {stray}')
        if name in _COPIES and self.host_syncs:
            # copy_kernel_cuda: a CPU<->device copy without non_blocking synchronises the stream (a device
            # to host copy always has to wait for the producer).
            src = args[0] if name == 'aten._to_copy.default' else args[1]
            dst_device = kwargs.get('device') if name == 'aten._to_copy.default' else args[0].device
            dst_type = torch.device(dst_device).type if dst_device is not None else src.device.type
            if src.device.type != dst_type and 'cpu' in (src.device.type, dst_type) \
                    and not kwargs.get('non_blocking', False):
                self._fail('host sync', f'{name} copies {src.device.type} -> {dst_type} '
                           f'(shape {tuple(src.shape)}), a synchronising transfer on CUDA')

    def _rule_bn_param_dtypes(self, name, x, params):
        # Normalization.cu is_mixed_type(): the first defined of weight/bias/running stats fixes
        # stat_scalar_t; the packed accessors of batch_norm_*_cuda_template then require every other one
        # to have exactly that type, and it must be the input's type or float32 for a half/bf16 input.
        defined = [p for p in params if isinstance(p, torch.Tensor)]
        if not defined:
            return
        kinds = {p.dtype for p in defined}
        allowed = {x.dtype, torch.float32} if x.dtype in _REDUCED else {x.dtype}
        if len(kinds) > 1 or not kinds <= allowed:
            self._fail('batch-norm dtypes', f'{name}: input {x.dtype} with weight/bias/running statistics '
                       f'{[p.dtype for p in defined]} (CUDA needs one dtype: the input\'s, or float32 for '
                       'a half/bfloat16 input)')

    def _rule_bn_backward(self, name, grad_out, x, weight, running_mean, running_var, save_mean, save_invstd):
        # batch_norm_backward_cuda: TORCH_INTERNAL_ASSERT(save_mean->defined()) / (save_invstd->defined())
        # on every path but the fused one (taken only when grad_input is requested on a contiguous input).
        if save_mean is None or save_invstd is None:
            self._fail('batch-norm backward', f'{name}: save_mean/save_invstd undefined (CUDA asserts they '
                       'are defined)')
        # batch_norm_backward_kernel: input and grad_output share the input_scalar_t accessor.
        if grad_out.dtype != x.dtype:
            self._fail('batch-norm backward', f'{name}: grad_out {grad_out.dtype} with input {x.dtype}')
        # ... and save_mean/save_invstd are read as stat_accscalar_t (float32, float64 for double).
        acc = _acc_type(x.dtype)
        for label, t in (('save_mean', save_mean), ('save_invstd', save_invstd)):
            if t.numel() and t.dtype != acc:
                self._fail('batch-norm backward', f'{name}: {label} {t.dtype} with input {x.dtype} '
                           f'(CUDA reads it as {acc})')
        self._rule_bn_param_dtypes(name, x, [weight, running_mean, running_var])

    def _rule_bn_stat_kernels(self, name, args):
        x_pos, stat_pos = _BN_STAT_KERNELS[name]
        x = args[x_pos]
        stats = [args[i] for i in stat_pos]
        # batch_norm_backward_elemt_cuda / _reduce_cuda: "mean and invstd need to have the same data types".
        if stats[0].dtype != stats[1].dtype:
            self._fail('batch-norm statistics', f'{name}: mean {stats[0].dtype} and invstd {stats[1].dtype}')
        if self._channels_last_kernel(name, args):
            # The channels-last templates read mean/invstd through const_data_ptr<accscalar_t>().
            if stats[0].dtype != _acc_type(x.dtype):
                self._fail('batch-norm statistics', f'{name}: statistics {stats[0].dtype} with a channels-last '
                           f'{x.dtype} input (the channels-last kernel reads {_acc_type(x.dtype)})')
            # batch_norm_backward_elemt_cuda picks that kernel from grad_output's layout alone ("Input is
            # guaranteed to be channels-last compatible"): a contiguous input would be read in the wrong order.
            if name == 'aten.batch_norm_backward_elemt.default' and not _uses_channels_last_kernels(args[1]):
                self._fail('batch-norm channels_last', f'{name}: channels-last grad_out with an input of strides '
                           f'{args[1].stride()} (read as channels-last)')
            return
        # The accscalar_t template is chosen only for (half|bf16 input, float32 statistics); otherwise the
        # statistics are read with the input's type.
        want = {x.dtype, torch.float32} if x.dtype in _REDUCED else {x.dtype}
        if stats[0].dtype not in want:
            self._fail('batch-norm statistics', f'{name}: statistics {stats[0].dtype} with input {x.dtype}')

    @staticmethod
    def _channels_last_kernel(name, args):
        """Does the CUDA op take its channels-last template (the conditions of Normalization.cu)?"""
        if name == 'aten.batch_norm_elemt.default':
            return _uses_channels_last_kernels(args[0]) and all(
                t is None or t.is_contiguous() for t in (args[1], args[2], args[3], args[4]))
        if name == 'aten.batch_norm_backward_elemt.default':
            return _uses_channels_last_kernels(args[0])
        weight = args[4]
        return (_uses_channels_last_kernels(args[0]) and _uses_channels_last_kernels(args[1])
                and (weight is None or weight.is_contiguous()) and args[2].is_contiguous() and args[3].is_contiguous())


def _uses_channels_last_kernels(t):
    # Normalization.cu batch_norm_use_channels_last_kernels().
    return t.dim() == 4 and (t.is_contiguous(memory_format=torch.channels_last)
                             or (t.is_contiguous() and t.stride()[1] == 1))


# ---------------------------------------------------------------------- layer cases
C_IN, C_OUT, SIZE, BATCH = 3, 8, 6, 2


def _cbn(**kwargs):
    def build():
        conv = nn.Conv2d(C_IN, C_OUT, 3, padding=1, bias=False)
        norm = ops.CrossIterationBatchNorm2d(C_OUT, **kwargs)
        if norm.buffer_num:
            ops.bind_cbn_to_conv(norm, conv)
        return conv, norm
    return build


def _ws_cbn():
    conv = ops.WeightStandardizedConv2d(C_IN, C_OUT, 3, padding=1, bias=False)
    norm = ops.CrossIterationBatchNorm2d(C_OUT, buffer_num=2)
    ops.bind_cbn_to_conv(norm, conv)
    return conv, norm


def _sync_cbn():
    conv = nn.Conv2d(C_IN, C_OUT, 3, padding=1, bias=False)
    norm = ops.SyncCrossIterationBatchNorm2d(C_OUT, buffer_num=2)
    ops.bind_cbn_to_conv(norm, conv)
    return conv, norm


def _plain(conv_cls, norm_factory):
    def build():
        return conv_cls(C_IN, C_OUT, 3, padding=1, bias=False), norm_factory()
    return build


LAYER_CASES = {
    'cbn_plain': _cbn(buffer_num=0),
    'cbn_burnin': _cbn(buffer_num=2, burnin=2),
    'cbn_window': _cbn(buffer_num=2),
    'cbn_two_stage_false': _cbn(buffer_num=2, burnin=3, two_stage=False),
    'cbn_frozen': _cbn(buffer_num=2, frozen=True),
    'cbn_grad_through_window': _cbn(buffer_num=2, grad_through_window=True),
    'cbn_momentum_none': _cbn(buffer_num=2, momentum=None),
    'cbn_stat_grad_sample': _cbn(buffer_num=2, stat_grad_sample=0.25),
    'cbn_eps_inside_sqrt': _cbn(buffer_num=2, eps_inside_sqrt=True),
    'cbn_wsconv': _ws_cbn,
    'sync_cbn': _sync_cbn,
    'sync_bn': _plain(nn.Conv2d, lambda: ops.SyncBatchNorm(C_OUT)),
    'sync_bn_momentum_none': _plain(nn.Conv2d, lambda: ops.SyncBatchNorm(C_OUT, momentum=None)),
    'bcn_wsconv': _plain(ops.WeightStandardizedConv2d, lambda: ops.BatchChannelNorm2d(C_OUT, num_groups=4)),
    'bcn_wsconv_estimate': _plain(ops.WeightStandardizedConv2d,
                                  lambda: ops.BatchChannelNorm2d(C_OUT, num_groups=4, estimate_stats=True)),
    'bcn_momentum_none': _plain(ops.WeightStandardizedConv2d,
                                lambda: ops.BatchChannelNorm2d(C_OUT, num_groups=4, momentum=None)),
    # K = real_B / B = 2 rows and a 1-step warm-up: the moving averages are in use from step 3 on.
    'mabn_cenconv': _plain(ops.CenteredConv2d,
                           lambda: ops.MovingAverageBatchNorm2d(C_OUT, B=BATCH, real_B=2 * BATCH, warmup_iters=1)),
}
if hasattr(ops, 'BatchRenorm2d'):
    LAYER_CASES['brn'] = _plain(nn.Conv2d, lambda: ops.BatchRenorm2d(C_OUT, warmup_iters=1, r_ramp_iters=2,
                                                                      d_ramp_iters=2))

# Host syncs present today (file: line of the read); the tests mark these cases xfail(strict=True).
# Layer cases that still read a device value on the host in a training step (none left: the cumulative
# average is a device-side factor everywhere); kept so that a new known sync is declared, not hidden.
KNOWN_HOST_SYNCS = {}



def case_params(xfails):
    """The case names for ``parametrize``, those in ``xfails`` marked ``xfail(strict=True)``."""
    return [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=xfails[name])) if name in xfails
            else name for name in sorted(LAYER_CASES)]


# fp32: plain; channels_last: model and input in channels_last; bf16_autocast: CPU autocast to bfloat16.
MODES = ('fp32', 'channels_last', 'bf16_autocast')


def build_case(name, mode='fp32', seed=0):
    """``nn.Sequential(conv, norm, ReLU)`` of a case, deterministic weights, laid out for ``mode``."""
    torch.manual_seed(seed)
    conv, norm = LAYER_CASES[name]()
    model = nn.Sequential(conv, norm, nn.ReLU())
    if mode == 'channels_last':
        model.to(memory_format=torch.channels_last)
    return model


def _batch(step, mode, device='cpu'):
    if torch.device(device).type == 'meta':      # made on the device: no transfer inside a checked step
        return (torch.empty(BATCH, C_IN, SIZE, SIZE, device='meta', requires_grad=True),
                torch.empty(BATCH, C_OUT, SIZE, SIZE, device='meta'))
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, C_IN, SIZE, SIZE, generator=gen)
    target = torch.randn(BATCH, C_OUT, SIZE, SIZE, generator=gen)
    if mode == 'channels_last':
        x = x.to(memory_format=torch.channels_last)
    return x.to(device).requires_grad_(), target.to(device)


def _autocast(mode, device_type):
    if mode == 'bf16_autocast':
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_steps(model, steps, mode='fp32', optimizer=None, start=0, device='cpu'):
    """``steps`` SGD training steps (forward, backward, optimizer step); returns the optimizer."""
    model.train()
    if optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for step in range(start, start + steps):
        x, target = _batch(step, mode, device)
        with _autocast(mode, torch.device(device).type):
            out = model(x)
        loss = (out.float() * target).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def eval_forward(model, mode='fp32', device='cpu'):
    model.eval()
    x, _ = _batch(99, mode, device)
    with torch.no_grad(), _autocast(mode, torch.device(device).type):
        out = model(x.detach())
    model.train()
    return out


def reload(name, model, mode='fp32'):
    """A fresh model of case ``name`` loaded from ``model``'s checkpoint (through torch.save/load)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = build_case(name, mode, seed=1)
    fresh.load_state_dict(torch.load(buf))
    return fresh


@contextlib.contextmanager
def meta_device():
    """Let layers run on ``meta`` (a non-CPU device with autograd and no data): ``torch.autocast`` has no
    meta backend, so ``torch.autocast('meta', enabled=False)`` becomes a no-op inside this block."""
    real = torch.autocast

    class _Autocast:
        def __new__(cls, device_type, *args, **kwargs):
            if device_type == 'meta':
                return contextlib.nullcontext()
            return real(device_type, *args, **kwargs)

    torch.autocast = _Autocast
    try:
        yield
    finally:
        torch.autocast = real


def to_meta(model):
    return copy.deepcopy(model).to('meta')
