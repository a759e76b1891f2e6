"""Official CBN detectors (mmdetection v0.6 layout) -> our mmdet 3.x Faster R-CNN with CBN.

The synthetic checkpoint is written here with the v0.6 layout (top-level ``bbox_head``, background class
first, no CBN window buffers: the official layer kept them in Python lists). The oracle of the eval
forward is the official layer's formula (tests/oracles/official_layers.py) applied to the SOURCE tensors.
"""
import copy
import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mmengine import Config

import cbn_mmdet  # noqa: F401
from cbn_mmdet.converters import ConversionError, convert_cbn_v06_detector
from tests.oracles.official_layers import official_cbn_eval

CONFIG = Path(__file__).resolve().parents[2] / 'configs/cbn/faster_rcnn_r50_fpn_cbn_buffer3_burnin8_1x.py'
NUM_CLASSES = 80
CBN_ONLY = ('iter_count', 'num_fallbacks', 'num_nonfinite', 'window_head', 'window_filled', 'window_mean',
            'window_sq', 'window_weight', 'window_mean_grad', 'window_sq_grad')


@functools.lru_cache(maxsize=None)
def _model_cfg():
    cfg = Config.fromfile(str(CONFIG))
    model = copy.deepcopy(cfg.model)
    model.backbone.init_cfg = None
    return model


def _build():
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    return MODELS.build(copy.deepcopy(_model_cfg()))


def _v06_checkpoint(target_state):
    """The v0.6 key layout and shapes of the same detector, random values."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for key, value in target_state.items():
        if key.rsplit('.', 1)[-1] in CBN_ONLY:
            continue
        name = key[len('roi_head.'):] if key.startswith('roi_head.') else key
        if not value.is_floating_point():
            out[name] = torch.full_like(value, 77)
        elif name.endswith('running_var'):
            out[name] = torch.rand(value.shape, generator=gen) + 0.5
        else:
            out[name] = torch.randn(value.shape, generator=gen) * 0.1
    # background first: one more class row; class-specific regression: 4 more rows in front
    out['bbox_head.fc_cls.weight'] = torch.randn(NUM_CLASSES + 1, 1024, generator=gen) * 0.1
    out['bbox_head.fc_cls.bias'] = torch.randn(NUM_CLASSES + 1, generator=gen) * 0.1
    out['bbox_head.fc_reg.weight'] = torch.randn(4 * (NUM_CLASSES + 1), 1024, generator=gen) * 0.1
    out['bbox_head.fc_reg.bias'] = torch.randn(4 * (NUM_CLASSES + 1), generator=gen) * 0.1
    return out


@pytest.fixture(scope='module')
def converted():
    model = _build()
    target = model.state_dict()
    source = _v06_checkpoint(target)
    result = convert_cbn_v06_detector({f'module.{k}': v for k, v in source.items()}, target)
    model.load_state_dict(result, strict=True)
    model.eval()
    return model, source


def test_source_has_the_v06_layout(converted):
    _, source = converted
    assert 'bbox_head.shared_convs.0.bn.running_var' in source and 'neck.lateral_convs.0.bn.weight' in source
    assert not any(k.startswith('roi_head.') or k.endswith('window_mean') for k in source)
    assert source['bbox_head.fc_cls.weight'].shape == (81, 1024)


def test_bbox_head_eval_output_equals_the_official(converted):
    model, src = converted
    x = torch.randn(3, 256, 7, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cls_score, bbox_pred = model.roi_head.bbox_head(x)
        h = x
        for i in range(4):
            p = f'bbox_head.shared_convs.{i}'
            h = F.conv2d(h, src[f'{p}.conv.weight'], padding=1)
            h = F.relu(official_cbn_eval(h, src[f'{p}.bn.weight'], src[f'{p}.bn.bias'],
                                         src[f'{p}.bn.running_mean'], src[f'{p}.bn.running_var']))
        h = F.relu(F.linear(h.flatten(1), src['bbox_head.shared_fcs.0.weight'], src['bbox_head.shared_fcs.0.bias']))
        official_cls = F.linear(h, src['bbox_head.fc_cls.weight'], src['bbox_head.fc_cls.bias'])
        official_reg = F.linear(h, src['bbox_head.fc_reg.weight'], src['bbox_head.fc_reg.bias'])
    # v0.6: [background, class 1..80]; 3.x: [class 1..80, background]; the background has no deltas in 3.x
    torch.testing.assert_close(cls_score, torch.cat([official_cls[:, 1:], official_cls[:, :1]], 1))
    torch.testing.assert_close(bbox_pred, official_reg[:, 4:])
    torch.testing.assert_close(F.softmax(cls_score, 1)[:, -1], F.softmax(official_cls, 1)[:, 0])


def test_neck_cbn_eval_output_equals_the_official(converted):
    model, src = converted
    x = torch.randn(1, 256, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model.neck.lateral_convs[0](x)
        p = 'neck.lateral_convs.0'
        expected = official_cbn_eval(F.conv2d(x, src[f'{p}.conv.weight']), src[f'{p}.bn.weight'], src[f'{p}.bn.bias'],
                                     src[f'{p}.bn.running_mean'], src[f'{p}.bn.running_var'])
    torch.testing.assert_close(got, expected)


def test_cbn_window_starts_empty(converted):
    model, _ = converted
    norm = model.neck.lateral_convs[0].bn
    assert int(norm.iter_count) == 0 and not bool(norm.window_filled.any())


def test_unknown_and_missing_keys_are_named():
    model = _build()
    target = model.state_dict()
    source = _v06_checkpoint(target)
    with pytest.raises(ConversionError, match=r"^unknown key 'roi_head\.bbox_head\.fc_extra\.weight': the target"):
        convert_cbn_v06_detector(dict(source, **{'bbox_head.fc_extra.weight': torch.zeros(2)}), target)
    source.pop('neck.fpn_convs.2.bn.running_mean')
    with pytest.raises(ConversionError, match=r"^missing key 'neck\.fpn_convs\.2\.bn\.running_mean': the source"):
        convert_cbn_v06_detector(source, target)
