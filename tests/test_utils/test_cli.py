"""The argument-parsing helpers shared by the tools: list types, overrides, the study options."""
import argparse

import pytest

from cbn_mmdet.analysis.small_batch import BenchConfig
from cbn_mmdet.utils.cli import (
    add_study_args,
    choice_list,
    config_error_exit,
    float_list,
    int_list,
    parse_mmdet_tool_args,
    study_config,
)


def test_list_types():
    assert int_list('1,2,16') == (1, 2, 16)
    assert float_list('0.1,1') == (0.1, 1.0)
    with pytest.raises(argparse.ArgumentTypeError, match="'1,x' is not a comma-separated list of ints"):
        int_list('1,x')
    assert choice_list(('bn', 'gn'))('gn,bn') == ('gn', 'bn')
    with pytest.raises(argparse.ArgumentTypeError, match=r"unknown value\(s\) \['ln'\]"):
        choice_list(('bn', 'gn'))('bn,ln')


def _study_parser():
    parser = argparse.ArgumentParser()
    add_study_args(parser, BenchConfig(), ('digits', 'synthetic'))
    parser.add_argument('--seeds', type=int_list)
    parser.add_argument('--epochs', type=float)
    return parser


def test_study_config_defaults_overrides_and_quick():
    parser = _study_parser()
    cfg = study_config(BenchConfig, parser.parse_args([]), ('seeds', 'epochs'))
    assert cfg == BenchConfig()
    cfg = study_config(BenchConfig, parser.parse_args(['--seeds', '4,5', '--threads', '2', '--out', 'o']),
                       ('seeds', 'epochs'))
    assert (cfg.seeds, cfg.threads, cfg.out, cfg.epochs) == ((4, 5), 2, 'o', BenchConfig().epochs)
    quick = study_config(BenchConfig, parser.parse_args(['--quick', '--dataset', 'synthetic', '--epochs', '0.5']),
                         ('seeds', 'epochs'))
    assert quick.dataset == 'synthetic' and quick.epochs == 0.5                  # given options win
    assert quick.batch_sizes == BenchConfig.QUICK['batch_sizes'] != BenchConfig().batch_sizes
    with pytest.raises(SystemExit):
        parser.parse_args(['--dataset', 'imagenet'])


def test_mmdet_tool_args(monkeypatch):
    monkeypatch.delenv('LOCAL_RANK', raising=False)
    parser = argparse.ArgumentParser()
    parser.add_argument('config')
    args = parse_mmdet_tool_args(parser, ['c.py', '--cfg-options', 'a.b=1', 'c=[1,2]', '--launcher', 'pytorch',
                                          '--local-rank', '3'])
    assert args.cfg_options == {'a.b': 1, 'c': [1, 2]} and args.launcher == 'pytorch'
    import os
    assert os.environ['LOCAL_RANK'] == '3'
    monkeypatch.setenv('LOCAL_RANK', '1')               # torchrun's value is kept
    parse_mmdet_tool_args(argparse.ArgumentParser(), ['--local_rank', '5'])
    assert os.environ['LOCAL_RANK'] == '1'
    with pytest.raises(SystemExit):
        parse_mmdet_tool_args(argparse.ArgumentParser(), ['--launcher', 'ssh'])
    assert str(config_error_exit('tools/x.py', ValueError('bad field')).code) == 'tools/x.py: config error: bad field'
