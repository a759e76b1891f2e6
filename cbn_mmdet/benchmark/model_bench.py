"""Whole-detector training-step benchmark: Mask R-CNN R-50-FPN with each norm of the CBN paper.

Needs mmdet/mmengine/mmcv (imported here only; ``cbn_mmdet.benchmark`` itself does not import this module).
Every model is built from ``configs/cbn/`` — the paper's detector with the norm in the FPN, the 4conv1fc box
head and the 4-conv mask head — with the backbone's ``init_cfg`` dropped (no download; random weights do
not change the cost). All models see the same two images and the same ground truth, with the same seed
before each step so that RoI sampling is as alike as the models allow (the RoI counts are reported).
Steps of the models are interleaved (one step of each model per round, the order rotated) after a
warm-up that fills CBN's window, and the median is reported. A step is data preprocessing, forward with
losses, backward and an SGD step.

The caller passes where the configs are (``config_dir``: the checkout's ``configs/cbn``) and, for the
``CBN-official`` variant, the official algorithm as a factory ``official(num_features, **cbn_args)``
returning a module called as ``norm(x, conv_weight)`` (the package ships no reference layers).
"""
import copy
import os.path as osp
import statistics
import time

import torch
import torch.nn as nn

from ..ops import CrossIterationBatchNorm2d, bind_cbn_convs
from .memory import module_state_bytes, peak_step_bytes
from .norm_bench import BNPlusWeightGrad

__all__ = ['MODEL_VARIANTS', 'DEFAULT_VARIANTS', 'build_detector', 'run_model_benchmark']

_CFG = 'mask_rcnn_r50_fpn_{}_1x.py'

# name -> (paper config, modification); 'BN' is derived from the SyncBN config with type='BN'. 'BN+wgrad' is
# exact CBN's compute floor: BN in every CBN layer's place, each also computing its conv's dν/dW (the one
# weight-gradient exact CBN adds) and discarding it.
MODEL_VARIANTS = {
    'baseline': ('baseline', None),
    'BN': ('syncbn', 'bn'),
    'SyncBN': ('syncbn', None),
    'GN': ('gn', None),
    'CBN': ('cbn_buffer3_burnin8', None),
    'CBN-fast': ('cbn_buffer3_burnin8', 'fast'),
    'CBN-official': ('cbn_buffer3_burnin8', 'official'),
    'BN+wgrad': ('cbn_buffer3_burnin8', 'wgrad'),
}
DEFAULT_VARIANTS = tuple(MODEL_VARIANTS)
FAST_SAMPLE = 0.25


class _OfficialCBNAdapter(nn.Module):
    """Calls the official algorithm's module with the weight of the conv that a CBN layer was bound to."""

    def __init__(self, cbn, conv, official):
        super().__init__()
        self.cbn = official(cbn.num_features, buffer_num=cbn.buffer_num, rho=cbn.rho, burnin=cbn.burnin,
                            eps=cbn.eps, momentum=cbn.momentum)
        self._conv = (conv,)      # a tuple: not a submodule (the conv is owned by its parent)
        if cbn.is_bound:          # the replaced layer must no longer capture the conv's input
            cbn.unbind()

    def forward(self, x):
        return self.cbn(x, self._conv[0].weight)


def _set_norm(cfg, norm_cfg):
    cfg.model.neck.norm_cfg = norm_cfg
    cfg.model.roi_head.bbox_head.norm_cfg = copy.deepcopy(norm_cfg)
    cfg.model.roi_head.mask_head.norm_cfg = copy.deepcopy(norm_cfg)


def build_detector(variant, config_dir, device='cpu', rois_per_image=None, official=None):
    """The detector of ``variant`` (see ``MODEL_VARIANTS``) from the paper's configs in ``config_dir``, in
    train mode, on ``device``.

    ``rois_per_image`` overrides the RoI sampler's ``num`` (the paper's 512; fewer keeps a CPU run short);
    ``official`` is the factory of the ``CBN-official`` variant (module doc).
    """
    from mmdet.registry import MODELS
    from mmengine.config import Config
    if variant not in MODEL_VARIANTS:
        raise ValueError(f'variant {variant!r}: unknown; choose from {", ".join(MODEL_VARIANTS)}')
    config, change = MODEL_VARIANTS[variant]
    if change == 'official' and official is None:
        raise ValueError("variant 'CBN-official': no official-algorithm factory given (official=None)")
    cfg = Config.fromfile(osp.join(config_dir, _CFG.format(config)))
    cfg.model.backbone.init_cfg = None
    if rois_per_image is not None:
        cfg.model.train_cfg.rcnn.sampler.num = rois_per_image
    if change == 'bn':
        _set_norm(cfg, dict(type='BN', requires_grad=True))
    elif change == 'fast':
        norm_cfg = copy.deepcopy(cfg.model.neck.norm_cfg)
        norm_cfg['stat_grad_sample'] = FAST_SAMPLE
        _set_norm(cfg, norm_cfg)
    model = MODELS.build(cfg.model)
    if change in ('official', 'wgrad'):
        bind_cbn_convs(model)              # the layers not bound when the model was built
        cbn_layers = [(name, m) for name, m in model.named_modules() if isinstance(m, CrossIterationBatchNorm2d)]
        for name, cbn in cbn_layers:
            if cbn.bound_conv is None:
                raise RuntimeError(f"CBN layer '{name}' has no bound conv: cannot replace it ({variant})")
            parent_name, _, child = name.rpartition('.')
            setattr(model.get_submodule(parent_name), child, _replacement(change, cbn, official))
        if not cbn_layers:
            raise RuntimeError(f'variant {variant!r}: the config builds no CBN layer to replace')
    return model.to(device).train()


def _replacement(change, cbn, official):
    conv = cbn.bound_conv
    if change == 'official':
        return _OfficialCBNAdapter(cbn, conv, official)
    cbn.unbind()                          # the replaced layer must no longer capture the conv's input
    return BNPlusWeightGrad(cbn.num_features, conv)


def _inputs(device):
    from mmdet.testing import demo_mm_inputs
    torch.manual_seed(0)
    return demo_mm_inputs(2, [[3, 320, 480], [3, 320, 480]], num_items=[8, 8], num_classes=80, with_mask=True,
                          device=device)


class _RoICounter:
    """Counts the RoIs that reach the box and mask heads (to show that the workloads are alike)."""

    def __init__(self, model):
        self.box, self.mask = [], []
        model.roi_head.bbox_head.register_forward_pre_hook(lambda m, a: self.box.append(a[0].shape[0]))
        model.roi_head.mask_head.register_forward_pre_hook(lambda m, a: self.mask.append(a[0].shape[0]))


def run_model_benchmark(config_dir, variants=DEFAULT_VARIANTS, repeats=3, warmup=3, device='cpu', measure_peak=True,
                        rois_per_image=None, log=None, official=None):
    """Return ``{variant: dict(times_s, peak_bytes, box_rois, mask_rois, params)}`` (arguments: see
    :func:`build_detector`)."""
    from mmdet.utils import register_all_modules

    import cbn_mmdet  # noqa: F401  (registers the layers)
    register_all_modules()
    packed = _inputs(device)
    models, optims, counters = {}, {}, {}
    for name in variants:
        torch.manual_seed(0)
        models[name] = build_detector(name, config_dir, device, rois_per_image, official)
        optims[name] = torch.optim.SGD(models[name].parameters(), lr=1e-4, momentum=0.9)
        counters[name] = _RoICounter(models[name])

    def step(name, seed):
        model, optim = models[name], optims[name]
        torch.manual_seed(seed)
        data = model.data_preprocessor(packed, True)
        losses = model(**data, mode='loss')
        loss, _ = model.parse_losses(losses)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    cuda = torch.device(device).type == 'cuda'

    def timed(name, seed):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(name, seed)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    results = {name: dict(times_s=[], peak_bytes=None) for name in variants}
    for i in range(warmup):
        for name in variants:
            step(name, seed=i)
        if log:
            log(f'  warm-up step {i + 1}/{warmup} done')
    for name in variants:
        counters[name].box.clear()
        counters[name].mask.clear()
    for r in range(repeats):
        for i in range(len(variants)):
            name = variants[(i + r) % len(variants)]
            results[name]['times_s'].append(timed(name, seed=warmup + r))
        if log:
            log(f'  round {r + 1}/{repeats}: ' + ', '.join(f'{n} {results[n]["times_s"][-1]:.2f} s'
                                                         for n in variants))
    for name in variants:
        res = results[name]
        res['median_s'] = statistics.median(res['times_s'])
        res['box_rois'] = statistics.mean(counters[name].box) if counters[name].box else 0
        res['mask_rois'] = statistics.mean(counters[name].mask) if counters[name].mask else 0
        res['params'] = sum(p.numel() for p in models[name].parameters())
        res['norm_state_bytes'] = _head_norm_state_bytes(models[name])
        if measure_peak:
            res['peak_bytes'] = peak_step_bytes(lambda: step(name, seed=warmup + repeats), device)
    return results


def _head_norm_state_bytes(model):
    """Persistent state of the norm layers in the FPN and the RoI heads (the backbone's is common to all)."""
    from torch.nn.modules.batchnorm import _NormBase
    total = 0
    for part in (model.neck, model.roi_head):
        for module in part.modules():
            if isinstance(module, (_NormBase, nn.GroupNorm)):
                total += module_state_bytes(module)
            elif isinstance(module, _OfficialCBNAdapter):
                total += module_state_bytes(module.cbn)
    return total


def model_rows(results):
    from .report import fmt_bytes
    bn = results.get('BN')
    base = results.get('baseline')
    rows = []
    for name, res in results.items():
        rows.append([name, f"{res['median_s']:.2f}",
                     f"{res['median_s'] / bn['median_s']:.2f}x" if bn else '',
                     f"{res['median_s'] / base['median_s']:.2f}x" if base else '',
                     fmt_bytes(res['peak_bytes']), fmt_bytes(res['norm_state_bytes']),
                     f"{res['box_rois']:.0f} / {res['mask_rois']:.0f}"])
    header = ['config', 'step s (median)', 'x BN config', 'x baseline', 'step peak memory',
              'norm state (FPN + heads)', 'RoIs box / mask']
    return header, rows
