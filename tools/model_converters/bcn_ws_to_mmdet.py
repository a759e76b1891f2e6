"""Convert a BCN+WS ImageNet ResNet released by the BCN authors into the mmdet ResNet of configs/ws/*bcn_ws*.

    python tools/model_converters/bcn_ws_to_mmdet.py rn50_bcn_ws.pth checkpoints/resnet50_bcn_ws_mmdet.pth
    python tools/model_converters/bcn_ws_to_mmdet.py rn101_bcn_ws.pth checkpoints/resnet101_bcn_ws_mmdet.pth \
        --depth 101

The result loads strictly into ``ResNet(norm_cfg=BCN, conv_cfg=WSConv(eps_inside_sqrt=True))`` (checked
before writing). The logic lives in ``cbn_mmdet.converters.bcn_ws``.
"""
import argparse
import os.path as osp
import sys
from importlib.util import find_spec

if find_spec('cbn_mmdet') is None:   # run from a checkout, uninstalled
    sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from cbn_mmdet.converters import check_against_target, convert_bcn_ws_resnet  # noqa: E402
from cbn_mmdet.converters.bcn_ws import build_bcn_ws_resnet  # noqa: E402
from cbn_mmdet.utils.cli import run_converter  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='BCN+WS ImageNet ResNet (released) -> mmdet ResNet (BCN, WSConv)')
    parser.add_argument('src', help='released checkpoint (rn50_bcn_ws.pth / rn101_bcn_ws.pth)')
    parser.add_argument('dst', help='output checkpoint')
    parser.add_argument('--depth', type=int, choices=(50, 101), default=50, help='ResNet depth of src')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run_converter(args.src, args.dst, lambda state: check_against_target(
        convert_bcn_ws_resnet(state), build_bcn_ws_resnet(args.depth).state_dict()))


if __name__ == '__main__':
    main()
