# Former name of mask_rcnn_r101_fpn_1x.py (the official name), kept as an alias for existing command lines.
_base_ = './mask_rcnn_r101_fpn_1x.py'
