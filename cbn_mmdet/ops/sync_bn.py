"""Synchronized batch normalization that also runs on CPU (gloo).

Batch Normalization: Accelerating Deep Network Training by Reducing Internal Covariate Shift,
S. Ioffe and C. Szegedy, ICML 2015, https://arxiv.org/abs/1502.03167

``torch.nn.SyncBatchNorm`` refuses CPU tensors as soon as a process group is initialised (even one
of size 1), so a multi-process CPU run (gloo) cannot use it. :class:`SyncBatchNorm` here is a strict
superset: on devices torch supports it *is* torch's code path, elsewhere it pools the statistics
with :func:`~cbn_mmdet.ops.distributed.sync_weighted_mean`.

.. code-block:: bibtex

    @inproceedings{ioffe2015batch,
      title={Batch Normalization: Accelerating Deep Network Training by Reducing Internal
             Covariate Shift},
      author={Ioffe, Sergey and Szegedy, Christian},
      booktitle={ICML},
      year={2015}
    }
"""
import inspect

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from ._amp import autocast_off
from ._bn_common import batch_mean_var, lerp_running_stats_, momentum_factor
from ._validate import check_eps, check_positive_int, check_unit_interval
from .distributed import get_world_size, sync_weighted_mean

__all__ = ['SyncBatchNorm', 'sync_batch_norm']

_OWNER = 'SyncBatchNorm'
# ``bias=False`` (affine weight without a shift) is recent in torch; pass it through only when the
# installed torch knows it.
_TORCH_HAS_BIAS_KW = 'bias' in inspect.signature(torch.nn.SyncBatchNorm.__init__).parameters


def _torch_sync_devices():
    """Device types ``torch.nn.SyncBatchNorm`` accepts in its synchronised branch."""
    get_name = getattr(torch._C, '_get_privateuse1_backend_name', None)
    private = get_name() if get_name is not None else 'privateuseone'
    return ('cuda', 'hpu', 'xpu', private)


def sync_batch_norm(x, weight, bias, running_mean, running_var, momentum, eps, group=None,
                    num_batches_tracked=None):
    r"""Training-mode batch norm with statistics pooled over ``group``; pure torch, any device.

    Each rank computes the per-channel mean and mean of squares of its input over ``N`` and the
    spatial dims, in float32 (float64 stays float64), and :func:`sync_weighted_mean` turns them into
    global ones weighted by the local element counts (one ``all_reduce`` forward, one backward).
    The input is normalised with the biased global variance
    :math:`\sigma^2 = \mathrm{E}[x^2] - \mathrm{E}[x]^2`; the running variance is updated with the
    unbiased one, :math:`\sigma^2 C / (C - 1)` with :math:`C` the global count. Gradients come from
    autograd through these ops and are those of the sum of the per-rank losses.

    A rank with an empty batch returns an empty output but still joins both collectives. When the
    global count is 0 the running statistics are left untouched; when it is 1 the running variance
    is updated with the biased (zero) variance instead of dividing by zero. Neither case syncs with
    the host.

    Args:
        x (Tensor): input ``(N, C, *)``.
        weight, bias (Tensor | None): affine parameters ``(C,)``.
        running_mean, running_var (Tensor | None): buffers updated in place when given.
        momentum (float | None): update factor; ``None`` means a cumulative average, which needs
            ``num_batches_tracked`` (already incremented for this batch).
        eps (float): added to the variance.
        group (ProcessGroup, optional): group to synchronise over. Default: the whole world.
        num_batches_tracked (Tensor, optional): counter used when ``momentum`` is ``None``.

    Returns:
        Tensor: normalised input, dtype of ``x``.
    """
    stat_dtype = torch.promote_types(x.dtype, torch.float32)
    num_channels = x.size(1)
    reduce_dims = [0] + list(range(2, x.dim()))
    local_count = x.numel() // num_channels if num_channels else 0
    with autocast_off(x.device.type):
        xf = x.to(stat_dtype)
        # Sum / max(n, 1): an empty batch gives zeros (not NaN) and a count of 0.
        denom = float(max(local_count, 1))
        mean = xf.sum(reduce_dims) / denom
        sq_mean = (xf * xf).sum(reduce_dims) / denom
        (mean, sq_mean), total = sync_weighted_mean((mean, sq_mean), local_count, group)
        var = (sq_mean - mean * mean).clamp_min(0)
        invstd = torch.rsqrt(var + eps)

        shape = [1, num_channels] + [1] * (x.dim() - 2)
        out = (xf - mean.reshape(shape)) * invstd.reshape(shape)
        if weight is not None:
            out = out * weight.to(stat_dtype).reshape(shape)
        if bias is not None:
            out = out + bias.to(stat_dtype).reshape(shape)

        if running_mean is not None or running_var is not None:
            with torch.no_grad():
                if momentum is None:
                    factor = 1.0 / num_batches_tracked.to(stat_dtype)
                else:   # a fill kernel, not a blocking copy of a host value
                    factor = torch.full((), momentum, dtype=stat_dtype, device=x.device)
                # Without any element there is nothing to learn from: keep the buffers.
                factor = torch.where(total > 0, factor, torch.zeros_like(factor))
                if running_mean is not None:
                    running_mean.lerp_(mean.to(running_mean.dtype), factor.to(running_mean.dtype))
                if running_var is not None:
                    bessel = torch.where(total > 1, total / (total - 1), torch.ones_like(total))
                    unbiased = var * bessel
                    running_var.lerp_(unbiased.to(running_var.dtype), factor.to(running_var.dtype))
    return out.to(x.dtype)


_ddp_hook_handle = None


def _accept_in_cpu_ddp(parent, name, module):
    """Module-registration hook: let torch DDP wrap a CPU model holding this SyncBatchNorm.

    DDP's constructor refuses every ``torch.nn.SyncBatchNorm`` in a CPU module ("SyncBatchNorm layers only
    work with GPU modules") because torch's forward needs CUDA; ours synchronises on CPU itself (gloo), so
    for a model whose synchronised BNs are all ours, DDP's check is narrowed to the layers that are not.
    DDP assigns ``self.module`` before it runs the check, which is when this hook sees it.
    """
    from torch.nn.parallel import DistributedDataParallel
    if not (isinstance(parent, DistributedDataParallel) and name == 'module' and module is not None):
        return None
    if not any(isinstance(m, SyncBatchNorm) for m in module.modules()):
        return None
    original = type(parent)._passing_sync_batchnorm_handle

    def check_foreign_sync_bn_only(ddp_self, wrapped):
        foreign = [m for m in wrapped.modules() if isinstance(m, torch.nn.SyncBatchNorm)
                   and not isinstance(m, SyncBatchNorm)]
        if foreign:
            return original(ddp_self, foreign[0])
        return None

    parent._passing_sync_batchnorm_handle = check_foreign_sync_bn_only.__get__(parent)
    return None


def _install_ddp_hook():
    global _ddp_hook_handle
    if _ddp_hook_handle is None:
        from torch.nn.modules.module import register_module_module_registration_hook
        _ddp_hook_handle = register_module_module_registration_hook(_accept_in_cpu_ddp)


class SyncBatchNorm(torch.nn.SyncBatchNorm, _BatchNorm):
    r"""Synchronized Batch Normalization for CUDA *and* CPU process groups.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    with mean and (biased) variance taken per channel over the batches of all ranks of the process
    group, as in :class:`torch.nn.SyncBatchNorm`.

    Why this class exists: torch's SyncBatchNorm raises ``ValueError`` for CPU tensors whenever a
    process group is initialised, which rules out multi-process CPU (gloo) training and testing.
    This class is a strict superset:

    * on CUDA (and the other devices torch's synchronised kernel accepts) with a group of size > 1
      it calls ``torch.nn.SyncBatchNorm.forward``: results are identical to torch's;
    * in eval mode, without an initialised process group, or with a group of size 1 it is plain
      ``F.batch_norm``, like torch (torch itself raises here on CPU with a size-1 group);
    * on any other device with a group of size > 1 it uses :func:`sync_batch_norm`: per-rank sum
      and sum of squares (float32) and counts pooled with one ``all_reduce``, normalisation with the
      biased global variance, ``running_var`` updated with the unbiased one. Uneven batch sizes and
      ranks with an empty batch are supported (the empty rank returns an empty output and still
      joins the collectives); statistics stay float32 under ``torch.autocast``, the output has the
      input's dtype.

    Running-statistics semantics (``momentum``, ``momentum=None`` cumulative average,
    ``num_batches_tracked``, ``track_running_stats``) and the state-dict keys are those of torch's
    batch norms, so BN checkpoints load. It subclasses ``_BatchNorm`` directly, so code keyed on that
    name or type (``norm_eval``, ``init_cfg`` with ``layer='_BatchNorm'``) treats it as batch norm.

    Args:
        num_features (int): :math:`C` of an input of size :math:`(N, C, +)`.
        eps (float): added to the variance for numerical stability. Default: ``1e-5``.
        momentum (float | None): factor of the running-statistics update; ``None`` for a cumulative
            average. Default: ``0.1``.
        affine (bool): learnable per-channel :math:`\gamma`, :math:`\beta`. Default: ``True``.
        track_running_stats (bool): keep running mean / variance for eval. Default: ``True``.
        process_group (ProcessGroup, optional): group to synchronise over. Default: the whole world.
        device, dtype: factory keywords, as in torch.
        bias (bool, keyword-only): learn :math:`\beta` when ``affine``. Default: ``True``. Only on a
            torch whose ``SyncBatchNorm`` accepts it.

    Shape:
        - Input: :math:`(N, C, +)` (at least 2D, like torch's SyncBatchNorm)
        - Output: :math:`(N, C, +)` (same shape as input)

    Example:
        >>> import torch.distributed as dist
        >>> dist.init_process_group('gloo', init_method='tcp://127.0.0.1:29500',
        ...                         rank=rank, world_size=2)
        >>> bn = SyncBatchNorm(16)
        >>> y = bn(torch.randn(rank + 1, 16, 8, 8))   # statistics over all 3 samples
        >>> model = SyncBatchNorm.convert_sync_batchnorm(model)  # BatchNorm*d -> SyncBatchNorm
    """

    _abbr_ = 'bn'

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None, *, bias=True):
        num_features = check_positive_int('num_features', num_features, _OWNER)
        eps = check_eps(eps, _OWNER)
        momentum = check_unit_interval('momentum', momentum, _OWNER, allow_none=True)
        extra = {}
        if not bias:
            if not _TORCH_HAS_BIAS_KW:
                raise ValueError(f'{_OWNER}: bias=False needs a torch whose SyncBatchNorm accepts '
                                 f'`bias` (torch {torch.__version__} does not), got bias={bias!r}')
            extra['bias'] = False
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group,
                         device=device, dtype=dtype, **extra)
        _install_ddp_hook()

    def _own_sync_group(self, x):
        """Group to synchronise over where torch's forward cannot, else ``None`` (use torch's).

        Torch's forward is right in eval mode, without a process group, and on the devices its
        synchronised kernel accepts (it falls back to plain BN for a size-1 group there itself).
        """
        if not self.training or not (dist.is_available() and dist.is_initialized()):
            return None
        if x.device.type in _torch_sync_devices():
            return None
        return self.process_group if self.process_group else dist.group.WORLD

    def forward(self, input):
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        group = self._own_sync_group(input)
        # The cumulative average (momentum=None): torch's forward reads num_batches_tracked on the host
        # (.item(), a sync per layer per step); ours keeps the factor on the device.
        cumulative = self.training and self.momentum is None and self.track_running_stats
        if cumulative and group is None and dist.is_available() and dist.is_initialized():
            group = self.process_group if self.process_group else dist.group.WORLD
        if group is None and not cumulative:
            return super().forward(input)

        # Training mode torch cannot run as wanted: mirror torch's bookkeeping.
        track = self.track_running_stats
        if track:
            self.num_batches_tracked.add_(1)
        running_mean = self.running_mean if track else None
        running_var = self.running_var if track else None
        if group is not None and get_world_size(group) > 1:
            return sync_batch_norm(input, self.weight, self.bias, running_mean, running_var,
                                   self.momentum, self.eps, group,
                                   num_batches_tracked=self.num_batches_tracked)
        # A single process is plain BN, as torch does without a group (torch would raise on CPU input).
        if self.momentum is not None or not track:
            return F.batch_norm(input, running_mean, running_var, self.weight, self.bias, True,
                                self.momentum if track else 0.0, self.eps)
        mean, var = batch_mean_var(input)
        count = input.numel() // input.shape[1]
        lerp_running_stats_(running_mean, running_var, mean, var * (count / max(count - 1, 1)),
                            momentum_factor(None, self.num_batches_tracked, running_mean.dtype))
        return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Replace every ``_BatchNorm`` in ``module`` by this class, sharing parameters and buffers.

        Like :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm` but produces
        :class:`cbn_mmdet.ops.SyncBatchNorm` (also for torch ``SyncBatchNorm`` layers). Parameters
        and buffers are the same tensor objects, ``training`` and ``qconfig`` are carried over.

        Args:
            module (nn.Module): a module containing ``BatchNorm*d`` layers, or one such layer.
            process_group (ProcessGroup, optional): group to synchronise over. Default: the world.

        Returns:
            nn.Module: ``module`` with its batch norms replaced in place, or a new layer when
            ``module`` itself is a batch norm.

        Example:
            >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
            >>> net = SyncBatchNorm.convert_sync_batchnorm(net)
        """
        converted = module
        if isinstance(module, _BatchNorm):
            extra = {}
            if module.affine and module.bias is None:
                extra['bias'] = False
            converted = cls(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group, **extra)
            if module.affine:
                with torch.no_grad():
                    converted.weight = module.weight
                    converted.bias = module.bias
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.training = module.training
            if hasattr(module, 'qconfig'):
                converted.qconfig = module.qconfig
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted
