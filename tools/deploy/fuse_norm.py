#!/usr/bin/env python
"""Fold eval-mode norm layers into their convs and verify: tools/deploy/fuse_norm.py CONFIG [CKPT] [--out F]."""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..')))

from cbn_mmdet.deploy.fuse_tool import main  # noqa: E402

if __name__ == '__main__':
    main()
