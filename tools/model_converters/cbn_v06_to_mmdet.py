"""Convert an official CBN detector checkpoint (mmdetection v0.6 fork) into the mmdet 3.x model of a config.

    python tools/model_converters/cbn_v06_to_mmdet.py official_faster_cbn.pth \
        configs/cbn/faster_rcnn_r50_fpn_cbn_buffer3_burnin8_1x.py work_dirs/converted/faster_cbn.pth

The config decides the target keys; the result is checked against the model it builds (every key,
every shape) before it is written. The logic lives in ``cbn_mmdet.converters.cbn_detector``.
"""
import argparse
import os.path as osp
import sys
from importlib.util import find_spec

if find_spec('cbn_mmdet') is None:   # run from a checkout, uninstalled
    sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from cbn_mmdet.converters import convert_cbn_v06_detector  # noqa: E402
from cbn_mmdet.converters.cbn_detector import build_config_model  # noqa: E402
from cbn_mmdet.utils.cli import run_converter  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='official CBN detector (mmdet v0.6) -> mmdet 3.x of a config')
    parser.add_argument('src', help='official checkpoint')
    parser.add_argument('config', help='our config of the same detector (e.g. configs/cbn/...cbn...py)')
    parser.add_argument('dst', help='output checkpoint')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run_converter(args.src, args.dst, lambda state: convert_cbn_v06_detector(
        state, build_config_model(args.config).state_dict()))


if __name__ == '__main__':
    main()
