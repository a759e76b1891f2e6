"""Memory measurements of the benchmarks (torch only).

* Persistent state of a norm layer: the bytes of the storages behind its ``state_dict`` tensors, its
  buffers and the tensors it keeps in plain attributes between steps (CBN's packed window and its views;
  the official layer's Python-list window), each storage counted once. The *extra* state of a CBN layer
  is that minus the state of an ``nn.BatchNorm2d`` of the same width.
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
    """Bytes of the distinct storages behind ``tensors``: views of one packed buffer (a state_dict that
    exposes named slices of it) count once, a stride-0 expanded tensor counts its one stored element."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def _attribute_tensors(module):
    """Tensors a module holds in plain attributes (caches, Python-list windows), one level deep."""
    for key, value in vars(module).items():
        if key in ('_parameters', '_buffers', '_modules'):
            continue
        items = value if isinstance(value, (list, tuple)) else (value,)
        for item in items:
            if isinstance(item, torch.Tensor):
                yield item


def module_state_bytes(module):
    """Bytes of ``module``'s own state: state_dict tensors, all buffers, tensors held in attributes
    (e.g. CBN's per-entry offsets and work tensor) and those a module lists in a ``state_tensors()``
    method (the official algorithm's Python-list window, kept in a plain object)."""
    tensors = [t for t in module.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor)]
    tensors += list(module.buffers(recurse=False)) + list(_attribute_tensors(module))
    if callable(getattr(module, 'state_tensors', None)):
        tensors += list(module.state_tensors())
    return _bytes(tensors)


def cbn_extra_bound_bytes(weight_numel, channels, buffer_num, element_size=4):
    """Our budget for the extra memory of one CBN layer: ``n·(3|W| + 2C) + 2|W|`` numbers."""
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
