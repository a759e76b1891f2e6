# Runtime shared by every cbn_mmdet config: mmdet's own defaults (logging, checkpoint every epoch,
# default_scope='mmdet', env_cfg with the nccl backend) plus the import that registers our layers.
_base_ = 'mmdet::_base_/default_runtime.py'

# `import cbn_mmdet` registers CBN, SyncCBN, SyncBN, BCN, MABN, WSConv, CenConv and CBNBurnInHook in
# mmengine's root registries; failing loudly beats silently training without the layer.
custom_imports = dict(imports=['cbn_mmdet'], allow_failed_imports=False)
