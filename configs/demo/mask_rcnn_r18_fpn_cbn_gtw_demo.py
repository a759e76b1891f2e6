# Demo, norm CBN buffer3 with grad_through_window=True: the CBN demo (mask_rcnn_r18_fpn_cbn_demo.py)
# whose backward also flows through the compensated past statistics into the conv weight (opt-in,
# beyond the paper: the official backward treats them as constants; docs/cbn.md, docs/fidelity.md).
# Same forward, same window, same burn-in.
_base_ = './mask_rcnn_r18_fpn_cbn_demo.py'

norm_cfg = dict(type='CBN', buffer_num=3, burnin=0, requires_grad=True, grad_through_window=True)
model = dict(
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(norm_cfg=norm_cfg),
        mask_head=dict(norm_cfg=norm_cfg)))
