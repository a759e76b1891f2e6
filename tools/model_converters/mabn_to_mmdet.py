"""Convert an official MABN state_dict (MABN2d layers) into ours (``MovingAverageBatchNorm2d``, type ``MABN``).

    python tools/model_converters/mabn_to_mmdet.py official_mabn.pth converted.pth [--config CONFIG]

With ``--config`` (e.g. configs/mabn/mask_rcnn_r50_fpn_mabn_cenconv_scratch_2x.py) the result is checked
key by key and shape by shape against the model that config builds. The logic lives in
``cbn_mmdet.converters.mabn``.
"""
import argparse
import os.path as osp
import sys
from importlib.util import find_spec

if find_spec('cbn_mmdet') is None:   # run from a checkout, uninstalled
    sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from cbn_mmdet.converters import check_against_target, convert_mabn  # noqa: E402
from cbn_mmdet.converters.cbn_detector import build_config_model  # noqa: E402
from cbn_mmdet.utils.cli import run_converter  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='official MABN2d state_dict -> cbn_mmdet MABN')
    parser.add_argument('src', help='official checkpoint')
    parser.add_argument('dst', help='output checkpoint')
    parser.add_argument('--config', help='check the result against the model of this config')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)

    def convert(state):
        converted = convert_mabn(state)
        if args.config:
            converted = check_against_target(converted, build_config_model(args.config).state_dict())
        return converted

    run_converter(args.src, args.dst, convert)


if __name__ == '__main__':
    main()
