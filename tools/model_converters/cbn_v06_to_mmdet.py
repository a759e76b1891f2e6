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

from cbn_mmdet.converters import (  # noqa: E402
    ConversionError,
    convert_cbn_v06_detector,
    load_state_dict,
    save_state_dict,
)
from cbn_mmdet.converters.cbn_detector import build_config_model  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='official CBN detector (mmdet v0.6) -> mmdet 3.x of a config')
    parser.add_argument('src', help='official checkpoint')
    parser.add_argument('config', help='our config of the same detector (e.g. configs/cbn/...cbn...py)')
    parser.add_argument('dst', help='output checkpoint')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        target = build_config_model(args.config).state_dict()
        converted = convert_cbn_v06_detector(load_state_dict(args.src), target)
    except ConversionError as error:
        sys.exit(f'{args.src}: {error}')
    save_state_dict(converted, args.dst, meta=dict(converted_from=osp.basename(args.src)))
    print(f'wrote {args.dst} ({len(converted)} tensors)')


if __name__ == '__main__':
    main()
