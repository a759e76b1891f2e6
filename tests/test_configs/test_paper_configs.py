"""Every config under configs/ loads, builds, and carries the papers' settings.

The expected values come from a reference table written here from the papers (docs/papers.md: the
CBN detection configs and their table; WS/BCN; MABN) -- not read back from the configs -- and are
compared field by field with the loaded config and with the model it builds (layer classes in the
backbone, the FPN and the RoI heads, head structure, frozen BN). Models are built on CPU without
loading weights and without any forward pass.
"""
import copy
import functools
from pathlib import Path

import pytest
import torch.nn as nn
from mmcv.cnn import ConvModule
from mmengine import Config
from mmengine.registry import HOOKS
from torch.nn.modules.batchnorm import _BatchNorm

import cbn_mmdet  # noqa: F401  (registers the layers and the hook)
from cbn_mmdet.engine import CBNBurnInHook
from cbn_mmdet.ops import (
    BatchChannelNorm2d,
    CenteredConv2d,
    CrossIterationBatchNorm2d,
    MovingAverageBatchNorm2d,
    SyncBatchNorm,
    WeightStandardizedConv2d,
    bind_cbn_convs,
)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / 'configs'

# --------------------------------------------------------------------------------------------------
# Reference table (from the papers, see the module docstring)
# --------------------------------------------------------------------------------------------------
# CBN paper, detection: 4 GPUs x 4 images, SGD lr 0.02 / momentum 0.9 / wd 1e-4, 1x = 12 epochs with
# steps at 8 and 11, linear warm-up 500 iterations from 0.001, gradient clipping max_norm 35.
ONE_X = dict(max_epochs=12, milestones=[8, 11])
TWO_X = dict(max_epochs=24, milestones=[16, 22])
OPTIMIZER = dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=1e-4)
WARMUP = dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500)
CLIP = dict(max_norm=35, norm_type=2)
TOTAL_BATCH = 16

# Norms of the neck and heads: (norm_cfg type, built class, norm_cfg fields, built-layer attributes).
NORMS = {
    'baseline': None,
    'syncbn': ('SyncBN', SyncBatchNorm, {}, {}),
    'gn': ('GN', nn.GroupNorm, dict(num_groups=32), dict(num_groups=32)),
    # buffer3 / burnin8 with the paper's intent: 8 epochs of plain BN through CBNBurnInHook.
    'cbn_buffer3_burnin8': ('CBN', CrossIterationBatchNorm2d, dict(buffer_num=3, burnin=0),
                            dict(buffer_num=3, burnin=0, rho=1.0)),
    # the official code's effective burn-in: 8 training forwards, counted by the layer.
    'cbn_buffer3_burnin8iter': ('CBN', CrossIterationBatchNorm2d, dict(buffer_num=3, burnin=8),
                                dict(buffer_num=3, burnin=8, rho=1.0)),
    'gn_ws': ('GN', nn.GroupNorm, dict(num_groups=32), dict(num_groups=32)),
    'bcn_ws': ('BCN', BatchChannelNorm2d, dict(num_groups=32, estimate_stats=True),
               dict(num_groups=32, estimate_stats=True)),
    # MABN paper / official detection code: 2 images per GPU, MABN2d(B=2, real_B=32).
    'mabn': ('MABN', MovingAverageBatchNorm2d, dict(B=2, real_B=32), dict(B=2, real_B=32)),
}
# Burn-in hook epochs per norm (None: no CBNBurnInHook in custom_hooks).
BURNIN_EPOCHS = {'cbn_buffer3_burnin8': 8}


def _row(folder, detector, depth, norm, **overrides):
    # The official CBN repository names the no-norm row without a norm token: faster_rcnn_r50_fpn_1x.py.
    suffix = '' if norm == 'baseline' else f'_{norm}'
    row = dict(
        path=f'{folder}/{detector}_rcnn_r{depth}_fpn{suffix}_1x.py',
        detector=detector, depth=depth, norm=norm,
        # backbone: ImageNet (torchvision) weights, frozen BN, plain convs
        backbone_norm=('BN', nn.BatchNorm2d), conv=nn.Conv2d, norm_eval=True, frozen_stages=1,
        pretrained=f'torchvision://resnet{depth}',
        schedule=ONE_X, batch_per_gpu=4, gpus=4)
    row.update(overrides)
    return row


ROWS = []
# configs/cbn: the CBN paper's 8 rows, the same at R-101, and the 8-iteration burn-in variant.
for _det in ('faster', 'mask'):
    for _depth in (50, 101):
        for _norm in ('baseline', 'syncbn', 'gn', 'cbn_buffer3_burnin8'):
            ROWS.append(_row('cbn', _det, _depth, _norm))
    ROWS.append(_row('cbn', _det, 50, 'cbn_buffer3_burnin8iter'))
# configs/ws: WS convs + GN / BCN (32 groups) everywhere, from WS-pretrained backbones.
for _det in ('faster', 'mask'):
    for _depth in (50, 101):
        ROWS.append(_row('ws', _det, _depth, 'gn_ws', backbone_norm=('GN', nn.GroupNorm),
                         conv=WeightStandardizedConv2d, pretrained=f'open-mmlab://jhu/resnet{_depth}_gn_ws'))
        ROWS.append(_row('ws', _det, _depth, 'bcn_ws', backbone_norm=('BCN', BatchChannelNorm2d),
                         conv=WeightStandardizedConv2d, norm_eval=False,
                         pretrained=('bcn_ws', f'resnet{_depth}')))
# configs/mabn: the MABN paper's Mask R-CNN from scratch, 2x, 8 GPUs x 2 images.
ROWS.append(dict(_row('mabn', 'mask', 50, 'mabn', backbone_norm=('MABN', MovingAverageBatchNorm2d),
                      conv=CenteredConv2d, norm_eval=False, frozen_stages=-1, pretrained=None,
                      schedule=TWO_X, batch_per_gpu=2, gpus=8),
                 path='mabn/mask_rcnn_r50_fpn_mabn_cenconv_scratch_2x.py'))
ROWS_BY_PATH = {row['path']: row for row in ROWS}
IDS = [row['path'] for row in ROWS]

# Folders whose configs reproduce a paper row and must all appear in the table above.
PAPER_FOLDERS = ('cbn', 'ws', 'mabn')
# Former names kept as one-line `_base_` aliases of the official names (tested below, not reference rows).
ALIASES = {f'cbn/{det}_rcnn_r{depth}_fpn_baseline_1x.py': f'cbn/{det}_rcnn_r{depth}_fpn_1x.py'
           for det in ('faster', 'mask') for depth in (50, 101)}
LEAVES = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob('*.py')
                if '_base_' not in p.parts and p.relative_to(CONFIGS).as_posix() not in ALIASES)
OTHER_LEAVES = [p for p in LEAVES if p.split('/')[0] not in PAPER_FOLDERS]


# --------------------------------------------------------------------------------------------------
# Loading (cached) and building (one model alive at a time: see the `built` fixture)
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _registered():
    from mmdet.utils import register_all_modules
    register_all_modules()
    return True


@functools.lru_cache(maxsize=None)
def load(path):
    return Config.fromfile(str(CONFIGS / path))


def build(path):
    _registered()
    from mmdet.registry import MODELS
    model_cfg = copy.deepcopy(load(path).model)
    model_cfg.backbone.init_cfg = None    # no download; weights are never loaded here
    return MODELS.build(model_cfg)


def _metrics(evaluator):
    metric = evaluator['metric']
    return sorted([metric] if isinstance(metric, str) else metric)


def _head_convmodules(model, detector):
    """{part: [ConvModule]} for the neck and RoI heads, where the norm goes."""
    parts = dict(lateral=list(model.neck.lateral_convs), fpn=list(model.neck.fpn_convs),
                 bbox=list(model.roi_head.bbox_head.shared_convs))
    if detector == 'mask':
        parts['mask'] = list(model.roi_head.mask_head.convs)
    return parts


# --------------------------------------------------------------------------------------------------
# The set of configs
# --------------------------------------------------------------------------------------------------
def test_every_paper_config_is_in_the_reference_table():
    leaves = {p for p in LEAVES if p.split('/')[0] in PAPER_FOLDERS}
    assert leaves == set(ROWS_BY_PATH), (
        f'configs without a reference row: {sorted(leaves - set(ROWS_BY_PATH))}; '
        f'reference rows without a config: {sorted(set(ROWS_BY_PATH) - leaves)}')


@pytest.mark.parametrize('path', OTHER_LEAVES)
def test_other_config_loads_and_builds(path):
    """Configs outside the paper folders (e.g. configs/demo) still load, import cbn_mmdet and build."""
    assert load(path).custom_imports == dict(imports=['cbn_mmdet'], allow_failed_imports=False)
    assert isinstance(build(path), nn.Module)


@pytest.mark.parametrize('path', sorted(p.relative_to(CONFIGS).as_posix()
                                        for p in (CONFIGS / '_base_').rglob('*.py')))
def test_base_config_loads(path):
    cfg = load(path)
    assert len(cfg) > 0


def test_the_cbn_paper_rows_exist():
    """The 8 detection rows of the CBN paper's table (and the R-101 ones), by the official repository's names."""
    for det in ('faster', 'mask'):
        for depth in (50, 101):
            for name in ('fpn_1x', 'fpn_syncbn_1x', 'fpn_gn_1x', 'fpn_cbn_buffer3_burnin8_1x'):
                assert (CONFIGS / 'cbn' / f'{det}_rcnn_r{depth}_{name}.py').is_file()


@pytest.mark.parametrize('alias', sorted(ALIASES))
def test_former_baseline_names_are_one_line_aliases(alias):
    """One source per config: the old name holds nothing but a `_base_` pointing at the official one."""
    official = ALIASES[alias]
    code = [line for line in (CONFIGS / alias).read_text().splitlines()
            if line.strip() and not line.lstrip().startswith('#')]
    assert code == [f"_base_ = './{Path(official).name}'"]
    assert load(alias).to_dict() == load(official).to_dict()


# --------------------------------------------------------------------------------------------------
# Config fields
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('path', IDS)
def test_runtime_imports_cbn_mmdet(path):
    assert load(path).custom_imports == dict(imports=['cbn_mmdet'], allow_failed_imports=False)


@pytest.mark.parametrize('path', IDS)
def test_schedule_and_optimizer(path):
    row, cfg = ROWS_BY_PATH[path], load(path)
    optimizer = cfg.optim_wrapper.optimizer
    assert optimizer.type == OPTIMIZER['type']
    for key in ('lr', 'momentum', 'weight_decay'):
        assert optimizer[key] == pytest.approx(OPTIMIZER[key]), key
    assert dict(cfg.optim_wrapper.clip_grad) == CLIP
    assert cfg.train_cfg.type == 'EpochBasedTrainLoop'
    assert cfg.train_cfg.max_epochs == row['schedule']['max_epochs']

    warmup, steps = cfg.param_scheduler
    for key, value in WARMUP.items():
        assert warmup[key] == value, key
    assert steps.type == 'MultiStepLR' and steps.by_epoch is True
    assert list(steps.milestones) == row['schedule']['milestones']
    assert steps.gamma == pytest.approx(0.1)
    assert steps.end == row['schedule']['max_epochs']


@pytest.mark.parametrize('path', IDS)
def test_batch_and_lr_scaling(path):
    row, cfg = ROWS_BY_PATH[path], load(path)
    assert cfg.train_dataloader.batch_size == row['batch_per_gpu']
    # 4 GPUs x 4 images (CBN paper) or 8 GPUs x 2 images (MABN): the lr is for 16 images either way.
    assert row['gpus'] * row['batch_per_gpu'] == TOTAL_BATCH
    assert cfg.global_batch_size == TOTAL_BATCH     # tools/train.py keeps this total on any GPU count
    assert cfg.auto_scale_lr == dict(enable=False, base_batch_size=TOTAL_BATCH)
    if row['norm'] == 'mabn':   # MABN's B is the per-GPU batch
        assert cfg.model.backbone.norm_cfg.B == row['batch_per_gpu']


@pytest.mark.parametrize('path', IDS)
def test_coco_2017_data_and_metrics(path):
    row, cfg = ROWS_BY_PATH[path], load(path)
    train, val = cfg.train_dataloader.dataset, cfg.val_dataloader.dataset
    assert train.type == val.type == 'CocoDataset'
    assert train.data_root == val.data_root == 'data/coco/'
    assert train.ann_file == 'annotations/instances_train2017.json'
    assert val.ann_file == 'annotations/instances_val2017.json'
    assert train.data_prefix.img == 'train2017/' and val.data_prefix.img == 'val2017/'
    expected = ['bbox', 'segm'] if row['detector'] == 'mask' else ['bbox']
    for evaluator in (cfg.val_evaluator, cfg.test_evaluator):
        assert evaluator.type == 'CocoMetric'
        assert _metrics(evaluator) == expected
        assert evaluator.ann_file.endswith('annotations/instances_val2017.json')
    assert any(t.type == 'LoadAnnotations' and t.get('with_mask', False) == (row['detector'] == 'mask')
               for t in train.pipeline)


@pytest.mark.parametrize('path', IDS)
def test_model_fields(path):
    row, cfg = ROWS_BY_PATH[path], load(path)
    model = cfg.model
    assert model.type == {'faster': 'FasterRCNN', 'mask': 'MaskRCNN'}[row['detector']]

    backbone = model.backbone
    assert backbone.type == 'ResNet' and backbone.depth == row['depth']
    assert backbone.norm_cfg.type == row['backbone_norm'][0]
    assert backbone.norm_eval is row['norm_eval']
    assert backbone.frozen_stages == row['frozen_stages']
    pretrained = row['pretrained']
    if pretrained is None:
        assert backbone.init_cfg is None
    elif isinstance(pretrained, tuple):   # a converted local checkpoint: its name says what it is
        assert backbone.init_cfg.type == 'Pretrained'
        assert all(part in backbone.init_cfg.checkpoint for part in pretrained)
    else:
        assert backbone.init_cfg == dict(type='Pretrained', checkpoint=pretrained)

    bbox_head = model.roi_head.bbox_head
    assert bbox_head.type == 'Shared4Conv1FCBBoxHead' and bbox_head.conv_out_channels == 256
    heads = [model.neck, bbox_head]
    if row['detector'] == 'mask':
        mask_head = model.roi_head.mask_head
        assert mask_head.type == 'FCNMaskHead' and mask_head.num_convs == 4
        assert mask_head.conv_out_channels == 256
        heads.append(mask_head)
    else:
        assert 'mask_head' not in model.roi_head

    spec = NORMS[row['norm']]
    for part in heads:
        norm_cfg = part.get('norm_cfg')
        if spec is None:
            assert norm_cfg is None
        else:
            assert norm_cfg.type == spec[0]
            assert norm_cfg.get('requires_grad', True) is True
            for key, value in spec[2].items():
                assert norm_cfg[key] == value, (key, norm_cfg)
    # WS / CenConv convs go wherever their norm goes; the CBN-paper rows keep plain convs.
    expected_conv = {nn.Conv2d: None, WeightStandardizedConv2d: 'WSConv', CenteredConv2d: 'CenConv'}
    for part in heads + [backbone]:
        conv_cfg = part.get('conv_cfg')
        assert (None if conv_cfg is None else conv_cfg.type) == expected_conv[row['conv']]
        # The BCN authors' ImageNet WS divides by sqrt(var_unbiased + 1e-5): their weights need that variant.
        if conv_cfg is not None and conv_cfg.type == 'WSConv':
            assert conv_cfg.get('eps_inside_sqrt', False) is (row['norm'] == 'bcn_ws'), conv_cfg


@pytest.mark.parametrize('path', IDS)
def test_burnin_hook(path):
    row, cfg = ROWS_BY_PATH[path], load(path)
    hooks = [h for h in cfg.get('custom_hooks', []) if h.type == 'CBNBurnInHook']
    epochs = BURNIN_EPOCHS.get(row['norm'])
    if epochs is None:
        assert hooks == []
        return
    assert len(hooks) == 1
    hook = HOOKS.build(copy.deepcopy(hooks[0]))
    assert isinstance(hook, CBNBurnInHook)
    assert hook.burnin_epochs == epochs and hook.burnin_iters is None
    assert epochs < row['schedule']['max_epochs']


# --------------------------------------------------------------------------------------------------
# The built model
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module', params=IDS)
def built(request):
    """(row, model) per paper config. Module scope + params: pytest runs every test of one config
    together and drops the model before building the next, so ~30 detectors never coexist."""
    model = build(request.param)
    yield ROWS_BY_PATH[request.param], model
    del model


def test_built_heads_structure_and_norms(built):
    row, model = built
    bbox_head = model.roi_head.bbox_head
    # 4conv1fc: 4 shared 3x3 convs of 256 channels, 1 shared fc of 1024, no separate cls/reg branches.
    assert len(bbox_head.shared_convs) == 4 and len(bbox_head.shared_fcs) == 1
    assert len(bbox_head.cls_convs) == len(bbox_head.cls_fcs) == 0
    assert len(bbox_head.reg_convs) == len(bbox_head.reg_fcs) == 0
    assert all(m.conv.out_channels == 256 and m.conv.kernel_size == (3, 3) for m in bbox_head.shared_convs)
    assert bbox_head.shared_fcs[0].out_features == 1024
    if row['detector'] == 'mask':
        assert len(model.roi_head.mask_head.convs) == 4
        assert all(m.conv.out_channels == 256 for m in model.roi_head.mask_head.convs)
    else:
        assert not model.roi_head.with_mask

    spec = NORMS[row['norm']]
    parts = _head_convmodules(model, row['detector'])
    assert len(parts['lateral']) == len(parts['fpn']) == 4
    for part, modules in parts.items():
        for module in modules:
            assert isinstance(module, ConvModule)
            assert type(module.conv) is row['conv'], (part, type(module.conv))
            if spec is None:
                assert not module.with_norm, part
                assert module.conv.bias is not None, part   # no norm: the conv keeps its bias
                continue
            assert module.with_norm, part
            assert type(module.norm) is spec[1], (part, type(module.norm))
            for attr, value in spec[3].items():
                assert getattr(module.norm, attr) == value, (part, attr)
            assert module.conv.bias is None, part           # a norm follows: no conv bias
    # The RPN head never gets a norm.
    assert not any(isinstance(m, (_BatchNorm, nn.GroupNorm)) for m in model.rpn_head.modules())


def test_built_backbone(built):
    row, model = built
    backbone = model.backbone
    assert backbone.depth == row['depth']
    norm_cls, conv_cls = row['backbone_norm'][1], row['conv']
    norms = [m for m in backbone.modules() if isinstance(m, (_BatchNorm, nn.GroupNorm))]
    convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    # stem + 3 per bottleneck + 4 downsamples
    blocks = {50: 16, 101: 33}[row['depth']]
    assert len(norms) == len(convs) == 1 + 3 * blocks + 4
    assert all(type(m) is norm_cls for m in norms), {type(m).__name__ for m in norms}
    assert all(type(m) is conv_cls for m in convs), {type(m).__name__ for m in convs}
    if row['backbone_norm'][0] != 'BN':   # WS / MABN rows: the same norm as in the neck and heads
        for attr, value in NORMS[row['norm']][3].items():
            assert all(getattr(m, attr) == value for m in norms), attr

    backbone.train()
    if row['norm_eval']:
        # frozen BN: every BN of the backbone stays in eval mode while the model trains
        assert all(not m.training for m in norms if isinstance(m, _BatchNorm))
    else:
        assert all(m.training for name, m in backbone.named_modules()
                   if isinstance(m, (_BatchNorm, nn.GroupNorm)) and not _in_frozen_stage(name, row, backbone))
    if row['frozen_stages'] < 0:
        assert all(p.requires_grad for p in backbone.parameters())
    else:
        frozen = [p for name, p in backbone.named_parameters() if _in_frozen_stage(name, row, backbone)]
        assert frozen and all(not p.requires_grad for p in frozen)


def _in_frozen_stage(name, row, backbone):
    """Whether backbone parameter/module `name` lies in the stem or a stage frozen by frozen_stages."""
    stages = row['frozen_stages']
    if stages < 0:
        return False
    stem = name.split('.')[0] in ('conv1', backbone.norm1_name)
    return stem or any(name.startswith(f'layer{i}.') for i in range(1, stages + 1))


def test_built_cbn_layers(built):
    """CBN sits in the neck and heads only, and every CBN finds the conv of its ConvModule (no forward)."""
    row, model = built
    cbn_layers = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    spec = NORMS[row['norm']]
    if spec is None or spec[0] != 'CBN':
        assert cbn_layers == []
        return
    parts = _head_convmodules(model, row['detector'])
    assert len(cbn_layers) == sum(len(v) for v in parts.values()) == (16 if row['detector'] == 'mask' else 12)
    assert not any(isinstance(m, CrossIterationBatchNorm2d) for m in model.backbone.modules())
    bind_cbn_convs(model, strict=True)
    for modules in parts.values():
        for module in modules:
            assert module.norm.bound_conv is module.conv


@pytest.mark.parametrize('r101', [p for p in IDS if '_r101_' in p])
def test_r101_is_r50_plus_backbone(r101):
    """Each R-101 config differs from its R-50 config only in the backbone's depth and weights."""
    r50 = r101.replace('_r101_', '_r50_')
    a, b = load(r50).to_dict(), load(r101).to_dict()
    for cfg in (a, b):
        cfg['model']['backbone'].pop('depth')
        cfg['model']['backbone'].pop('init_cfg')
    assert a == b
