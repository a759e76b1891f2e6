"""``python -m cbn_mmdet.datasets [OUT_DIR] [--seed S] ...``: generate (or reuse) the synthetic dataset."""
from .synthetic_coco import main

main()
