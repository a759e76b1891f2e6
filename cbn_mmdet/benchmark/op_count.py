"""Counting the aten operators a norm layer costs per training step (deterministic, any device).

Wall-clock time of a small layer is dominated by per-operator overhead (kernel launches, dispatcher),
so the number of aten calls is a machine-independent proxy for it. The count is taken with a
``TorchDispatchMode``: it sees each operator that reaches the dispatcher from Python or from autograd,
but not the operators a kernel calls internally (the mode is disabled inside ``__torch_dispatch__``),
i.e. exactly the top-level aten ops.

A norm step is measured as ``ops(conv + norm) − ops(conv alone)`` (forward, ``sum`` loss and
backward each time, gradients cleared before, as a training loop clears them), so the conv's own forward
and backward are excluded but every extra conv-shaped op the norm issues (CBN's ∂ν/∂W weight-gradient)
is counted.
"""
from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ['AtenOpCounter', 'count_aten_ops', 'norm_step_op_count']

# Bookkeeping "ops" that do no work (views of metadata only are still counted: they are dispatcher calls).
_IGNORED = ('aten.detach.default',)


class AtenOpCounter(TorchDispatchMode):
    """``with AtenOpCounter() as c: ...`` then ``c.counts`` is a ``Counter`` of aten op names."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name not in _IGNORED:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self):
        return sum(self.counts.values())


def count_aten_ops(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` and return ``(result, Counter of top-level aten ops)``."""
    with AtenOpCounter() as counter:
        result = fn(*args, **kwargs)
    return result, counter.counts


def _train_step(conv, norm, x):
    # Gradients cleared first, as a training loop's ``optimizer.zero_grad()`` (set_to_none) leaves them:
    # backward then stores each parameter's gradient instead of adding it to the last step's.
    for module in (conv, norm):
        for p in ([] if module is None else module.parameters()):
            p.grad = None
    out = conv(x) if norm is None else norm(conv(x))
    out.sum().backward()


def norm_step_op_count(conv, norm, x):
    """Top-level aten ops of one training step of ``norm`` fed by ``conv`` (conv excluded).

    Returns ``(total, Counter)`` where the Counter is the per-op difference (norm's share).
    """
    _, with_norm = count_aten_ops(_train_step, conv, norm, x)
    _, conv_only = count_aten_ops(_train_step, conv, None, x)
    diff = Counter(with_norm)
    diff.subtract(conv_only)
    diff = Counter({k: v for k, v in diff.items() if v != 0})
    return sum(diff.values()), diff
