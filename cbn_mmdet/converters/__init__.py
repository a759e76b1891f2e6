"""Converters from the authors' released checkpoints to state_dicts of this package's models.

* :func:`convert_bcn_ws_resnet`: BCN+WS ImageNet ResNets (pytorch-classification layout) -> an mmdet
  ``ResNet`` with ``BCN`` norms and ``WSConv(eps_inside_sqrt=True)`` convs;
* :func:`convert_mabn`: official ``MABN2d`` state -> our ``MovingAverageBatchNorm2d``;
* :func:`convert_cbn_v06_detector`: the official CBN detectors (an mmdetection v0.6 fork) -> an mmdet
  3.x Faster/Mask R-CNN of our configs.

Each takes and returns a plain ``{key: tensor}`` dict and raises :class:`ConversionError` (one line,
naming the key) on a key it does not know or a key the target needs but the source lacks.
"""
from .bcn_ws import convert_bcn_ws_resnet
from .cbn_detector import convert_cbn_v06_detector
from .common import ConversionError, check_against_target, load_state_dict, save_state_dict
from .mabn import convert_mabn

__all__ = ['ConversionError', 'check_against_target', 'convert_bcn_ws_resnet', 'convert_cbn_v06_detector',
           'convert_mabn', 'load_state_dict', 'save_state_dict']
