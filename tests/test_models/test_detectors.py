"""A real mmdet Mask R-CNN R-50-FPN with each norm in the neck and heads trains and predicts on CPU."""
import os

import mmdet
import pytest
import torch
from mmdet.registry import MODELS
from mmdet.testing import demo_mm_inputs
from mmdet.utils import register_all_modules
from mmengine.config import Config

import cbn_mmdet  # noqa: F401
from cbn_mmdet.ops import CrossIterationBatchNorm2d
from tests.test_models.norm_cases import NORM_CFGS

MMDET_CONFIGS = os.path.join(os.path.dirname(mmdet.__file__), '.mim', 'configs')


def mask_rcnn_cfg(norm_cfg):
    """The paper's detector: norm in FPN + 4conv1fc bbox head + 4conv mask head, frozen-BN backbone."""
    cfg = Config.fromfile(os.path.join(MMDET_CONFIGS, 'mask_rcnn', 'mask-rcnn_r50_fpn_1x_coco.py'))
    model = cfg.model
    model.backbone.init_cfg = None          # no download: random init is enough for a smoke step
    model.neck.norm_cfg = norm_cfg
    model.roi_head.bbox_head = dict(
        type='Shared4Conv1FCBBoxHead', in_channels=256, conv_out_channels=256, fc_out_channels=1024,
        roi_feat_size=7, num_classes=3, norm_cfg=norm_cfg,
        bbox_coder=model.roi_head.bbox_head.bbox_coder, reg_class_agnostic=False,
        loss_cls=model.roi_head.bbox_head.loss_cls, loss_bbox=model.roi_head.bbox_head.loss_bbox)
    model.roi_head.mask_head.update(num_convs=4, norm_cfg=norm_cfg, num_classes=3)
    # small and quick on CPU
    model.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=100)
    model.train_cfg.rcnn.sampler.num = 64
    model.test_cfg.rpn.update(nms_pre=200, max_per_img=50)
    return model


@pytest.fixture(scope='module', autouse=True)
def _mmdet_scope():
    register_all_modules()


@pytest.mark.parametrize('name', sorted(NORM_CFGS))
def test_mask_rcnn_r50_fpn_trains_and_predicts(name):
    torch.manual_seed(0)
    model = MODELS.build(mask_rcnn_cfg(NORM_CFGS[name]))
    model.train()
    packed = demo_mm_inputs(2, [[3, 96, 128], [3, 128, 96]], num_items=[3, 2], num_classes=3, with_mask=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9)
    for _ in range(2):   # two steps: the second one uses a CBN window entry from the first
        data = model.data_preprocessor(packed, True)
        losses = model(**data, mode='loss')
        loss, log_vars = model.parse_losses(losses)
        assert torch.isfinite(loss), log_vars
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if name in ('CBN', 'SyncCBN'):
        cbn_layers = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
        assert len(cbn_layers) == 4 + 4 + 4 + 4    # FPN lateral + fpn convs, 4 bbox convs, 4 mask convs
        assert all(m.is_bound and int(m.window_filled.sum()) >= 1 for m in cbn_layers)
    model.eval()
    with torch.no_grad():
        results = model(**model.data_preprocessor(packed, False), mode='predict')
    assert len(results) == 2 and hasattr(results[0], 'pred_instances')
