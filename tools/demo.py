"""End-to-end demo: synthetic data -> train baseline/CBN (+GN, SyncBN if time allows) -> evaluate.

    .venv/bin/python tools/demo.py [--work-dir work_dirs/demo] [--variants baseline cbn gn syncbn]
                                   [--budget 540]

Usually started as ``bash tools/demo.sh`` (which first sets up .venv). About 10 minutes on 2 CPU
cores; writes results.md, results.json and loss_curves.png into the work dir. The logic lives in
``cbn_mmdet.apis.demo``.
"""
import os.path as osp
import sys
import warnings

# setuptools<82 (needed by mmengine/mmcv) warns about pkg_resources on every import: keep the console readable
warnings.filterwarnings('ignore', message='pkg_resources is deprecated')
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))   # run from a checkout, uninstalled

from cbn_mmdet.apis.demo import main  # noqa: E402

if __name__ == '__main__':
    main()
