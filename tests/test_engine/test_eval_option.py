"""``--eval`` (mmdet 2.x style) maps onto the CocoMetric of test_evaluator (``prepare_test_config``)."""
import pytest

from cbn_mmdet.engine.config_checks import ConfigError
from cbn_mmdet.engine.testing import apply_eval_metrics, prepare_test_config


@pytest.fixture(scope='module')
def checkpoint(tiny_cbn_config, tmp_path_factory):
    """A checkpoint of the tiny config's own model (it is checked against the model before testing)."""
    import torch
    from mmdet.registry import MODELS
    from mmengine.config import Config

    from cbn_mmdet.engine.runner_setup import register_modules
    register_modules()
    path = tmp_path_factory.mktemp('ckpt') / 'model.pth'
    torch.save(dict(state_dict=MODELS.build(Config.fromfile(tiny_cbn_config).model).state_dict()), path)
    return str(path)


@pytest.mark.parametrize('metrics', [['bbox'], ['segm'], ['bbox', 'segm'], ['bbox', 'bbox', 'segm']])
def test_eval_replaces_the_coco_metric_list(tiny_cbn_config, checkpoint, tmp_path, metrics):
    cfg = prepare_test_config(tiny_cbn_config, checkpoint, work_dir=str(tmp_path / 'wd'), eval_metrics=metrics)
    assert cfg.test_evaluator.type == 'CocoMetric'
    assert cfg.test_evaluator.metric == list(dict.fromkeys(metrics))
    assert cfg.load_from == checkpoint
    assert not (tmp_path / 'wd').exists()


def test_without_eval_the_config_metric_stays(tiny_cbn_config, checkpoint, tmp_path):
    cfg = prepare_test_config(tiny_cbn_config, checkpoint)
    assert cfg.test_evaluator.metric == ['bbox', 'segm']


def test_eval_on_list_evaluators_and_errors():
    from mmengine.config import Config
    cfg = Config(dict(model=dict(type='MaskRCNN', roi_head=dict(mask_head=dict(type='FCNMaskHead'))),
                      test_evaluator=[dict(type='mmdet.CocoMetric', metric='bbox'),
                                      dict(type='DumpDetResults', out_file_path='x.pkl')]))
    apply_eval_metrics(cfg, ['segm'])
    assert cfg.test_evaluator[0].metric == ['segm'] and 'metric' not in cfg.test_evaluator[1]
    with pytest.raises(ConfigError, match="test_evaluator has type\\(s\\) \\['VOCMetric'\\]"):
        apply_eval_metrics(Config(dict(model=dict(type='MaskRCNN'), test_evaluator=dict(type='VOCMetric'))),
                           ['bbox'])
    faster = Config(dict(model=dict(type='FasterRCNN', roi_head=dict(bbox_head=dict())),
                         test_evaluator=dict(type='CocoMetric', metric=['bbox'])))
    with pytest.raises(ConfigError, match='--eval segm needs a model with a mask branch'):
        apply_eval_metrics(faster, ['bbox', 'segm'])


def test_out_must_be_a_pickle(tiny_cbn_config, checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="--out 'preds.json'"):
        prepare_test_config(tiny_cbn_config, checkpoint, out='preds.json')
