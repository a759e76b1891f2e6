# SyncBN row: BN whose batch statistics are all-reduced over all GPUs (16 images), the paper's
# large-batch reference. `SyncBN` is cbn_mmdet's subclass of torch.nn.SyncBatchNorm: torch's own code
# on CUDA, and it also runs on CPU / a single process (where it is plain BN).
# A leaf places `norm_cfg` (as `_base_.norm_cfg`) into the FPN and the RoI heads.
norm_cfg = dict(type='SyncBN', requires_grad=True)
