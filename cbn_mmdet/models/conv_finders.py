"""Conv finders for mmcv/mmdet building blocks, so CBN binds without forking them.

Each finder answers "which conv produces ``parent.<child_name>``?" for one family of modules (see
``cbn_mmdet.ops.cbn_binding``): mmcv's ``ConvModule`` (conv→norm order) and the ``norm{k}_name`` /
``conv{k}`` convention of mmdet's ResNet ``Bottleneck``, ``BasicBlock`` and ResNet stem (also used by
ResNeXt, RegNet, Res2Net-style blocks built on them). Downsample branches and deep stems are
``nn.Sequential`` (conv, norm, ...) and are handled by the generic Sequential finder in ops.
"""
from mmcv.cnn import ConvModule

from ..ops.cbn_binding import CBNBindError, register_conv_finder


@register_conv_finder
def conv_module_finder(parent, child_name, norm):
    if not isinstance(parent, ConvModule) or getattr(parent, 'norm_name', None) != child_name:
        return None
    order = tuple(parent.order)
    if order.index('conv') > order.index('norm'):
        raise CBNBindError(f'ConvModule order={order} puts the norm before the conv, so no conv '
                           'produces its input')
    return parent.conv


@register_conv_finder
def numbered_norm_finder(parent, child_name, norm):
    """ResNet-style blocks: ``self.norm{k}_name == child_name`` pairs with ``self.conv{k}``."""
    for k in range(1, 10):
        if getattr(parent, f'norm{k}_name', None) == child_name:
            conv = getattr(parent, f'conv{k}', None)
            if conv is None:
                raise CBNBindError(f'{type(parent).__name__} has norm{k}_name={child_name!r} but no conv{k}')
            return conv
    return None
