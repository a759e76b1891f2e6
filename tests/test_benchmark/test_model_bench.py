"""The whole-detector benchmark's official variant really replaces every CBN layer (no timing)."""
import os.path as osp

import pytest
import torch

from tests.oracles.official_cbn import OfficialCBNModule
from tests.tiny_config import ROOT

CONFIG_DIR = osp.join(ROOT, 'configs', 'cbn')


def test_official_variant_replaces_every_cbn_layer_by_the_injected_module():
    pytest.importorskip('mmdet')
    from mmdet.utils import register_all_modules

    import cbn_mmdet  # noqa: F401
    from cbn_mmdet.benchmark.model_bench import _head_norm_state_bytes, _OfficialCBNAdapter, build_detector
    from cbn_mmdet.ops import CrossIterationBatchNorm2d
    register_all_modules()
    with pytest.raises(ValueError, match="variant 'CBN-official': no official-algorithm factory"):
        build_detector('CBN-official', CONFIG_DIR)
    model = build_detector('CBN-official', CONFIG_DIR, official=OfficialCBNModule)
    adapters = {n: m for n, m in model.named_modules() if isinstance(m, _OfficialCBNAdapter)}
    # the paper's CBN detector: norm in the FPN (4 laterals, 4 outputs), the 4conv1fc box head, the 4-conv mask head
    expected = {f'{part}.{i}.bn' for i in range(4) for part in (
        'neck.lateral_convs', 'neck.fpn_convs', 'roi_head.bbox_head.shared_convs', 'roi_head.mask_head.convs')}
    assert set(adapters) == expected
    assert not any(isinstance(m, CrossIterationBatchNorm2d) for m in model.modules())
    adapter = adapters['neck.fpn_convs.0.bn']
    assert isinstance(adapter.cbn, OfficialCBNModule) and adapter._conv[0] is model.neck.fpn_convs[0].conv
    before = _head_norm_state_bytes(model)
    x = torch.randn(1, 256, 6, 6, requires_grad=True)
    adapter(model.neck.fpn_convs[0].conv(x))             # one training forward pushes a window entry
    assert _head_norm_state_bytes(model) > before


def test_floor_variant_puts_bn_with_one_weight_gradient_in_every_cbn_layers_place(monkeypatch):
    """'BN+wgrad', exact CBN's compute floor: BN where the CBN config has CBN, each computing its own conv's
    dν/dW (the weight-gradient exact CBN adds) once per training forward."""
    pytest.importorskip('mmdet')
    from mmdet.utils import register_all_modules

    import cbn_mmdet  # noqa: F401
    from cbn_mmdet.benchmark import norm_bench
    from cbn_mmdet.benchmark.model_bench import build_detector
    from cbn_mmdet.ops import CrossIterationBatchNorm2d
    register_all_modules()
    model = build_detector('BN+wgrad', CONFIG_DIR)
    floors = {n: m for n, m in model.named_modules() if isinstance(m, norm_bench.BNPlusWeightGrad)}
    assert len(floors) == 16 and not any(isinstance(m, CrossIterationBatchNorm2d) for m in model.modules())
    calls = []
    real = norm_bench.second_moment_weight_grad
    monkeypatch.setattr(norm_bench, 'second_moment_weight_grad',
                        lambda x, y, shape, *a: calls.append(shape) or real(x, y, shape, *a))
    conv = model.neck.fpn_convs[1].conv
    assert floors['neck.fpn_convs.1.bn']._conv[0] is conv
    floors['neck.fpn_convs.1.bn'](conv(torch.randn(1, 256, 6, 6)))
    assert calls == [conv.weight.shape]
