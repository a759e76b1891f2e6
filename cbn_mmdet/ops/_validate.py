"""Argument checks shared by the norm cores.

Every check raises a one-line ``ValueError``/``TypeError`` that names the offending argument and the
value received, so a typo in a config surfaces at build time and never as NaNs hours later. They are
plain functions (never ``assert``: asserts vanish under ``python -O``).
"""
import math
import numbers

import torch

__all__ = [
    'check_positive_int', 'check_non_negative_int', 'check_eps', 'check_unit_interval', 'check_finite',
    'check_input_dim', 'check_divides',
]


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive_int(name, value, owner='layer'):
    if not _is_int(value):
        raise TypeError(f'{owner}: {name} must be an int, got {value!r} ({type(value).__name__})')
    if value <= 0:
        raise ValueError(f'{owner}: {name} must be a positive int, got {value!r}')
    return int(value)


def check_non_negative_int(name, value, owner='layer'):
    if not _is_int(value):
        raise TypeError(f'{owner}: {name} must be an int, got {value!r} ({type(value).__name__})')
    if value < 0:
        raise ValueError(f'{owner}: {name} must be >= 0, got {value!r}')
    return int(value)


def check_finite(name, value, owner='layer'):
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f'{owner}: {name} must be a real number, got {value!r} ({type(value).__name__})')
    if not math.isfinite(value):
        raise ValueError(f'{owner}: {name} must be finite, got {value!r}')
    return float(value)


def check_eps(value, owner='layer', name='eps'):
    """A strictly positive, finite epsilon.

    ``eps = 0`` is refused although torch's BN accepts it: a constant channel (or a constant filter
    for WS) then divides 0 by 0 and gives NaN, and cuDNN's batch norm requires eps >= 1e-5 anyway.
    """
    number = check_finite(name, value, owner)
    if number <= 0:
        raise ValueError(f'{owner}: {name} must be > 0, got {value!r}')
    return number


def check_unit_interval(name, value, owner='layer', allow_none=False):
    """``value`` in [0, 1] (``None`` allowed where torch allows a cumulative average)."""
    if value is None and allow_none:
        return None
    value = check_finite(name, value, owner)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f'{owner}: {name} must be in [0, 1], got {value!r}')
    return value


def check_divides(divisor_name, divisor, total_name, total, owner='layer'):
    if total % divisor != 0:
        raise ValueError(f'{owner}: {divisor_name}={divisor!r} must divide {total_name}={total!r}')


def check_input_dim(x, expected_dims, owner='layer'):
    """Raise if ``x.dim()`` is not one of ``expected_dims`` (e.g. ``(4,)`` for a 2d norm)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f'{owner}: input must be a torch.Tensor, got {type(x).__name__}')
    if x.dim() not in expected_dims:
        want = ' or '.join(f'{d}D' for d in expected_dims)
        raise ValueError(f'{owner}: expected {want} input (N, C, H, W), got {x.dim()}D input of '
                         f'shape {tuple(x.shape)}')
