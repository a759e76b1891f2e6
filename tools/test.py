"""Test (and evaluate) a detector: mmdet 3.x's ``tools/test.py`` with cbn_mmdet's layers registered.

Same arguments as mmdet's (config, checkpoint, --work-dir, --out, --show, --show-dir, --cfg-options,
--launcher, --tta), plus mmdet 2.x's ``--eval bbox segm`` (mapped onto the CocoMetric of
``test_evaluator``). The logic lives in ``cbn_mmdet.apis.test``.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))   # run from a checkout, uninstalled

from cbn_mmdet.apis.test import main  # noqa: E402

if __name__ == '__main__':
    main()
