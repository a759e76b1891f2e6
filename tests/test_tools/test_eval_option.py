"""tools/test.py --eval (mmdet 2.x style) maps onto the CocoMetric of test_evaluator."""
import pytest

from cbn_mmdet.apis.test import COCO_METRICS, apply_eval_metrics, main, parse_test_args, prepare_test_config
from cbn_mmdet.apis.validate import ConfigError


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / 'model.pth'
    path.write_bytes(b'')      # only its existence is checked before building
    return str(path)


@pytest.mark.parametrize('metrics', [['bbox'], ['segm'], ['bbox', 'segm'], ['bbox', 'bbox', 'segm']])
def test_eval_replaces_the_coco_metric_list(tiny_cbn_config, checkpoint, tmp_path, metrics):
    args = parse_test_args([tiny_cbn_config, checkpoint, '--work-dir', str(tmp_path / 'wd'), '--eval', *metrics])
    cfg = prepare_test_config(args)
    assert cfg.test_evaluator.type == 'CocoMetric'
    assert cfg.test_evaluator.metric == list(dict.fromkeys(metrics))
    assert cfg.load_from == checkpoint
    assert not (tmp_path / 'wd').exists()


def test_without_eval_the_config_metric_stays(tiny_cbn_config, checkpoint, tmp_path):
    cfg = prepare_test_config(parse_test_args([tiny_cbn_config, checkpoint]))
    assert cfg.test_evaluator.metric == ['bbox', 'segm']


def test_bad_metric_is_one_clear_error_before_anything(tiny_cbn_config, tmp_path):
    work_dir = tmp_path / 'wd'
    # neither the checkpoint nor the config is looked at: the metric is refused first
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / 'no_config.py'), str(tmp_path / 'no.pth'), '--work-dir', str(work_dir),
              '--eval', 'bbox', 'mAP'])
    message = str(info.value.code)
    assert "unsupported metric(s) ['mAP']" in message
    assert 'supported (CocoMetric): ' + ', '.join(COCO_METRICS) in message
    assert not work_dir.exists()


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
        prepare_test_config(parse_test_args([tiny_cbn_config, checkpoint, '--out', 'preds.json']))
