"""Memory measurements of the benchmarks (torch only).

* Persistent state of a norm layer: the bytes of its ``state_dict`` tensors plus its non-persistent
  buffers (for the official-algorithm reference: its Python-list window). The *extra* state of a CBN
  layer is that minus the state of an ``nn.BatchNorm2d`` of the same width.
* Peak memory of one training step: on CUDA ``torch.cuda.max_memory_allocated`` above the memory
  allocated before the step; on CPU torch's profiler memory timeline (``profile_memory=True``): the
  maximum, over the step, of the bytes of tensors created during the step and still alive (tensors that
  existed before the step — parameters, buffers, inputs — are not counted). ``None`` where the profiler
  cannot give it.
"""
import warnings

import torch

__all__ = ['module_state_bytes', 'peak_step_bytes', 'cbn_extra_bound_bytes']


def _bytes(tensors):
    seen, total = set(), 0
    for t in tensors:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def module_state_bytes(module):
    """Bytes of ``module``'s own persistent state (state_dict + non-persistent buffers + list windows)."""
    tensors = [t for t in module.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor)]
    tensors += list(module.buffers())
    total = _bytes(tensors)
    window_bytes = getattr(module, 'window_bytes', None)
    if callable(window_bytes):
        total += window_bytes()
    return total


def cbn_extra_bound_bytes(weight_numel, channels, buffer_num, element_size=4):
    """The issue's budget for the extra memory of one CBN layer: ``n·(3|W| + 2C) + 2|W|`` numbers."""
    return (buffer_num * (3 * weight_numel + 2 * channels) + 2 * weight_numel) * element_size


def peak_step_bytes(step, device='cpu'):
    """Peak bytes allocated while ``step()`` runs, above what was allocated before (see module doc)."""
    device = torch.device(device)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type != 'cpu':
        return None
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import Action
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                         with_stack=True) as prof:
                step()
            timeline = prof._memory_profile().timeline
    except Exception:   # a private API: absent or changed in another torch version
        return None
    live = peak = 0
    for _, action, _, size in timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak
