"""Pure-torch cores of the norm layers (importable with torch alone: no mmcv/mmengine/mmdet).

One family per file, each a functional core plus a thin module:

* ``cross_iter_bn``      — Cross-Iteration BN (CBN) and its synced variant; ``cbn_stat_grads`` holds the
  closed-form statistic gradients and ``cbn_binding`` finds the conv feeding a CBN layer;
* ``sync_bn``            — SyncBN that also runs on CPU/gloo (torch's own path on CUDA);
* ``batch_channel_norm`` — Batch-Channel Normalization (BCN);
* ``moving_average_bn``  — Moving Average BN (MABN) with its own autograd function;
* ``weight_std_conv``    — weight-standardized and centred convolutions (WS, MABN's CenConv);
* ``distributed``        — differentiable count-weighted all-reduce shared by the synced layers.
"""
from .batch_channel_norm import BatchChannelNorm2d
from .batch_renorm import BatchRenorm2d, batch_renorm, renorm_limits
from .cbn_binding import CBNBindError, bind_cbn_convs, bind_cbn_to_conv, register_conv_finder
from .cbn_stat_grads import mean_input_patch, second_moment_weight_grad
from .cross_iter_bn import CrossIterationBatchNorm2d, SyncCrossIterationBatchNorm2d
from .distributed import get_world_size, sync_weighted_mean
from .moving_average_bn import MovingAverageBatchNorm2d, MovingAverageBNFunction, moving_average_bn
from .sync_bn import SyncBatchNorm, sync_batch_norm
from .weight_std_conv import CenteredConv2d, WeightStandardizedConv2d, weight_center, weight_standardize

__all__ = [
    'CrossIterationBatchNorm2d', 'SyncCrossIterationBatchNorm2d', 'CBNBindError', 'bind_cbn_to_conv',
    'bind_cbn_convs', 'register_conv_finder', 'mean_input_patch', 'second_moment_weight_grad',
    'SyncBatchNorm', 'sync_batch_norm', 'get_world_size', 'sync_weighted_mean', 'BatchChannelNorm2d',
    'MovingAverageBatchNorm2d', 'MovingAverageBNFunction', 'moving_average_bn',
    'WeightStandardizedConv2d', 'CenteredConv2d', 'weight_standardize', 'weight_center',
    'BatchRenorm2d', 'batch_renorm', 'renorm_limits',
]
