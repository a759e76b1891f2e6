"""Mixed-precision helpers shared by the norm cores: statistics are always computed in float32+."""
import contextlib

import torch

__all__ = ['autocast_off', 'compute_dtype']


def autocast_off(device_type):
    """Autocast must not re-cast the statistics ops to half precision: disable it where it exists."""
    is_available = getattr(torch.amp, 'is_autocast_available', None)  # torch >= 2.4
    available = is_available(device_type) if is_available is not None else device_type in ('cpu', 'cuda')
    if available:
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def compute_dtype(dtype):
    """float32 for half/bfloat16 inputs (statistics lose too much in 8-10 mantissa bits), else as is.

    Plain Python (``torch.promote_types`` is a dispatcher call: one more op per layer per step)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
