"""Fuse a whole detector: build it from a config, load a checkpoint, fold its norms, verify the result."""
import copy

import torch

__all__ = ['build_detector', 'verify_fused', 'fuse_detector']


def build_detector(config, checkpoint=None, allow_partial_load=False, log=None):
    """The eval-mode detector of ``config`` (mmdet registry), with ``checkpoint`` loaded when given.

    A checkpoint of another model (missing/unexpected keys, other shapes) raises a ``ConfigError``
    naming it, unless ``allow_partial_load``: verifying a half-loaded model against itself proves nothing.
    """
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.runner import load_checkpoint

    import cbn_mmdet  # noqa: F401  (registration)
    from cbn_mmdet.engine.checkpoint import trusted_checkpoints
    from cbn_mmdet.engine.checkpoint_match import check_checkpoint_matches
    from cbn_mmdet.engine.runner_setup import read_config_file

    register_all_modules()
    model_cfg = read_config_file(config).model
    model = MODELS.build(copy.deepcopy(model_cfg))
    if checkpoint:
        if '://' not in checkpoint:
            check_checkpoint_matches(MODELS.build(copy.deepcopy(model_cfg)), checkpoint,
                                     allow_partial=allow_partial_load, log=log)
        with trusted_checkpoints(paths=[checkpoint]):
            load_checkpoint(model, checkpoint, map_location='cpu')
    return model.eval()


def verify_fused(model, fused, shape, seed=0):
    """Max abs difference of the backbone+neck features of the two models on a random batch."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, *shape, generator=gen)
    with torch.no_grad():
        ref, out = model.extract_feat(x), fused.extract_feat(x)
    ref = ref if isinstance(ref, (tuple, list)) else (ref, )
    out = out if isinstance(out, (tuple, list)) else (out, )
    return max(float((a - b).abs().max()) for a, b in zip(ref, out))


def fuse_detector(config, checkpoint=None, shape=(320, 320), allow_partial_load=False, log=None):
    """``(fused model, report, max abs difference)``: the detector of ``config`` with its eval-mode norms
    folded into their convs (``fuse_norm_layers``'s report) and the verification against the unfused one."""
    from .fuse_norm import fuse_norm_layers
    model = build_detector(config, checkpoint, allow_partial_load=allow_partial_load, log=log)
    fused = copy.deepcopy(model)
    report = fuse_norm_layers(fused)
    return fused, report, verify_fused(model, fused, tuple(shape))
